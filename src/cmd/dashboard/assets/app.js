// Palisade dashboard: the page of `palisade dashboard`. Plain JavaScript, no framework and no
// build step. Every figure comes from this server's JSON API (/api/stat, /api/edges,
// /api/workloads/NAME, /api/workloads/NAME/tap, /api/cost), read every two seconds; text is
// always inserted with textContent, never as HTML (paths and identities come from traffic).
"use strict";

const POLL_MS = 2000;
const TAP_ROWS = 200;
const SVG_NS = "http://www.w3.org/2000/svg";

const state = { stat: null, edges: null, cost: null, error: null, tap: null, route: null };

// ---- DOM helpers -------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}
function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}
function build(el, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const $ = (id) => document.getElementById(id);

// ---- Number formats (as the CLI prints them) ----------------------------------------------

function fmtRate(r) {
  if (r === null || r === undefined) return "–";
  if (r >= 100) return r.toFixed(0);
  if (r >= 10) return r.toFixed(1);
  return r.toFixed(2);
}
function fmtPct(x) {
  if (x === null || x === undefined) return "–";
  if (x >= 1) return "100%";
  return (x * 100).toFixed(x >= 0.999 ? 2 : 1) + "%";
}
function fmtMs(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms >= 1000) return (ms / 1000).toFixed(2) + "s";
  if (ms >= 10) return ms.toFixed(0) + "ms";
  if (ms >= 1) return ms.toFixed(1) + "ms";
  return ms.toFixed(2) + "ms";
}
function fmtBytes(b) {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (b >= 1000 && i < units.length - 1) { b /= 1000; i++; }
  return (i === 0 ? b.toFixed(0) : b.toFixed(1)) + " " + units[i];
}
function fmtMoney(x) {
  if (x === null || x === undefined) return "–";
  return Math.abs(x) >= 1 ? x.toFixed(2) : Number(x.toPrecision(3)).toString();
}
function fmtAge(secs) {
  const a = Math.abs(secs), sign = secs < 0 ? "expired " : "in ";
  const d = Math.floor(a / 86400), hh = Math.floor(a / 3600) % 24, m = Math.floor(a / 60) % 60;
  const t = d > 0 ? `${d}d ${hh}h` : hh > 0 ? `${hh}h ${m}m` : `${m}m ${Math.floor(a % 60)}s`;
  return secs < 0 ? `${sign}${t} ago` : sign + t;
}
function fmtDur(secs) {
  if (secs === null || secs === undefined) return "?";
  if (secs < 90) return `${Math.round(secs)} s`;
  if (secs < 5400) return `${Math.round(secs / 60)} min`;
  return `${Math.round(secs / 3600)} h`;
}
// What the figures cover: the recent window (rates), and the totals (since the proxies
// started, or with Prometheus the last hour).
function recentLabel() {
  return state.stat ? `last ${fmtDur(state.stat.window)}` : "recent";
}
function totalLabel() {
  const t = state.stat && state.stat.totals;
  return !t ? "total" : t.sinceStart ? "since start" : `last ${fmtDur(t.window)}`;
}
function health(successRate) {
  if (successRate === null || successRate === undefined) return "idle";
  return successRate >= 0.99 ? "ok" : successRate >= 0.95 ? "warn" : "bad";
}

// ---- Data -------------------------------------------------------------------------------

async function getJSON(path) {
  const rsp = await fetch(path, { cache: "no-store" });
  const body = await rsp.json().catch(() => ({ error: `${path} answered ${rsp.status}` }));
  if (!rsp.ok) throw new Error(body.error || `${path} answered ${rsp.status}`);
  return body;
}

async function refresh() {
  try {
    const [stat, edges] = await Promise.all([getJSON("/api/stat"), getJSON("/api/edges")]);
    state.stat = stat;
    state.edges = edges;
    state.error = stat.error || null;
  } catch (e) {
    state.error = e.message;
  }
  renderStatus();
  renderLive();
}

async function refreshCost() {
  try {
    state.cost = await getJSON("/api/cost");
  } catch (e) {
    state.cost = { available: false, error: e.message };
  }
  $("nav-cost").hidden = !(state.cost && state.cost.available);
  if (state.route && state.route.view === "cost") renderCost();
}

function renderStatus() {
  const el = $("status"), banner = $("banner");
  el.className = "status " + (state.error ? "error" : state.stat ? "live" : "");
  if (state.stat) {
    const t = new Date(state.stat.updatedAt * 1000).toLocaleTimeString();
    const from = state.stat.source === "prometheus" ? " · from Prometheus" : "";
    $("status-text").textContent = `live · ${recentLabel()}${from} · read ${t}`;
  }
  banner.hidden = !state.error;
  banner.textContent = state.error ? `Cannot read the mesh: ${state.error}` : "";
}

// ---- Routing ----------------------------------------------------------------------------

function parseRoute() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const m = hash.match(/^\/workload\/([^/?]+)/);
  if (m) return { view: "workload", name: decodeURIComponent(m[1]) };
  if (hash.startsWith("/cost")) return { view: "cost" };
  return { view: "overview" };
}

function onRoute() {
  stopTap();
  state.route = parseRoute();
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", a.dataset.nav === state.route.view);
  }
  const view = $("view");
  view.replaceChildren();
  if (state.route.view === "overview") {
    view.append(
      h("section", { class: "card graph", id: "topology" },
        h("h2", {}, "Topology", h("span", { class: "muted", id: "topology-note" })),
        h("div", { id: "graph" }),
        legend()),
      h("section", { class: "card" },
        h("h2", {}, "Workloads", h("span", { class: "muted" }, "requests received, at each workload's inbound side; RPS to Denied over the recent window")),
        h("div", { class: "scroll", id: "workloads" })));
  } else if (state.route.view === "workload") {
    renderWorkloadPage(view, state.route.name);
  } else {
    view.append(h("section", { class: "card", id: "cost" }, h("p", { class: "muted" }, "Loading…")));
    renderCost();
  }
  renderLive();
}

function renderLive() {
  if (!state.route) return;
  if (state.route.view === "overview") {
    renderGraph();
    renderWorkloadTable();
  } else if (state.route.view === "workload") {
    renderWorkloadStat(state.route.name);
  }
}

// ---- Topology ---------------------------------------------------------------------------

function legend() {
  return h("div", {}, h("div", { class: "legend" },
    h("span", {}, lockIcon(true, "legend-lock"), "mTLS (both identities verified)"),
    h("span", {}, lockIcon(false, "legend-lock"), "plaintext"),
    h("span", {}, h("i", { class: "swatch" }), "traffic in the recent window"),
    h("span", {}, h("i", { class: "swatch deny" }), "requests denied by policy")),
    h("p", { class: "legend-window", id: "legend-window" }));
}

function lockIcon(closed, cls) {
  const g = s("svg", { viewBox: "0 0 12 14", width: 11, height: 13, class: cls });
  g.append(
    s("path", { d: closed ? "M3 6V4a3 3 0 0 1 6 0v2" : "M3 6V4a3 3 0 0 1 6 0", fill: "none",
      stroke: closed ? "#16a34a" : "#d97706", "stroke-width": 1.6 }),
    s("rect", { x: 1, y: 6, width: 10, height: 7.5, rx: 1.5, fill: closed ? "#16a34a" : "#d97706" }));
  return g;
}

// Edges of the recent window, with their totals since start (same src/dst).
function joinedEdges() {
  if (!state.edges) return [];
  const key = (e) => e.src + "\u0000" + e.dst;
  const totals = new Map((state.edges.totals ? state.edges.totals.edges : []).map((e) => [key(e), e]));
  const out = new Map();
  for (const e of state.edges.edges) out.set(key(e), { src: e.src, dst: e.dst, recent: e, total: totals.get(key(e)) || e });
  for (const [k, t] of totals) if (!out.has(k)) out.set(k, { src: t.src, dst: t.dst, recent: null, total: t });
  return [...out.values()];
}

// Columns by longest path from the callers (cycles are cut at the node count), rows in mesh
// order: web -> api -> db reads left to right.
function layout(names, edges) {
  const layer = new Map(names.map((n) => [n, 0]));
  for (let i = 0; i < names.length; i++) {
    let changed = false;
    for (const e of edges) {
      if (e.src === e.dst) continue;
      const want = layer.get(e.src) + 1;
      if (want < names.length && layer.get(e.dst) < want) { layer.set(e.dst, want); changed = true; }
    }
    if (!changed) break;
  }
  const columns = [];
  for (const n of names) (columns[layer.get(n)] = columns[layer.get(n)] || []).push(n);
  const cols = columns.filter(Boolean);
  const maxRows = Math.max(1, ...cols.map((c) => c.length));
  // Room above the rows for edges that arc over a column, below for edges going back.
  const TOP = 110, ROW = 150, W = 1100, H = TOP + ROW * (maxRows - 1) + 130, pos = new Map();
  cols.forEach((col, ci) => {
    const x = cols.length === 1 ? W / 2 : 130 + (ci * (W - 260)) / (cols.length - 1);
    col.forEach((n, ri) => pos.set(n, { x, y: TOP + 31 + (ri + (maxRows - col.length) / 2) * ROW, col: ci }));
  });
  return { W, H, pos };
}

function renderGraph() {
  const box = $("graph");
  if (!box || !state.stat) return;
  const rows = state.stat.workloads, totals = new Map(state.stat.totals.workloads.map((w) => [w.name, w]));
  const edges = joinedEdges();
  const names = rows.map((w) => w.name);
  for (const e of edges) for (const n of [e.src, e.dst]) if (!names.includes(n)) names.push(n);
  const { W, H, pos } = layout(names, edges);
  const NW = 204, NH = 62;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "mesh topology" });
  const defs = s("defs", {});
  for (const [id, color] of [["arrow", "#94a3b8"], ["arrow-live", "#3b82f6"], ["arrow-deny", "#dc2626"]]) {
    defs.append(s("marker", { id, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
      s("path", { d: "M0 0 10 5 0 10z", fill: color })));
  }
  svg.append(defs);
  const edgeLayer = s("g", { class: "edges" }), labelLayer = s("g", { class: "labels" }), nodeLayer = s("g", { class: "nodes" });
  svg.append(edgeLayer, nodeLayer, labelLayer);

  const pairs = new Set(edges.map((e) => e.src + "\u0000" + e.dst));
  for (const e of edges) {
    const a = pos.get(e.src), b = pos.get(e.dst);
    if (!a || !b || e.src === e.dst) continue;
    const rec = e.recent, tot = e.total;
    const denied = tot.denied || 0, deniedRecent = rec ? rec.denied : 0;
    const live = rec && rec.requests > 0;
    const cls = ["edge", denied > 0 ? "denied" : "", live ? "live" : ""].filter(Boolean).join(" ");
    const forward = b.col > a.col;
    const x1 = a.x + (forward ? NW / 2 : b.col === a.col ? 0 : -NW / 2), y1 = a.y + (b.col === a.col ? (b.y > a.y ? NH / 2 : -NH / 2) : 0);
    const x2 = b.x + (forward ? -NW / 2 : b.col === a.col ? 0 : NW / 2), y2 = b.y + (b.col === a.col ? (b.y > a.y ? -NH / 2 : NH / 2) : 0);
    // Bend an edge that skips a column over the nodes between, and a pair of opposite edges apart.
    let bend = 0;
    if (Math.abs(b.col - a.col) > 1) bend = -95 * (Math.abs(b.col - a.col) - 1);
    if (pairs.has(e.dst + "\u0000" + e.src)) bend += forward ? -28 : 28;
    if (!forward && b.col !== a.col && bend === 0) bend = 60;
    const mx = (x1 + x2) / 2, my = (y1 + y2) / 2, len = Math.hypot(x2 - x1, y2 - y1) || 1;
    const cx = mx + (-(y2 - y1) / len) * bend * 2, cy = my + ((x2 - x1) / len) * bend * 2;
    const lx = 0.25 * x1 + 0.5 * cx + 0.25 * x2, ly = 0.25 * y1 + 0.5 * cy + 0.25 * y2;
    const marker = denied > 0 ? "arrow-deny" : live ? "arrow-live" : "arrow";
    const g = s("g", {
      class: cls, "data-src": e.src, "data-dst": e.dst, "data-denied": denied, "data-denied-recent": deniedRecent,
      "data-secured": String(tot.secured), "data-requests": tot.requests, "data-rps": rec ? rec.rps : 0,
    });
    g.append(s("path", { class: "line", d: `M${x1} ${y1} Q${cx} ${cy} ${x2} ${y2}`, "marker-end": `url(#${marker})` }));
    const fig = live ? rec : tot;
    const lines = live
      ? [`${fmtRate(rec.rps)} rps · ${fmtPct(rec.successRate)}`, `p99 ${fmtMs(rec.latencyMs.p99)}`]
      : [`idle · ${tot.requests} req`, tot.requests > 0 ? `${fmtPct(fig.successRate)} ${totalLabel()}` : totalLabel()];
    if (denied > 0) lines.push(`${denied} denied` + (deniedRecent > 0 ? ` (${deniedRecent} recent)` : ""));
    // Text is not measured (the label is drawn before layout): 6.8 px a character, 7.6 in bold.
    const chars = lines.map((l, i) => l.length * (denied > 0 && i === lines.length - 1 ? 7.6 : 6.8));
    const width = 30 + Math.max(...chars), height = 8 + 16 * lines.length;
    const label = s("g", { class: "label", transform: `translate(${lx - width / 2} ${ly - height / 2})` });
    label.append(s("title", {}, `${e.src} → ${e.dst}\n${tot.srcIdentity} → ${tot.dstIdentity}\n${tot.secured ? "mTLS" : "plaintext"}; ${tot.requests} requests ${totalLabel()}, ${denied} denied`));
    label.append(s("rect", { class: "bg", width, height, rx: 6 }));
    const lock = lockIcon(tot.secured, tot.secured ? "lock-closed" : "lock-open");
    lock.setAttribute("x", 7); lock.setAttribute("y", 4);
    lock.setAttribute("width", 12); lock.setAttribute("height", 14);
    label.append(lock);
    lines.forEach((l, i) => label.append(s("text", { x: 24, y: 16 + 16 * i, class: denied > 0 && i === lines.length - 1 ? "deny" : "" }, l)));
    g.append(label);
    edgeLayer.append(g);
  }

  for (const name of names) {
    const p = pos.get(name), row = rows.find((w) => w.name === name), total = totals.get(name);
    const external = !row;
    const hl = row && row.requests > 0 ? health(row.successRate) : "idle";
    // What it received; for a workload that only calls out (web), what it sent.
    const out = edges.filter((e) => e.src === name && e.recent && e.recent.requests > 0)
      .reduce((sum, e) => sum + (e.recent.rps || 0), 0);
    const sub = !row ? "outside the mesh" : row.requests > 0
      ? `${fmtRate(row.rps)} rps · ${fmtPct(row.successRate)} · p99 ${fmtMs(row.latencyMs.p99)}`
      : out > 0 ? `calls out · ${fmtRate(out)} rps` : `idle · ${total ? total.requests : 0} req ${totalLabel()}`;
    const g = s("g", {
      class: `node ${hl}${external ? " external" : ""}`, "data-workload": name,
      transform: `translate(${p.x - NW / 2} ${p.y - NH / 2})`,
      onclick: external ? null : () => { location.hash = `#/workload/${encodeURIComponent(name)}`; },
    });
    g.append(s("title", {}, row && row.identity ? row.identity : name));
    g.append(s("rect", { class: "box", width: NW, height: NH, rx: 10 }));
    g.append(s("circle", { cx: 16, cy: 21, r: 5, fill: { ok: "#16a34a", warn: "#d97706", bad: "#dc2626", idle: "#94a3b8" }[hl] }));
    g.append(s("text", { class: "name", x: 28, y: 26 }, name.length > 18 ? name.slice(0, 17) + "…" : name));
    g.append(s("text", { class: "sub", x: 14, y: 47 }, sub));
    nodeLayer.append(g);
  }
  box.replaceChildren(svg);
  const note = $("topology-note");
  if (note) note.textContent = `${rows.length} workloads · ${edges.length} edges · counted at the callee's proxy`;
  const lw = $("legend-window");
  if (lw) lw.textContent = `rates, success and p99 over the ${recentLabel()}; idle edges and denials: ${totalLabel()}`;
}

function renderWorkloadTable() {
  const box = $("workloads");
  if (!box || !state.stat) return;
  const totals = new Map(state.stat.totals.workloads.map((w) => [w.name, w]));
  const head = ["Workload", "RPS", "Success", "P50", "P95", "P99", "mTLS", "Denied", `Requests ${totalLabel()}`, `Denied ${totalLabel()}`];
  const table = h("table", { class: "stat" },
    h("thead", {}, h("tr", {}, head.map((t, i) => h("th", { class: i > 0 ? "num" : "" }, t)))),
    h("tbody", {}, state.stat.workloads.map((w) => {
      const t = totals.get(w.name) || {};
      return h("tr", { "data-workload": w.name },
        h("td", {}, h("a", { href: `#/workload/${encodeURIComponent(w.name)}` }, w.name), " ",
          h("span", { class: "muted mono" }, w.identity || "")),
        h("td", { class: "num" }, fmtRate(w.rps)),
        h("td", { class: "num" }, fmtPct(w.successRate)),
        h("td", { class: "num" }, fmtMs(w.latencyMs.p50)),
        h("td", { class: "num" }, fmtMs(w.latencyMs.p95)),
        h("td", { class: "num" }, fmtMs(w.latencyMs.p99)),
        h("td", { class: "num" }, fmtPct(w.mtlsShare)),
        h("td", { class: "num" + (w.denied > 0 ? " denied-cell" : "") }, w.denied),
        h("td", { class: "num" }, t.requests ?? "–"),
        h("td", { class: "num" + (t.denied > 0 ? " denied-cell" : "") }, t.denied ?? "–"));
    })));
  const missing = state.stat.missing && state.stat.missing.length
    ? h("p", { class: "muted" }, `Not read: ${state.stat.missing.join(", ")} (their proxies did not answer)`) : null;
  box.replaceChildren(table, missing || "");
}

// ---- Workload page ----------------------------------------------------------------------

function renderWorkloadPage(view, name) {
  view.append(
    h("div", { class: "crumbs" }, h("a", { href: "#/" }, "← Topology")),
    h("h1", {}, name, h("span", { id: "ready" })),
    h("p", { class: "subtitle mono", id: "identity" }, ""),
    h("div", { class: "cards", id: "wl-stat" }),
    h("div", { class: "grid2", id: "describe" }, h("p", { class: "muted" }, "Reading its proxy…")),
    h("section", { class: "card", id: "tap", "data-workload": name },
      h("h2", {}, "Live tap", h("span", { class: "muted" }, "requests through this workload's proxy, newest first")),
      h("div", { class: "toolbar" },
        h("span", { class: "muted", id: "tap-status" }, "connecting…"),
        h("button", { id: "tap-toggle", onclick: () => (state.tap ? stopTap("paused") : startTap(name)) }, "Pause"),
        h("button", { onclick: () => $("tap-rows").replaceChildren() }, "Clear")),
      h("div", { class: "tap-table" },
        h("table", {},
          h("thead", {}, h("tr", {}, ["Time", "Direction", "From → To", "Method", "Path", "Status", "Latency", "Authz", "Route"].map((t) => h("th", {}, t)))),
          h("tbody", { id: "tap-rows" })))));
  loadDescribe(name);
  startTap(name);
}

function renderWorkloadStat(name) {
  const box = $("wl-stat");
  if (!box || !state.stat) return;
  const w = state.stat.workloads.find((r) => r.name === name);
  const t = state.stat.totals.workloads.find((r) => r.name === name);
  if (!w) { box.replaceChildren(h("p", { class: "muted" }, "No figures for this workload (its proxy was not read).")); return; }
  $("identity").textContent = w.identity || "";
  const metric = (label, value, bad) => h("div", { class: "metric" + (bad ? " bad" : "") }, h("div", { class: "label" }, label), h("div", { class: "value" }, value));
  box.replaceChildren(
    metric(`RPS (${recentLabel()})`, fmtRate(w.rps)),
    metric("Success", fmtPct(w.successRate), health(w.successRate) === "bad"),
    metric("P50", fmtMs(w.latencyMs.p50)),
    metric("P99", fmtMs(w.latencyMs.p99)),
    metric("mTLS", fmtPct(w.mtlsShare)),
    metric(`Denied (${recentLabel()})`, String(w.denied), w.denied > 0),
    metric(`Requests ${totalLabel()}`, t ? String(t.requests) : "–"),
    metric(`Denied ${totalLabel()}`, t ? String(t.denied) : "–", t && t.denied > 0));
}

async function loadDescribe(name) {
  let d;
  try {
    d = await getJSON(`/api/workloads/${encodeURIComponent(name)}`);
  } catch (e) {
    const box = $("describe");
    if (box) box.replaceChildren(h("div", { class: "banner" }, e.message));
    return;
  }
  const box = $("describe");
  if (!box || !state.route || state.route.name !== name) return;
  $("identity").textContent = d.identity || "";
  $("ready").replaceChildren(d.ready === true ? h("span", { class: "badge ok" }, "ready") : d.ready === false ? h("span", { class: "badge bad" }, "not ready") : "");
  const kv = (pairs) => h("dl", { class: "kv" }, pairs.filter(Boolean).flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  const c = d.certificate, m = d.mtls || {}, cfg = d.config || {};
  const cert = c ? kv([
    ["SPIFFE ID", h("span", { class: "mono" }, c.spiffeId)],
    ["Issuer", c.issuer],
    ["Expires", [new Date(c.notAfter * 1000).toISOString().replace(".000", ""), " ", h("span", { class: "muted" }, `(${fmtAge(c.expiresInSeconds)})`)]],
    ["Chain", c.verified ? h("span", { class: "badge ok" }, "verified") : h("span", { class: "badge bad" }, c.verifyError || "not verified")],
    ["Serial", h("span", { class: "mono" }, c.serial)],
  ]) : h("p", { class: "muted" }, "No certificate (or its proxy was not read).");
  const mtls = kv([
    ["Mode", [h("span", { class: "badge " + (m.mode === "STRICT" ? "ok" : "warn") }, m.mode || "unknown"), m.port ? ` on port ${m.port}` : ""]],
    ["Source", m.source || "–"],
    ...(m.portModes || []).map((p) => [`Port ${p.port}`, `${p.mode} (${p.source})`]),
    ["Default policy", d.defaultPolicy || "–"],
  ]);
  const stateBadge = cfg.state === "in sync" ? "ok" : cfg.state === "behind" ? "warn" : "";
  const config = kv([
    ["State", h("span", { class: "badge " + stateBadge }, cfg.state || "unknown")],
    ["Proxy holds", `version ${cfg.proxyVersion ?? "–"} · ${cfg.proxyDigest ?? "–"}`],
    ["Served", `generation ${cfg.servedGeneration ?? "–"} · ${cfg.servedDigest ?? "–"}`],
    d.controlPlane && d.controlPlane.lastRejection ? ["Last rejection", JSON.stringify(d.controlPlane.lastRejection)] : null,
  ]);
  const yes = (b) => (b === true ? "yes" : b === false ? "no" : "–");
  const policies = (d.policies || []).length ? h("table", {},
    h("thead", {}, h("tr", {}, ["Policy", "Action", "Enforced", "Served"].map((t) => h("th", {}, t)))),
    h("tbody", {}, d.policies.map((p) => h("tr", {}, h("td", { class: "mono" }, p.name), h("td", {}, h("span", { class: "badge " + (p.action === "DENY" ? "bad" : p.action === "ALLOW" ? "ok" : "") }, p.action)), h("td", {}, yes(p.enforced)), h("td", {}, yes(p.served))))))
    : h("p", { class: "muted" }, `No policy selects it: the mesh's default (${d.defaultPolicy || "?"}) applies.`);
  const routes = (d.routes || []).length ? h("table", {},
    h("thead", {}, h("tr", {}, ["Route", "Kind", "Direction", "Rules"].map((t) => h("th", {}, t)))),
    h("tbody", {}, d.routes.map((r) => h("tr", {}, h("td", { class: "mono" }, r.name), h("td", {}, r.kind), h("td", {}, r.direction === "outbound" ? `calls to ${r.service}` : "inbound"), h("td", { class: "mono" }, (r.rules || []).join(", "))))))
    : h("p", { class: "muted" }, "No route applies.");
  const upstreams = (d.upstreams || []).map((u) => h("div", { class: "upstream" },
    h("h3", {}, h("span", { class: "mono" }, u.service), " ", h("span", { class: "muted" }, `${u.protocol}${u.listen ? ` · the app calls ${u.listen}` : ""}`)),
    h("table", {}, h("tbody", {}, (u.endpoints || []).map((e) => h("tr", {},
      h("td", { class: "mono" }, e.addr), h("td", {}, e.workload || "–"), h("td", { class: "num" }, `weight ${e.weight}`),
      h("td", {}, h("span", { class: "badge " + (e.ejected ? "bad" : e.failing ? "warn" : e.ejected === null ? "" : "ok") }, e.ejected ? "ejected" : e.failing ? "failing" : e.ejected === null ? "–" : "ok")),
      h("td", { class: "mono muted id" }, e.identity)))))));
  const errors = Object.entries(d.errors || {}).filter(([, v]) => v).map(([k, v]) => h("div", { class: "banner" }, `Cannot read ${k === "proxy" ? "its proxy" : "the control plane"}: ${v}`));
  const card = (title, ...body) => h("section", { class: "card" }, h("h2", {}, title), ...body);
  box.replaceChildren(...errors,
    card("Identity and certificate", cert),
    card("mTLS", mtls),
    card("Authorization policies", policies),
    card("Config", config),
    card("Routes", routes),
    card("Upstreams", upstreams.length ? upstreams : h("p", { class: "muted" }, "None.")));
}

// ---- Live tap ---------------------------------------------------------------------------

function stopTap(why) {
  if (state.tap) { state.tap.abort(); state.tap = null; }
  const st = $("tap-status"), btn = $("tap-toggle");
  if (why && st) st.textContent = why;
  if (btn) btn.textContent = "Resume";
}

async function startTap(name) {
  stopTap();
  const ctrl = new AbortController();
  state.tap = ctrl;
  $("tap-toggle").textContent = "Pause";
  $("tap-status").textContent = "connecting…";
  try {
    const rsp = await fetch(`/api/workloads/${encodeURIComponent(name)}/tap`, { signal: ctrl.signal, cache: "no-store" });
    if (!rsp.ok) {
      const e = await rsp.json().catch(() => ({ error: `answered ${rsp.status}` }));
      throw new Error(e.error);
    }
    const reader = rsp.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 1);
        if (line) onTapLine(JSON.parse(line));
      }
    }
    if (state.tap === ctrl) stopTap($("tap-status").textContent);
  } catch (e) {
    if (ctrl.signal.aborted) return;
    if (state.tap === ctrl) stopTap(`tap stopped: ${e.message}`);
  }
}

function onTapLine(ev) {
  const st = $("tap-status"), rowsEl = $("tap-rows");
  if (!rowsEl) return;
  if (ev.tapping) { st.textContent = `tapping ${ev.tapping} (${ev.identity || "no identity"}) at ${ev.admin}`; return; }
  if (ev.end) { st.textContent = `tap ended: ${ev.end}`; return; }
  if (ev.dropped) { rowsEl.prepend(h("tr", {}, h("td", { colspan: 9, class: "muted" }, `${ev.dropped} requests not shown (read too slowly)`))); return; }
  const name = (id) => {
    if (!id || id === "unknown") return id || "–";
    const w = state.stat && state.stat.workloads.find((r) => r.identity === id);
    return w ? w.name : id;
  };
  const deny = ev.authz === "deny";
  rowsEl.prepend(h("tr", { class: deny ? "deny" : "", "data-status": ev.status ?? "" },
    h("td", { class: "mono" }, (ev.time || "").replace(/^.*T/, "").replace("Z", "")),
    h("td", {}, ev.direction),
    h("td", {}, `${name(ev.srcIdentity)} → ${name(ev.dstIdentity)}`),
    h("td", {}, ev.method),
    h("td", { class: "mono" }, ev.path),
    h("td", { class: "num" + (ev.status >= 500 || deny ? " denied-cell" : "") }, ev.status ?? "–"),
    h("td", { class: "num" }, fmtMs(ev.latencyMs)),
    h("td", {}, ev.authz ? h("span", { class: "badge " + (deny ? "bad" : "ok") }, ev.authz) : "–"),
    h("td", { class: "mono muted" }, ev.route || "")));
  while (rowsEl.children.length > TAP_ROWS) rowsEl.lastChild.remove();
}

// ---- Cost -------------------------------------------------------------------------------

function renderCost() {
  const box = $("cost");
  if (!box) return;
  const c = state.cost;
  if (!c) return;
  if (!c.available) {
    box.replaceChildren(h("h2", {}, "Cost"), h("p", { class: "muted" }, c.error || "No cost figures: the proxies export no palisade_cost_* metrics, or there was no traffic yet."));
    return;
  }
  const key = c.by || "identity";
  const byId = new Map(((state.stat && state.stat.workloads) || []).map((w) => [w.identity, w.name]));
  const when = !c.window ? "since the proxies started"
    : c.source === "prometheus" ? `over the last ${fmtDur(c.window)}` : `over ${fmtDur(c.window)}, since the oldest proxy started`;
  box.replaceChildren(
    h("h2", {}, "Cost", h("span", { class: "muted" }, `per ${key} · ${when} · prices ${c.prices.vcpuHour} ${c.currency}/vCPU-hour, ${c.prices.gb} ${c.currency}/GB`)),
    h("div", { class: "scroll" }, h("table", {},
      h("thead", {}, h("tr", {}, [key, "Workload", "Requests", "Bytes", "CPU-seconds", `Cost (${c.currency})`, "Per 1000 req"].map((t, i) => h("th", { class: i > 1 ? "num" : "" }, t)))),
      h("tbody", {}, c.rows.map((r) => h("tr", {},
        h("td", { class: "mono" }, r[key]), h("td", {}, byId.get(r[key]) || "–"),
        h("td", { class: "num" }, r.requests), h("td", { class: "num" }, fmtBytes(r.bytes)),
        h("td", { class: "num" }, fmtMoney(r.cpuSeconds)), h("td", { class: "num" }, fmtMoney(r.cost)),
        h("td", { class: "num" }, fmtMoney(r.costPer1000Requests))))))),
    h("p", { class: "muted" }, `Proxy CPU not attributed to a caller: ${fmtMoney(c.unattributedCpuSeconds)} s (${fmtMoney(c.unattributedCost)} ${c.currency}). docs/cost.md says how the figures are made.`));
}

// ---- Start ------------------------------------------------------------------------------

window.addEventListener("hashchange", onRoute);
onRoute();
refresh();
refreshCost();
setInterval(refresh, POLL_MS);
setInterval(refreshCost, 15000);
