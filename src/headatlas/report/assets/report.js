"use strict";
// The self-contained report: grid coloured by score or role, head detail, sortable table.
(() => {
  const { el, clear, fmt } = HA;
  const data = JSON.parse(document.getElementById("ha-data").textContent);
  const heads = data.heads;
  const L = data.model.n_layers;
  const H = data.model.n_heads;
  const indexOf = new Map();
  heads.layer.forEach((l, k) => indexOf.set(l + ":" + heads.head[k], k));
  const state = { layer: 0, head: 0, example: 0, colorBy: "role", sortKey: "layer", sortDir: 1, filter: "", role: "" };

  // ---- header ----
  document.getElementById("model-name").textContent = data.model.name || "model";
  const facts = [
    L + " layers × " + H + " heads" + (data.model.n_kv_heads && data.model.n_kv_heads !== H ? " (" + data.model.n_kv_heads + " KV heads)" : ""),
    data.model.arch || "",
    data.model.causal === false ? "bidirectional" : "causal",
  ];
  if (data.run.tokens) facts.push(Number(data.run.tokens).toLocaleString("en-US") + " tokens scanned");
  if (data.run.probes && data.run.probes.length) facts.push("probes: " + data.run.probes.join(", "));
  document.getElementById("model-facts").textContent = facts.filter(Boolean).join(" · ");

  // ---- grid ----
  const colorSel = document.getElementById("color-by");
  HA.scoreOptions(colorSel, data, true);
  const legend = document.getElementById("legend");
  const grid = HA.headGrid(document.getElementById("grid"), data, { onSelect: (l, h) => selectHead(l, h, true) });
  colorSel.addEventListener("change", () => {
    state.colorBy = colorSel.value;
    grid.colorBy(state.colorBy, legend);
  });

  // ---- detail ----
  function selectHead(l, h, scroll) {
    state.layer = l;
    state.head = h;
    grid.select(l, h);
    renderDetail();
    highlightRow();
    if (scroll) document.getElementById("detail").scrollIntoView({ behavior: "smooth", block: "nearest" });
  }

  function renderDetail() {
    const k = indexOf.get(state.layer + ":" + state.head);
    document.getElementById("head-title").textContent = "Layer " + state.layer + " · head " + state.head;
    const kv = document.getElementById("head-kv");
    kv.textContent = k !== undefined && heads.kv_head.length ? "reads KV head " + heads.kv_head[k] : "";
    const rolesNode = clear(document.getElementById("head-roles"));
    const roles = k !== undefined ? heads.roles[k] || [] : [];
    roles.forEach((r) => rolesNode.appendChild(HA.roleTag(data, r)));
    if (!roles.length) rolesNode.appendChild(el("span", "muted", "no role"));

    const tb = clear(document.getElementById("head-scores"));
    data.scores.forEach((s) => {
      const v = k !== undefined ? heads.scores[s.name][k] : null;
      const sd = k !== undefined && heads.std[s.name] ? heads.std[s.name][k] : null;
      const tr = el("tr", s.role && roles.includes(s.role) ? "role" : null);
      tr.title = s.description + (s.threshold !== null ? " (role " + s.role + " at ≥ " + s.threshold + ")" : "");
      const barCell = el("td", "barcell");
      const bar = el("div", "bar");
      bar.style.width = Math.round(100 * (v === null ? 0 : HA.scoreScale(data, s.name).magnitude(v))) + "%";
      barCell.appendChild(bar);
      tr.append(el("td", null, s.label), barCell, el("td", "v", fmt(v) + (sd !== null ? " ± " + fmt(sd, 2) : "")));
      tb.appendChild(tr);
    });
    drawProfile(k);
    renderExample();
  }

  // A w × h canvas drawn at the screen's pixel density; returns its 2-D context.
  function sharpCanvas(cv, w, h) {
    const dpr = window.devicePixelRatio || 1;
    cv.width = w * dpr;
    cv.height = h * dpr;
    cv.style.width = w + "px";
    cv.style.height = h + "px";
    const ctx = cv.getContext("2d");
    ctx.scale(dpr, dpr);
    return ctx;
  }

  function drawProfile(k) {
    const cv = document.getElementById("profile");
    const cap = document.getElementById("profile-caption");
    const prof = k !== undefined && heads.profile ? heads.profile[k] : null;
    const w = 300;
    const h = 90;
    const ctx = sharpCanvas(cv, w, h);
    ctx.clearRect(0, 0, w, h);
    if (!prof) {
      cap.textContent = "no distance profile in this atlas";
      return;
    }
    const m = Math.min(24, prof.length);
    const bw = (w - 20) / m;
    ctx.fillStyle = "#8a94a6";
    ctx.font = "9px sans-serif";
    for (let d = 0; d < m; d++) {
      const v = prof[d] || 0;
      const bh = Math.sqrt(Math.max(0, v)) * (h - 16);
      ctx.fillStyle = d === 1 ? "#d62728" : d === 0 ? "#ff7f0e" : "#3454d1";
      ctx.fillRect(10 + d * bw + 1, h - 12 - bh, Math.max(1, bw - 2), bh);
      if (d % 4 === 0) {
        ctx.fillStyle = "#5f6b7a";
        ctx.fillText(String(d), 10 + d * bw + 1, h - 1);
      }
    }
    cap.textContent = "attention by offset i − j = 0.." + (m - 1) + " (bar height ∝ √mean; 0 = itself, 1 = previous)";
  }

  function renderExample() {
    const tabs = clear(document.getElementById("example-tabs"));
    const hm = document.getElementById("heatmap");
    const lv = document.getElementById("lineview");
    if (!data.examples.length) {
      clear(hm).appendChild(el("p", "muted", "This atlas stores no example maps (rescan to get them)."));
      clear(lv);
      return;
    }
    data.examples.forEach((ex, i) => {
      const b = el("button", i === state.example ? "on" : null, ex.label + " (" + ex.n + " tokens)");
      b.addEventListener("click", () => {
        state.example = i;
        renderExample();
      });
      tabs.appendChild(b);
    });
    const ex = data.examples[state.example];
    const values = HA.exampleMap(ex, state.layer, state.head);
    const title = el("div", "hm-title", "attention map — rows: query (attending), columns: key (attended to)");
    const box = el("div");
    hm.replaceChildren(title, box);
    HA.heatmap(box, ex.tokens, values, ex.n, { causal: ex.causal, maxPx: 460 });
    const lvTitle = el("div", "hm-title", "token view — hover a token on the left");
    const lvBox = el("div");
    lv.replaceChildren(lvTitle, lvBox);
    HA.lineView(lvBox, ex.tokens, values, ex.n, { width: 140 });
  }

  // ---- table ----
  const table = document.getElementById("heads-table");
  const cols = [
    { key: "layer", label: "layer" },
    { key: "head", label: "head" },
    { key: "kv_head", label: "kv" },
    ...data.scores.map((s) => ({ key: s.name, label: s.label, score: true })),
    { key: "roles", label: "roles", left: true },
  ];
  const scales = Object.fromEntries(data.scores.map((s) => [s.name, HA.scoreScale(data, s.name)]));
  function cellValue(k, key) {
    if (key === "layer" || key === "head" || key === "kv_head") return heads[key].length ? heads[key][k] : null;
    if (key === "roles") return (heads.roles[k] || []).join(", ");
    return heads.scores[key][k];
  }
  const thead = el("thead");
  const hr = el("tr");
  cols.forEach((c) => {
    const th = el("th", c.left ? "l" : null, c.label);
    th.dataset.key = c.key;
    th.title = "sort by " + c.label;
    th.addEventListener("click", () => {
      if (state.sortKey === c.key) state.sortDir = -state.sortDir;
      else {
        state.sortKey = c.key;
        state.sortDir = c.score ? -1 : 1;
      }
      renderTable();
    });
    hr.appendChild(th);
  });
  thead.appendChild(hr);
  const tbody = el("tbody");
  table.append(thead, tbody);
  const rows = heads.layer.map((_, k) => {
    const tr = el("tr");
    tr.dataset.layer = String(heads.layer[k]);
    tr.dataset.head = String(heads.head[k]);
    cols.forEach((c) => {
      const v = cellValue(k, c.key);
      const td = el("td", c.left ? "l" : null, c.score ? fmt(v) : v === null ? "" : String(v));
      if (c.score && v !== null) td.style.background = "rgba(52,84,209," + (0.32 * scales[c.key].magnitude(v)).toFixed(3) + ")";
      tr.appendChild(td);
    });
    tr.addEventListener("click", () => selectHead(heads.layer[k], heads.head[k], true));
    return { k, tr, text: ("l" + heads.layer[k] + "h" + heads.head[k] + " " + cellValue(k, "roles")).toLowerCase() };
  });

  function renderTable() {
    const f = state.filter.trim().toLowerCase().split(/\s+/).filter(Boolean);
    const shown = rows.filter(
      (r) => (!state.role || (heads.roles[r.k] || []).includes(state.role)) && f.every((w) => r.text.includes(w)),
    );
    shown.sort((a, b) => {
      const x = cellValue(a.k, state.sortKey);
      const y = cellValue(b.k, state.sortKey);
      if (x === y) return a.k - b.k;
      if (x === null) return 1;
      if (y === null) return -1;
      return (x < y ? -1 : 1) * state.sortDir;
    });
    tbody.replaceChildren(...shown.map((r) => r.tr));
    thead.querySelectorAll("th").forEach((th) => {
      th.classList.toggle("sorted-asc", th.dataset.key === state.sortKey && state.sortDir > 0);
      th.classList.toggle("sorted-desc", th.dataset.key === state.sortKey && state.sortDir < 0);
    });
    document.getElementById("count").textContent = shown.length + " of " + rows.length + " heads";
    grid.dim(state.role || f.length ? (k) => shown.some((r) => r.k === k) : null);
  }
  function highlightRow() {
    rows.forEach((r) => r.tr.classList.toggle("sel", heads.layer[r.k] === state.layer && heads.head[r.k] === state.head));
  }
  const filter = document.getElementById("filter");
  filter.addEventListener("input", () => {
    state.filter = filter.value;
    renderTable();
  });
  const roleSel = document.getElementById("role-filter");
  roleSel.appendChild(new Option("any role", ""));
  data.roles.forEach((r) => roleSel.appendChild(new Option(r.role + " (" + r.count + ")", r.role)));
  roleSel.addEventListener("change", () => {
    state.role = roleSel.value;
    renderTable();
  });

  // ---- circuits (meta["circuits"], written by headatlas circuit --atlas) ----
  const CURVE_COLORS = ["#3454d1", "#d62728", "#2ca02c", "#ff7f0e", "#8c564b", "#7b2d8e"];

  function drawCurves(cv, c) {
    const w = 340;
    const h = 200;
    const ctx = sharpCanvas(cv, w, h);
    const total = c.total_heads || 1;
    let fmax = 1.2;
    let fmin = 0;
    c.methods.forEach((m) => m.curve.forEach((p) => { fmax = Math.max(fmax, p[1]); fmin = Math.min(fmin, p[1]); }));
    const X = (k) => 36 + (w - 46) * Math.log1p(k) / Math.log1p(total);
    const Y = (f) => h - 22 - (h - 32) * (f - fmin) / (fmax - fmin);
    ctx.strokeStyle = "#c9ced8";
    ctx.fillStyle = "#5f6b7a";
    ctx.font = "9px sans-serif";
    [0, c.threshold || 0.9, 1].forEach((f) => {
      ctx.setLineDash(f === 0 || f === 1 ? [] : [3, 3]);
      ctx.beginPath(); ctx.moveTo(X(0), Y(f)); ctx.lineTo(X(total), Y(f)); ctx.stroke();
      if (f !== c.threshold) ctx.fillText(String(f), 4, Y(f) + 3);
    });
    ctx.setLineDash([]);
    if (fmax > 1.2) ctx.fillText(fmt(fmax, 1), 4, Y(fmax) + 8);
    ctx.fillText("f", 24, Y(fmax) + 8);
    [0, 1, 10, 100, 1000].filter((k) => X(total) - X(k) > 16).concat([total]).forEach((k) => ctx.fillText(String(k), X(k) - 4, h - 10));
    ctx.fillText("heads kept (log scale)", w / 2 - 30, h - 1);
    c.methods.forEach((m, i) => {
      ctx.strokeStyle = CURVE_COLORS[i % CURVE_COLORS.length];
      ctx.lineWidth = 1.6;
      ctx.beginPath();
      m.curve.forEach((p, j) => (j ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
      ctx.stroke();
    });
    ctx.lineWidth = 1;
  }

  function renderCircuit(c) {
    const box = el("div", "circuit");
    box.appendChild(el("h3", null, c.task));
    const facts = [c.method ? "ranked by " + c.method : "", c.ablation ? c.ablation + " ablation" : "",
      c.n_pairs !== null ? fmt(c.n_pairs, 0) + " pairs" : "",
      c.clean_accuracy !== null ? "clean accuracy " + fmt(c.clean_accuracy, 2) : "",
      c.column ? "atlas column " + c.column : ""];
    box.appendChild(el("div", "muted", facts.filter(Boolean).join(" · ")));
    const body = el("div", "circuit-body");
    const cv = el("canvas");
    body.appendChild(cv);
    const right = el("div");
    const table = el("table", "circuit-methods");
    const head = el("tr");
    ["", "method", "CPR ↑", "CMD ↓", "minimal k", "ranking s"].forEach((t, i) => head.appendChild(el("th", i < 2 ? "l" : null, t)));
    table.appendChild(head);
    c.methods.forEach((m, i) => {
      const tr = el("tr");
      const sw = el("td", "l", "●");
      sw.style.color = CURVE_COLORS[i % CURVE_COLORS.length];
      const sd = (v) => (v !== null ? " ± " + fmt(v, 3) : "");
      tr.append(sw, el("td", "l", m.name), el("td", null, fmt(m.cpr) + sd(m.cpr_std)), el("td", null, fmt(m.cmd) + sd(m.cmd_std)),
        el("td", null, m.minimal_k !== null ? fmt(m.minimal_k, 0) : "–"), el("td", null, fmt(m.ranking_seconds, 1)));
      table.appendChild(tr);
    });
    right.appendChild(table);
    const hs = el("div", "circuit-heads");
    const k = c.minimal_k;
    hs.appendChild(el("span", null, k !== null
      ? "Minimal circuit (f ≥ " + fmt(c.threshold, 2) + "): " + fmt(k, 0) + " of " + fmt(c.total_heads, 0) + " heads: "
      : "No measured circuit reaches f ≥ " + fmt(c.threshold, 2) + "."));
    c.heads.slice(0, 64).forEach((x) => {
      const a = el("span", "head-link", x.name);
      a.addEventListener("click", () => selectHead(x.layer, x.head, true));
      hs.appendChild(a);
    });
    if (c.heads.length > 64) hs.appendChild(el("span", "muted", " … and " + (c.heads.length - 64) + " more"));
    right.appendChild(hs);
    body.appendChild(right);
    box.appendChild(body);
    drawCurves(cv, c);
    return box;
  }

  if (data.circuits && data.circuits.length) {
    const list = document.getElementById("circuit-list");
    data.circuits.forEach((c) => list.appendChild(renderCircuit(c)));
    document.getElementById("circuits").hidden = false;
  }

  // ---- about ----
  const dl = document.getElementById("score-defs");
  data.scores.forEach((s) => dl.append(el("dt", null, s.label), el("dd", null, s.description)));
  const rl = document.getElementById("role-defs");
  data.roles.forEach((r) => {
    const dt = el("dt");
    dt.appendChild(HA.roleTag(data, r.role));
    rl.append(dt, el("dd", null, r.score + " ≥ " + r.threshold + ": " + r.meaning));
  });
  const v = data.run.versions || {};
  document.getElementById("run-facts").textContent =
    "headatlas " + (v.headatlas || "?") + " · torch " + (v.torch || "?") + " · transformers " + (v.transformers || "?") +
    (data.run.seed !== null && data.run.seed !== undefined ? " · seed " + data.run.seed : "") +
    (data.run.wall_seconds ? " · scan took " + fmt(data.run.wall_seconds, 1) + " s" : "");

  // ---- start: the strongest induction head if any, else the first head ----
  grid.colorBy(state.colorBy, legend);
  renderTable();
  let start = 0;
  const ind = heads.scores.induction;
  if (ind) ind.forEach((v, k) => { if (v !== null && (ind[start] === null || v > ind[start])) start = k; });
  if (data.examples.length > 1 && ind) state.example = data.examples.findIndex((e) => e.label === "repeat") >= 0 ? data.examples.findIndex((e) => e.label === "repeat") : 0;
  selectHead(heads.layer[start] || 0, heads.head[start] || 0, false);
  document.body.dataset.ready = "1";
})();
