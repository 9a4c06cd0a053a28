// The reference chat page: rendering only. Following a stream (the contract's rules for whole
// turns, reconnects, resuming after a reload from sessionStorage, the 204 at the end, refusals)
// is the library's browser client, served by the blueprint at /api/client.js.
import { applyEvent, followStream, newTurn } from "/api/client.js";

const $ = (id) => document.getElementById(id);
const page = { conversation: null, follower: null, streamId: null, turns: {} };
window.page = page; // for the browser tests
const TERMINAL = ["done", "cancelled", "error"];
const blocksOf = (turn) => turn.blocks.map((b, k) => [k, b]).filter(([, b]) => b);

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
  const blocks = blocksOf(turn);
  const steps = el.querySelector(".steps");
  const open = new Set([...steps.querySelectorAll("details[open]")].map((d) => d.dataset.block));
  steps.replaceChildren(...blocks.filter(([, b]) => b.kind !== "text").map(([k, b]) => {
    const step = stepElement(k, b);
    if (open.has(String(k))) step.open = true;
    return step;
  }));
  el.querySelector(".body").textContent = blocks
    .filter(([, b]) => b.kind === "text").map(([, b]) => b.content).join("");
  const citations = turn.events.filter((e) => e.name === "citation").map(({ data: d }) => {
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
  el.dataset.phase = status && turn.state === "running" ? status.phase : "";
}

function follow(streamId, el) {
  page.follower?.close();
  page.streamId = streamId;
  $("cancel").disabled = false;
  const follower = (page.follower = followStream(`/api/streams/${streamId}`, {
    events: ["citation", "usage", "status"],
    onChange: (turn) => {
      render(el, turn);
      $("last-id").textContent = String(turn.lastEventId);
    },
    onState: (state, follower) => {
      setConnection(state);
      $("reconnects").textContent = String(follower.reconnects);
      if (state === "open" || state === "connecting" || state === "reconnecting") return;
      el.classList.remove("streaming");
      el.dataset.state = TERMINAL.includes(state) ? state : "error";
      $("cancel").disabled = true;
    },
  }));
  page.turns[streamId] = follower.turn;
  render(el, follower.turn);
  $("last-id").textContent = follower.lastEventId ? String(follower.lastEventId) : "–";
  $("reconnects").textContent = "0";
  document.body.dataset.resumedFrom = String(follower.lastEventId);
  setConnection(follower.state);
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
  page.follower?.close();
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
window.send = send; // for the browser tests

function runJob() {
  $("run-job").disabled = true;
  $("job-progress").value = 0;
  $("job-message").textContent = "Starting…";
  api("POST", "/api/streams", { producer: "progress", input: { steps: 20, interval_ms: 60 } })
    .then(({ stream_url }) => {
      followStream(stream_url, {
        store: null, // a job's progress need not survive a reload
        events: ["progress"],
        onChange: ({ latest: { progress: d } }) => {
          if (!d) return;
          $("job-progress").value = d.percent;
          $("job-message").textContent = `${d.percent} % — ${d.message}`;
        },
        onState: (state, { turn }) => {
          if (["open", "connecting", "reconnecting"].includes(state)) return;
          const d = turn.end ?? {};
          $("job-message").textContent = state === "done" ? `Done: ${d.result}` : `${state}: ${d.message || ""}`;
          document.body.dataset.job = state;
          $("run-job").disabled = false;
        },
      });
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
  page.follower?.cancel().catch(() => {});
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
