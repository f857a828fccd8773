// memserve's live memory page: plain JavaScript, no build step. It reads /api/ps and /v1/models every
// REFRESH_MS, /metrics for tokens/s when the server has it, and the pool's events pushed over
// /api/events/stream. With keys on it asks for the admin key first and reads nothing without it.
// Every text from the server goes into the page as textContent, never as HTML.
"use strict";

const KEY_STORAGE = "memserve-admin-key";
const REFRESH_MS = 2000;
const RATE_WINDOW_S = 10;
const FEED_LIMIT = 300;
const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#edc948", "#76b7b2", "#ff9da7", "#9c755f"];
const BAD = new Set(["watchdog_kill", "crash", "load_failed", "refused"]);
const WARN = new Set(["evict", "reload", "retry", "retry_lower", "rung_lower", "reservation_capped", "learned", "reserve", "backoff"]);

const $ = (id) => document.getElementById(id);
const view = {
  ps: { models: [], devices: {} },
  configured: [], // local model names, in the server's order
  rows: new Map(), // name -> the <tr> kept for it
  lastSeq: 0,
  metrics: null, // null: not known yet, false: the server has no /metrics
  samples: [], // [{time, totals: {model: generation tokens}}] within RATE_WINDOW_S
  timers: [],
  stream: null, // the AbortController of the event stream
  refreshSoon: null, // the refresh an event asked for
};

class Unauthorized extends Error {}

// ------------------------------------------------------------------------------------------ the server

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401 || response.status === 403) throw new Unauthorized(await errorText(response));
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error?.message || `${response.status} ${response.statusText}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function json(path, options) {
  const response = await api(path, options);
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

// ------------------------------------------------------------------------------------------ start, login

async function start() {
  stop();
  try {
    await refresh();
  } catch (error) {
    if (error instanceof Unauthorized) return showLogin(error.message);
    setLive(false, `cannot reach the server (${error.message}); retrying`);
    view.timers.push(setTimeout(start, REFRESH_MS));
    return;
  }
  $("login").hidden = true;
  $("data").hidden = false;
  $("forget").hidden = !sessionStorage.getItem(KEY_STORAGE);
  view.timers.push(setInterval(() => refresh().catch(failed), REFRESH_MS));
  view.timers.push(setInterval(renderModels, 1000)); // keep-alive countdowns
  openStream();
}

function stop() {
  view.timers.forEach(clearTimeout); // clears intervals too
  view.timers = [];
  clearTimeout(view.refreshSoon);
  view.stream?.abort();
  view.stream = null;
}

function failed(error) {
  if (error instanceof Unauthorized) showLogin(error.message);
  else setLive(false, error.message);
}

function showLogin(message) {
  stop();
  $("data").hidden = true;
  for (const id of ["devices", "feed", "fit-answer", "action", "model-names"]) $(id).replaceChildren();
  $("models").tBodies[0].replaceChildren();
  view.rows.clear();
  view.lastSeq = 0;
  view.samples = [];
  $("login-message").textContent = message;
  $("login").hidden = false;
  $("forget").hidden = true;
  setLive(false, "no key");
  $("key").focus();
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, $("key").value.trim());
  $("key").value = "";
  start();
});

$("forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORAGE);
  showLogin("Key forgotten. Type an admin key to see this server.");
});

function setLive(on, text) {
  $("live").className = on ? "live on" : "live";
  $("live").textContent = text;
}

// ------------------------------------------------------------------------------------------ polling

async function refresh() {
  const [ps, models] = await Promise.all([json("api/ps"), json("v1/models")]);
  view.ps = ps;
  view.configured = models.data.filter((m) => m.memserve).map((m) => ({ name: m.id, state: m.memserve.state }));
  await readMetrics();
  render();
}

function scheduleRefresh() {
  clearTimeout(view.refreshSoon);
  view.refreshSoon = setTimeout(() => refresh().catch(failed), 150);
}

async function readMetrics() {
  if (view.metrics === false) return;
  const response = await api("metrics");
  if (response.status === 404) {
    view.metrics = false;
    return;
  }
  if (!response.ok) return;
  view.metrics = true;
  const now = performance.now() / 1000;
  view.samples.push({ time: now, totals: generationTokens(await response.text()) });
  while (view.samples.length > 2 && now - view.samples[1].time >= RATE_WINDOW_S) view.samples.shift();
}

// memserve_generation_tokens_total{model="…",…} VALUE, summed per model (over providers and keys)
function generationTokens(text) {
  const totals = {};
  for (const line of text.split("\n")) {
    if (!line.startsWith("memserve_generation_tokens_total{")) continue;
    const model = /[{,]model="((?:[^"\\]|\\.)*)"/.exec(line);
    const value = Number.parseFloat(line.slice(line.lastIndexOf("}") + 1).trim().split(" ")[0]);
    if (model && Number.isFinite(value)) {
      const name = model[1].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
      totals[name] = (totals[name] || 0) + value;
    }
  }
  return totals;
}

function tokensPerSecond(name) {
  if (!view.metrics || view.samples.length < 2) return "–";
  const first = view.samples[0];
  const last = view.samples[view.samples.length - 1];
  const tokens = (last.totals[name] || 0) - (first.totals[name] || 0);
  const seconds = last.time - first.time;
  return tokens >= 0 && seconds > 0 ? (tokens / seconds).toFixed(1) : "–";
}

// ------------------------------------------------------------------------------------------ rendering

function render() {
  renderDevices();
  renderModels();
  const names = $("model-names");
  names.replaceChildren(...view.configured.map((m) => Object.assign(document.createElement("option"), { value: m.name })));
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function colour(name) {
  const index = view.configured.findIndex((m) => m.name === name);
  return PALETTE[(index < 0 ? view.configured.length : index) % PALETTE.length];
}

function renderDevices() {
  const box = $("devices");
  box.replaceChildren();
  for (const [device, d] of Object.entries(view.ps.devices)) {
    const capacity = d.capacity_bytes || 1;
    const percent = (bytes) => `${Math.max(0, (100 * bytes) / capacity)}%`;
    const bar = el("div", "bar");
    const legend = el("ul", "legend");
    for (const row of view.ps.models) {
      const use = row.devices[device];
      if (!use || (!use.reserved_bytes && !use.measured_bytes)) continue;
      const held = Math.max(use.reserved_bytes, use.measured_bytes);
      const segment = el("div", "segment");
      segment.dataset.model = row.name;
      segment.style.width = percent(held);
      segment.style.background = colour(row.name);
      segment.title = `${row.name}: reserved ${bytes(use.reserved_bytes)}, measured ${bytes(use.measured_bytes)}`;
      const measured = el("div", use.measured_bytes > use.reserved_bytes ? "measured over" : "measured");
      measured.style.width = `${(100 * use.measured_bytes) / held}%`;
      segment.append(measured);
      bar.append(segment);
      const item = el("li", "", ` ${row.name}: reserved ${bytes(use.reserved_bytes)}, measured ${bytes(use.measured_bytes)}`);
      const swatch = el("span", "swatch");
      swatch.style.background = colour(row.name);
      item.prepend(swatch);
      legend.append(item);
    }
    bar.append(el("div", "free"));
    const headroom = el("div", "headroom");
    headroom.style.width = percent(d.headroom_bytes);
    headroom.title = `headroom ${bytes(d.headroom_bytes)}: never handed out`;
    bar.append(headroom);
    const figures =
      `capacity ${bytes(d.capacity_bytes)} · usable ${bytes(d.usable_bytes)} · held ${bytes(d.held_bytes)}` +
      ` · free ${bytes(d.free_bytes)} · headroom ${bytes(d.headroom_bytes)}`;
    const block = el("div", "device");
    block.dataset.device = device;
    block.append(el("div", "device-name", device), bar, el("div", "figures", figures), legend);
    box.append(block);
  }
}

function renderModels() {
  const body = $("models").tBodies[0];
  const rows = new Map(view.ps.models.map((r) => [r.name, r]));
  for (const { name, state } of view.configured) {
    const row = rows.get(name) || { name, state: state || "stopped", devices: {} };
    if (!view.rows.has(name)) view.rows.set(name, newRow(name, body));
    fillRow(view.rows.get(name), row);
  }
}

function newRow(name, body) {
  const tr = el("tr");
  tr.dataset.model = name;
  const cells = ["name", "state", "rung", "dtype", "context", "concurrency", "reserved", "measured", "keep-alive", "leases", "tps"];
  for (const cell of cells) {
    const td = el("td", ["reserved", "measured", "leases", "tps"].includes(cell) ? "num" : "");
    td.dataset.cell = cell;
    tr.append(td);
  }
  const actions = el("td", "actions");
  const load = el("button", "load", "Load");
  const unload = el("button", "unload", "Unload");
  load.type = unload.type = "button";
  load.addEventListener("click", () => act("load", name));
  unload.addEventListener("click", () => act("unload", name));
  actions.append(load, unload);
  tr.append(actions);
  body.append(tr);
  return tr;
}

function fillRow(tr, row) {
  const set = (cell, text, title) => {
    const td = tr.querySelector(`[data-cell="${cell}"]`);
    td.textContent = text;
    td.title = title || "";
  };
  const devices = Object.entries(row.devices || {});
  const total = (field) => devices.reduce((sum, [, use]) => sum + (use[field] || 0), 0);
  const perDevice = (field) => devices.map(([d, use]) => `${bytes(use[field] || 0)} on ${d}`).join(", ");
  set("name", row.pinned ? `${row.name} (pinned)` : row.name);
  set("state", row.state, row.reason || "");
  tr.querySelector('[data-cell="state"]').className = `state ${row.state}`;
  set("rung", row.rung ?? "–");
  set("dtype", row.dtype ?? "–");
  set("context", row.context_tokens ?? "–");
  set("concurrency", row.concurrency ?? "–");
  set("reserved", devices.length ? bytes(total("reserved_bytes")) : "–", perDevice("reserved_bytes"));
  set("measured", devices.length ? bytes(total("measured_bytes")) : "–", perDevice("measured_bytes"));
  set("keep-alive", keepAliveLeft(row));
  set("leases", row.leases === undefined ? "–" : `${row.leases} / ${row.queued}`);
  set("tps", tokensPerSecond(row.name));
  tr.querySelector("button.load").disabled = row.state !== "stopped" && row.state !== "failed";
  tr.querySelector("button.unload").disabled = row.state === "stopped";
}

function keepAliveLeft(row) {
  if (row.state !== "ready") return "–";
  if (row.pinned) return "pinned";
  if (row.expires_at == null) return row.keep_alive_seconds == null ? "forever" : "in use";
  return duration(Math.max(0, row.expires_at - Date.now() / 1000));
}

// ------------------------------------------------------------------------------------------ actions

async function act(what, name) {
  const status = $("action");
  status.className = "note";
  status.textContent = what === "load" ? `loading ${name}…` : `unloading ${name}…`;
  try {
    await json(`api/${what}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: name }),
    });
    status.textContent = what === "load" ? `${name} is loaded` : `${name} is unloaded`;
  } catch (error) {
    if (error instanceof Unauthorized) return showLogin(error.message);
    status.className = "note error";
    status.textContent = error.message;
  }
  scheduleRefresh();
}

$("fit").addEventListener("submit", async (event) => {
  event.preventDefault();
  const query = new URLSearchParams({ model: $("fit-model").value.trim() });
  for (const field of ["context", "concurrency"]) {
    const value = $(`fit-${field}`).value.trim();
    if (value) query.set(field, value);
  }
  const answer = $("fit-answer");
  answer.className = "";
  answer.textContent = "planning…";
  try {
    const fit = await json(`api/fit?${query}`);
    answer.replaceChildren(...fitLines(fit).map((line) => el("p", "", line)));
    answer.className = fit.plan ? "fits" : "error";
  } catch (error) {
    if (error instanceof Unauthorized) return showLogin(error.message);
    answer.className = "error";
    answer.textContent = error.message;
  }
});

function fitLines(fit) {
  const free = `free now: ${sizes(fit.free_now || {})}`;
  if (!fit.plan) return [`does not fit: ${fit.nofit?.message || "no rung fits"}`, free];
  const p = fit.plan;
  const quantized = p.quantization && p.quantization !== "none" ? `, ${p.quantization}` : "";
  const needs = Object.fromEntries(Object.entries(p.devices).map(([d, need]) => [d, need.total_bytes]));
  return [
    `fits as ${p.rung} (${p.dtype}${quantized}, ${p.engine}): context ${p.context_tokens} × ${p.concurrency} sequences`,
    `needs ${sizes(needs)}`,
    free,
  ];
}

// ------------------------------------------------------------------------------------------ the event feed

async function openStream() {
  const controller = new AbortController();
  view.stream = controller;
  let delay = 500;
  while (!controller.signal.aborted) {
    try {
      const response = await api(`api/events/stream?since=${view.lastSeq}`, { signal: controller.signal });
      if (!response.ok) throw new Error(await errorText(response));
      setLive(true, "live");
      delay = 500;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          onFrame(parseFrame(buffer.slice(0, end)));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (error) {
      if (controller.signal.aborted) return;
      if (error instanceof Unauthorized) return showLogin(error.message);
    }
    setLive(false, "reconnecting…");
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(2 * delay, 10000);
  }
}

function parseFrame(text) {
  const frame = { event: "message", data: [] };
  for (const line of text.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") frame.event = value;
    else if (field === "data") frame.data.push(value);
  }
  return frame;
}

function onFrame(frame) {
  if (!frame.data.length) return;
  const data = JSON.parse(frame.data.join("\n"));
  if (frame.event === "pool") {
    addEvent(data);
    view.lastSeq = data.seq;
    scheduleRefresh();
  } else if (frame.event === "reset") {
    $("feed").replaceChildren(); // the server restarted: its events are numbered from 1 again
    view.lastSeq = 0;
  } else if (frame.event === "gap") {
    notice(`events ${data.after + 1}–${data.next - 1} scrolled off the server's log before they were sent`);
  }
}

function addEvent(event) {
  const { seq, time, event: kind, model, ...fields } = event;
  const item = el("li", BAD.has(kind) ? "bad" : WARN.has(kind) ? "warn" : kind === "ready" ? "good" : "");
  Object.assign(item.dataset, { seq, time, event: kind, model, received: Date.now() });
  item.append(
    el("time", "", new Date(time * 1000).toLocaleTimeString(undefined, { hour12: false })),
    el("span", "kind", kind),
    el("span", "model", model),
    el("span", "detail", details(fields)),
  );
  prepend(item);
}

function notice(text) {
  prepend(el("li", "warn", text));
}

function prepend(item) {
  const feed = $("feed");
  feed.prepend(item);
  while (feed.children.length > FEED_LIMIT) feed.lastElementChild.remove();
}

// key=value for each field, sizes in units, seconds in s, the reason last (as the server's log line)
function details(fields) {
  const entries = Object.entries(fields).filter(([, v]) => v !== null && v !== undefined);
  entries.sort(([a], [b]) => (a === "reason") - (b === "reason"));
  return entries
    .map(([key, value]) => {
      let text;
      if (key.endsWith("_bytes")) text = typeof value === "object" ? sizes(value) : bytes(value);
      else if (key.endsWith("_seconds") || key === "seconds") text = `${value}s`;
      else text = typeof value === "object" ? JSON.stringify(value) : String(value);
      return `${key.replace(/_bytes$|_seconds$/, "")}=${text}`;
    })
    .join(" ");
}

// ------------------------------------------------------------------------------------------ units

function bytes(n) {
  let value = Math.abs(n || 0);
  for (const unit of ["B", "KiB", "MiB", "GiB"]) {
    if (value < 1024) return `${n < 0 ? "-" : ""}${unit === "B" ? value.toFixed(0) : value.toFixed(1)} ${unit}`;
    value /= 1024;
  }
  return `${n < 0 ? "-" : ""}${value.toFixed(1)} TiB`;
}

function sizes(perDevice) {
  const parts = Object.entries(perDevice).map(([d, n]) => `${bytes(n)} on ${d}`);
  return parts.length ? parts.join(", ") : "nothing";
}

function duration(seconds) {
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

start();
