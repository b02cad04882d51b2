// globeflow web page: upload photos, draw each answer on an offline world map.
// Plain JS, no dependencies; everything is served by the local globeflow server.
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
    items: [], maxUploadMb: null, coastlines: null, running: 0, queue: [], nextId: 0,
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

  function loadCoastlines() {
    if (!state.coastlines) {
      state.coastlines = fetch("/v1/coastlines")
        .then((r) => (r.ok ? r.json() : { coastlines: [], borders: [] }))
        .catch(() => ({ coastlines: [], borders: [] }));
    }
    return state.coastlines;
  }

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

  // ---------------------------------------------------------------- map

  const WORLD = { lon0: -180, lon1: 180, lat0: -90, lat1: 90 };
  const KM_PER_DEG = Math.PI * 6371 / 180;

  // The largest 1, 2 or 5 times a power of ten not above v (> 0).
  function nice(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    return [5, 2, 1].map((m) => m * p).find((x) => x <= v) || p;
  }

  // A longitude turned by whole turns into [lon0, lon0 + 360): a window crossing 180 draws whole.
  function into(lon, lon0) {
    return ((((lon - lon0) % 360) + 360) % 360) + lon0;
  }

  function quantile(sorted, q) {
    return sorted[Math.min(sorted.length - 1, Math.max(0, Math.round(q * (sorted.length - 1))))];
  }

  // The window the server chose (result.map_extent: 95% of the samples, the best guess and the
  // main regions, true to scale at its middle latitude), else one fitted here for older results.
  function fitView(result) {
    const e = result.map_extent;
    if (Array.isArray(e) && e.length === 4) return { lat0: e[0], lat1: e[1], lon0: e[2], lon1: e[3] };
    if (e === null) return WORLD;
    return fitViewLegacy(result);
  }

  // The window (2:1, like the canvas) that holds most samples, the regions and the truth.
  function fitViewLegacy(result) {
    const lats = [];
    const lons = [];
    const samples = result.samples || [];
    if (samples.length) {
      const sl = samples.map((p) => p[0]).sort((a, b) => a - b);
      const so = samples.map((p) => p[1]).sort((a, b) => a - b);
      lats.push(quantile(sl, 0.02), quantile(sl, 0.98));
      lons.push(quantile(so, 0.02), quantile(so, 0.98));
    }
    for (const r of result.regions || []) {
      if (r.probability >= 0.05) { lats.push(r.lat); lons.push(r.lon); }
    }
    for (const p of [result.best_guess, result.exif_gps]) {
      if (p) { lats.push(p.lat); lons.push(p.lon); }
    }
    if (!lats.length) return WORLD;
    let lon0 = Math.min(...lons);
    let lon1 = Math.max(...lons);
    let lat0 = Math.min(...lats);
    let lat1 = Math.max(...lats);
    let spanLon = Math.max(40, (lon1 - lon0) * 1.3, (lat1 - lat0) * 1.3 * 2);
    if (spanLon >= 270) return WORLD;
    const cLon = (lon0 + lon1) / 2;
    const cLat = (lat0 + lat1) / 2;
    const spanLat = spanLon / 2;
    lon0 = cLon - spanLon / 2;
    lon1 = cLon + spanLon / 2;
    if (lon0 < -180) { lon1 += -180 - lon0; lon0 = -180; }
    if (lon1 > 180) { lon0 -= lon1 - 180; lon1 = 180; }
    lat0 = Math.max(-90, cLat - spanLat / 2);
    lat1 = Math.min(90, lat0 + spanLat);
    lat0 = lat1 - spanLat;
    return { lon0, lon1, lat0, lat1 };
  }

  function drawMap(canvas, result, coast, view = WORLD) {
    const cssW = canvas.clientWidth || 800;
    const dpr = window.devicePixelRatio || 1;
    const W = Math.round(cssW * dpr);
    const H = Math.round(W / 2);
    canvas.width = W;
    canvas.height = H;
    const ctx = canvas.getContext("2d");
    const xLinear = (lon) => ((lon - view.lon0) / (view.lon1 - view.lon0)) * W;
    const x = (lon) => xLinear(into(lon, view.lon0));
    const y = (lat) => ((view.lat1 - lat) / (view.lat1 - view.lat0)) * H;
    const s = W / 1000; // stroke and marker scale
    const span = view.lon1 - view.lon0;
    const step = span > 120 ? 30 : nice((view.lat1 - view.lat0) / 3);

    ctx.fillStyle = "#eaf2f8";
    ctx.fillRect(0, 0, W, H);
    ctx.strokeStyle = "#d3dfea";
    ctx.lineWidth = Math.max(1, 0.6 * s);
    ctx.beginPath();
    for (let lon = Math.ceil(view.lon0 / step) * step; lon < view.lon1; lon += step) {
      ctx.moveTo(xLinear(lon), 0); ctx.lineTo(xLinear(lon), H);
    }
    for (let lat = Math.ceil(view.lat0 / step) * step; lat < view.lat1; lat += step) {
      ctx.moveTo(0, y(lat)); ctx.lineTo(W, y(lat));
    }
    ctx.stroke();

    const d = result.density;
    if (d && d.log_density && d.log_density.length) {
      const h = d.lat.length;
      const w = d.lon.length;
      let max = -Infinity;
      for (const row of d.log_density) for (const v of row) if (v > max) max = v;
      const off = document.createElement("canvas");
      off.width = w;
      off.height = h;
      const octx = off.getContext("2d");
      const img = octx.createImageData(w, h);
      const ascending = h < 2 || d.lat[1] > d.lat[0];
      for (let i = 0; i < h; i++) {
        const row = d.log_density[ascending ? h - 1 - i : i];
        for (let j = 0; j < w; j++) {
          const rel = Math.exp(row[j] - max);
          const k = 4 * (i * w + j);
          img.data[k] = 217; img.data[k + 1] = 38; img.data[k + 2] = 25;
          // sqrt keeps the tails visible next to a sharp mode
          img.data[k + 3] = Math.round(200 * Math.sqrt(Math.min(1, Math.max(0, rel))));
        }
      }
      octx.putImageData(img, 0, 0);
      const dLat = h > 1 ? Math.abs(d.lat[1] - d.lat[0]) : 180;
      const dLon = w > 1 ? Math.abs(d.lon[1] - d.lon[0]) : 360;
      const latTop = Math.max(...d.lat) + dLat / 2;
      const latBot = Math.min(...d.lat) - dLat / 2;
      const lonL = Math.min(...d.lon) - dLon / 2;
      const lonR = Math.max(...d.lon) + dLon / 2;
      ctx.imageSmoothingEnabled = true;
      ctx.imageSmoothingQuality = "high";
      ctx.drawImage(off, xLinear(lonL), y(latTop), xLinear(lonR) - xLinear(lonL), y(latBot) - y(latTop));
    }

    const polylines = (lines, color, width) => {
      ctx.strokeStyle = color;
      ctx.lineWidth = width;
      ctx.lineJoin = "round";
      ctx.beginPath();
      // drawn once more a turn east where the window crosses 180
      for (const turn of view.lon1 > 180 ? [0, 360] : [0]) {
        for (const line of lines) {
          for (let i = 0; i < line.length; i++) {
            const px = xLinear(line[i][0] + turn);
            const py = y(line[i][1]);
            if (i === 0) ctx.moveTo(px, py); else ctx.lineTo(px, py);
          }
        }
      }
      ctx.stroke();
    };
    if (coast) {
      polylines(coast.borders || [], "#9aa8b6", Math.max(0.5, 0.5 * s));
      polylines(coast.coastlines || [], "#3b4a59", Math.max(0.8, 0.9 * s));
    }

    ctx.fillStyle = "rgba(31, 78, 156, 0.55)";
    const r = Math.max(1, 1.4 * s);
    for (const [lat, lon] of result.samples || []) {
      ctx.beginPath();
      ctx.arc(x(lon), y(lat), r, 0, 2 * Math.PI);
      ctx.fill();
    }

    ctx.font = `600 ${Math.round(11 * s)}px system-ui, sans-serif`;
    ctx.textBaseline = "middle";
    (result.regions || []).forEach((reg, i) => {
      const px = x(reg.lon);
      const py = y(reg.lat);
      // the region's radius as a dashed circle, on a window true to scale where it shows
      const rPx = ((reg.radius_km || 0) / KM_PER_DEG) * (H / (view.lat1 - view.lat0));
      if (view !== WORLD && rPx > 8 * s && rPx < 2 * W) {
        ctx.beginPath();
        ctx.setLineDash([4 * s, 3 * s]);
        ctx.arc(px, py, rPx, 0, 2 * Math.PI);
        ctx.lineWidth = 1 * s;
        ctx.strokeStyle = "rgba(17, 17, 17, 0.7)";
        ctx.stroke();
        ctx.setLineDash([]);
      }
      ctx.beginPath();
      ctx.arc(px, py, 7 * s, 0, 2 * Math.PI);
      ctx.lineWidth = 1.5 * s;
      ctx.strokeStyle = "#111";
      ctx.stroke();
      const label = `${i + 1}`;
      const tw = ctx.measureText(label).width;
      ctx.fillStyle = "rgba(255,255,255,0.9)";
      ctx.fillRect(px + 9 * s, py - 8 * s, tw + 8 * s, 16 * s);
      ctx.fillStyle = "#111";
      ctx.fillText(label, px + 13 * s, py);
    });

    const bg = result.best_guess;
    if (bg) star(ctx, x(bg.lon), y(bg.lat), 11 * s, "#f5b700", "#222", s);
    if (result.exif_gps) cross(ctx, x(result.exif_gps.lon), y(result.exif_gps.lat), 8 * s, s);
    if (view !== WORLD) scaleBar(ctx, view, W, H, s);
  }

  // A bar of a round length, about a fifth of the window, in the lower right corner.
  function scaleBar(ctx, view, W, H, s) {
    const midLat = (view.lat0 + view.lat1) / 2;
    const widthKm = (view.lon1 - view.lon0) * KM_PER_DEG * Math.cos((midLat * Math.PI) / 180);
    const km = nice(widthKm / 5);
    const len = (km / widthKm) * W;
    const x1 = W - 16 * s;
    const yb = H - 14 * s;
    ctx.lineCap = "butt";
    ctx.strokeStyle = "#222";
    ctx.lineWidth = 4 * s;
    ctx.beginPath(); ctx.moveTo(x1 - len, yb); ctx.lineTo(x1, yb); ctx.stroke();
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = 1.5 * s;
    ctx.beginPath(); ctx.moveTo(x1 - len, yb); ctx.lineTo(x1, yb); ctx.stroke();
    ctx.font = `600 ${Math.round(11 * s)}px system-ui, sans-serif`;
    ctx.textAlign = "center";
    ctx.textBaseline = "bottom";
    ctx.fillStyle = "#111";
    ctx.fillText(fmtKm(km), x1 - len / 2, yb - 4 * s);
    ctx.textAlign = "start";
  }

  function star(ctx, cx, cy, R, fill, stroke, s) {
    ctx.beginPath();
    for (let i = 0; i < 10; i++) {
      const rad = i % 2 ? R * 0.45 : R;
      const a = -Math.PI / 2 + (i * Math.PI) / 5;
      ctx.lineTo(cx + rad * Math.cos(a), cy + rad * Math.sin(a));
    }
    ctx.closePath();
    ctx.fillStyle = fill;
    ctx.fill();
    ctx.lineWidth = 1.2 * s;
    ctx.strokeStyle = stroke;
    ctx.stroke();
  }

  function cross(ctx, cx, cy, R, s) {
    ctx.lineCap = "round";
    for (const [color, width] of [["#fff", 5 * s], ["#15803d", 3 * s]]) {
      ctx.strokeStyle = color;
      ctx.lineWidth = width;
      ctx.beginPath();
      ctx.moveTo(cx - R, cy - R); ctx.lineTo(cx + R, cy + R);
      ctx.moveTo(cx + R, cy - R); ctx.lineTo(cx - R, cy + R);
      ctx.stroke();
    }
  }

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
      place.append(badge(reg.place && reg.place.country_code), reg.label || placeName(reg.place));
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
      tbody.append(tr);
    });

    const st = result.settings || {};
    $(".settings", c).textContent =
      `${(result.samples || []).length} samples · guidance ${st.guidance} · ${st.steps} steps · model ${st.model || "?"}` +
      (result.fusion ? ` · effective sample size ${Math.round(result.effective_sample_size)}` : "");

    const canvas = $("canvas.map", c);
    canvas.setAttribute("aria-label",
      `World map: best guess ${name} (${fmtCoord(bg.lat, bg.lon)})` +
      (hasTruth ? `; true location ${fmtCoord(result.exif_gps.lat, result.exif_gps.lon)}` : ""));
    const coast = await loadCoastlines();
    item.zoomed = item.zoomed !== false;
    const zoomBtn = $("[data-testid=zoom-toggle]", c);
    const redraw = () => {
      const view = item.zoomed ? fitView(result) : WORLD;
      zoomBtn.textContent = item.zoomed ? "Show whole world" : "Zoom to answer";
      zoomBtn.hidden = view === WORLD && item.zoomed;
      zoomBtn.setAttribute("aria-pressed", String(!item.zoomed));
      drawMap(canvas, result, coast, view);
    };
    zoomBtn.onclick = () => { item.zoomed = !item.zoomed; redraw(); };
    item.redraw = redraw;
    redraw();
    c.dataset.state = "done";

    const [jb, gb] = [$("[data-testid=download-json]", c), $("[data-testid=download-geojson]", c)];
    jb.disabled = false;
    gb.disabled = false;
    jb.onclick = () => download(`${stem(result.image)}.globeflow.json`, result, "application/json");
    gb.onclick = () => download(`${stem(result.image)}.geojson`, toGeoJSON(result), "application/geo+json");
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
    if (els.within.value.trim()) body.append("within", els.within.value.trim());
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
    if (state.fused) state.fused.card.remove();
    const node = els.template.content.firstElementChild.cloneNode(true);
    node.classList.add("card-fused");
    node.setAttribute("data-testid", "fused-card");
    $(".thumb", node).src = URL.createObjectURL(done[0].file);
    $(".thumb", node).alt = `Thumbnail of ${done[0].file.name}`;
    $(".file-name", node).textContent = `Same place: ${done.length} photos`;
    els.results.prepend(node);
    const item = { card: node, file: done[0].file, result: null };
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
  }

  function dropFused() {
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
    resizeTimer = setTimeout(async () => {
      await loadCoastlines();
      for (const item of state.items) if (item.redraw) item.redraw();
    }, 150);
  });

  loadHealth();
  loadCoastlines();
})();
