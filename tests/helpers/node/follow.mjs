// Follow a stream with the npm `eventsource` package (a common Node SSE client) and print what
// it got as one JSON line: {"events": [[id, type, data], ...], "closed": bool, "status": N}.
// Usage: node follow.mjs URL   (the stream's URL, with ?last_event_id=N to resume)
import { EventSource } from "eventsource";

const url = process.argv[2];
const events = [];
const names = ["start", "text_delta", "turnblock_catchup", "done", "error", "cancelled", "message"];
const es = new EventSource(url);
const finish = (extra) => {
  es.close();
  process.stdout.write(JSON.stringify({ events, ...extra }) + "\n");
  process.exit(0);
};
for (const name of names) {
  es.addEventListener(name, (e) => {
    if (name === "error" && e.data === undefined) return; // the client's own error event
    events.push([Number(e.lastEventId), name, JSON.parse(e.data)]);
    if (["done", "error", "cancelled"].includes(name)) finish({ closed: false });
  });
}
es.onerror = (e) => {
  // A 204 closes the EventSource for good (no reconnect): readyState CLOSED.
  if (es.readyState === EventSource.CLOSED) finish({ closed: true, status: e.code ?? null });
};
setTimeout(() => finish({ timeout: true }), 20000);
