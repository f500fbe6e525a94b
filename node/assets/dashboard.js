// cdtester dashboard. Every value shown comes from the node's API and may be chosen by a
// student (project names, test ids, failure messages): text is only ever set with
// textContent / createTextNode, never parsed as HTML.
"use strict";

const FAILING = new Set(["failed", "error", "timeout", "oom", "crashed", "infra-error"]);
const state = { evalId: null, source: null, report: null, full: null, open: new Set(), fetching: false, history: new Map() };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-") || k === "href" || k === "title" || k === "colspan") node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function num(v) { return typeof v === "number" ? v : 0; }
function grade(g) { return typeof g === "number" ? g.toFixed(2) : "–"; }

function bar(done, total) {
  const fill = el("div", { class: "fill" });
  fill.style.width = (total > 0 ? Math.round((100 * done) / total) : 0) + "%";
  return el("div", { class: "bar", title: done + "/" + total + " modules" }, fill);
}

function replaceRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

async function getJSON(path) {
  const r = await fetch(path, { headers: { Accept: "application/json" } });
  if (!r.ok) throw new Error(path + ": " + r.status);
  return r.json();
}

// ---------------------------------------------------------------- network

function renderNetwork(network, stats) {
  const rows = [];
  const perNode = new Map(((stats && stats.nodes) || []).map((n) => [n.address, n]));
  for (const [addr, peers] of Object.entries(network || {}).sort()) {
    const s = perNode.get(addr) || {};
    rows.push(el("tr", { "data-node": addr },
      el("td", {}, addr), el("td", { class: "s-finished" }, "alive"), el("td", { class: "num" }, peers.length),
      el("td", { class: "num" }, num(s.modules)), el("td", { class: "num" }, num(s.passed)),
      el("td", { class: "num" }, num(s.failed))));
  }
  replaceRows(document.querySelector("#network-table tbody"), rows);
}

// ---------------------------------------------------------------- evaluations list

async function renderEvaluations(ids) {
  const newest = ids.slice(-20).reverse();
  const rows = await Promise.all(newest.map(async (id) => {
    let r = null;
    try { r = await getJSON("/evaluation/" + id + "?tests=false"); } catch (e) { r = null; }
    const s = (r && r.summary) || {};
    const total = num(s.executed) + num(s.executing) + num(s.pending);
    return el("tr", { "data-eval": String(id) },
      el("td", {}, el("a", { href: "#/evaluation/" + id }, String(id))),
      el("td", { class: "s-" + (r ? r.status : "") }, r ? r.status : "?"),
      el("td", { class: "num" }, r ? Object.keys(r.projects).length : ""),
      el("td", {}, bar(num(s.executed), total)),
      el("td", { class: "num" }, grade(s.grade)));
  }));
  replaceRows(document.querySelector("#evaluations-table tbody"), rows);
}

async function refreshOverview() {
  try {
    const [network, stats, ids] = await Promise.all([getJSON("/network"), getJSON("/stats"), getJSON("/evaluation")]);
    renderNetwork(network, stats);
    await renderEvaluations(ids);
    document.getElementById("live").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    document.getElementById("live").textContent = "node unreachable";
  }
}

// ---------------------------------------------------------------- one evaluation

function failing(p) {
  return p.status === "failed" || num(p.total_failed) > 0;
}

function projectRow(name, p) {
  const t = p.tests || {};
  const total = num(p.executed) + num(p.executing) + num(p.pending);
  const status = p.error ? p.status + ": " + p.error : p.status;
  const row = el("tr", { class: "project", "data-project": name, title: "show modules and tests" },
    el("td", {}, name), el("td", { class: "num grade" }, grade(p.grade)),
    el("td", { class: "num" }, num(t.passed) + num(t.xpassed)),
    el("td", { class: "num" }, num(t.failed) + num(t.timeout) + num(t.oom) + num(t.crashed)),
    el("td", { class: "num" }, num(t.error)), el("td", { class: "num" }, num(t.skipped) + num(t.xfailed)),
    el("td", { class: "num o-flaky" }, num(t.flaky)),
    el("td", { class: "status s-" + p.status }, status), el("td", {}, bar(num(p.executed), total)));
  row.addEventListener("click", () => toggleProject(name));
  return row;
}

// Every attempt of a test that ran more than once: "failed 0.012 s → passed 0.010 s".
function attemptsCell(t) {
  const cell = el("td", { class: "attempts" });
  (t.attempts || []).forEach((a, i) => {
    if (i > 0) cell.appendChild(document.createTextNode(" → "));
    cell.appendChild(el("span", { class: "o-" + a.outcome, title: a.message || "" },
      a.outcome + " " + num(a.duration).toFixed(3) + " s"));
  });
  return cell;
}

// The test's recent runs across evaluations of the project's name, oldest first.
function historyCell(runs) {
  const cell = el("td", { class: "history" });
  for (const r of runs || []) {
    cell.appendChild(el("span", { class: "run o-" + r.outcome, "data-eval": String(r.eval),
      title: "evaluation " + r.eval + ": " + r.outcome + ", " + num(r.duration).toFixed(3) + " s" }));
  }
  return cell;
}

function testLine(t, history) {
  return el("tr", { class: "test t-" + t.outcome, "data-test": t.nodeid },
    el("td", {}, t.nodeid), el("td", { class: "o-" + t.outcome }, t.outcome),
    el("td", { class: "num" }, num(t.duration).toFixed(3) + " s"),
    el("td", { class: "message" }, t.message || ""), attemptsCell(t),
    historyCell(history && history[t.nodeid]));
}

function detailRow(name) {
  const onlyFailed = document.getElementById("failed-only").checked;
  const p = state.full && state.full.projects[name];
  const box = el("td", { colspan: "9" });
  if (!p) {
    box.appendChild(el("span", { class: "muted" }, "loading…"));
  } else {
    if (p.url) box.appendChild(el("div", { class: "muted" }, "repository: " + p.url));
    for (const [path, m] of Object.entries(p.modules)) {
      const tests = (m.tests || []).filter((t) => !onlyFailed || FAILING.has(t.outcome));
      if (onlyFailed && tests.length === 0) continue;
      box.appendChild(el("div", { class: "module", "data-module": path },
        path + " — " + m.status + (m.node ? " on " + m.node : "") + ", " + num(m.time).toFixed(2) + " s",
        m.note ? el("div", { class: "message" }, m.note) : null));
      const history = state.history.get(name);
      const table = el("table", { class: "tests" },
        el("thead", {}, el("tr", {}, el("th", {}, "test"), el("th", {}, "outcome"), el("th", {}, "duration"),
          el("th", {}, "message"), el("th", {}, "attempts"), el("th", {}, "history"))),
        el("tbody", {}, ...tests.map((t) => testLine(t, history))));
      box.appendChild(table);
    }
  }
  return el("tr", { class: "detail", "data-detail": name }, box);
}

function renderReport() {
  const r = state.report;
  if (!r) return;
  const s = r.summary;
  const total = num(s.executed) + num(s.executing) + num(s.pending);
  document.getElementById("eval-id").textContent = String(r.id);
  const st = document.getElementById("eval-status");
  st.textContent = r.status;
  st.className = "status s-" + r.status;
  document.getElementById("eval-summary").textContent =
    num(s.executed) + "/" + total + " modules, " + num(s.total_passed) + " passed, " + num(s.total_failed) +
    " failed, grade " + grade(s.grade) + ", " + num(r.time_elapsed).toFixed(1) + " s";
  document.getElementById("eval-progress").style.width = (total ? Math.round((100 * s.executed) / total) : 0) + "%";
  document.getElementById("rerun").hidden = !(r.status === "finished" && num(s.total_failed) > 0);
  renderLinks(r);
  renderFlaky(r);
  const onlyFailed = document.getElementById("failed-only").checked;
  const rows = [];
  for (const [name, p] of Object.entries(r.projects)) {
    if (onlyFailed && !failing(p)) continue;
    rows.push(projectRow(name, p));
    if (state.open.has(name)) rows.push(detailRow(name));
  }
  replaceRows(document.querySelector("#projects tbody"), rows);
}

// "rerun of #<id>" and "reruns: #<id> ..." links.
function renderLinks(r) {
  const links = [];
  const link = (id) => el("a", { href: "#/evaluation/" + id, "data-link": String(id) }, "#" + id);
  if (typeof r.rerun_of === "number") links.push("rerun of ", link(r.rerun_of));
  if (Array.isArray(r.reruns) && r.reruns.length) {
    links.push(links.length ? "; reruns: " : "reruns: ");
    r.reruns.forEach((id, i) => { if (i) links.push(" "); links.push(link(id)); });
  }
  document.getElementById("eval-links").replaceChildren(...links.map((x) => (x instanceof Node ? x : document.createTextNode(x))));
}

function renderFlaky(r) {
  const rows = [];
  for (const [name, p] of Object.entries(r.projects)) {
    for (const id of p.flaky || []) rows.push(el("tr", { "data-flaky": id }, el("td", {}, name), el("td", {}, id)));
  }
  document.getElementById("flaky-section").hidden = rows.length === 0;
  replaceRows(document.querySelector("#flaky-table tbody"), rows);
}

async function refreshHistory(name) {
  try {
    const h = await getJSON("/history/" + encodeURIComponent(name));
    state.history.set(name, h.tests || {});
  } catch (e) {
    state.history.delete(name);
  }
  renderReport();
}

async function refreshFull() {
  if (state.open.size === 0 || state.fetching || state.evalId === null) return;
  state.fetching = true;
  try {
    state.full = await getJSON("/evaluation/" + state.evalId);
  } catch (e) {
    state.full = null;
  } finally {
    state.fetching = false;
  }
  renderReport();
}

function toggleProject(name) {
  if (state.open.has(name)) state.open.delete(name);
  else {
    state.open.add(name);
    refreshHistory(name);
  }
  renderReport();
  refreshFull();
}

async function rerunFailed() {
  const button = document.getElementById("rerun");
  button.disabled = true;
  try {
    const r = await fetch("/evaluation/" + state.evalId + "/rerun", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ only: "failed" }),
    });
    const v = await r.json();
    if (!r.ok) throw new Error(v.error || String(r.status));
    location.hash = "#/evaluation/" + v.eval_id;
  } catch (e) {
    document.getElementById("live").textContent = "rerun refused: " + e.message;
  } finally {
    button.disabled = false;
  }
}

function follow(id) {
  if (state.source) state.source.close();
  Object.assign(state, { evalId: id, report: null, full: null, open: new Set(), history: new Map() });
  document.getElementById("grades-link").setAttribute("href", "/evaluation/" + id + "/grades.csv");
  const source = new EventSource("/evaluation/" + id + "/events");
  state.source = source;
  source.addEventListener("report", (e) => {
    state.report = JSON.parse(e.data);
    renderReport();
    refreshFull();
  });
  source.addEventListener("network", (e) => {
    renderNetwork(JSON.parse(e.data), null);
    refreshOverview();
  });
  source.addEventListener("end", () => {
    source.close();
    refreshOverview();
    for (const name of state.open) refreshHistory(name);
  });
  source.onerror = () => { document.getElementById("live").textContent = "reconnecting…"; };
}

function route() {
  const m = /^#\/evaluation\/(\d+)$/.exec(location.hash);
  const section = document.getElementById("evaluation-section");
  if (m) {
    section.hidden = false;
    if (state.evalId !== m[1]) follow(m[1]);
  } else {
    section.hidden = true;
    if (state.source) state.source.close();
    state.evalId = null;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("failed-only").addEventListener("change", renderReport);
  document.getElementById("rerun").addEventListener("click", rerunFailed);
  window.addEventListener("hashchange", route);
  route();
  refreshOverview();
  setInterval(refreshOverview, 3000);
});
