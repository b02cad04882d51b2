// globeflow web page: upload photos, show each answer on an interactive map (map.js, Leaflet).
// Plain JS; everything, the map library and the offline base map included, is served by the
// local globeflow server.
"use strict";

(() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const EARTH_KM2 = 510.1e6;
  const MAX_PARALLEL = 3;

  const els = {
    input: $("#file-input"),
    drop: $("#dropzone"),
    dzSub: $("#dz-sub"),
    guidance: $("#guidance"),
    guidanceOut: $("#guidance-out"),
    samples: $("#num-samples"),
    within: $("#within"),
    samePlace: $("#same-place"),
    rerun: $("#rerun"),
    clear: $("#clear"),
    status: $("#status"),
    results: $("#results"),
    template: $("#card-template"),
    modelInfo: $("#model-info"),
  };

  const state = {
    items: [], maxUploadMb: null, running: 0, queue: [], nextId: 0,
    fused: null, fusedKey: null,
  };

  // ---------------------------------------------------------------- formatting

  function placeName(place) {
    if (!place) return "Unknown place";
    const parts = [place.city, place.region, place.country || place.country_code].filter(Boolean);
    const unique = parts.filter((p, i) => parts.indexOf(p) === i);
    return unique.length ? unique.join(", ") : "Unknown place";
  }

  // A text badge rather than a flag emoji: emoji fonts are missing on many Linux machines.
  function badge(code) {
    const el = document.createElement("span");
    el.className = "cc";
    if (code && /^[A-Za-z]{2}$/.test(code)) el.textContent = code.toUpperCase();
    else el.hidden = true;
    el.setAttribute("aria-hidden", "true");
    return el;
  }

  function fmtCoord(lat, lon) {
    const ns = lat >= 0 ? "N" : "S";
    const ew = lon >= 0 ? "E" : "W";
    return `${Math.abs(lat).toFixed(3)}° ${ns}, ${Math.abs(lon).toFixed(3)}° ${ew}`;
  }

  function fmtKm(km) {
    if (km == null || !isFinite(km)) return "–";
    if (km < 1) return `${Math.round(km * 1000)} m`;
    if (km < 10) return `${km.toFixed(1)} km`;
    return `${Math.round(km).toLocaleString("en-US")} km`;
  }

  // Two significant figures, digits grouped: 470,000 m², 15 km², 1.5 km².
  function twoFigures(v) {
    return Number(v.toPrecision(2)).toLocaleString("en-US", { maximumFractionDigits: 1 });
  }

  function fmtArea(km2) {
    if (km2 == null || !isFinite(km2)) return "–";
    if (km2 >= 1e6) return `${(km2 / 1e6).toFixed(km2 >= 1e7 ? 0 : 1)} million km²`;
    if (km2 >= 1e3) return `${Math.round(km2).toLocaleString("en-US")} km²`;
    if (km2 >= 1) return `${twoFigures(km2)} km²`;
    return `${twoFigures(km2 * 1e6)} m²`;
  }

  // The CLI's scale: bits above a uniform guess over the globe (localizability_vs_uniform_bits).
  function fmtBits(bits) {
    return bits == null || !isFinite(bits) ? "–" : `${bits.toFixed(1)} bits vs uniform`;
  }

  function areaHint(km2) {
    if (km2 == null || !isFinite(km2)) return "";
    const pct = (100 * km2) / EARTH_KM2;
    if (pct >= 0.1) return `${pct.toFixed(pct >= 10 ? 0 : 1)}% of Earth's surface`;
    const side = Math.sqrt(km2);
    return `about a ${fmtKm(side)} × ${fmtKm(side)} square`;
  }

  function fmtPct(p) {
    const v = 100 * p;
    return v >= 10 ? `${v.toFixed(0)}%` : `${v.toFixed(1)}%`;
  }

  function setStatus(text) { els.status.textContent = text; }

  // ---------------------------------------------------------------- data

  function loadHealth() {
    fetch("/v1/health")
      .then((r) => r.json())
      .then((h) => {
        state.maxUploadMb = h.max_upload_mb;
        els.modelInfo.textContent = `Model: ${h.model} · encoder: ${h.encoder}`;
        if (typeof h.default_guidance === "number") {
          els.guidance.value = h.default_guidance;
          els.guidanceOut.textContent = Number(h.default_guidance).toFixed(1);
        }
        els.dzSub.textContent = `JPEG, PNG, WebP, TIFF, HEIC… up to ${h.max_upload_mb} MB each; processed on this machine only.`;
      })
      .catch(() => { els.modelInfo.textContent = "Server not reachable."; });
  }

  function toGeoJSON(result) {
    const point = (lat, lon, props) => ({
      type: "Feature",
      geometry: { type: "Point", coordinates: [lon, lat] },
      properties: { image: result.image, ...props },
    });
    const features = [];
    const bg = result.best_guess;
    features.push(point(bg.lat, bg.lon, {
      kind: "best_guess", ...(bg.place || {}),
      label: bg.label,
      osm_url: result.osm_url,
      localizability_bits: result.localizability_bits,
      localizability_vs_uniform_bits: result.localizability_vs_uniform_bits,
      effective_area_km2: result.effective_area_km2,
    }));
    (result.regions || []).forEach((r, i) => features.push(point(r.lat, r.lon, {
      kind: "region", rank: i + 1, probability: r.probability, radius_km: r.radius_km,
      share_within_radius: r.share_within_radius, ...(r.place || {}), label: r.label,
    })));
    if (result.exif_gps) {
      features.push(point(result.exif_gps.lat, result.exif_gps.lon, { kind: "exif_gps", error_km: result.error_km }));
    }
    return { type: "FeatureCollection", features };
  }

  function download(name, obj, mime) {
    const blob = new Blob([JSON.stringify(obj, null, 2)], { type: mime });
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = url;
    a.download = name;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }

  function stem(name) { return name.replace(/\.[^.]+$/, "") || "photo"; }

  // ---------------------------------------------------------------- cards

  function newCard(file) {
    const node = els.template.content.firstElementChild.cloneNode(true);
    const thumb = $(".thumb", node);
    thumb.src = URL.createObjectURL(file);
    thumb.alt = `Thumbnail of ${file.name}`;
    thumb.addEventListener("error", () => {  // not an image the browser can show: no broken icon
      URL.revokeObjectURL(thumb.src);
      thumb.removeAttribute("src");
      thumb.hidden = true;
    });
    $(".file-name", node).textContent = file.name;
    els.results.prepend(node);
    return node;
  }

  function showBusy(item) {
    const c = item.card;
    $(".busy", c).hidden = false;
    $(".error", c).hidden = true;
    c.setAttribute("aria-busy", "true");
    c.dataset.state = "busy";
  }

  function showError(item, message) {
    const c = item.card;
    $(".busy", c).hidden = true;
    $(".card-body", c).hidden = true;
    const err = $(".error", c);
    err.textContent = message;
    err.hidden = false;
    c.removeAttribute("aria-busy");
    c.dataset.state = "error";
  }

  async function showResult(item, result) {
    const c = item.card;
    item.result = result;
    $(".busy", c).hidden = true;
    $(".error", c).hidden = true;
    $(".card-body", c).hidden = false;
    c.removeAttribute("aria-busy");

    const bg = result.best_guess;
    const name = bg.label || placeName(bg.place);
    const bgEl = $(".best-guess", c);
    bgEl.textContent = "";
    bgEl.append(badge(bg.place && bg.place.country_code), name);
    const coords = $(".coords", c);
    coords.textContent = `Best guess: ${fmtCoord(bg.lat, bg.lon)}`;
    if (result.osm_url) {
      const osm = document.createElement("a");
      osm.href = result.osm_url;
      osm.target = "_blank";
      osm.rel = "noopener noreferrer";
      osm.className = "osm";
      osm.setAttribute("data-testid", "osm-link");
      osm.textContent = "Open in OpenStreetMap";
      coords.append(" · ", osm);
    }

    const loc = $("[data-testid=localizability]", c);
    loc.innerHTML = "";
    loc.append(
      fmtBits(result.localizability_vs_uniform_bits),
      small(result.localizability_vs_uniform_bits == null
        ? "not on the globe's scale (density in R³)"
        : "0 = no clue; each bit halves the area"),
    );
    const area = $("[data-testid=effective-area]", c);
    area.innerHTML = "";
    area.append(fmtArea(result.effective_area_km2), small(areaHint(result.effective_area_km2)));

    const mass = result.mass_inside;
    $(".mass-row", c).hidden = !mass;
    if (mass) {
      const dd = $("[data-testid=mass-inside]", c);
      dd.textContent = "";
      dd.append(`${fmtPct(mass.probability)} ± ${fmtPct(mass.stderr)}`,
        small(`of the model's probability is in ${mass.region.description}`));
    }

    const hasTruth = !!result.exif_gps;
    c.querySelectorAll(".truth-row").forEach((el) => { el.hidden = !hasTruth; });
    $(".lg-truth-item", c).hidden = !hasTruth;
    if (hasTruth) {
      $("[data-testid=truth]", c).textContent = fmtCoord(result.exif_gps.lat, result.exif_gps.lon);
      const ek = $("[data-testid=error-km]", c);
      ek.innerHTML = "";
      ek.append(fmtKm(result.error_km), small("best guess to EXIF GPS"));
    }

    const tbody = $("tbody", $(".regions", c));
    tbody.innerHTML = "";
    (result.regions || []).forEach((reg, i) => {
      const tr = document.createElement("tr");
      tr.dataset.testid = "region-row";
      tr.setAttribute("data-testid", "region-row");
      const rank = document.createElement("td");
      rank.className = "rank";
      rank.textContent = String(i + 1);
      const place = document.createElement("td");
      place.setAttribute("data-testid", "region-name");
      const zoomTo = document.createElement("button");
      zoomTo.type = "button";
      zoomTo.className = "region-zoom";
      zoomTo.setAttribute("data-testid", "region-zoom");
      zoomTo.title = "Show this region on the map";
      zoomTo.append(badge(reg.place && reg.place.country_code), reg.label || placeName(reg.place));
      place.append(zoomTo);
      const sub = document.createElement("span");
      sub.className = "sub";
      sub.setAttribute("data-testid", "region-extent");
      const share = reg.share_within_radius;
      const within = share != null && share < 1 ? `${fmtPct(share)} within` : "within";
      sub.textContent = fmtCoord(reg.lat, reg.lon) + (reg.radius_km ? ` · ${within} ${fmtKm(reg.radius_km)}` : "");
      place.append(sub);
      const prob = document.createElement("td");
      prob.className = "num";
      prob.setAttribute("data-testid", "region-probability");
      prob.textContent = fmtPct(reg.probability);
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("i");
      fill.style.width = `${Math.min(100, 100 * reg.probability).toFixed(1)}%`;
      bar.append(fill);
      prob.append(bar);
      tr.append(rank, place, prob);
      tr.addEventListener("click", () => zoomToRegion(item, i));
      tbody.append(tr);
    });

    const st = result.settings || {};
    $(".settings", c).textContent =
      `${(result.samples || []).length} samples · guidance ${st.guidance} · ${st.steps} steps · model ${st.model || "?"}` +
      (result.fusion ? ` · effective sample size ${Math.round(result.effective_sample_size)}` : "");

    await showMap(item, result, name, hasTruth);
    c.dataset.state = "done";

    const [jb, gb] = [$("[data-testid=download-json]", c), $("[data-testid=download-geojson]", c)];
    jb.disabled = false;
    gb.disabled = false;
    jb.onclick = () => download(`${stem(result.image)}.globeflow.json`, result, "application/json");
    gb.onclick = () => download(`${stem(result.image)}.geojson`, toGeoJSON(result), "application/geo+json");
  }

  // The card's interactive map (map.js); a card run again gets a fresh one.
  async function showMap(item, result, name, hasTruth) {
    const c = item.card;
    if (item.mapHandle) item.mapHandle.map.remove();
    item.mapHandle = null;
    const old = $("[data-testid=map]", c);
    const el = old.cloneNode(false);
    old.replaceWith(el);
    el.setAttribute("aria-label",
      `Map: best guess ${name} (${fmtCoord(result.best_guess.lat, result.best_guess.lon)})` +
      (hasTruth ? `; true location ${fmtCoord(result.exif_gps.lat, result.exif_gps.lon)}` : "") +
      ". Arrow keys pan, plus and minus zoom.");
    const note = $("[data-testid=tiles-note]", c);
    const handle = await window.GlobeflowMap.createAnswerMap(el, result, {
      within: item.within, photos: item.photos,
      onTilesFailed: () => {
        note.hidden = false;
        note.textContent = "Map tiles are unreachable: showing the offline map (coastlines, borders, regions, towns).";
      },
    });
    item.mapHandle = handle;
    const zoomBtn = $("[data-testid=zoom-toggle]", c);
    item.zoomed = true;
    const label = () => {
      zoomBtn.textContent = item.zoomed ? "Show whole world" : "Zoom to answer";
      zoomBtn.setAttribute("aria-pressed", String(!item.zoomed));
    };
    zoomBtn.hidden = !handle.answerBounds;
    zoomBtn.onclick = () => {
      item.zoomed = !item.zoomed;
      if (item.zoomed) handle.showAnswer(); else handle.showWorld();
      label();
    };
    label();
  }

  function zoomToRegion(item, i) {
    if (!item.mapHandle) return;
    item.mapHandle.zoomToRegion(i);
    item.zoomed = true;
    const el = item.mapHandle.map.getContainer();
    if (el.scrollIntoView) el.scrollIntoView({ block: "nearest" });
  }

  function small(text) {
    const el = document.createElement("small");
    el.textContent = text;
    return el;
  }

  // ---------------------------------------------------------------- requests

  // The reason a request failed, in words: the file's own error when the server names one.
  function failureText(resp, data) {
    const own = data && data.results && data.results[0] && data.results[0].error;
    if (own) return own;
    const detail = data && data.detail ? (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)) : "";
    if (resp.status >= 500) return `The server failed (${resp.status}${detail ? `: ${detail}` : ""}).`;
    return detail || `The server refused the request (${resp.status} ${resp.statusText}).`;
  }

  async function locate(item) {
    showBusy(item);
    if (state.maxUploadMb && item.file.size > state.maxUploadMb * 2 ** 20) {
      showError(item, `${item.file.name}: file too large (${(item.file.size / 2 ** 20).toFixed(1)} MB); the limit is ${state.maxUploadMb} MB.`);
      return;
    }
    const body = new FormData();
    body.append("file", item.file, item.file.name);
    body.append("num_samples", els.samples.value);
    body.append("guidance", els.guidance.value);
    item.within = els.within.value.trim();
    if (item.within) body.append("within", item.within);
    let resp;
    try {
      resp = await fetch("/v1/locate", { method: "POST", body });
    } catch (e) {
      showError(item, `Could not reach the globeflow server (${e.message}).`);
      return;
    }
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    if (!resp.ok) {
      showError(item, failureText(resp, data));
      return;
    }
    const result = data && data.results && data.results[0];
    if (!result || result.ok === false) {
      showError(item, (result && result.error) || "The server returned no result.");
      return;
    }
    await showResult(item, result);
  }

  // One answer for all located photos when "same place" is on (POST /v1/locate-together).
  async function fuse() {
    const done = state.items.filter((i) => i.card.dataset.state === "done");
    const key = done.map((i) => i.id).join(",") + `|${els.samples.value}|${els.within.value.trim()}`;
    if (!els.samePlace.checked || done.length < 2 || state.fusedKey === key) return;
    state.fusedKey = key;
    if (state.fused && state.fused.mapHandle) state.fused.mapHandle.map.remove();
    if (state.fused) state.fused.card.remove();
    const node = els.template.content.firstElementChild.cloneNode(true);
    node.classList.add("card-fused");
    node.setAttribute("data-testid", "fused-card");
    $(".thumb", node).src = URL.createObjectURL(done[0].file);
    $(".thumb", node).alt = `Thumbnail of ${done[0].file.name}`;
    $(".file-name", node).textContent = `Same place: ${done.length} photos`;
    els.results.prepend(node);
    const item = {
      card: node, file: done[0].file, result: null, within: els.within.value.trim(),
      photos: done.map((i) => ({ name: i.file.name, lat: i.result.best_guess.lat, lon: i.result.best_guess.lon })),
    };
    state.fused = item;
    showBusy(item);
    const body = new FormData();
    for (const i of done) body.append("file", i.file, i.file.name);
    body.append("num_samples", els.samples.value);
    if (els.within.value.trim()) body.append("within", els.within.value.trim());
    let data = null;
    let resp;
    try {
      resp = await fetch("/v1/locate-together", { method: "POST", body });
      data = await resp.json();
    } catch (e) {
      showError(item, `Could not fuse the photos (${e.message}).`);
      return;
    }
    if (!resp.ok) {
      showError(item, `Error ${resp.status}: ${data && data.detail ? data.detail : resp.statusText}`);
      return;
    }
    if (!data.result.ok) {
      showError(item, `Not fused: ${data.result.error}`);
      return;
    }
    await showResult(item, data.result);
    const fusion = data.result.fusion || {};
    if (fusion.different_places || data.result.warning) {
      // Said prominently, above the answer: a Bayes factor below 1 favours different places.
      const warn = document.createElement("p");
      warn.className = "warning";
      warn.setAttribute("data-testid", "fused-warning");
      warn.setAttribute("role", "alert");
      warn.textContent = data.result.warning || "The photos look like different places.";
      const body = $(".card-body", node) || node;
      body.prepend(warn);
    }
    if (fusion.product) {
      $(".settings", node).textContent += ` · ${fusion.product} product (exponent ${fusion.exponent})`;
    }
  }

  function dropFused() {
    if (state.fused && state.fused.mapHandle) state.fused.mapHandle.map.remove();
    if (state.fused) state.fused.card.remove();
    state.fused = null;
    state.fusedKey = null;
  }

  function pump() {
    while (state.running < MAX_PARALLEL && state.queue.length) {
      const item = state.queue.shift();
      state.running += 1;
      locate(item)
        .catch((e) => showError(item, `Unexpected error: ${e.message}`))
        .finally(() => {
          state.running -= 1;
          updateStatus();
          pump();
        });
    }
    updateStatus();
  }

  function updateStatus() {
    const pending = state.queue.length + state.running;
    const done = state.items.filter((i) => i.card.dataset.state === "done").length;
    const failed = state.items.filter((i) => i.card.dataset.state === "error").length;
    if (pending) setStatus(`Locating ${pending} photo${pending > 1 ? "s" : ""}…`);
    else if (state.items.length) setStatus(`${done} located${failed ? `, ${failed} failed` : ""}.`);
    else setStatus("");
    els.rerun.disabled = !state.items.length || pending > 0;
    els.clear.disabled = !state.items.length;
    if (!pending) fuse().catch((e) => state.fused && showError(state.fused, `Unexpected error: ${e.message}`));
  }

  function addFiles(fileList) {
    const files = Array.from(fileList || []);
    if (!files.length) return;
    for (const file of files) {
      const item = { file, card: newCard(file), result: null, id: ++state.nextId };
      state.items.push(item);
      state.queue.push(item);
    }
    pump();
  }

  // ---------------------------------------------------------------- wiring

  els.input.addEventListener("change", () => {
    addFiles(els.input.files);
    els.input.value = "";
  });
  ["dragenter", "dragover"].forEach((ev) => els.drop.addEventListener(ev, (e) => {
    e.preventDefault();
    els.drop.classList.add("dragging");
  }));
  ["dragleave", "drop"].forEach((ev) => els.drop.addEventListener(ev, (e) => {
    e.preventDefault();
    els.drop.classList.remove("dragging");
  }));
  els.drop.addEventListener("drop", (e) => {
    e.stopPropagation();
    addFiles(e.dataTransfer && e.dataTransfer.files);
  });
  // Dropping outside the zone must not navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => { e.preventDefault(); addFiles(e.dataTransfer && e.dataTransfer.files); });

  els.guidance.addEventListener("input", () => {
    els.guidanceOut.textContent = Number(els.guidance.value).toFixed(1);
  });
  els.rerun.addEventListener("click", () => {
    for (const item of state.items) if (!state.queue.includes(item)) state.queue.push(item);
    pump();
  });
  els.clear.addEventListener("click", () => {
    state.queue.length = 0;
    for (const item of state.items) {
      const t = $(".thumb", item.card);
      if (t.src) URL.revokeObjectURL(t.src);
      if (item.mapHandle) item.mapHandle.map.remove();
      item.card.remove();
    }
    state.items = [];
    dropFused();
    updateStatus();
  });
  els.samePlace.addEventListener("change", () => {
    if (!els.samePlace.checked) dropFused();
    updateStatus();
  });

  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      for (const item of [...state.items, state.fused]) if (item && item.mapHandle) item.mapHandle.map.invalidateSize();
    }, 150);
  });

  loadHealth();
  window.GlobeflowMap.loadConfig();
  window.GlobeflowMap.loadBasemap();
})();
