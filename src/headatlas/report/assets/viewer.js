"use strict";
// The live viewer: type text, see two heads' attention side by side, pick heads from the atlas.
(() => {
  const { el, clear, fmt } = HA;
  const SAMPLE = "Alice keeps her keys in the blue box. Bob keeps his keys in the red jar. Where are Alice's keys? In the blue box.";
  const state = {
    info: null,
    atlas: null,
    slots: [{ layer: 0, head: 0, view: "map" }, { layer: 0, head: 1, view: "map" }],
    result: null,
    seq: 0,
    timer: null,
  };
  const text = document.getElementById("text");
  const status = document.getElementById("status");
  const runBtn = document.getElementById("run");
  const slotNodes = [document.getElementById("slot-a"), document.getElementById("slot-b")];
  let grid = null;

  function setStatus(msg, isError) {
    status.textContent = msg;
    status.className = isError ? "error" : "muted";
  }

  async function getJson(url, options) {
    const res = await fetch(url, options);
    let body = null;
    try {
      body = await res.json();
    } catch (e) {
      body = { error: "bad response (" + res.status + ")" };
    }
    if (!res.ok) throw new Error((body && body.error) || "request failed (" + res.status + ")");
    return body;
  }

  function headIndex(l, h) {
    if (!state.atlas) return undefined;
    const hs = state.atlas.heads;
    for (let k = 0; k < hs.layer.length; k++) if (hs.layer[k] === l && hs.head[k] === h) return k;
    return undefined;
  }

  // ---- slots ------------------------------------------------------------------------------
  function renderSlot(s) {
    const node = clear(slotNodes[s]);
    const slot = state.slots[s];
    const head = el("div", "card-head");
    head.appendChild(el("span", "badge", s === 0 ? "A" : "B"));
    const title = el("h2", null, "L" + slot.layer + "H" + slot.head);
    title.id = s === 0 ? "slot-a-title" : "slot-b-title";
    head.appendChild(title);
    const model = state.info.model || {};
    const lIn = el("input");
    lIn.type = "number";
    lIn.min = "0";
    lIn.max = String((model.n_layers || 1) - 1);
    lIn.value = String(slot.layer);
    lIn.setAttribute("aria-label", "layer");
    const hIn = el("input");
    hIn.type = "number";
    hIn.min = "0";
    hIn.max = String((model.n_heads || 1) - 1);
    hIn.value = String(slot.head);
    hIn.setAttribute("aria-label", "head");
    const onNum = () => {
      const l = parseInt(lIn.value, 10);
      const h = parseInt(hIn.value, 10);
      if (Number.isInteger(l) && Number.isInteger(h) && l >= 0 && h >= 0 && l < model.n_layers && h < model.n_heads) setSlot(s, l, h);
    };
    lIn.addEventListener("change", onNum);
    hIn.addEventListener("change", onNum);
    const lab1 = el("label", null, "layer ");
    lab1.appendChild(lIn);
    const lab2 = el("label", null, "head ");
    lab2.appendChild(hIn);
    head.append(lab1, lab2);
    const tabs = el("span", "tabs");
    tabs.style.margin = "0";
    ["map", "tokens"].forEach((v) => {
      const b = el("button", slot.view === v ? "on" : null, v);
      b.addEventListener("click", () => {
        slot.view = v;
        renderSlot(s);
      });
      tabs.appendChild(b);
    });
    head.appendChild(tabs);
    node.appendChild(head);
    const k = headIndex(slot.layer, slot.head);
    if (k !== undefined) {
      const meta = el("div", "hint");
      const roles = state.atlas.heads.roles[k] || [];
      roles.forEach((r) => meta.appendChild(HA.roleTag(state.atlas, r)));
      const sc = state.atlas.heads.scores;
      const bits = ["previous_token", "first_token", "induction", "duplicate_token", "entropy_norm"]
        .filter((n) => sc[n])
        .map((n) => HA.scoreLabel(state.atlas, n) + " " + fmt(sc[n][k], 2));
      meta.appendChild(el("span", null, (roles.length ? " " : "atlas: ") + bits.join(" · ")));
      node.appendChild(meta);
    }
    const body = el("div", "slot-body");
    body.style.marginTop = "8px";
    node.appendChild(body);
    const r = state.result;
    const m = r && r.maps.find((x) => x.layer === slot.layer && x.head === slot.head);
    if (!r || !m) {
      body.appendChild(el("p", "muted", state.info.live ? "…" : "No model loaded: live attention is off."));
      return;
    }
    const values = HA.fullMap(m.data, r.n_tokens);
    if (slot.view === "map") HA.heatmap(body, r.tokens, values, r.n_tokens, { causal: r.causal, maxPx: Math.max(240, Math.min(620, (body.clientWidth || 520) - 110)), rowLabelWidth: 96 });
    else HA.lineView(body, r.tokens, values, r.n_tokens, { width: 170 });
    body.dataset.layer = String(slot.layer);
    body.dataset.head = String(slot.head);
  }

  function setSlot(s, l, h) {
    state.slots[s].layer = l;
    state.slots[s].head = h;
    if (grid) {
      grid.select(state.slots[0].layer, state.slots[0].head, "sel");
      grid.select(state.slots[1].layer, state.slots[1].head, "sel-b");
    }
    renderSlot(s);
    run();
  }

  // ---- running ----------------------------------------------------------------------------
  async function run() {
    if (!state.info || !state.info.live) return;
    const t = text.value;
    if (!t.trim()) {
      setStatus("type some text", true);
      return;
    }
    const seq = ++state.seq;
    runBtn.disabled = true;
    setStatus("running…", false);
    const started = performance.now();
    try {
      const res = await getJson("/api/attention", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ text: t, heads: state.slots.map((s) => ({ layer: s.layer, head: s.head })), format: "uint8" }),
      });
      if (seq !== state.seq) return;
      state.result = res;
      renderSlot(0);
      renderSlot(1);
      setStatus(res.n_tokens + " tokens · " + Math.round(performance.now() - started) + " ms", false);
      document.body.dataset.ready = "1";
    } catch (e) {
      if (seq === state.seq) setStatus(e.message, true);
    } finally {
      if (seq === state.seq) runBtn.disabled = false;
    }
  }

  runBtn.addEventListener("click", run);
  text.addEventListener("input", () => {
    if (!document.getElementById("live").checked) return;
    clearTimeout(state.timer);
    state.timer = setTimeout(run, 500);
  });
  text.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run();
  });

  // ---- picking from the atlas ---------------------------------------------------------------
  function renderPicks(what) {
    const picks = clear(document.getElementById("picks"));
    const hs = state.atlas.heads;
    let ks = hs.layer.map((_, k) => k);
    if (what === "role") {
      picks.appendChild(el("span", "muted", "heads by role: "));
      state.atlas.roles.forEach((r) => {
        if (!r.count) return;
        const members = ks.filter((k) => (hs.roles[k] || []).includes(r.role));
        const c = el("span", "chip click");
        const sw = el("span", "sw");
        sw.style.background = r.color;
        c.append(sw, el("span", null, r.role + ": " + members.slice(0, 6).map((k) => "L" + hs.layer[k] + "H" + hs.head[k]).join(" ") + (members.length > 6 ? " …" : "")));
        c.title = "click: panel A gets the first " + r.role + " head";
        c.addEventListener("click", (evt) => setSlot(evt.shiftKey ? 1 : 0, hs.layer[members[0]], hs.head[members[0]]));
        picks.appendChild(c);
      });
      return;
    }
    const vals = hs.scores[what];
    ks = ks.filter((k) => vals[k] !== null).sort((a, b) => vals[b] - vals[a]).slice(0, 12);
    picks.appendChild(el("span", "muted", "top by " + HA.scoreLabel(state.atlas, what) + ": "));
    ks.forEach((k) => {
      const c = el("span", "chip click", "L" + hs.layer[k] + "H" + hs.head[k] + " " + fmt(vals[k], 2));
      c.dataset.layer = String(hs.layer[k]);
      c.dataset.head = String(hs.head[k]);
      c.title = "click: panel A · shift-click: panel B";
      c.addEventListener("click", (evt) => setSlot(evt.shiftKey ? 1 : 0, hs.layer[k], hs.head[k]));
      picks.appendChild(c);
    });
  }

  function best(score) {
    const vals = state.atlas.heads.scores[score];
    if (!vals) return null;
    let k = -1;
    vals.forEach((v, i) => {
      if (v !== null && (k < 0 || v > vals[k])) k = i;
    });
    return k < 0 ? null : [state.atlas.heads.layer[k], state.atlas.heads.head[k]];
  }

  // ---- start ------------------------------------------------------------------------------
  async function start() {
    try {
      state.info = await getJson("/api/info");
    } catch (e) {
      setStatus(e.message, true);
      return;
    }
    const model = state.info.model || {};
    document.getElementById("model-name").textContent = model.name || "model";
    document.getElementById("model-facts").textContent =
      (model.n_layers || "?") + " layers × " + (model.n_heads || "?") + " heads · " + (model.arch || "") +
      (state.info.live ? "" : " · atlas only (no model: live attention off)");
    const lim = state.info.limits;
    document.getElementById("limits").textContent = "up to " + lim.max_tokens + " tokens · Ctrl+Enter runs";
    state.slots[1].head = Math.min(1, (model.n_heads || 1) - 1);
    if (state.info.atlas) {
      state.atlas = await getJson("/api/atlas");
      const a = best("induction");
      const b = best("previous_token");
      if (a) [state.slots[0].layer, state.slots[0].head] = a;
      if (b) [state.slots[1].layer, state.slots[1].head] = b;
      document.getElementById("pick-card").hidden = false;
      const sel = document.getElementById("color-by");
      HA.scoreOptions(sel, state.atlas, true);
      sel.value = state.atlas.heads.scores.induction ? "induction" : "role";
      const legend = document.getElementById("legend");
      grid = HA.headGrid(document.getElementById("grid"), state.atlas, {
        onSelect: (l, h, shift) => setSlot(shift ? 1 : 0, l, h),
      });
      const recolor = () => {
        grid.colorBy(sel.value, legend);
        renderPicks(sel.value);
      };
      sel.addEventListener("change", recolor);
      recolor();
      grid.select(state.slots[0].layer, state.slots[0].head, "sel");
      grid.select(state.slots[1].layer, state.slots[1].head, "sel-b");
    }
    text.value = SAMPLE;
    renderSlot(0);
    renderSlot(1);
    if (state.info.live) run();
    else {
      runBtn.disabled = true;
      setStatus("no model loaded", true);
      document.body.dataset.ready = "1";
    }
  }
  start();
})();
