// The status page: polls the public API for the models and their busiest streams, draws each
// model's loss and symbols/s since the page was opened, and predicts the next characters of the
// text box over the stream WebSocket with `predict: true`, so that nothing is learned unless
// the person presses "Learn".
"use strict";

const POLL_MS = 1000;
const HISTORY_POINTS = 300;
const MIN_SPAN_POINTS = 30;
const BUSIEST = 10;
const TOP_K = 8;
// Each prediction re-reads the text from a fresh state; a bound keeps a keystroke cheap.
const MAX_CONTEXT_CHARS = 2000;

// A server with an API key needs it on every /v1 call: open the page as `/#key=<key>`. The
// fragment never leaves the browser; the key stays in this tab's session storage only, and the
// address bar drops it at once.
const API_KEY = (() => {
  const match = location.hash.match(/(?:^#|&)key=([^&]+)/);
  if (match) {
    sessionStorage.setItem("kfrtrl-api-key", decodeURIComponent(match[1]));
    window.history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("kfrtrl-api-key");
})();
const AUTH = API_KEY ? { authorization: `Bearer ${API_KEY}` } : {};
// Browsers cannot set headers on a WebSocket: the key goes as a subprotocol next to kfrtrl.v1.
const WS_PROTOCOLS = API_KEY ? ["kfrtrl.v1", `kfrtrl.bearer.${API_KEY}`] : [];

const $ = (id) => document.getElementById(id);
const history = new Map(); // model name -> { last: {t, seen}, points: [{t, loss, rate}] }

function fmt(value, digits) {
  return value === null || value === undefined || Number.isNaN(value) ? "–" : value.toFixed(digits);
}

function fmtCount(n) {
  if (n >= 1e9) return (n / 1e9).toFixed(2) + "G";
  if (n >= 1e6) return (n / 1e6).toFixed(2) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return String(n);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

async function getJson(path) {
  const response = await fetch(path, { headers: { accept: "application/json", ...AUTH } });
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

// ---- models -------------------------------------------------------------------------------

function record(model, now) {
  let h = history.get(model.name);
  if (!h) {
    h = { last: null, points: [] };
    history.set(model.name, h);
  }
  const seen = model.stats.symbols_seen;
  let rate = null;
  if (h.last && now > h.last.t) rate = Math.max(0, (seen - h.last.seen) / ((now - h.last.t) / 1000));
  h.last = { t: now, seen };
  h.points.push({ t: now, loss: model.stats.loss_bits_avg, rate });
  if (h.points.length > HISTORY_POINTS) h.points.shift();
  return rate;
}

function drawSeries(canvas, points, key, color, fixedMin) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  ctx.clearRect(0, 0, width, height);
  ctx.strokeStyle = "#e4e7ec";
  ctx.strokeRect(0.5, 0.5, width - 1, height - 1);
  const values = points.map((p) => p[key]).filter((v) => v !== null && Number.isFinite(v));
  if (values.length === 0) return null;
  let min = fixedMin !== undefined ? fixedMin : Math.min(...values);
  let max = Math.max(...values);
  if (max - min < 1e-9) { max += 0.5; min = Math.max(fixedMin ?? -Infinity, min - 0.5); }
  // The time axis grows with the history up to its bound, so that a fresh page is not a sliver.
  const span = Math.max(MIN_SPAN_POINTS, points.length);
  const x = (i) => 2 + (i / Math.max(1, span - 1)) * (width - 4);
  const y = (v) => height - 3 - ((v - min) / (max - min)) * (height - 6);
  const offset = span - points.length;
  ctx.beginPath();
  let started = false;
  points.forEach((p, i) => {
    const v = p[key];
    if (v === null || !Number.isFinite(v)) { started = false; return; }
    if (started) ctx.lineTo(x(offset + i), y(v)); else ctx.moveTo(x(offset + i), y(v));
    started = true;
  });
  ctx.strokeStyle = color;
  ctx.lineWidth = 1.8;
  ctx.stroke();
  return { min, max };
}

function stat(label, value, title) {
  return el("div", { class: "stat", title: title || "" },
    el("div", { class: "value" }, value), el("div", { class: "label" }, label));
}

// The model's averages mix the latest tokens of all its streams: one easy stream can hide a hard
// one, so the card says so and the streams table below has each stream's own.
const ALL_STREAMS = "over the latest tokens of all the model's streams together; each stream's own is in the table below";

function modelCard(model, rate) {
  const c = model.config;
  const learner = c.learner === "tbptt" ? `tbptt:${c.tbptt_window}` : c.learner;
  const card = el("div", { class: "card", "data-model": model.name },
    el("h3", {}, model.name + (model.state === "ready" ? "" : ` (${model.state})`)),
    el("div", { class: "config" },
      `${c.cell} n=${c.hidden} · ${learner} · ${c.optimizer} lr=${c.lr.toPrecision(3)} · vocab ${c.vocab_size}`),
    el("div", { class: "stats" },
      stat("loss bits (recent, all streams)", fmt(model.stats.loss_bits_avg, 3), ALL_STREAMS),
      stat("symbols/s", rate === null ? "–" : fmtCount(Math.round(rate))),
      stat("top-1 (recent, all streams)", model.stats.top1_accuracy_avg === null ? "–"
        : (100 * model.stats.top1_accuracy_avg).toFixed(1) + "%", ALL_STREAMS),
      stat("symbols", fmtCount(model.stats.symbols_seen)),
      stat("streams", String(model.stats.streams)),
      stat("queued", fmtCount(model.stats.queued_tokens))));
  const lossLabel = el("div", { class: "chart-label" }, el("span", {}, "loss in bits"), el("span", {}));
  const loss = el("canvas", { class: "loss", role: "img", "aria-label": `loss of ${model.name}` });
  const rateLabel = el("div", { class: "chart-label" }, el("span", {}, "symbols/s"), el("span", {}));
  const rates = el("canvas", { class: "rate", role: "img", "aria-label": `symbols per second of ${model.name}` });
  card.append(lossLabel, loss, rateLabel, rates);
  return { card, draw() {
    const points = history.get(model.name).points;
    const l = drawSeries(loss, points, "loss", "#2f6fde");
    lossLabel.lastChild.textContent = l ? `${l.min.toFixed(2)} – ${l.max.toFixed(2)}` : "";
    const r = drawSeries(rates, points, "rate", "#16a34a", 0);
    rateLabel.lastChild.textContent = r ? `0 – ${fmtCount(Math.round(r.max))}` : "";
  } };
}

function renderModels(models, rates) {
  const container = $("models");
  const cards = models.map((m) => modelCard(m, rates.get(m.name)));
  container.replaceChildren(...cards.map((c) => c.card));
  cards.forEach((c) => c.draw());
  $("models-empty").hidden = models.length > 0;
  for (const name of [...history.keys()]) {
    if (!models.some((m) => m.name === name)) history.delete(name);
  }
}

function renderStreams(lists) {
  const rows = lists.flatMap((list) => list.streams)
    .sort((a, b) => b.position - a.position || a.stream.localeCompare(b.stream))
    .slice(0, BUSIEST);
  $("streams").tBodies[0].replaceChildren(...rows.map((s) => el("tr", {},
    el("td", {}, s.model), el("td", {}, s.stream),
    el("td", { class: "num" }, fmtCount(s.position)),
    el("td", { class: "num" }, fmtCount(s.symbols_learned)),
    el("td", { class: "num" }, fmt(s.loss_bits_avg, 3)),
    el("td", { class: "num" }, fmt(s.mean_loss_bits, 3)),
    el("td", { class: "num" }, fmtCount(s.queued_tokens)),
    el("td", { class: "num" }, s.idle_seconds < 1 ? "active" : `${Math.round(s.idle_seconds)} s`))));
  $("streams-empty").hidden = rows.length > 0;
}

async function poll() {
  try {
    const ready = await fetch("/readyz");
    $("health").textContent = ready.ok ? "ready" : "not ready";
    $("health").className = "pill " + (ready.ok ? "ok" : "bad");
    const { models } = await getJson("/v1/models");
    const now = Date.now();
    const rates = new Map(models.map((m) => [m.name, record(m, now)]));
    renderModels(models, rates);
    const lists = await Promise.all(models.map((m) =>
      getJson(`/v1/models/${encodeURIComponent(m.name)}/streams?limit=${BUSIEST}`)
        .catch(() => ({ streams: [] }))));
    renderStreams(lists);
    updateModelChoice(models);
  } catch (e) {
    $("health").textContent = "unreachable";
    $("health").className = "pill bad";
  }
}

// ---- try it -------------------------------------------------------------------------------

const session = {
  stream: "status-page-" + Math.random().toString(16).slice(2, 10),
  model: null,
  socket: null,
  waiting: [],      // kinds of the requests in flight, in order (replies come back in order)
  predicting: false,
  dirty: false,
};

function updateModelChoice(models) {
  const select = $("try-model");
  const byteModels = models.filter((m) => m.config.vocab_size === 256 && m.state === "ready");
  const names = byteModels.map((m) => m.name);
  const current = [...select.options].map((o) => o.value);
  if (names.join("\n") !== current.join("\n")) {
    const keep = select.value;
    select.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
    if (names.includes(keep)) select.value = keep;
  }
  if (names.length === 0) {
    $("try-state").textContent = "no byte-level model to type to";
    closeSocket();
  } else if (session.model !== select.value) {
    openSocket(select.value);
  }
}

function closeSocket() {
  if (session.socket) {
    session.socket.onclose = null;
    session.socket.close();
  }
  session.socket = null;
  session.model = null;
  session.waiting = [];
  session.predicting = false;
  $("learn").disabled = true;
}

function streamPath(model) {
  return `/v1/models/${encodeURIComponent(model)}/streams/${session.stream}`;
}

function send(kind, message) {
  session.waiting.push(kind);
  session.socket.send(JSON.stringify(message));
}

function createStream() {
  // A predict needs the stream to exist; one newline, not learned from, creates it.
  send("create", { tokens: [10], learn: false, top_k: 0 });
}

function openSocket(model) {
  closeSocket();
  session.model = model;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}${streamPath(model)}/ws`, WS_PROTOCOLS);
  session.socket = socket;
  $("try-state").textContent = "connecting…";
  socket.onopen = () => {
    $("try-state").textContent = `stream ${session.stream}`;
    createStream();
    requestPrediction();
  };
  socket.onmessage = (event) => onReply(JSON.parse(event.data));
  socket.onclose = () => {
    $("try-state").textContent = "disconnected; reconnecting…";
    const lost = session.model;
    closeSocket();
    setTimeout(() => { if (!session.model && lost) openSocket(lost); }, 2000);
  };
}

function context() {
  const text = $("try-text").value;
  return text.length > MAX_CONTEXT_CHARS ? text.slice(-MAX_CONTEXT_CHARS) : text;
}

function requestPrediction() {
  $("learn").disabled = !session.socket || context().length === 0;
  if (!session.socket || session.socket.readyState !== WebSocket.OPEN) return;
  if (session.predicting) { session.dirty = true; return; }
  const text = context();
  if (text.length === 0) {
    $("predictions").replaceChildren(el("span", { class: "note" }, "Type something."));
    return;
  }
  session.predicting = true;
  session.dirty = false;
  send("predict", { text, predict: true, reset: true, top_k: TOP_K });
}

function tokenLabel(p) {
  if (p.token === 32) return "␣";
  if (p.token === 10) return "⏎";
  if (p.token === 9) return "⇥";
  return p.text !== undefined ? p.text : "0x" + p.token.toString(16).padStart(2, "0");
}

function bar(fraction) {
  const node = el("div", { class: "bar" });
  node.style.width = `${(100 * fraction).toFixed(1)}%`; // CSSOM, which the page's CSP allows
  return node;
}

function showPredictions(reply) {
  const top = reply.predictions[0] ? reply.predictions[0].prob : 1;
  $("predictions").replaceChildren(
    ...reply.predictions.map((p) => el("div", { class: "prediction" },
      el("span", { class: "token" }, tokenLabel(p)),
      el("div", {}, bar(p.prob / top)),
      el("span", { class: "prob" }, (100 * p.prob).toFixed(1) + "%"))),
    el("div", { class: "note" }, `${reply.consumed} bytes read, ${fmt(reply.mean_loss_bits, 2)} bits each`));
}

function onReply(reply) {
  const kind = session.waiting.shift();
  const problem = typeof reply.type === "string" && reply.type.startsWith("urn:kfrtrl:problem:");
  if (kind === "predict") session.predicting = false;
  if (problem) {
    if (reply.type.endsWith(":unknown-stream")) {
      createStream(); // the server forgot the idle stream: make it again
      session.dirty = true;
    } else {
      $("try-note").textContent = reply.detail;
    }
  } else if (kind === "predict") {
    showPredictions(reply);
  } else if (kind === "learn") {
    $("try-note").textContent =
      `Learned from ${reply.consumed} bytes (${fmt(reply.mean_loss_bits, 2)} bits each before learning).`;
    session.dirty = true;
  }
  if (session.dirty && !session.predicting) requestPrediction();
}

function learn() {
  const text = context();
  if (!session.socket || text.length === 0) return;
  send("learn", { text, reset: true, top_k: 0 });
}

window.addEventListener("DOMContentLoaded", () => {
  $("try-text").addEventListener("input", requestPrediction);
  $("try-model").addEventListener("change", () => openSocket($("try-model").value));
  $("learn").addEventListener("click", learn);
  window.addEventListener("pagehide", () => {
    if (session.model) fetch(streamPath(session.model), { method: "DELETE", keepalive: true, headers: AUTH });
  });
  poll();
  setInterval(poll, POLL_MS);
});
