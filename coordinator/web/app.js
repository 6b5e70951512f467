// edgeweave's web page: a chat streamed from /v1/chat/completions and a live view of /v1/status.
// Plain browser JavaScript, no framework and no build step. Model output is only ever set as
// textContent, never as HTML.
"use strict";

const KEY_STORAGE = "edgeweave.apiKey";
const STATUS_EVERY_MS = 2000;
const DASH = "–";
const AUTH_HINT = "This server requires an API key: enter it in the API key field at the top, then send again.";

const $ = (id) => document.getElementById(id);

const state = {
  model: null,          // the id from GET /v1/models
  history: [],          // the conversation sent with each request: {role, content}
  controller: null,     // AbortController of the answer being streamed, if any
  statusTimer: null,
};

// ---------------------------------------------------------------- API access

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

function apiKey() {
  return (localStorage.getItem(KEY_STORAGE) || "").trim();
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// The message of an error reply (OpenAI's shape {"error": {"message": ...}}), or a fallback.
async function errorOf(response) {
  if (response.status === 401) {
    showAuth(true);
    return new ApiError(AUTH_HINT, 401);
  }
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
    else if (body && body.detail) message = String(body.detail);
  } catch (_) { /* not JSON: keep the status line */ }
  return new ApiError(message, response.status);
}

async function getJson(path) {
  const response = await fetch(path, { headers: headers(), cache: "no-store" });
  if (!response.ok) throw await errorOf(response);
  showAuth(false);
  return response.json();
}

function showAuth(needed) {
  $("auth-message").hidden = !needed;
  document.body.classList.toggle("needs-key", needed);
}

async function loadModel() {
  try {
    const list = await getJson("/v1/models");
    state.model = (list.data && list.data[0] && list.data[0].id) || null;
  } catch (err) {
    state.model = null;
  }
  $("model-name").textContent = state.model || DASH;
  return state.model;
}

// ---------------------------------------------------------------- chat

function addMessage(role, text, stateName) {
  const item = document.createElement("div");
  item.className = `message ${role}`;
  if (stateName) item.dataset.state = stateName;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  item.append(label, body);
  $("messages").append(item);
  scrollDown();
  return item;
}

function scrollDown() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function numberField(id, fallback) {
  const value = Number($(id).value);
  return Number.isFinite(value) && $(id).value !== "" ? value : fallback;
}

// Read an SSE body: calls onDelta(text) per content delta; resolves at `data: [DONE]` (or the end).
async function readStream(response, onDelta) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    const lines = buffer.split("\n");
    buffer = done ? "" : lines.pop();
    for (const raw of lines) {
      const line = raw.replace(/\r$/, "");
      if (!line.startsWith("data:")) continue;  // comments, blank separators, other fields
      const data = line.slice(5).trim();
      if (data === "[DONE]") {
        reader.cancel().catch(() => {});
        return;
      }
      let event;
      try {
        event = JSON.parse(data);
      } catch (_) {
        continue;
      }
      if (event.error) throw new ApiError(event.error.message || "generation failed", 500);
      const choice = (event.choices || []).find((c) => (c.index || 0) === 0);  // the first choice only
      const text = choice && choice.delta && choice.delta.content;
      if (text) onDelta(text);
    }
    if (done) return;
  }
}

async function send() {
  const prompt = $("prompt").value.trim();
  if (!prompt || state.controller) return;
  $("prompt").value = "";
  const userItem = addMessage("user", prompt);
  state.history.push({ role: "user", content: prompt });
  const answer = addMessage("assistant", "", "waiting");
  const answerText = answer.querySelector(".text");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  let text = "";
  try {
    const model = state.model || (await loadModel());
    if (!model) throw new ApiError($("auth-message").hidden ? "No model: is the server up?" : AUTH_HINT, 0);
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({
        model,
        messages: state.history,
        stream: true,
        max_tokens: Math.max(1, Math.round(numberField("max-tokens", 128))),
        temperature: numberField("temperature", 0),
      }),
      signal: controller.signal,
    });
    if (!response.ok) throw await errorOf(response);
    showAuth(false);
    answer.dataset.state = "streaming";
    await readStream(response, (delta) => {
      text += delta;
      answerText.textContent = text;
      scrollDown();
    });
    answer.dataset.state = "done";
  } catch (err) {
    if (controller.signal.aborted) {
      answer.dataset.state = "stopped";
      const note = document.createElement("div");
      note.className = "note";
      note.textContent = "stopped";
      answer.append(note);
    } else {
      const message = describe(err, answer.dataset.state === "streaming");
      answer.dataset.state = "error";
      answer.classList.add("error");
      answerText.textContent = text ? `${text}\n\n${message}` : message;
    }
  } finally {
    if (text) {
      state.history.push({ role: "assistant", content: text });
    } else {
      // nothing came back: this question is not part of the conversation the model saw
      state.history.pop();
      userItem.classList.add("unanswered");
    }
    state.controller = null;
    setBusy(false);
    scrollDown();
  }
}

// A failure as one sentence: the API's own message, or what a failed fetch/read means here.
function describe(err, started) {
  if (err instanceof ApiError) return err.message;
  if (err instanceof TypeError) {  // fetch's "Failed to fetch" / a body that broke off
    return started ? `The answer broke off: the connection to the server was lost (${err.message}).`
      : `Could not reach the server (${err.message}).`;
  }
  return String(err && err.message ? err.message : err);
}

function stop() {
  if (state.controller) state.controller.abort();
}

function clearChat() {
  stop();
  state.history = [];
  $("messages").replaceChildren();
}

// ---------------------------------------------------------------- cluster view

function fmt(value, digits = 1, unit = "") {
  if (value === null || value === undefined || value === "") return DASH;
  if (typeof value === "number") {
    if (!Number.isFinite(value)) return DASH;
    const shown = Number.isInteger(value) ? String(value) : value.toFixed(digits);
    return unit ? `${shown} ${unit}` : shown;
  }
  return String(value);
}

function fmtMB(bytes) {
  return typeof bytes === "number" ? `${(bytes / 1e6).toFixed(1)} MB` : DASH;
}

function fmtDuration(seconds) {
  if (typeof seconds !== "number") return DASH;
  const s = Math.floor(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function setText(id, text) {
  $(id).textContent = text;
}

function row(cells, title) {
  const tr = document.createElement("tr");
  if (title) tr.title = title;
  for (const cell of cells) {
    const td = document.createElement("td");
    td.textContent = cell;
    tr.append(td);
  }
  return tr;
}

function placeholderRow(text) {
  const tr = document.createElement("tr");
  const td = document.createElement("td");
  td.colSpan = 5;
  td.className = "muted";
  td.textContent = text;
  tr.append(td);
  return tr;
}

function heads(node) {
  if (node.kv_heads === undefined && node.q_heads === undefined) return DASH;
  return `${fmt(node.kv_heads)} / ${fmt(node.q_heads)}`;
}

function renderNodes(nodes) {
  const body = $("nodes");
  if (!Array.isArray(nodes) || nodes.length === 0) {
    body.replaceChildren(placeholderRow("no nodes"));
    return;
  }
  body.replaceChildren(...nodes.map((node) => {
    const extra = [];
    if (node.job_id) extra.push(`job ${node.job_id}`);
    if (typeof node.weight === "number") extra.push(`weight ${fmt(node.weight, 2)}`);
    return row([fmt(node.name), fmt(node.address), heads(node), fmt(node.columns), fmtMB(node.weight_bytes)],
      extra.join(", "));
  }));
}

function shortId(id) {
  const text = fmt(id);
  return text.length > 8 ? `${text.slice(0, 8)}…` : text;
}

function renderRecent(recent) {
  const body = $("recent");
  if (!Array.isArray(recent) || recent.length === 0) {
    body.replaceChildren(placeholderRow("none yet"));
    return;
  }
  body.replaceChildren(...recent.slice().reverse().map((job) => row([
    shortId(job.id),
    `${fmt(job.prompt_tokens)} / ${fmt(job.completion_tokens)}`,
    fmt(job.ttft_s, 2, "s"),
    fmt(job.tokens_per_s),
    fmt(job.finish_reason),
  ], [job.id ? `request ${job.id}` : "", job.client ? `client ${job.client}` : ""].filter(Boolean).join(", "))));
}

function renderStatus(status) {
  const engine = status.engine || {};
  const sched = status.scheduler || {};
  if (status.model) {
    setText("model-name", status.model);
    if (!state.model) state.model = status.model;
  }
  setText("engine-desc", fmt(engine.engine));
  setText("layers", fmt(engine.layers));
  setText("tokens-per-s", fmt(sched.tokens_per_s));
  setText("batch-size", fmt(sched.batch_size));
  setText("active", sched.max_active !== undefined ? `${fmt(sched.active)} of ${fmt(sched.max_active)}` : fmt(sched.active));
  setText("waiting", sched.max_queue !== undefined ? `${fmt(sched.waiting)} of ${fmt(sched.max_queue)}` : fmt(sched.waiting));
  setText("median-tokens-per-s", fmt(sched.median_tokens_per_s));
  setText("median-ttft", fmt(sched.median_ttft_s, 2, "s"));
  const recoveries = Array.isArray(engine.recoveries) ? engine.recoveries.length : undefined;
  const rejoins = Array.isArray(engine.rejoins) ? engine.rejoins.length : undefined;
  setText("recoveries", rejoins ? `${fmt(recoveries)} (${rejoins} rejoined)` : fmt(recoveries));
  setText("uptime", fmtDuration(status.uptime_s));
  setText("version", status.version ? `edgeweave ${status.version}` : "");
  renderNodes(engine.nodes);
  renderRecent(sched.recent);
}

function setStatusState(text, kind) {
  const badge = $("status-state");
  badge.textContent = text;
  badge.className = `state ${kind}`;
}

async function pollStatus() {
  clearTimeout(state.statusTimer);
  try {
    renderStatus(await getJson("/v1/status"));
    setStatusState("live", "ok");
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) setStatusState("needs API key", "bad");
    else setStatusState(err instanceof ApiError ? err.message : "unreachable", "bad");
  }
  state.statusTimer = setTimeout(pollStatus, STATUS_EVERY_MS);
}

// ---------------------------------------------------------------- wiring

function keyChanged() {
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
  loadModel();
  pollStatus();
}

function init() {
  $("api-key").value = apiKey();
  $("api-key").addEventListener("change", keyChanged);
  $("api-key").addEventListener("input", () => {
    // keep what is typed even before the field loses focus
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  });
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", clearChat);
  loadModel();
  pollStatus();
}

document.addEventListener("DOMContentLoaded", init);
