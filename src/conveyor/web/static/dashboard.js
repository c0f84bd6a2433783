// conveyor's dashboard: polls the /v1 routes every 1.5 s and redraws. No framework, no build step.
// The session cookie (HttpOnly) signs every request in; writes carry X-Conveyor-Dashboard.
"use strict";

const POLL_MS = 1500;
const STATES = ["pending", "in_progress", "resolved", "dead", "cancelled"];
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04"];
const canWrite = document.body.dataset.canWrite === "yes";
const browse = { cursors: [], after: null, next: null };

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
};

async function api(path, options = {}) {
  const headers = { "Accept": "application/json", ...(options.body ? { "Content-Type": "application/json" } : {}) };
  if (options.method && options.method !== "GET") headers["X-Conveyor-Dashboard"] = "1";
  const response = await fetch(path, { ...options, headers, credentials: "same-origin" });
  if (response.status === 401) { location.reload(); throw new Error("signed out"); }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  if (seconds < 7200) return `${(seconds / 60).toFixed(1)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}
const fmt = (n) => Number(n).toLocaleString("en-US");
const say = (text) => { $("#message").textContent = text; };
const headline = (error) => {
  const lines = (error || "").trim().split("\n").filter((l) => l.trim());
  if (!lines.length) return "";
  if (lines[0].startsWith("Traceback")) {
    for (let i = lines.length - 1; i >= 0; i--) if (!/^\s/.test(lines[i])) return lines[i];
  }
  return lines[0];
};

// -- queues ------------------------------------------------------------------------------------
function renderQueues(queues) {
  const body = $("#queues tbody");
  const names = Object.keys(queues);
  body.replaceChildren(...(names.length ? names.map((name) => {
    const q = queues[name];
    const row = el("tr", { "data-queue": name }, el("td", {}, name, q.rows ? el("span", { class: "muted" }, " (table)") : "",
      ...flowNotes(name, q)));
    for (const state of STATES) {
      const n = state === "cancelled" && q.rows ? q.other : q[state];
      row.append(el("td", { class: "n", "data-state": state }, fmt(n)));
    }
    row.append(el("td", { class: "n", "data-field": "oldest" }, age(q.oldest_pending_seconds)));
    row.append(el("td", { class: "n" }, fmt(q.resolved_last_minute)));
    const actions = el("td");
    if (canWrite) {
      const [verb, path] = q.paused ? ["Resume", "resume"] : ["Pause", "pause"];
      actions.append(el("button", { type: "button", "data-action": path,
        onclick: () => act(`/v1/queues/${encodeURIComponent(name)}/${path}`, {}, `${path} ${name}`) }, verb), " ");
    }
    if (canWrite && !q.rows && q.dead + q.cancelled > 0) {
      actions.append(el("button", { type: "button", "data-action": "requeue-queue",
        onclick: () => act(`/v1/queues/${encodeURIComponent(name)}/requeue`, {}, `requeued ${name}`) },
        `Requeue ${fmt(q.dead + q.cancelled)}`));
    }
    row.append(actions);
    return row;
  }) : [el("tr", {}, el("td", { colspan: 9, class: "muted" }, "no items yet"))]));
  const select = $("#filters select[name=queue]");
  const have = new Set([...select.options].map((o) => o.value));
  for (const name of names) if (!have.has(name) && !queues[name].rows) select.append(el("option", {}, name));
}

// what holds a queue back, under its name: paused, held by a Backoff, paused or held keys, limits
function flowNotes(name, q) {
  const notes = [];
  if (q.paused) notes.push(el("span", { class: "badge paused", "data-flow": "paused" }, "paused"));
  if (q.held_until) {
    const until = new Date(q.held_until * 1000).toISOString().slice(11, 19);
    notes.push(el("span", { class: "badge held", "data-flow": "held" }, `held until ${until} UTC`));
  }
  const keys = (field, label) => {
    const list = q[field] || [];
    if (!list.length) return;
    const line = el("div", { class: "muted small", "data-flow": field }, `${label}: `);
    list.slice(0, 10).forEach((key, i) => {
      if (i) line.append(", ");
      line.append(key);
      if (canWrite && field === "paused_keys") {
        line.append(" ", el("button", { type: "button", class: "link", "data-action": "resume-key",
          onclick: () => act(`/v1/queues/${encodeURIComponent(name)}/resume`, { key }, `resume ${name} key ${key}`) }, "resume"));
      }
    });
    if (list.length > 10) line.append(` and ${list.length - 10} more`);
    notes.push(line);
  };
  keys("paused_keys", "paused keys");
  keys("held_keys", "keys held by a Backoff");
  if (q.limits && Object.keys(q.limits).length) {
    const text = Object.entries(q.limits).map(([k, v]) => (v === true ? k : `${k} ${v}`)).join(" · ");
    notes.push(el("div", { class: "muted small", "data-flow": "limits" }, text));
  }
  return notes.length ? [" ", ...notes] : [];
}

async function act(path, body, done) {
  try {
    await api(path, { method: "POST", body: JSON.stringify(body) });
    say("");
    await refresh();
  } catch (e) { say(`${done} failed: ${e.message}`); }
}

// -- charts (canvas, drawn by hand) -------------------------------------------------------------
function drawChart(canvas, t, series, unit) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 48, bottom = 18;
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px system-ui"; ctx.fillStyle = "#6b7280"; ctx.strokeStyle = "#e3e5ea";
  let max = 0;
  for (const values of Object.values(series)) for (const v of values) if (v !== null && v > max) max = v;
  canvas.dataset.peak = String(max);
  max = max > 0 ? max * 1.1 : 1;
  for (let i = 0; i <= 4; i++) {
    const y = (h - bottom) * (1 - i / 4);
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(w, y); ctx.stroke();
    ctx.fillText(`${(max * i / 4).toFixed(max < 10 ? 1 : 0)}${unit}`, 2, Math.max(10, y - 2));
  }
  if (t.length < 2) { ctx.fillText("collecting samples…", left + 8, h / 2); return; }
  const t0 = t[0], span = Math.max(1, t[t.length - 1] - t0);
  ctx.fillText(`${Math.round(span / 60 * 10) / 10} min`, w - 50, h - 4);
  Object.entries(series).forEach(([name, values], k) => {
    ctx.strokeStyle = COLORS[k % COLORS.length]; ctx.lineWidth = 1.5; ctx.beginPath();
    let pen = false;
    values.forEach((v, i) => {
      if (v === null) { pen = false; return; }
      const x = left + (w - left) * (t[i] - t0) / span, y = (h - bottom) * (1 - v / max);
      if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      pen = true;
    });
    ctx.stroke();
  });
}

function renderHistory(history) {
  const names = Object.keys(history.queues);
  const pick = (what) => Object.fromEntries(names.map((n) => [n, history.queues[n][what]]));
  $("#throughput").dataset.samples = String(history.t.length);
  drawChart($("#throughput"), history.t, pick("throughput"), "/s");
  drawChart($("#lag"), history.t, pick("lag"), "s");
  $("#legend").replaceChildren(...names.map((n, k) =>
    el("span", {}, el("i", { style: `background:${COLORS[k % COLORS.length]}` }), n)));
}

// -- dead items ---------------------------------------------------------------------------------
function renderDead(page) {
  const list = $("#dead");
  const open = new Set([...list.querySelectorAll("details[open]")].map((d) => d.dataset.id));
  if (!page.items.length) { list.replaceChildren(el("li", { class: "muted" }, "none")); return; }
  list.replaceChildren(...page.items.map((it) => {
    const details = el("details", { "data-id": String(it.id) },
      el("summary", {}, `#${it.id} · ${it.queue} · attempt ${it.attempts} · `, el("span", { class: "state-dead" }, headline(it.last_error))),
      el("pre", {}, it.last_error || "(no error text)"));
    if (open.has(String(it.id))) details.open = true;
    const li = el("li", { "data-item": String(it.id) }, details);
    if (canWrite) {
      li.append(el("button", { type: "button", "data-action": "requeue-item",
        onclick: () => act(`/v1/queues/${encodeURIComponent(it.queue)}/requeue`, { ids: [it.id] }, `requeue #${it.id}`) },
        "Requeue"));
    }
    return li;
  }));
}

// -- item browser -------------------------------------------------------------------------------
function filters() {
  const form = new FormData($("#filters"));
  const params = new URLSearchParams({ limit: "25" });
  for (const name of ["queue", "state", "key"]) { const v = form.get(name); if (v) params.set(name, v); }
  if (browse.after !== null) params.set("after", browse.after);
  return params;
}

async function loadItems() {
  const page = await api(`/v1/items?${filters()}`);
  browse.next = page.next;
  $("#older").disabled = page.next === null;
  $("#newer").disabled = browse.after === null;
  $("#items tbody").replaceChildren(...page.items.map((it) => {
    const row = el("tr", { "data-item": String(it.id) },
      el("td", { class: "n" }, String(it.id)), el("td", {}, it.queue),
      el("td", { class: `state-${it.state}`, "data-field": "state" }, it.state.replace("_", " ")),
      el("td", {}, it.key ?? ""), el("td", { class: "n" }, String(it.attempts)),
      el("td", {}, (it.created_at || "").replace("T", " ").slice(0, 19)), el("td", {}, headline(it.last_error)));
    const actions = el("td");
    if (canWrite && (it.state === "pending" || it.state === "in_progress")) {
      actions.append(el("button", { type: "button", "data-action": "cancel",
        onclick: () => act(`/v1/items/${it.id}/cancel`, {}, `cancel #${it.id}`) }, "Cancel"));
    }
    row.append(actions);
    return row;
  }));
}

$("#filters").addEventListener("submit", (e) => { e.preventDefault(); browse.after = null; browse.cursors = []; loadItems().catch((x) => say(x.message)); });
$("#older").addEventListener("click", () => { browse.cursors.push(browse.after); browse.after = browse.next; loadItems().catch((x) => say(x.message)); });
$("#newer").addEventListener("click", () => { browse.after = null; browse.cursors = []; loadItems().catch((x) => say(x.message)); });
const signOut = $("#sign-out");
if (signOut) signOut.addEventListener("click", async () => {
  await fetch("/session/end", { method: "POST", headers: { "X-Conveyor-Dashboard": "1" }, credentials: "same-origin" });
  location.reload();
});

// -- the poll -----------------------------------------------------------------------------------
async function refresh() {
  const [queues, history, dead] = await Promise.all([
    api("/v1/queues"), api("/v1/history"), api("/v1/items?state=dead&limit=10"),
  ]);
  renderQueues(queues.queues);
  renderHistory(history);
  renderDead(dead);
  if (browse.after === null) await loadItems();  // the first page follows new items; older pages stay put
  $("#updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

async function poll() {
  try { await refresh(); } catch (e) { $("#updated").textContent = `stale: ${e.message}`; }
  setTimeout(poll, POLL_MS);
}
poll();
