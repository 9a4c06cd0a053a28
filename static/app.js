// The reference chat page: plain EventSource and the contract's rules for whole turns.
//
// A reply is a turn: numbered blocks {kind, meta, content, complete} and the app's events.
// `block_start` opens a block, `text_delta` appends to it, `block_end` merges meta and completes
// it, `turnblock_catchup` replaces it whole; other events (citations, usage, status) are kept.
// The page keeps the turn and the last event id in sessionStorage, so a reload asks only for
// what came after (`?last_event_id=`); EventSource's own reconnects send `Last-Event-ID`.
"use strict";

const $ = (id) => document.getElementById(id);
const page = { conversation: null, es: null, streamId: null, reconnects: 0, turns: {} };
const TERMINAL = ["done", "cancelled", "error"];

function newTurn() {
  return { blocks: {}, events: [], latest: {}, last: "", state: "running" };
}

// The contract's client rule, for one event (id, name, data).
function applyEvent(turn, id, name, d) {
  const blank = () => ({ kind: "text", meta: {}, content: "", complete: false });
  if (name === "block_start") {
    turn.blocks[d.block] = { kind: d.kind, meta: { ...d.meta }, content: "", complete: false };
  } else if (name === "text_delta") {
    (turn.blocks[d.block] ??= blank()).content += d.text;
  } else if (name === "block_end") {
    const block = (turn.blocks[d.block] ??= blank());
    Object.assign(block.meta, d.meta);
    block.complete = true;
  } else if (name === "turnblock_catchup") {
    turn.blocks[d.block] = { kind: d.kind, meta: { ...d.meta }, content: d.content, complete: d.complete };
  } else if (TERMINAL.includes(name)) {
    turn.state = name;
  } else if (name !== "start") {
    turn.events.push([id, name, d]);
    turn.latest[name] = [id, d];
  }
  turn.last = String(id);
}

async function api(method, url, body) {
  const response = await fetch(url, {
    method,
    headers: body ? { "Content-Type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `${response.status}`);
  return data;
}

function setConnection(state) {
  $("conn-state").textContent = state;
  document.body.dataset.conn = state;
}

function addMessage(role, text, state) {
  const el = document.createElement("div");
  el.className = `message ${role}`;
  if (state === "streaming") el.classList.add("streaming");
  el.dataset.state = state || "done";
  const steps = document.createElement("div");
  steps.className = "steps";
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text || "";
  const citations = document.createElement("ol");
  citations.className = "citations";
  el.append(steps, body, citations);
  if (role === "assistant" && state && state !== "done" && state !== "streaming") {
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = state;
    el.append(meta);
  }
  $("messages").append(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function pretty(json) {
  try { return JSON.stringify(JSON.parse(json), null, 1); } catch { return json; }
}

// One element per block that is not plain text: reasoning collapsed, tool calls and results.
function stepElement(index, block) {
  let el;
  if (block.kind === "reasoning") {
    el = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = block.complete ? "Reasoning" : "Reasoning…";
    const content = document.createElement("div");
    content.className = "content";
    content.textContent = block.content;
    el.append(summary, content);
  } else {
    el = document.createElement("div");
    const label = document.createElement("div");
    label.className = "label";
    const content = document.createElement(block.kind.startsWith("tool_") ? "pre" : "div");
    content.className = "content";
    if (block.kind === "tool_call") {
      label.textContent = `Tool call: ${block.meta.name ?? "?"}${block.complete ? "" : "…"}`;
      content.textContent = block.complete ? pretty(block.content) : block.content;
    } else if (block.kind === "tool_result") {
      label.textContent = "Tool result";
      content.textContent = pretty(block.content);
    } else {
      label.textContent = block.kind;
      content.textContent = block.content;
    }
    el.append(label, content);
  }
  el.className = `block ${block.kind.replaceAll("_", "-")}`;
  el.dataset.block = String(index);
  el.dataset.complete = String(block.complete);
  return el;
}

function render(el, turn) {
  const keys = Object.keys(turn.blocks).map(Number).sort((a, b) => a - b);
  const steps = el.querySelector(".steps");
  const open = new Set([...steps.querySelectorAll("details[open]")].map((d) => d.dataset.block));
  steps.replaceChildren(...keys.filter((k) => turn.blocks[k].kind !== "text").map((k) => {
    const step = stepElement(k, turn.blocks[k]);
    if (open.has(String(k))) step.open = true;
    return step;
  }));
  el.querySelector(".body").textContent = keys
    .filter((k) => turn.blocks[k].kind === "text").map((k) => turn.blocks[k].content).join("");
  const citations = turn.events.filter(([, name]) => name === "citation").map(([, , d]) => {
    const li = document.createElement("li");
    const a = document.createElement("a");
    a.href = d.url;
    a.textContent = d.title;
    a.rel = "noreferrer";
    li.append(a);
    return li;
  });
  el.querySelector(".citations").replaceChildren(...citations);
  const status = turn.latest.status;
  el.dataset.phase = status && turn.state === "running" ? status[1].phase : "";
}

function saveTurn(streamId, turn) {
  sessionStorage.setItem(`sse:${streamId}`, JSON.stringify(turn));
}

function follow(streamId, el) {
  if (page.es) page.es.close();
  const turn = { ...newTurn(), ...JSON.parse(sessionStorage.getItem(`sse:${streamId}`) || "{}") };
  page.turns[streamId] = turn;
  render(el, turn);
  page.streamId = streamId;
  page.reconnects = 0;
  $("reconnects").textContent = "0";
  $("last-id").textContent = turn.last || "–";
  $("cancel").disabled = false;
  document.body.dataset.resumedFrom = turn.last || "0";
  setConnection("connecting");

  const es = new EventSource(`/api/streams/${streamId}?last_event_id=${turn.last}`);
  page.es = es;
  const seen = (e) => {
    applyEvent(turn, Number(e.lastEventId), e.type, JSON.parse(e.data));
    render(el, turn);
    $("last-id").textContent = e.lastEventId;
    saveTurn(streamId, turn);
  };
  es.onopen = () => setConnection("open");
  for (const name of ["start", "block_start", "text_delta", "block_end", "turnblock_catchup",
    "citation", "usage", "status"]) {
    es.addEventListener(name, seen);
  }
  const finish = (state) => {
    es.close();
    if (page.es === es) page.es = null;
    el.classList.remove("streaming");
    el.dataset.state = state;
    $("cancel").disabled = true;
    setConnection(state);
  };
  for (const end of TERMINAL) {
    es.addEventListener(end, (e) => {
      if (end === "error" && e.data === undefined) {
        // EventSource's own error: the connection dropped (it reconnects) or was refused.
        if (es.readyState === EventSource.CONNECTING) {
          page.reconnects += 1;
          $("reconnects").textContent = String(page.reconnects);
          setConnection("reconnecting");
        } else if (es.readyState === EventSource.CLOSED && page.es === es) {
          finish(turn.state === "running" ? "error" : turn.state);
        }
        return;
      }
      seen(e);
      finish(end);
    });
  }
}

// A finished reply: its whole turn once, from the stream's stored record (NDJSON).
async function showFinished(streamId, el) {
  const response = await fetch(`/api/streams/${streamId}?format=ndjson`);
  if (response.status !== 200) return;
  const turn = newTurn();
  for (const line of (await response.text()).split("\n")) {
    if (!line.trim()) continue;
    const { id, event, data } = JSON.parse(line);
    applyEvent(turn, id, event, data);
  }
  page.turns[streamId] = turn;
  render(el, turn);
}

async function loadConversation(id) {
  const conversation = await api("GET", `/chat/conversations/${id}`);
  page.conversation = conversation.id;
  history.replaceState(null, "", `#c${conversation.id}`);
  for (const a of document.querySelectorAll("#conversations a")) {
    a.classList.toggle("active", a.dataset.id === String(conversation.id));
  }
  $("messages").replaceChildren();
  if (page.es) page.es.close();
  setConnection("idle");
  for (const m of conversation.messages) {
    const el = addMessage(m.role, m.content, m.state);
    if (m.role !== "assistant" || !m.stream_id) continue;
    if (m.state === "streaming") follow(m.stream_id, el);
    else showFinished(m.stream_id, el).catch(() => {});
  }
}

function addConversationLink(conversation) {
  const li = document.createElement("li");
  const a = document.createElement("a");
  a.href = `#c${conversation.id}`;
  a.dataset.id = conversation.id;
  a.textContent = conversation.title;
  li.append(a);
  $("conversations").prepend(li);
}

// `options` may set the stand-in's `chunk_size` and `interval_ms` (tests slow it down).
async function send(text, options = {}) {
  if (page.conversation === null) {
    const conversation = await api("POST", "/chat/conversations", { title: text.slice(0, 60) });
    addConversationLink(conversation);
    await loadConversation(conversation.id);
  }
  const result = await api("POST", `/chat/conversations/${page.conversation}/messages`, { text, ...options });
  addMessage("user", result.user.content);
  follow(result.reply.stream_id, addMessage("assistant", "", "streaming"));
}

function runJob() {
  $("run-job").disabled = true;
  $("job-progress").value = 0;
  $("job-message").textContent = "Starting…";
  api("POST", "/api/streams", { producer: "progress", input: { steps: 20, interval_ms: 60 } })
    .then(({ stream_id }) => {
      const es = new EventSource(`/api/streams/${stream_id}`);
      es.addEventListener("progress", (e) => {
        const d = JSON.parse(e.data);
        $("job-progress").value = d.percent;
        $("job-message").textContent = `${d.percent} % — ${d.message}`;
      });
      for (const end of ["done", "cancelled", "error"]) {
        es.addEventListener(end, (e) => {
          if (end === "error" && e.data === undefined) return;  // reconnecting
          es.close();
          const d = JSON.parse(e.data);
          $("job-message").textContent = end === "done" ? `Done: ${d.result}` : `${end}: ${d.message || ""}`;
          document.body.dataset.job = end;
          $("run-job").disabled = false;
        });
      }
    })
    .catch((err) => {
      $("job-message").textContent = `Could not start: ${err.message}`;
      $("run-job").disabled = false;
    });
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text) return;
  $("prompt").value = "";
  send(text).catch((err) => setConnection(`failed: ${err.message}`));
});
$("cancel").addEventListener("click", () => {
  if (page.streamId) api("POST", `/api/streams/${page.streamId}/cancel`, {}).catch(() => {});
});
$("new-chat").addEventListener("click", () => {
  page.conversation = null;
  history.replaceState(null, "", "#");
  $("messages").replaceChildren();
  setConnection("idle");
});
$("conversations").addEventListener("click", (event) => {
  const a = event.target.closest("a");
  if (!a) return;
  event.preventDefault();
  loadConversation(Number(a.dataset.id));
});
$("run-job").addEventListener("click", runJob);

const fromHash = /^#c(\d+)$/.exec(location.hash);
if (fromHash) loadConversation(Number(fromHash[1]));
