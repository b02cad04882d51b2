// globeflow web page: the interactive map of one answer (Leaflet, vendored under /static/vendor).
// Base layers: raster tiles when the browser reaches them (serve --tiles), else the bundled
// offline map drawn here from /v1/basemap (Natural Earth lines and countries) and /v1/places
// (GeoNames towns). Overlays: density, samples, regions, best guess, EXIF truth, the `within`
// region and, for a fused answer, each photo's best guess.
"use strict";

(() => {
  const TILE = 256;
  const LAND = "#f3f0e8";
  const SEA = "#d6e6f2";
  const BUILT_UP = "#ecd7b0";
  const DEG = Math.PI / 180;

  const shared = { config: null, basemap: null, tilesFailed: false };

  function getJSON(url, init) {
    return fetch(url, init).then((r) => (r.ok ? r.json() : Promise.reject(new Error(`${url}: ${r.status}`))));
  }

  function loadConfig() {
    if (!shared.config) {
      shared.config = getJSON("/v1/map").catch(() => ({ tiles: null, offline_attribution: "" }));
    }
    return shared.config;
  }

  // Flat [lon0, lat0, dlon1, dlat1, ...] integers (1/scale degree) to a Float64Array of degrees
  // and its box [lon0, lat0, lon1, lat1].
  function decodeLine(flat, scale) {
    const out = new Float64Array(flat.length);
    let x = 0;
    let y = 0;
    const box = [Infinity, Infinity, -Infinity, -Infinity];
    for (let i = 0; i < flat.length; i += 2) {
      x += flat[i];
      y += flat[i + 1];
      out[i] = x / scale;
      out[i + 1] = y / scale;
      if (out[i] < box[0]) box[0] = out[i];
      if (out[i] > box[2]) box[2] = out[i];
      if (out[i + 1] < box[1]) box[1] = out[i + 1];
      if (out[i + 1] > box[3]) box[3] = out[i + 1];
    }
    return { pts: out, box };
  }

  function loadBasemap() {
    if (!shared.basemap) {
      shared.basemap = Promise.all(["lines", "countries", "admin1"].map((n) => getJSON(`/v1/basemap/${n}`)))
        .then(([lines, countries, admin1]) => {
          const decode = (list, scale) => list.map((flat) => decodeLine(flat, scale));
          const out = { admin1 };
          for (const kind of ["coastlines", "borders", "admin1"]) out[kind] = decode(lines[kind], lines.scale);
          out.countries = {};
          for (const [code, c] of Object.entries(countries.countries)) {
            const rings = decode(c.rings, countries.scale);
            const box = [Infinity, Infinity, -Infinity, -Infinity];
            for (const r of rings) {
              box[0] = Math.min(box[0], r.box[0]); box[1] = Math.min(box[1], r.box[1]);
              box[2] = Math.max(box[2], r.box[2]); box[3] = Math.max(box[3], r.box[3]);
            }
            out.countries[code] = { name: c.name, rings, box };
          }
          return out;
        })
        .catch(() => null);
    }
    return shared.basemap;
  }

  // ------------------------------------------------------------ Web Mercator, in tile pixels

  function worldPx(z) { return TILE * Math.pow(2, z); }
  function lonToX(lon, z) { return ((lon + 180) / 360) * worldPx(z); }
  function latToY(lat, z) {
    const s = Math.sin(Math.max(-85.06, Math.min(85.06, lat)) * DEG);
    return (0.5 - Math.log((1 + s) / (1 - s)) / (4 * Math.PI)) * worldPx(z);
  }
  function yToLat(y, z) {
    const n = Math.PI - (2 * Math.PI * y) / worldPx(z);
    return Math.atan(Math.sinh(n)) / DEG;
  }

  // The tile's box in degrees, widened by `pad` pixels.
  function tileBox(coords, pad) {
    const z = coords.z;
    const w = worldPx(z);
    return {
      z,
      x0: coords.x * TILE,
      y0: coords.y * TILE,
      lon0: ((coords.x * TILE - pad) / w) * 360 - 180,
      lon1: (((coords.x + 1) * TILE + pad) / w) * 360 - 180,
      lat0: yToLat((coords.y + 1) * TILE + pad, z),
      lat1: yToLat(coords.y * TILE - pad, z),
    };
  }

  function meets(box, t) {
    return box[0] <= t.lon1 && box[2] >= t.lon0 && box[1] <= t.lat1 && box[3] >= t.lat0;
  }

  function tracePath(ctx, pts, t) {
    for (let i = 0; i < pts.length; i += 2) {
      const px = lonToX(pts[i], t.z) - t.x0;
      const py = latToY(pts[i + 1], t.z) - t.y0;
      if (i === 0) ctx.moveTo(px, py); else ctx.lineTo(px, py);
    }
  }

  // The offline base map, drawn tile by tile from the bundled vectors.
  const OfflineTiles = L.GridLayer.extend({
    initialize(data, options) {
      this._data = data;
      L.setOptions(this, options);
    },
    createTile(coords) {
      const tile = document.createElement("canvas");
      const ratio = window.devicePixelRatio || 1;
      tile.width = tile.height = TILE * ratio;
      const ctx = tile.getContext("2d");
      ctx.scale(ratio, ratio);
      ctx.fillStyle = SEA;
      ctx.fillRect(0, 0, TILE, TILE);
      const data = this._data;
      if (!data) return tile;
      const t = tileBox(coords, 4);
      ctx.fillStyle = LAND;
      for (const c of Object.values(data.countries)) {
        if (!meets(c.box, t)) continue;
        ctx.beginPath();
        for (const ring of c.rings) if (meets(ring.box, t)) tracePath(ctx, ring.pts, t);
        ctx.fill("evenodd");
      }
      const stroke = (lines, color, width, dash) => {
        ctx.strokeStyle = color;
        ctx.lineWidth = width;
        ctx.setLineDash(dash || []);
        ctx.lineJoin = "round";
        ctx.beginPath();
        for (const line of lines) if (meets(line.box, t)) tracePath(ctx, line.pts, t);
        ctx.stroke();
      };
      if (coords.z >= 4) stroke(data.admin1, "#b3a3c2", coords.z >= 8 ? 1.2 : 0.8, [4, 3]);
      stroke(data.borders, "#8f7aa3", coords.z >= 6 ? 1.8 : 1.1);
      stroke(data.coastlines, "#5d7287", coords.z >= 8 ? 1.2 : 0.8);
      return tile;
    },
  });

  // Town and admin-1 names (and towns' built-up disks) of the offline map, for the view.
  const PlaceNames = L.Layer.extend({
    initialize(data, renderer) { this._data = data; this._renderer = renderer; this._request = null; },
    onAdd(map) {
      this._group = L.layerGroup().addTo(map);
      this._update();
      map.on("moveend", this._update, this);
    },
    onRemove(map) {
      map.off("moveend", this._update, this);
      if (this._request) this._request.abort();
      this._group.remove();
    },
    _update() {
      const map = this._map;
      if (!map) return;
      const b = map.getBounds();
      let lon0 = b.getWest();
      let lon1 = b.getEast();
      if (lon1 - lon0 > 360) { lon0 = -180; lon1 = 180; }
      const lat0 = Math.max(-90, b.getSouth());
      const lat1 = Math.min(90, b.getNorth());
      if (this._request) this._request.abort();
      const request = new AbortController();
      this._request = request;
      const q = new URLSearchParams({ lat0, lat1, lon0, lon1, limit: 80 });
      getJSON(`/v1/places?${q}`, { signal: request.signal })
        .then((d) => { if (this._request === request && this._map) this._draw(d.places || []); })
        .catch(() => {});
    },
    _draw(places) {
      const map = this._map;
      const z = map.getZoom();
      this._group.clearLayers();
      const taken = [];
      const free = (x, y, w, h) => {
        const box = [x - 3, y - h / 2 - 2, x + w + 3, y + h / 2 + 2];
        if (taken.some((o) => box[0] < o[2] && box[2] > o[0] && box[1] < o[3] && box[3] > o[1])) return false;
        taken.push(box);
        return true;
      };
      const label = (latlng, text, cls, width) => {
        const p = map.latLngToContainerPoint(latlng);
        if (!free(p.x, p.y, width, 14)) return;
        this._group.addLayer(L.marker(latlng, {
          icon: L.divIcon({ className: cls, html: `<span>${escapeHtml(text)}</span>`, iconSize: null }),
          keyboard: false, interactive: false, pane: "gf-names",
        }));
      };
      if (z >= 4 && z <= 9 && this._data) {
        const a = this._data.admin1;
        const b = map.getBounds();
        const shown = [];
        for (let i = 0; i < a.name.length; i++) {
          const lat = a.lat[i] / a.scale;
          const lon = a.lon[i] / a.scale;
          if (b.contains([lat, lon])) shown.push(i);
        }
        shown.sort((i, j) => a.places[j] - a.places[i]);
        for (const i of shown.slice(0, 40)) {
          const name = a.name[i];
          label([a.lat[i] / a.scale, a.lon[i] / a.scale], name, "gf-admin1", 6.5 * name.length);
        }
      }
      for (const p of places) {
        const r = (p.built_up_radius_km || 0) * 1000;
        if (z >= 7 && r > 0) {
          this._group.addLayer(L.circle([p.lat, p.lon], {
            radius: r, stroke: false, fillColor: BUILT_UP, fillOpacity: 0.6, interactive: false,
            renderer: this._renderer,
          }));
        }
      }
      for (const p of places) {
        const latlng = [p.lat, p.lon];
        const before = taken.length;
        label(latlng, p.name, "gf-town", 6.2 * p.name.length + 8);
        if (taken.length > before) {
          this._group.addLayer(L.circleMarker(latlng, {
            radius: 2.5, stroke: false, fillColor: "#2b2f36", fillOpacity: 0.9, interactive: false,
            renderer: this._renderer,
          }));
        }
      }
    },
  });

  function escapeHtml(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }

  // ------------------------------------------------------------ the answer's layers

  // The density grid, resampled per screen pixel so that it stays true in Web Mercator.
  const DensityTiles = L.GridLayer.extend({
    initialize(density, options) {
      L.setOptions(this, options);
      const lat = density.lat;
      const lon = density.lon;
      this._h = lat.length;
      this._w = lon.length;
      this._latAsc = this._h < 2 || lat[1] > lat[0];
      this._lat0 = this._latAsc ? lat[0] : lat[this._h - 1];
      this._dLat = this._h > 1 ? Math.abs(lat[1] - lat[0]) : 180;
      this._lon0 = lon[0];
      this._dLon = this._w > 1 ? lon[1] - lon[0] : 360;
      this._global = Math.abs(this._w * this._dLon - 360) < 1e-6;
      let max = -Infinity;
      for (const row of density.log_density) for (const v of row) if (v > max) max = v;
      // rows from south to north
      this._rel = new Float32Array(this._h * this._w);
      for (let i = 0; i < this._h; i++) {
        const row = density.log_density[this._latAsc ? i : this._h - 1 - i];
        for (let j = 0; j < this._w; j++) this._rel[i * this._w + j] = Math.exp(row[j] - max);
      }
    },
    _value(lat, lon) {
      const v = (lat - this._lat0) / this._dLat;
      if (v < -0.5 || v > this._h - 0.5) return 0;
      let u = (lon - this._lon0) / this._dLon;
      if (this._global) {
        u = ((u % this._w) + this._w) % this._w;
      } else {
        const turn = 360 / this._dLon;
        if (u < -0.5) u += turn;
        else if (u > this._w - 0.5) u -= turn;
        if (u < -0.5 || u > this._w - 0.5) return 0;
      }
      const i0 = Math.max(0, Math.min(this._h - 1, Math.floor(v)));
      const i1 = Math.min(this._h - 1, i0 + 1);
      const fv = Math.max(0, Math.min(1, v - i0));
      let j0 = Math.floor(u);
      let j1 = j0 + 1;
      const fu = Math.max(0, Math.min(1, u - j0));
      if (this._global) { j0 = (j0 + this._w) % this._w; j1 = j1 % this._w; } else {
        j0 = Math.max(0, Math.min(this._w - 1, j0)); j1 = Math.min(this._w - 1, j1);
      }
      const r = this._rel;
      const w = this._w;
      return (1 - fv) * ((1 - fu) * r[i0 * w + j0] + fu * r[i0 * w + j1])
        + fv * ((1 - fu) * r[i1 * w + j0] + fu * r[i1 * w + j1]);
    },
    createTile(coords) {
      const tile = document.createElement("canvas");
      tile.width = tile.height = TILE;
      const ctx = tile.getContext("2d");
      const img = ctx.createImageData(TILE, TILE);
      const z = coords.z;
      const w = worldPx(z);
      const lons = new Float64Array(TILE);
      for (let i = 0; i < TILE; i++) lons[i] = ((coords.x * TILE + i + 0.5) / w) * 360 - 180;
      for (let y = 0; y < TILE; y++) {
        const lat = yToLat(coords.y * TILE + y + 0.5, z);
        for (let x = 0; x < TILE; x++) {
          const rel = this._value(lat, lons[x]);
          if (rel <= 1e-4) continue;
          const k = 4 * (y * TILE + x);
          img.data[k] = 217; img.data[k + 1] = 38; img.data[k + 2] = 25;
          // sqrt keeps the tails visible next to a sharp mode
          img.data[k + 3] = Math.round(200 * Math.sqrt(Math.min(1, rel)));
        }
      }
      ctx.putImageData(img, 0, 0);
      return tile;
    },
  });

  const STAR = '<svg viewBox="-12 -12 24 24" width="26" height="26" aria-hidden="true"><path d="M0,-11 L2.6,-3.6 L10.5,-3.4 L4.2,1.4 L6.5,9 L0,4.5 L-6.5,9 L-4.2,1.4 L-10.5,-3.4 L-2.6,-3.6 Z" fill="#f5b700" stroke="#222" stroke-width="1.3"/></svg>';
  const CROSS = '<svg viewBox="-10 -10 20 20" width="20" height="20" aria-hidden="true"><path d="M-7,-7 L7,7 M7,-7 L-7,7" stroke="#fff" stroke-width="6" stroke-linecap="round"/><path d="M-7,-7 L7,7 M7,-7 L-7,7" stroke="#15803d" stroke-width="3.4" stroke-linecap="round"/></svg>';

  function pct(p) { const v = 100 * p; return v >= 10 ? `${v.toFixed(0)}%` : `${v.toFixed(1)}%`; }

  // The `within` text the request was sent with, as a map layer (null when none).
  function withinLayer(text, basemap, turn) {
    if (!text) return null;
    const style = { color: "#7c3aed", weight: 2, dashArray: "6 4", fillColor: "#7c3aed", fillOpacity: 0.05, interactive: false };
    const t = text.trim();
    const bbox = t.match(/^\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*$/);
    if (bbox) {
      const [lat0, lon0, lat1, lon1] = bbox.slice(1).map(Number);
      const east = lon1 < lon0 ? lon1 + 360 : lon1;
      return L.rectangle([[lat0, turn(lon0)], [lat1, turn(lon0) + (east - lon0)]], style);
    }
    if (/^[A-Za-z]{2}$/.test(t)) {
      const c = basemap && basemap.countries[t.toUpperCase()];
      if (!c) return null;
      const rings = c.rings.map((r) => {
        const ll = [];
        for (let i = 0; i < r.pts.length; i += 2) ll.push([r.pts[i + 1], r.pts[i]]);
        return ll;
      });
      return L.polygon(rings, { ...style, fillRule: "evenodd" });
    }
    try {
      return L.geoJSON(JSON.parse(t), { style: () => style, interactive: false });
    } catch (e) {
      return null;
    }
  }

  // A map of `result` in `el`. opts: {within, photos: [{name, lat, lon}], title, onBase}.
  async function createAnswerMap(el, result, opts = {}) {
    const [config, basemap] = await Promise.all([loadConfig(), loadBasemap()]);
    const e = result.map_extent;
    const extent = Array.isArray(e) && e.length === 4 ? e : null;
    const lonStart = extent ? extent[2] : -180;
    // longitudes turned by whole turns into the window, so one across 180 draws whole
    const turn = (lon) => (extent ? ((((lon - lonStart) % 360) + 360) % 360) + lonStart : lon);
    const canvas = L.canvas({ padding: 0.3 });
    const still = window.matchMedia && window.matchMedia("(prefers-reduced-motion: reduce)").matches;
    const map = L.map(el, {
      zoomAnimation: !still, fadeAnimation: !still, markerZoomAnimation: !still, inertia: !still,
      preferCanvas: true, renderer: canvas, zoomSnap: 0.25, zoomDelta: 1, minZoom: 1, maxZoom: 19,
      worldCopyJump: false, attributionControl: true,
    });
    map.attributionControl.setPrefix('<a href="https://leafletjs.com">Leaflet</a>');
    // above the tiles, in this order: built-up disks, density, samples and shapes (overlay
    // pane, 400), place names, markers (600)
    for (const [pane, z] of [["gf-base", 250], ["gf-density", 300], ["gf-names", 450]]) {
      map.createPane(pane).style.zIndex = String(z);
      map.getPane(pane).style.pointerEvents = "none";
    }
    L.control.scale({ imperial: false, maxWidth: 140 }).addTo(map);

    const offline = L.layerGroup([
      new OfflineTiles(basemap, { attribution: config.offline_attribution || "", maxZoom: 19 }),
      new PlaceNames(basemap, L.canvas({ pane: "gf-base", padding: 0.3 })),
    ]);
    const bases = {};
    let tiles = null;
    if (config.tiles && config.tiles.url) {
      tiles = L.tileLayer(config.tiles.url, { attribution: config.tiles.attribution, maxZoom: 19, crossOrigin: false });
      bases["OpenStreetMap"] = tiles;
    }
    bases["Offline map"] = offline;
    const setBase = (name) => { el.dataset.base = name; if (opts.onBase) opts.onBase(name); };
    map.on("baselayerchange", (ev) => setBase(ev.layer === offline ? "offline" : "tiles"));

    const overlays = {};
    const d = result.density;
    if (d && d.log_density && d.log_density.length) {
      overlays["Probability density"] = new DensityTiles(d, { opacity: 0.85, pane: "gf-density", maxZoom: 19 });
    }
    const samples = result.samples || [];
    if (samples.length) {
      const dots = samples.map(([lat, lon]) => L.circleMarker([lat, turn(lon)], {
        radius: 2.2, stroke: false, fillColor: "#1f4e9c", fillOpacity: 0.55, interactive: false, renderer: canvas,
      }));
      overlays[`Samples (${samples.length})`] = L.layerGroup(dots);
    }
    const regionCircles = [];
    const regionMarkers = [];
    const regions = result.regions || [];
    if (regions.length) {
      const group = L.layerGroup();
      regions.forEach((reg, i) => {
        const ll = [reg.lat, turn(reg.lon)];
        const name = reg.label || (reg.place && (reg.place.city || reg.place.country)) || "region";
        const text = `${i + 1}. ${name} · ${pct(reg.probability)}`;
        const circle = L.circle(ll, {
          radius: Math.max(1, (reg.radius_km || 0) * 1000), color: "#111", weight: 1.3, dashArray: "5 4",
          fillColor: "#111", fillOpacity: 0.04, interactive: false,
        });
        const marker = L.marker(ll, {
          icon: L.divIcon({ className: "gf-region", html: `<span>${i + 1}</span>`, iconSize: [22, 22] }),
          title: text, alt: text, keyboard: true, riseOnHover: true,
        }).bindTooltip(escapeHtml(text), { direction: "right", offset: [10, 0] });
        marker.on("click", () => zoomToRegion(i));
        group.addLayer(circle);
        group.addLayer(marker);
        regionCircles.push(circle);
        regionMarkers.push(marker);
      });
      overlays["Top regions"] = group;
    }
    const bg = result.best_guess;
    if (bg) {
      const text = `Best guess: ${bg.label || ""}`.trim();
      overlays["Best guess"] = L.marker([bg.lat, turn(bg.lon)], {
        icon: L.divIcon({ className: "gf-star", html: STAR, iconSize: [26, 26] }),
        title: text, alt: text, zIndexOffset: 1000, keyboard: true,
      }).bindTooltip(escapeHtml(text));
    }
    if (result.exif_gps) {
      overlays["True location (EXIF GPS)"] = L.marker([result.exif_gps.lat, turn(result.exif_gps.lon)], {
        icon: L.divIcon({ className: "gf-truth", html: CROSS, iconSize: [20, 20] }),
        title: "True location (EXIF GPS)", alt: "True location (EXIF GPS)", zIndexOffset: 900, keyboard: true,
      });
    }
    const within = withinLayer(opts.within, basemap, turn);
    if (within) overlays["Only-inside region"] = within;
    if (opts.photos && opts.photos.length) {
      overlays["Each photo's best guess"] = L.layerGroup(opts.photos.map((p) => L.circleMarker([p.lat, turn(p.lon)], {
        radius: 6, color: "#0f766e", weight: 2, fillColor: "#99f6e4", fillOpacity: 0.9,
      }).bindTooltip(escapeHtml(p.name))));
    }
    for (const layer of Object.values(overlays)) layer.addTo(map);
    const control = L.control.layers(bases, overlays, { collapsed: true }).addTo(map);

    // tiles first when they may be reachable; the offline map as soon as they are not
    if (tiles && !shared.tilesFailed) {
      tiles.addTo(map);
      setBase("tiles");
      let loaded = false;
      const fallBack = (why) => {
        if (loaded || !map.hasLayer(tiles)) return;
        shared.tilesFailed = true;
        map.removeLayer(tiles);
        offline.addTo(map);
        setBase("offline");
        el.dataset.tilesNote = why;
        if (opts.onTilesFailed) opts.onTilesFailed(why);
      };
      tiles.on("tileload", () => { loaded = true; el.dataset.tiles = "loaded"; });
      tiles.on("tileerror", () => fallBack("unreachable"));
      setTimeout(() => fallBack("too slow"), 8000);
    } else {
      offline.addTo(map);
      setBase("offline");
    }

    const answerBounds = extent
      ? L.latLngBounds([extent[0], extent[2]], [extent[1], extent[3]])
      : null;
    function showAnswer() {
      if (answerBounds) map.fitBounds(answerBounds, { animate: false });
      else map.setView([20, 0], 1, { animate: false });
    }
    function showWorld() { map.setView([20, extent ? turn(0) : 0], 1, { animate: false }); }
    function zoomToRegion(i) {
      const c = regionCircles[i];
      if (!c) return;
      if (!map.hasLayer(overlays["Top regions"])) map.addLayer(overlays["Top regions"]);
      map.fitBounds(c.getBounds(), { padding: [24, 24], maxZoom: 18, animate: false });
      regionMarkers[i].openTooltip();
    }
    map.on("zoomend", () => { el.dataset.zoom = map.getZoom().toFixed(2); });
    showAnswer();
    el.dataset.zoom = map.getZoom().toFixed(2);
    const handle = { map, overlays, bases, control, showAnswer, showWorld, zoomToRegion, answerBounds };
    el.globeflowMap = handle;
    return handle;
  }

  window.GlobeflowMap = { createAnswerMap, loadConfig, loadBasemap };
})();
