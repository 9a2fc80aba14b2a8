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
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/covidcxr demo --out demo_output

test: $(STAMP) browser orthanc
	$(PY) -m pytest -q

# The end-to-end page test drives Debian's Chromium (Playwright's own browser download cannot work offline).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      chromium chromium-driver; \
	  else \
	    echo "note: /usr/bin/chromium is missing and apt-get needs root; the browser test will be skipped"; \
	  fi; \
	fi

# The PACS tests run `covidcxr pacs` against a real Orthanc with its DICOMweb plugin (Debian packages).
orthanc:
	@if ! command -v Orthanc >/dev/null && [ ! -x /usr/sbin/Orthanc ] || \
	    ! ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so* >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      orthanc orthanc-dicomweb; \
	  else \
	    echo "note: Orthanc or its DICOMweb plugin is missing and apt-get needs root; the PACS tests will be skipped"; \
	  fi; \
	fi

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

clean-venv:
	rm -rf $(VENV)
