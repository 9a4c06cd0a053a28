// The reference chat page: plain EventSource and the contract's delta/catch-up rule.
//
// A reply is a set of blocks: `text_delta` appends to its block, `turnblock_catchup` replaces it.
// The page keeps the blocks and the last event id in sessionStorage, so a reload asks only for
// what came after (`?last_event_id=`); EventSource's own reconnects send `Last-Event-ID`.
"use strict";

const $ = (id) => document.getElementById(id);
const page = { conversation: null, es: null, streamId: null, reconnects: 0 };

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
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text || "";
  el.append(body);
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

function render(el, blocks) {
  const keys = [...blocks.keys()].sort((a, b) => a - b);
  el.querySelector(".body").textContent = keys.map((k) => blocks.get(k)).join("");
}

function follow(streamId, el) {
  if (page.es) page.es.close();
  const key = `sse:${streamId}`;
  const saved = JSON.parse(sessionStorage.getItem(key) || '{"last": "", "blocks": []}');
  const blocks = new Map(saved.blocks);
  render(el, blocks);
  page.streamId = streamId;
  page.reconnects = 0;
  $("reconnects").textContent = "0";
  $("last-id").textContent = saved.last || "–";
  $("cancel").disabled = false;
  document.body.dataset.resumedFrom = saved.last || "0";
  setConnection("connecting");

  const es = new EventSource(`/api/streams/${streamId}?last_event_id=${saved.last}`);
  page.es = es;
  const seen = (e) => {
    $("last-id").textContent = e.lastEventId;
    sessionStorage.setItem(key, JSON.stringify({ last: e.lastEventId, blocks: [...blocks] }));
  };
  const apply = (e, update) => {
    const d = JSON.parse(e.data);
    blocks.set(d.block, update(d, blocks.get(d.block) ?? ""));
    render(el, blocks);
    seen(e);
  };
  es.onopen = () => setConnection("open");
  es.addEventListener("start", seen);
  es.addEventListener("text_delta", (e) => apply(e, (d, old) => old + d.text));
  es.addEventListener("turnblock_catchup", (e) => apply(e, (d) => d.content));
  const finish = (state) => {
    es.close();
    if (page.es === es) page.es = null;
    el.classList.remove("streaming");
    el.dataset.state = state;
    $("cancel").disabled = true;
    setConnection(state);
  };
  for (const end of ["done", "cancelled", "error"]) {
    es.addEventListener(end, (e) => {
      if (end === "error" && e.data === undefined) {
        // EventSource's own error: the connection dropped (it reconnects) or was refused.
        if (es.readyState === EventSource.CONNECTING) {
          page.reconnects += 1;
          $("reconnects").textContent = String(page.reconnects);
          setConnection("reconnecting");
        } else if (es.readyState === EventSource.CLOSED && page.es === es) {
          finish("error");
        }
        return;
      }
      seen(e);
      finish(end);
    });
  }
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
    if (m.role === "assistant" && m.state === "streaming" && m.stream_id) follow(m.stream_id, el);
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

async function send(text) {
  if (page.conversation === null) {
    const conversation = await api("POST", "/chat/conversations", { title: text.slice(0, 60) });
    addConversationLink(conversation);
    await loadConversation(conversation.id);
  }
  const result = await api("POST", `/chat/conversations/${page.conversation}/messages`, { text });
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
