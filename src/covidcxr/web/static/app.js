// covidcxr page: upload one image, show the analysis. Plain JS, no build step, no third-party code.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const LABELS = { covid: "COVID-19 pattern", non_covid: "No COVID-19 pattern" };
  let maxMb = 50;
  let healthShown = false; // /healthz gave the model and index facts
  let caseGeneration = 0;

  const TOKEN_KEY = "covidcxr.token";
  let thumbUrls = []; // object URLs of the case thumbnails shown now (revoked when replaced)
  let tokenWaiters = null; // pending callers while the token form is open

  function pct(x, digits = 0) {
    return (100 * x).toFixed(digits) + "%";
  }

  // A threshold or share: whole percent, one decimal only where it carries information (43.7%, not 50.0%).
  function pctShort(x) {
    const v = Math.round(1000 * x) / 10;
    return (Number.isInteger(v) ? v.toFixed(0) : v.toFixed(1)) + "%";
  }

  // A model probability: whole percent, and never "100%" or "0%", which would claim a certainty it does not have.
  function probText(p) {
    if (p >= 0.995) return "> 99%";
    if (p < 0.005) return "< 1%";
    return Math.round(100 * p) + "%";
  }

  // ------------------------------------------------------------------ access token
  function getToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch (e) {
      return "";
    }
  }

  function setToken(token) {
    try {
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (e) {
      /* storage disabled: the token lives only as long as this call */
    }
  }

  function withAuth(opts) {
    const o = Object.assign({}, opts || {});
    const headers = new Headers(o.headers || {});
    const token = getToken();
    if (token) headers.set("Authorization", "Bearer " + token);
    o.headers = headers;
    return o;
  }

  // Show the token form (once, however many requests are waiting) and resolve when the user submits a token.
  function askToken(message) {
    $("token-message").textContent = message;
    if (!tokenWaiters) {
      tokenWaiters = [];
      show($("token-form"), true);
      $("token-input").value = "";
      $("token-input").focus();
    }
    return new Promise((resolve) => tokenWaiters.push(resolve));
  }

  function onTokenSubmit(ev) {
    ev.preventDefault();
    const token = $("token-input").value.trim();
    if (!token) return;
    setToken(token);
    $("token-input").value = "";
    show($("token-form"), false);
    const waiters = tokenWaiters || [];
    tokenWaiters = null;
    for (const w of waiters) w();
  }

  // fetch() for the API: sends the bearer token; on 401 asks for a token (again, after a refused one) and retries.
  async function apiFetch(url, opts) {
    for (;;) {
      const sent = getToken();
      const r = await fetch(url, withAuth(opts));
      if (r.status !== 401) return r;
      if (sent && getToken() === sent) setToken("");
      if (getToken()) continue; // another request got a new token meanwhile
      await askToken(sent ? "The access token was refused. Check it and enter it again."
                          : "This server needs an access token.");
    }
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
    clearCases();
    show($("cases-empty"), true);
    show($("cases-help"), false);
    $("cases-caption").textContent = "";
    show($("heat-legend"), false);
    $("file-input").value = "";
    setError("");
    setStatus("");
  }

  // /healthz may answer only {"status": "ok"} (e.g. without a token): show whatever facts it gives.
  async function loadHealth() {
    try {
      const r = await fetch("/healthz", withAuth());
      if (r.ok) {
        const h = (await r.json()) || {};
        const parts = [];
        if (h.model) parts.push("model " + h.model);
        if (typeof h.index_cases === "number") parts.push(h.index_cases + " archived cases");
        if (parts.length) $("model-version").textContent = parts.join(" · ");
        healthShown = typeof h.index_cases === "number";
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
      const r = await apiFetch("/api/v1/analyze", { method: "POST", body: form });
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
    const noResult = res.status === "no_result";
    $("layer-image").src = "data:image/png;base64," + ov.image_png;
    if (ov.heatmap_png) $("layer-heat").src = "data:image/png;base64," + ov.heatmap_png;
    else $("layer-heat").removeAttribute("src");
    $("layer-outline").src = "data:image/png;base64," + ov.lung_outline_png;
    $("stack").style.aspectRatio = ov.width + " / " + ov.height;
    // No heat map without a result: the toggle is off and disabled, so there is no empty layer and no legend.
    $("toggle-heat").disabled = !ov.heatmap_png;
    if (!ov.heatmap_png) $("toggle-heat").checked = false;
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
    if (noResult || p === null || p === undefined) {
      $("probability").textContent = "No result";
      chip.textContent = res.no_result_reason || "no result: not a usable frontal chest X-ray";
      chip.className = "label-chip chip-none";
      $("prob-fill").style.width = "0%";
      $("prob-fill").className = "prob-fill";
    } else {
      $("probability").textContent = probText(p);
      chip.textContent = (p >= t ? "Above threshold · " : "Below threshold · ") + (LABELS[res.label] || res.label);
      chip.className = "label-chip " + (res.label === "covid" ? "chip-pos" : "chip-neg");
      $("prob-fill").style.width = pct(Math.min(Math.max(p, 0), 1), 2);
      $("prob-fill").className = "prob-fill " + (p >= t ? "fill-pos" : "fill-neg");
    }
    $("threshold-marker").style.left = pct(t, 2);
    $("threshold-text").textContent = "threshold " + pctShort(t);
    $("threshold").textContent = pctShort(t);
    const e = res.lung_energy_fraction;
    const energyLow = e !== null && e !== undefined && e < 0.5;
    $("lung-energy").textContent = e === null || e === undefined ? "n/a" : pct(e, 0) + (energyLow ? " — the model looked mostly outside the lungs" : "");
    $("lung-energy").className = energyLow ? "warn-text" : "";
    $("lung-fraction").textContent = typeof res.lung_fraction === "number" ? pct(res.lung_fraction, 0) + " of the image" : "n/a";

    renderQc(res, im, energyLow);
    renderModel(res.model || {});
    show($("findings-empty"), false);
    show($("findings"), true);
    if (!healthShown) loadHealth();

    renderCases(res.similar_cases || []);
  }

  // One coherent summary line plus the details: "passed" is shown only when nothing at all is wrong.
  function renderQc(res, im, energyLow) {
    const details = [];
    const add = (text) => {
      if (text && !details.includes(text)) details.push(text);
    };
    for (const f of res.qc_flags || []) add((res.qc_messages && res.qc_messages[f]) || f.replace(/_/g, " "));
    for (const w of im.warnings || []) add(w);
    const explain = res.explanation_flags || [];
    if (energyLow || explain.includes("heatmap_outside_lungs")) {
      add("the model looked mostly outside the lungs: the heat map and the probability may rest on non-lung features");
    }
    for (const f of explain) if (f !== "heatmap_outside_lungs") add(f.replace(/_/g, " "));
    let summary;
    if (res.status === "no_result") {
      summary = "No result: the image did not pass the input checks" + (details.length ? " (details below)." : ".");
      if (res.no_result_reason) details.unshift(res.no_result_reason);
    } else if (details.length) {
      summary = "Read with caution: " + details.length + (details.length === 1 ? " quality warning." : " quality warnings.");
    }
    const list = $("qc-list");
    list.replaceChildren();
    for (const d of details) {
      const li = document.createElement("li");
      li.textContent = d;
      list.appendChild(li);
    }
    $("qc-summary").textContent = summary || "";
    show($("qc-box"), Boolean(summary));
    show($("qc-ok"), !summary);
  }

  function renderModel(m) {
    const rows = [];
    const name = m.name || m.arch;
    if (name) rows.push(["Model", name + (m.kind && m.kind !== "classifier" ? " (" + m.kind + ")" : "")]);
    if (m.version) rows.push(["Version", m.version]);
    const trained = [];
    if (m.training_data) trained.push(typeof m.training_data === "string" ? m.training_data : JSON.stringify(m.training_data));
    if (m.trained_with) trained.push("trained with covidcxr " + m.trained_with);
    if (m.created) trained.push("created " + m.created);
    rows.push(["Training data", (trained.length ? trained.join(" · ") + " · " : "") + "see MODEL_CARD.md"]);
    if (m.seg_mode) rows.push(["Lung input", m.seg_mode]);
    if (m.honest_estimate) rows.push(["Honest estimate", m.honest_estimate]);
    const dl = $("model-facts");
    dl.replaceChildren();
    for (const [k, v] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = v;
      if (k === "Version" && m.weights_sha256) dd.title = "weights SHA-256 " + m.weights_sha256;
      dl.append(dt, dd);
    }
    if (!$("model-version").textContent && m.version) $("model-version").textContent = "model " + m.version;
  }

  function clearCases() {
    for (const u of thumbUrls) URL.revokeObjectURL(u);
    thumbUrls = [];
    $("cases-grid").replaceChildren();
  }

  // Thumbnails are fetched (with the token), not <img src>: an <img> cannot send an Authorization header.
  async function loadThumb(img, url, generation) {
    try {
      const r = await apiFetch(url);
      if (!r.ok) throw new Error(String(r.status));
      const blob = await r.blob();
      if (generation !== caseGeneration) return; // replaced meanwhile
      const objectUrl = URL.createObjectURL(blob);
      thumbUrls.push(objectUrl);
      img.src = objectUrl;
    } catch (e) {
      img.classList.add("missing");
    }
  }

  function rankText(rank) {
    return rank === 1 ? "most similar" : "#" + rank + " most similar";
  }

  function renderCases(cases) {
    clearCases();
    caseGeneration += 1;
    const generation = caseGeneration;
    const grid = $("cases-grid");
    for (const c of cases) {
      const tile = document.createElement("figure");
      tile.className = "case-tile";
      const frame = document.createElement("div");
      frame.className = "thumb-frame";
      const img = document.createElement("img");
      img.alt = "Case " + c.case_id + " (" + rankText(c.rank) + ")";
      img.addEventListener("load", () => {
        img.classList.toggle("tall", img.naturalHeight > img.naturalWidth);
      });
      img.addEventListener("error", () => img.classList.add("missing"));
      frame.appendChild(img);
      const cap = document.createElement("figcaption");
      const rank = document.createElement("span");
      rank.className = "case-rank";
      rank.textContent = rankText(c.rank);
      const label = document.createElement("span");
      label.className = "label-chip small " + (c.label === "covid" ? "chip-pos" : "chip-neg");
      label.textContent = LABELS[c.label] ? (c.label === "covid" ? "COVID-19" : "non-COVID") : c.label;
      const sim = document.createElement("span");
      sim.className = "similarity";
      sim.textContent = "similarity " + c.score.toFixed(3);
      sim.title = "Cosine similarity of the model's image features: 1.00 = identical image. " +
        "Found by image features, not by diagnosis.";
      const who = document.createElement("div");
      who.className = "muted case-meta";
      who.textContent = "patient " + c.patient_id + (c.view ? " · " + c.view : "") + (c.source ? " · " + c.source : "");
      cap.append(rank, label, sim, who);
      tile.append(frame, cap);
      grid.appendChild(tile);
      loadThumb(img, c.thumbnail_url, generation);
    }
    layoutCases();
    show($("cases-empty"), cases.length === 0);
    show($("cases-help"), cases.length > 0);
    $("cases-caption").textContent = cases.length ? cases.length + " most similar by the model's image features" : "";
  }

  // Columns that divide the number of cases (no half-empty last row), as many as fit at MIN_TILE px; a count
  // with no fitting divisor (a prime) gets the most balanced rows instead.
  const MIN_TILE = 120;
  const GAP = 12;
  function layoutCases() {
    const grid = $("cases-grid");
    const n = grid.children.length;
    if (!n) {
      grid.style.gridTemplateColumns = "";
      return;
    }
    const card = grid.parentElement;
    const cs = getComputedStyle(card);
    const width = card.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
    const fit = Math.max(1, Math.floor((width + GAP) / (MIN_TILE + GAP)));
    let cols = 1;
    if (n <= fit) {
      cols = n;
    } else {
      for (let d = fit; d >= 1; d--) {
        if (n % d === 0) {
          cols = d;
          break;
        }
      }
      if (cols < Math.ceil(fit / 2)) cols = Math.ceil(n / Math.ceil(n / fit));
    }
    grid.style.gridTemplateColumns = "repeat(" + cols + ", minmax(0, 1fr))";
    grid.style.maxWidth = cols * 260 + (cols - 1) * GAP + "px";
  }

  function applyToggles() {
    const heatOn = $("toggle-heat").checked && !$("toggle-heat").disabled;
    show($("layer-outline"), $("toggle-outline").checked);
    show($("layer-heat"), heatOn);
    show($("heat-legend"), heatOn);
  }

  function init() {
    const zone = $("drop-zone");
    const input = $("file-input");
    $("choose-button").addEventListener("click", (ev) => {
      ev.stopPropagation();
      input.click();
    });
    zone.addEventListener("click", () => input.click());
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
    $("token-form").addEventListener("submit", onTokenSubmit);
    if (window.ResizeObserver) new ResizeObserver(layoutCases).observe($("cases-grid").parentElement);
    else window.addEventListener("resize", layoutCases);
    reset();
    loadHealth();
  }

  document.addEventListener("DOMContentLoaded", init);
})();
