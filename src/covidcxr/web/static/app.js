// covidcxr page: upload one image, show the analysis. Plain JS, no build step, no third-party code.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const LABELS = { covid: "COVID-19 pattern", non_covid: "No COVID-19 pattern" };
  let maxMb = 50;

  function pct(x, digits = 0) {
    return (100 * x).toFixed(digits) + "%";
  }

  function show(el, visible) {
    el.hidden = !visible;
  }

  function setStatus(text) {
    $("status").textContent = text || "";
    show($("status"), Boolean(text));
  }

  function setError(text) {
    $("error").textContent = text || "";
    show($("error"), Boolean(text));
  }

  function reset() {
    show($("viewer"), false);
    show($("toggles"), false);
    show($("drop-zone"), true);
    show($("findings"), false);
    show($("findings-empty"), true);
    $("cases-grid").replaceChildren();
    show($("cases-empty"), true);
    $("cases-caption").textContent = "";
    $("file-input").value = "";
    setError("");
    setStatus("");
  }

  async function loadHealth() {
    try {
      const r = await fetch("/healthz");
      if (r.ok) {
        const h = await r.json();
        $("model-version").textContent = "model " + h.model + " · " + h.index_cases + " archived cases";
        if (h.max_upload_mb) {
          maxMb = h.max_upload_mb;
          $("max-mb").textContent = String(maxMb);
        }
      }
    } catch (e) {
      /* the page still works without it */
    }
  }

  async function analyze(file) {
    setError("");
    if (file.size > maxMb * 1e6) {
      setError("The file is larger than the " + maxMb + " MB limit.");
      return;
    }
    setStatus("Analysing " + (file.size / 1e6).toFixed(1) + " MB…");
    $("drop-zone").classList.add("busy");
    const form = new FormData();
    form.append("file", file);
    try {
      const r = await fetch("/api/v1/analyze", { method: "POST", body: form });
      let body = null;
      try {
        body = await r.json();
      } catch (e) {
        body = null;
      }
      if (!r.ok) {
        const reason = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : r.statusText;
        setError("The image was not analysed (" + r.status + "): " + reason);
        return;
      }
      render(body);
    } catch (e) {
      setError("The server could not be reached: " + e.message);
    } finally {
      setStatus("");
      $("drop-zone").classList.remove("busy");
    }
  }

  function render(res) {
    const ov = res.overlays;
    $("layer-image").src = "data:image/png;base64," + ov.image_png;
    if (ov.heatmap_png) $("layer-heat").src = "data:image/png;base64," + ov.heatmap_png;
    else $("layer-heat").removeAttribute("src");
    $("layer-outline").src = "data:image/png;base64," + ov.lung_outline_png;
    $("stack").style.aspectRatio = ov.width + " / " + ov.height;
    applyToggles();
    const im = res.image || {};
    const facts = [];
    if (im.format) facts.push(im.format.toUpperCase());
    if (im.width) facts.push(im.width + " × " + im.height + " px");
    if (im.view && im.view !== "unknown") facts.push(im.view);
    $("image-facts").textContent = facts.join(" · ");
    show($("drop-zone"), false);
    show($("viewer"), true);
    show($("toggles"), true);

    // Findings. No verdict at all when the input gate found no usable frontal chest X-ray.
    const p = res.probability;
    const t = res.threshold;
    const chip = $("label");
    if (res.status === "no_result") {
      $("probability").textContent = "No result";
      chip.textContent = res.no_result_reason || "no result: not a usable frontal chest X-ray";
      chip.className = "label-chip chip-none";
      $("prob-fill").style.width = "0%";
      $("prob-fill").className = "prob-fill";
    } else {
      $("probability").textContent = pct(p, 1);
      chip.textContent = (p >= t ? "Above threshold · " : "Below threshold · ") + (LABELS[res.label] || res.label);
      chip.className = "label-chip " + (res.label === "covid" ? "chip-pos" : "chip-neg");
      $("prob-fill").style.width = pct(Math.min(Math.max(p, 0), 1), 2);
      $("prob-fill").className = "prob-fill " + (p >= t ? "fill-pos" : "fill-neg");
    }
    $("threshold-marker").style.left = pct(t, 2);
    $("threshold-text").textContent = "threshold " + pct(t, 0);
    $("threshold").textContent = pct(t, 1);
    const e = res.lung_energy_fraction;
    $("lung-energy").textContent = e === null || e === undefined ? "n/a" : pct(e, 0) + (e < 0.5 ? " — the model looked mostly outside the lungs" : "");
    $("lung-energy").className = e !== null && e !== undefined && e < 0.5 ? "warn-text" : "";
    $("lung-fraction").textContent = pct(res.lung_fraction, 0) + " of the image";

    const qc = $("qc-list");
    qc.replaceChildren();
    const warnings = [];
    for (const f of res.qc_flags || []) warnings.push((res.qc_messages && res.qc_messages[f]) || f);
    for (const w of im.warnings || []) warnings.push(w);
    for (const w of warnings) {
      const li = document.createElement("li");
      li.textContent = w;
      qc.appendChild(li);
    }
    show($("qc-box"), warnings.length > 0);
    show($("qc-ok"), (res.qc_flags || []).length === 0 && res.status !== "no_result");
    show($("findings-empty"), false);
    show($("findings"), true);
    if (!$("model-version").textContent) $("model-version").textContent = "model " + res.model.version;

    renderCases(res.similar_cases || []);
  }

  function renderCases(cases) {
    const grid = $("cases-grid");
    grid.replaceChildren();
    for (const c of cases) {
      const tile = document.createElement("figure");
      tile.className = "case-tile";
      const img = document.createElement("img");
      img.loading = "lazy";
      img.alt = "Case " + c.case_id;
      img.src = c.thumbnail_url;
      img.addEventListener("error", () => img.classList.add("missing"));
      const cap = document.createElement("figcaption");
      const label = document.createElement("span");
      label.className = "label-chip small " + (c.label === "covid" ? "chip-pos" : "chip-neg");
      label.textContent = LABELS[c.label] ? (c.label === "covid" ? "COVID-19" : "non-COVID") : c.label;
      const sim = document.createElement("span");
      sim.className = "similarity";
      sim.textContent = "similarity " + c.score.toFixed(3);
      const who = document.createElement("div");
      who.className = "muted case-meta";
      who.textContent = "#" + c.rank + " · patient " + c.patient_id + (c.view ? " · " + c.view : "");
      cap.append(label, sim, who);
      tile.append(img, cap);
      grid.appendChild(tile);
    }
    show($("cases-empty"), cases.length === 0);
    $("cases-caption").textContent = cases.length ? cases.length + " nearest by image embedding" : "";
  }

  function applyToggles() {
    show($("layer-outline"), $("toggle-outline").checked);
    show($("layer-heat"), $("toggle-heat").checked);
  }

  function init() {
    const zone = $("drop-zone");
    const input = $("file-input");
    $("choose-button").addEventListener("click", (ev) => {
      ev.stopPropagation();
      input.click();
    });
    zone.addEventListener("click", () => input.click());
    zone.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") {
        ev.preventDefault();
        input.click();
      }
    });
    input.addEventListener("change", () => {
      if (input.files && input.files[0]) analyze(input.files[0]);
    });
    for (const name of ["dragenter", "dragover"]) {
      zone.addEventListener(name, (ev) => {
        ev.preventDefault();
        zone.classList.add("dragging");
      });
    }
    for (const name of ["dragleave", "drop"]) {
      zone.addEventListener(name, (ev) => {
        ev.preventDefault();
        zone.classList.remove("dragging");
      });
    }
    zone.addEventListener("drop", (ev) => {
      const files = ev.dataTransfer && ev.dataTransfer.files;
      if (files && files.length) analyze(files[0]);
    });
    // A file dropped outside the zone must not make the browser navigate away from the page.
    window.addEventListener("dragover", (ev) => ev.preventDefault());
    window.addEventListener("drop", (ev) => ev.preventDefault());
    $("toggle-outline").addEventListener("change", applyToggles);
    $("toggle-heat").addEventListener("change", applyToggles);
    $("new-button").addEventListener("click", reset);
    reset();
    loadHealth();
  }

  document.addEventListener("DOMContentLoaded", init);
})();
