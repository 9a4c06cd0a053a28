// sse-blueprint's browser client: follow a stream and get its whole turn, exactly, across
// reconnects and page reloads. One dependency-free ES module; the server serves it at
// /api/client.js. The rules it applies are the contract's (docs/protocol.md).

const TERMINAL = ["done", "error", "cancelled"];
const TURN_EVENTS = ["start", "block_start", "text_delta", "block_end", "turnblock_catchup"];
/** App events an EventSource listens for unless `events` says otherwise (NDJSON gets all). */
export const APP_EVENTS = ["citation", "usage", "progress", "status", "tool_status", "metadata"];

/** A turn before any event: no blocks, no events, running. */
export function newTurn() {
  return { blocks: [], events: [], latest: {}, lastEventId: 0, state: "running", end: null };
}

/** The contract's client rule for one event. False (and nothing changes) for an id it has. */
export function applyEvent(turn, id, name, data) {
  if (!(id > turn.lastEventId)) return false;
  turn.lastEventId = id;
  const blocks = turn.blocks;
  const at = (i) => (blocks[i] ??= { kind: "text", meta: {}, content: "", complete: false });
  if (name === "block_start") {
    blocks[data.block] = { kind: data.kind, meta: { ...data.meta }, content: "", complete: false };
  } else if (name === "text_delta") {
    at(data.block).content += data.text;
  } else if (name === "block_end") {
    Object.assign(at(data.block).meta, data.meta);
    blocks[data.block].complete = true;
  } else if (name === "turnblock_catchup") {
    const { kind, meta, content, complete } = data;
    blocks[data.block] = { kind, meta: { ...meta }, content, complete };
  } else if (TERMINAL.includes(name)) {
    turn.state = name;
    turn.end = data;
  } else if (name !== "start") {
    turn.events.push({ id, name, data });
    turn.latest[name] = data;
  }
  return true;
}

const query = (url, params) =>
  url + (url.includes("?") ? "&" : "?") + new URLSearchParams(params).toString();
const base = (url) => url.split("?")[0];
const REFUSED = { 401: "unauthorized", 403: "forbidden", 404: "not-found" };

/**
 * Follows one stream (its URL, e.g. `/api/streams/ID`). An EventTarget: `change` after every
 * event it applies, `state` when `state` changes. States: connecting, open, reconnecting,
 * done, error, cancelled (the stream's end), not-found, unauthorized, forbidden, unreachable.
 */
export class StreamFollower extends EventTarget {
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = options;
    this.reconnects = 0;
    this.state = "connecting";
    this._failures = 0;
    this._store = options.store === undefined ? globalThis.sessionStorage : options.store;
    this._key = options.key ?? `sse:${base(url)}`;
    let saved = null;
    try {
      saved = JSON.parse(this._store?.getItem(this._key) ?? "null");
    } catch {}
    this.turn = saved && saved.lastEventId >= 0 ? { ...newTurn(), ...saved } : newTurn();
    globalThis.addEventListener?.("pagehide", (this._flush = () => this._save(true)));
    if (TERMINAL.includes(this.turn.state)) this._setState(this.turn.state); // nothing to ask
    else this._connect();
  }

  get lastEventId() {
    return this.turn.lastEventId;
  }

  /** Ask the server to cancel the stream (every reader then gets `cancelled`). */
  cancel() {
    const headers = { "Content-Type": "application/json", ...this.options.headers };
    return fetch(base(this.url) + "/cancel", { method: "POST", headers, body: "{}" });
  }

  /** Stop following (the turn so far stays saved; a new follower resumes from it). */
  close() {
    this.closed = true;
    this._source?.close();
    this._abort?.abort();
    clearTimeout(this._timer);
    this._save(true);
    globalThis.removeEventListener?.("pagehide", this._flush);
  }

  _connect() {
    if (this.closed) return;
    if (this.options.transport === "fetch") this._fetch();
    else this._eventSource();
  }

  _eventSource() {
    const ES = this.options.EventSource ?? globalThis.EventSource;
    const es = (this._source = new ES(query(this.url, { last_event_id: this.lastEventId || "" })));
    es.onopen = () => this._opened();
    const on = (e) => {
      if (e.data !== undefined) return this._receive(Number(e.lastEventId), e.type, e.data);
      // EventSource's own error: it reconnects by itself (CONNECTING) or has given up.
      if (es.readyState === 2) return this._refused();
      this._dropped(() => {});
    };
    for (const name of [...TURN_EVENTS, ...TERMINAL, ...(this.options.events ?? APP_EVENTS)]) {
      es.addEventListener(name, on);
    }
  }

  async _fetch() {
    const ctl = (this._abort = new AbortController());
    let response;
    try {
      const url = query(this.url, { format: "ndjson", last_event_id: this.lastEventId || "" });
      response = await fetch(url, { headers: this.options.headers, signal: ctl.signal });
    } catch {
      return this.closed || this._dropped(() => this._later());
    }
    if (response.status === 204) return this._ended();
    if (!response.ok) return this._final(response.status, null);
    this._opened();
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let rest = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const lines = (rest + value).split("\n");
        rest = lines.pop();
        for (const line of lines) {
          if (!line.trim()) continue;
          const { id, event, data } = JSON.parse(line);
          this._receive(id, event, data);
        }
      }
    } catch {}
    if (!this.closed && !TERMINAL.includes(this.turn.state)) this._dropped(() => this._later());
  }

  _receive(id, name, data) {
    if (!applyEvent(this.turn, id, name, typeof data === "string" ? JSON.parse(data) : data)) {
      return;
    }
    this._save(TERMINAL.includes(name));
    this.dispatchEvent(new Event("change"));
    this.options.onChange?.(this.turn, this);
    if (TERMINAL.includes(name)) this._ended();
  }

  _opened() {
    this._failures = 0;
    this._setState("open");
  }

  _dropped(retry) {
    this.reconnects += 1;
    if (++this._failures > (this.options.maxRetries ?? 8)) return this._refused();
    this._setState("reconnecting");
    retry();
  }

  _later() {
    const delay = Math.min(30000, (this.options.retryMs ?? 1000) * 2 ** (this._failures - 1));
    this._timer = setTimeout(() => this._connect(), delay);
  }

  // Refused or gone: the status endpoint says which (EventSource hides the HTTP status).
  async _refused() {
    this._source?.close();
    let status = 0;
    let info = null;
    try {
      const response = await fetch(base(this.url) + "/status", { headers: this.options.headers });
      status = response.status;
      info = await response.json();
    } catch {}
    this._final(status, info);
  }

  _final(status, info) {
    if (this.closed) return;
    const turn = this.turn;
    if (info && info.state !== "running" && info.last_event_id <= turn.lastEventId) {
      turn.state = TERMINAL.includes(turn.state) ? turn.state : info.state; // a 204: all is here
    }
    const again = status === 200 || status === 429 || status >= 500;
    if (!TERMINAL.includes(turn.state) && again && this._failures < (this.options.maxRetries ?? 8)) {
      return this._dropped(() => this._later()); // running, this answer refused: later
    }
    this._source?.close();
    this._setState(TERMINAL.includes(turn.state) ? turn.state : REFUSED[status] ?? "unreachable");
  }

  _ended() {
    this._source?.close();
    this._save(true);
    this._setState(TERMINAL.includes(this.turn.state) ? this.turn.state : "done");
  }

  _setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.dispatchEvent(new Event("state"));
    this.options.onState?.(state, this);
  }

  // Saved at most every 200 ms (and at the end, on close and when the page goes): the saved
  // turn and its last id always match, so a reload resumes exactly from whichever was saved.
  _save(now) {
    if (!this._store || (this._saving && !now)) return;
    clearTimeout(this._saving);
    const write = () => {
      this._saving = null;
      try {
        this._store.setItem(this._key, JSON.stringify(this.turn));
      } catch {}
    };
    if (now) write();
    else this._saving = setTimeout(write, 200);
  }
}

/** `new StreamFollower(url, options)`: follow a stream and get its turn. */
export const followStream = (url, options) => new StreamFollower(url, options);
