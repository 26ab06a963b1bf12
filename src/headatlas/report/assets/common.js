"use strict";
// headatlas front end, shared by the report and the live viewer.
// No external code. Every piece of data reaches the page through textContent, never innerHTML.

const HA = (() => {
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  // Same rules as headatlas.report.data.display_token.
  function displayToken(token, limit) {
    const max = limit || 16;
    let t = String(token).replace(/\r\n|\n|\r/g, "↵").replace(/\t/g, "⇥");
    t = t.replace(/[\x00-\x08\x0b-\x1f\x7f]/g, (c) => "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"));
    t = t.replace(/ {2,}/g, (m) => "␣" + m.length);
    if (t === "") t = "∅";
    else if (t === " ") t = "␣";
    return t.length <= max ? t : t.slice(0, max - 1) + "…";
  }

  function fmt(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    return Number(v).toFixed(digits === undefined ? 3 : digits);
  }

  // ---- colours -------------------------------------------------------------------------
  const BLUES = ["#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b"];
  const VIRIDIS = ["#440154", "#472c7a", "#3b518b", "#2c718e", "#21908d", "#27ad81", "#5cc863", "#aadc32", "#fde725"];

  function hexToRgb(h) {
    return [parseInt(h.slice(1, 3), 16), parseInt(h.slice(3, 5), 16), parseInt(h.slice(5, 7), 16)];
  }
  function ramp(stops) {
    const rgb = stops.map(hexToRgb);
    const lut = [];
    for (let i = 0; i < 256; i++) {
      const x = (i / 255) * (rgb.length - 1);
      const k = Math.min(rgb.length - 2, Math.floor(x));
      const f = x - k;
      lut.push(rgb[k].map((c, j) => Math.round(c + (rgb[k + 1][j] - c) * f)));
    }
    return (v) => lut[Math.max(0, Math.min(255, Math.round(v * 255)))];
  }
  const RDBU = ["#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582", "#d6604d", "#b2182b"];
  const blues = ramp(BLUES);
  const viridis = ramp(VIRIDIS);
  const rdbu = ramp(RDBU);
  const css = (c) => "rgb(" + c[0] + "," + c[1] + "," + c[2] + ")";
  // attention colour: square-root scale, so weak but real patterns stay visible next to a sink
  const attnColor = (a) => blues(Math.sqrt(Math.max(0, Math.min(1, a))));

  // score colour, from the score's spec: signed scores on a diverging scale centred on 0,
  // unbounded ones from 0 to their largest value, the rest from 0 to 1
  function scoreScale(payload, what) {
    const spec = payload.scores.find((s) => s.name === what) || {};
    const vals = (payload.heads.scores[what] || []).filter((v) => v !== null);
    if (spec.signed) {
      const span = Math.max(1e-9, ...vals.map((v) => Math.abs(v)));
      const unit = (v) => 0.5 + v / (2 * span);
      const magnitude = (v) => Math.min(1, Math.abs(v) / span);
      return { signed: true, low: -span, high: span, unit, magnitude, color: (v) => css(rdbu(unit(v))) };
    }
    const high = spec.bounded === false ? Math.max(1e-9, ...vals) : 1;
    const unit = (v) => Math.max(0, Math.min(1, v / high));
    return { signed: false, low: 0, high, unit, magnitude: unit, color: (v) => css(viridis(unit(v))) };
  }

  // ---- maps ------------------------------------------------------------------------------
  function bytesOf(b64) {
    const s = atob(b64);
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }

  // One head's map from an example ({n, causal, heads, data}) as Float32Array(n*n).
  function exampleMap(ex, layer, head) {
    if (!ex._bytes) ex._bytes = bytesOf(ex.data);
    const n = ex.n;
    const stride = ex.causal ? (n * (n + 1)) / 2 : n * n;
    const base = (layer * ex.heads + head) * stride;
    const out = new Float32Array(n * n);
    for (let i = 0; i < n; i++) {
      for (let j = 0; j < n; j++) {
        if (ex.causal) {
          if (j <= i) out[i * n + j] = ex._bytes[base + (i * (i + 1)) / 2 + j] / 255;
        } else {
          out[i * n + j] = ex._bytes[base + i * n + j] / 255;
        }
      }
    }
    return out;
  }

  function fullMap(b64, n) {
    const bytes = bytesOf(b64);
    const out = new Float32Array(n * n);
    for (let i = 0; i < n * n; i++) out[i] = bytes[i] / 255;
    return out;
  }

  // ---- tooltip ---------------------------------------------------------------------------
  let tipNode = null;
  function tip() {
    if (!tipNode) {
      tipNode = el("div", "tip");
      tipNode.style.display = "none";
      document.body.appendChild(tipNode);
    }
    return tipNode;
  }
  function showTip(evt, build) {
    const t = clear(tip());
    build(t);
    t.style.display = "block";
    const pad = 14;
    let x = evt.clientX + pad;
    let y = evt.clientY + pad;
    const r = t.getBoundingClientRect();
    if (x + r.width > window.innerWidth - 4) x = evt.clientX - r.width - pad;
    if (y + r.height > window.innerHeight - 4) y = evt.clientY - r.height - pad;
    t.style.left = Math.max(4, x) + "px";
    t.style.top = Math.max(4, y) + "px";
  }
  function hideTip() {
    if (tipNode) tipNode.style.display = "none";
  }
  function tokSpan(text) {
    return el("span", "tok", displayToken(text, 40));
  }

  // ---- heatmap ---------------------------------------------------------------------------
  // Draws an n × n map with token labels on both axes (labels thinned when cells are small).
  function heatmap(container, tokens, values, n, opts) {
    const o = opts || {};
    clear(container);
    const maxPx = o.maxPx || 470;
    const cell = Math.max(1, Math.min(16, maxPx / n));
    const size = Math.round(cell * n);
    const labelEvery = Math.max(1, Math.ceil(11 / cell));
    const fontPx = Math.max(8, Math.min(11, cell - 1));
    const causal = !!o.causal;
    const wrap = el("div", "hm");
    const rowW = o.rowLabelWidth || 104;
    const colH = o.colLabelHeight || 78;
    wrap.style.gridTemplateColumns = rowW + "px " + size + "px";
    wrap.style.gridTemplateRows = colH + "px " + size + "px";
    const corner = el("div", "hm-corner");
    const xl = el("div", "xl");
    const yl = el("div", "yl");
    xl.style.height = colH + "px";
    yl.style.height = size + "px";
    const xs = [];
    const ys = [];
    for (let i = 0; i < n; i += labelEvery) {
      const label = displayToken(tokens[i] === undefined ? "" : tokens[i], 14);
      const x = el("span", null, label);
      x.style.left = i * cell + cell / 2 - fontPx / 2 + "px";
      x.style.fontSize = fontPx + "px";
      xl.appendChild(x);
      xs[i] = x;
      const y = el("span", null, label);
      y.style.top = i * cell + (cell - fontPx) / 2 + "px";
      y.style.fontSize = fontPx + "px";
      yl.appendChild(y);
      ys[i] = y;
    }
    const cv = el("canvas");
    const dpr = window.devicePixelRatio || 1;
    cv.width = Math.round(size * dpr);
    cv.height = Math.round(size * dpr);
    cv.style.width = size + "px";
    cv.style.height = size + "px";
    const box = el("div");
    box.style.position = "relative";
    box.appendChild(cv);
    const cursor = el("div", "cursor");
    cursor.style.width = cell + "px";
    cursor.style.height = cell + "px";
    box.appendChild(cursor);
    wrap.append(corner, xl, yl, box);
    container.appendChild(wrap);

    const ctx = cv.getContext("2d");
    const img = ctx.createImageData(n, n);
    for (let i = 0; i < n; i++) {
      for (let j = 0; j < n; j++) {
        const v = values[i * n + j];
        const c = causal && j > i ? [243, 243, 243] : attnColor(v);
        const p = (i * n + j) * 4;
        img.data[p] = c[0];
        img.data[p + 1] = c[1];
        img.data[p + 2] = c[2];
        img.data[p + 3] = 255;
      }
    }
    const off = document.createElement("canvas");
    off.width = n;
    off.height = n;
    off.getContext("2d").putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, 0, 0, cv.width, cv.height);

    let lit = [];
    function light(i, j) {
      lit.forEach((s) => s.classList.remove("hl"));
      lit = [];
      const qi = i - (i % labelEvery);
      const kj = j - (j % labelEvery);
      if (ys[qi] && qi === i) lit.push(ys[qi]);
      if (xs[kj] && kj === j) lit.push(xs[kj]);
      lit.forEach((s) => s.classList.add("hl"));
    }
    cv.addEventListener("mousemove", (evt) => {
      const r = cv.getBoundingClientRect();
      const j = Math.min(n - 1, Math.floor(((evt.clientX - r.left) / r.width) * n));
      const i = Math.min(n - 1, Math.floor(((evt.clientY - r.top) / r.height) * n));
      if (i < 0 || j < 0) return;
      cursor.style.display = "block";
      cursor.style.left = j * cell - 1 + "px";
      cursor.style.top = i * cell - 1 + "px";
      light(i, j);
      showTip(evt, (t) => {
        t.appendChild(el("div", "t", "attention " + fmt(values[i * n + j], 3)));
        const line = el("div");
        line.append(el("span", null, "query " + i + " "), tokSpan(tokens[i]));
        const line2 = el("div");
        line2.append(el("span", null, "→ key " + j + " "), tokSpan(tokens[j]));
        t.append(line, line2);
      });
      if (o.onHover) o.onHover(i, j);
    });
    cv.addEventListener("mouseleave", () => {
      cursor.style.display = "none";
      light(-1, -1);
      hideTip();
    });
    if (labelEvery > 1) {
      container.appendChild(el("div", "hm-caption", "1 in " + labelEvery + " tokens labelled; hover the map for every token"));
    }
    return wrap;
  }

  // ---- line view (token-to-token, as bertviz's head view) --------------------------------
  function lineView(container, tokens, values, n, opts) {
    const o = opts || {};
    clear(container);
    const limit = o.limit || 160;
    const m = Math.min(n, limit);
    const rowH = 15;
    const width = o.width || 150;
    const lv = el("div", "lv");
    const left = el("div", "col q");
    const right = el("div", "col k");
    const cv = el("canvas");
    const dpr = window.devicePixelRatio || 1;
    cv.width = Math.round(width * dpr);
    cv.height = Math.round(m * rowH * dpr);
    cv.style.width = width + "px";
    cv.style.height = m * rowH + "px";
    const ls = [];
    const rs = [];
    for (let i = 0; i < m; i++) {
      const a = el("span", null, displayToken(tokens[i], 14));
      a.style.height = rowH + "px";
      a.style.lineHeight = rowH + "px";
      a.dataset.index = String(i);
      left.appendChild(a);
      ls.push(a);
      const b = el("span", null, displayToken(tokens[i], 14));
      b.style.height = rowH + "px";
      b.style.lineHeight = rowH + "px";
      right.appendChild(b);
      rs.push(b);
    }
    lv.append(left, cv, right);
    container.appendChild(lv);
    const ctx = cv.getContext("2d");
    ctx.scale(dpr, dpr);
    function draw(focus) {
      ctx.clearRect(0, 0, width, m * rowH);
      rs.forEach((s) => (s.style.background = ""));
      ls.forEach((s) => s.classList.toggle("on", s.dataset.index === String(focus)));
      for (let i = 0; i < m; i++) {
        if (focus !== null && focus !== i) continue;
        for (let j = 0; j < m; j++) {
          const a = values[i * n + j];
          if (a < (focus === null ? 0.04 : 0.01)) continue;
          ctx.strokeStyle = "rgba(52,84,209," + Math.min(1, focus === null ? a * 0.9 : 0.25 + a) + ")";
          ctx.lineWidth = focus === null ? 1 : 1 + 3 * a;
          ctx.beginPath();
          ctx.moveTo(2, i * rowH + rowH / 2);
          ctx.lineTo(width - 2, j * rowH + rowH / 2);
          ctx.stroke();
          if (focus !== null) rs[j].style.background = "rgba(52,84,209," + Math.min(0.6, a) + ")";
        }
      }
    }
    ls.forEach((s, i) => {
      s.addEventListener("mouseenter", () => draw(i));
      s.addEventListener("mouseleave", () => draw(null));
    });
    draw(null);
    if (n > limit) container.appendChild(el("div", "hm-caption", "lines for the first " + limit + " tokens"));
    return lv;
  }

  // ---- layer × head grid -----------------------------------------------------------------
  // payload: {model:{n_layers,n_heads}, heads:{layer,head,roles,scores,std}, scores:[...], roles:[...]}
  function headGrid(container, payload, opts) {
    const o = opts || {};
    clear(container);
    const L = payload.model.n_layers;
    const H = payload.model.n_heads;
    const avail = o.width || Math.max(400, (container.clientWidth || 900) - 40);
    const cellPx = Math.max(9, Math.min(34, Math.floor(avail / L) - 2));
    const g = el("div", "grid");
    g.style.gridTemplateColumns = "34px repeat(" + L + ", " + cellPx + "px)";
    g.appendChild(el("div", "corner", "H\\L"));
    const step = cellPx < 16 ? Math.ceil(16 / cellPx) : 1;
    for (let l = 0; l < L; l++) g.appendChild(el("div", "axis", l % step === 0 ? String(l) : ""));
    const cells = new Map();
    const index = new Map();
    payload.heads.layer.forEach((l, k) => index.set(l + ":" + payload.heads.head[k], k));
    for (let h = 0; h < H; h++) {
      g.appendChild(el("div", "axis row", "H" + h));
      for (let l = 0; l < L; l++) {
        const c = el("div", "cell");
        c.style.height = cellPx + "px";
        c.dataset.layer = String(l);
        c.dataset.head = String(h);
        c.tabIndex = 0;
        c.setAttribute("role", "button");
        c.setAttribute("aria-label", "layer " + l + " head " + h);
        const k = index.get(l + ":" + h);
        c.addEventListener("mouseenter", (evt) => showTip(evt, (t) => headTip(t, payload, k, l, h)));
        c.addEventListener("mousemove", (evt) => showTip(evt, (t) => headTip(t, payload, k, l, h)));
        c.addEventListener("mouseleave", hideTip);
        c.addEventListener("click", (evt) => o.onSelect && o.onSelect(l, h, evt.shiftKey));
        c.addEventListener("keydown", (evt) => {
          if (evt.key === "Enter" || evt.key === " ") {
            evt.preventDefault();
            if (o.onSelect) o.onSelect(l, h, evt.shiftKey);
          }
        });
        cells.set(l + ":" + h, c);
        g.appendChild(c);
      }
    }
    const wrap = el("div", "grid-wrap");
    wrap.appendChild(g);
    container.appendChild(wrap);
    const roleColor = new Map(payload.roles.map((r) => [r.role, r.color]));

    function colorBy(what, legend) {
      const scale = what === "role" ? null : scoreScale(payload, what);
      cells.forEach((c, key) => {
        const k = index.get(key);
        if (k === undefined) {
          c.style.background = "#ffffff";
          return;
        }
        if (what === "role") {
          const roles = payload.heads.roles[k] || [];
          if (!roles.length) c.style.background = payload.no_role_color || "#eeeeee";
          else if (roles.length === 1) c.style.background = roleColor.get(roles[0]) || "#444";
          else {
            const w = 100 / roles.length;
            const parts = roles.map((r, i) => (roleColor.get(r) || "#444") + " " + i * w + "% " + (i + 1) * w + "%");
            c.style.background = "linear-gradient(90deg, " + parts.join(", ") + ")";
          }
        } else {
          const v = payload.heads.scores[what][k];
          c.style.background = v === null || !scale ? "#ffffff" : scale.color(v);
        }
      });
      if (legend) drawLegend(legend, payload, what, scale);
    }
    function select(l, h, cls) {
      const name = cls || "sel";
      cells.forEach((c) => c.classList.remove(name));
      const c = cells.get(l + ":" + h);
      if (c) c.classList.add(name);
    }
    function dim(pred) {
      cells.forEach((c, key) => {
        const k = index.get(key);
        c.classList.toggle("dim", !!pred && !(k !== undefined && pred(k)));
      });
    }
    return { colorBy, select, dim, cells };
  }

  function drawLegend(node, payload, what, scale) {
    clear(node);
    if (what === "role") {
      payload.roles.forEach((r) => {
        if (!r.count) return;
        const c = el("span", "chip");
        const sw = el("span", "sw");
        sw.style.background = r.color;
        c.append(sw, el("span", null, r.role + " " + r.count));
        c.title = r.meaning;
        node.appendChild(c);
      });
      const c = el("span", "chip");
      const sw = el("span", "sw");
      sw.style.background = payload.no_role_color || "#eeeeee";
      c.append(sw, el("span", null, "none"));
      node.appendChild(c);
      return;
    }
    const bar = el("span", "bar");
    bar.style.background = "linear-gradient(90deg, " + (scale.signed ? RDBU : VIRIDIS).join(", ") + ")";
    const digits = (x) => (Math.abs(x) > 2 ? 1 : 2);
    node.append(el("span", "muted", fmt(scale.low, digits(scale.low))), bar, el("span", "muted", fmt(scale.high, digits(scale.high))));
  }

  function scoreLabel(payload, name) {
    const s = payload.scores.find((x) => x.name === name);
    return s ? s.label : name;
  }

  function headTip(t, payload, k, l, h) {
    t.appendChild(el("div", "t", "layer " + l + ", head " + h + (k !== undefined && payload.heads.kv_head.length ? " · kv " + payload.heads.kv_head[k] : "")));
    if (k === undefined) return;
    const roles = payload.heads.roles[k] || [];
    t.appendChild(el("div", null, roles.length ? "roles: " + roles.join(", ") : "no role"));
    const tb = el("table");
    payload.scores.forEach((s) => {
      const tr = el("tr");
      const v = payload.heads.scores[s.name][k];
      const sd = payload.heads.std[s.name] ? payload.heads.std[s.name][k] : null;
      tr.append(el("td", null, s.label), el("td", "v", fmt(v) + (sd !== null ? " ± " + fmt(sd, 2) : "")));
      tb.appendChild(tr);
    });
    t.appendChild(tb);
  }

  function roleTag(payload, role) {
    const r = payload.roles.find((x) => x.role === role);
    const t = el("span", "role-tag", role);
    t.style.background = r ? r.color : "#444";
    if (r && r.color === "#9ecae1") t.style.color = "#123";
    return t;
  }

  function scoreOptions(select, payload, withRole) {
    clear(select);
    if (withRole) select.appendChild(new Option("role", "role"));
    payload.scores.forEach((s) => select.appendChild(new Option(s.label, s.name)));
  }

  return {
    el,
    clear,
    displayToken,
    fmt,
    attnColor,
    exampleMap,
    fullMap,
    heatmap,
    lineView,
    headGrid,
    headTip,
    roleTag,
    scoreLabel,
    scoreOptions,
    scoreScale,
    showTip,
    hideTip,
  };
})();
