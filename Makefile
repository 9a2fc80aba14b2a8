# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install lint clean-venv browser orthanc

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the project metadata changes; the stamp keeps repeat runs fast.
$(STAMP): $(VENV)/bin/python pyproject.toml
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[train,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/covidcxr demo --out demo_output

test: $(STAMP) browser orthanc
	$(PY) -m pytest -q

# $(call apt_install,CHECK,PACKAGES,WHAT,SKIPPED): install Debian packages when the shell test CHECK fails (as root,
# as CI runs); otherwise say what is missing and which tests will skip.
define apt_install
	@if ! { $(1); }; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(2); \
	  else \
	    echo "note: $(3) missing and apt-get needs root; $(4) will be skipped"; \
	  fi; \
	fi
endef

# The end-to-end page test drives Debian's Chromium (Playwright's own browser download cannot work offline).
browser:
	$(call apt_install,[ -x /usr/bin/chromium ],chromium chromium-driver,/usr/bin/chromium is,the browser test)

# The PACS tests run `covidcxr pacs` against a real Orthanc with its DICOMweb plugin (Debian packages).
ORTHANC_PRESENT = { command -v Orthanc >/dev/null || [ -x /usr/sbin/Orthanc ]; } && ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so* >/dev/null 2>&1
orthanc:
	$(call apt_install,$(ORTHANC_PRESENT),orthanc orthanc-dicomweb,Orthanc or its DICOMweb plugin is,the PACS tests)

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

clean-venv:
	rm -rf $(VENV)
