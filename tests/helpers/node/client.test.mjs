// The browser client's rules under Node's own test runner (node --test), no browser.
//
// SSE_RECORDING names a JSON file that tests/test_client_js.py recorded from a real server:
// {"answers": {"<k>": [[id, event, data], ...]}, "durable": [...], "latest": {...}} where
// answers[k] is what the server answers a reader at position k (catch-up included: the server
// ran with a tiny buffer, so most answers start with turnblock_catchup). A fake EventSource
// plays those answers, cutting connections and reloading the "page" at random; every schedule
// must end with the turn a reader from 0 gets, each durable event once, the newest latest.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { applyEvent, followStream, newTurn } from "../../../sse_blueprint/js/index.js";

test("the contract's rule: start, deltas, end, catch-up replaces, app events, terminal", () => {
  const turn = newTurn();
  const events = [
    [1, "start", {}],
    [2, "block_start", { block: 0, kind: "reasoning", meta: {} }],
    [3, "text_delta", { block: 0, text: "Hm" }],
    [4, "text_delta", { block: 1, text: "Hi" }], // a block first seen here is text
    [5, "block_end", { block: 0, meta: { seconds: 1 } }],
    [6, "citation", { url: "u" }],
    [7, "status", { phase: "a" }],
    [8, "status", { phase: "b" }],
    [9, "turnblock_catchup", { block: 1, kind: "text", meta: {}, content: "Hi!", complete: true }],
    [10, "done", { ok: 1 }],
  ];
  for (const [id, name, data] of events) assert.equal(applyEvent(turn, id, name, data), true);
  assert.deepEqual(turn.blocks, [
    { kind: "reasoning", meta: { seconds: 1 }, content: "Hm", complete: true },
    { kind: "text", meta: {}, content: "Hi!", complete: true },
  ]);
  assert.deepEqual(turn.events.map((e) => e.name), ["citation", "status", "status"]);
  assert.deepEqual(turn.latest, { citation: { url: "u" }, status: { phase: "b" } });
  assert.equal(turn.state, "done");
  assert.deepEqual(turn.end, { ok: 1 });
  assert.equal(applyEvent(turn, 10, "text_delta", { block: 1, text: "again" }), false);
  assert.equal(applyEvent(turn, 3, "text_delta", { block: 1, text: "old" }), false);
  assert.equal(turn.blocks[1].content, "Hi!");
});

// -- a fake browser: EventSource over recorded answers, sessionStorage, timers --------------

function random(seed) {
  let s = seed >>> 0;
  return () => ((s = (s * 1664525 + 1013904223) >>> 0) / 2 ** 32);
}

// sessionStorage, with its history: a reload may find any value once saved (a write the
// page did not get to make before it went), never a mix of two.
class MemoryStore {
  constructor() {
    this.items = new Map();
    this.history = [];
  }
  getItem(key) {
    return this.items.has(key) ? this.items.get(key) : null;
  }
  setItem(key, value) {
    this.items.set(key, value);
    this.history.push([key, value]);
  }
  rollBack(rng) {
    if (this.history.length === 0) return this.items.clear();
    const [key, value] = this.history[Math.floor(rng() * this.history.length)];
    this.items.set(key, value);
  }
}

// Plays answers[k] for the position in the URL (or its Last-Event-ID after a cut), cutting a
// connection after a random number of events; EventSource reconnects by itself (readyState 0).
function fakeEventSource(recording, rng, stats) {
  return class FakeEventSource {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.listeners = {};
      const position = Number(new URL(url, "http://x").searchParams.get("last_event_id") || 0);
      stats.opened.push(position);
      setTimeout(() => this._play(position), 0);
    }
    addEventListener(name, fn) {
      (this.listeners[name] ??= []).push(fn);
    }
    close() {
      this.readyState = 2;
    }
    _emit(name, event) {
      for (const fn of this.listeners[name] ?? []) fn(event);
    }
    _play(position) {
      if (this.readyState === 2) return;
      const answer = recording.answers[String(position)];
      if (answer === undefined || answer.length === 0) {
        this.readyState = 2; // a 204: EventSource gives up for good
        stats.noContent += 1;
        return this._emit("error", { type: "error" });
      }
      this.readyState = 1;
      this.onopen?.();
      const cutAfter = rng() < 0.8 ? 1 + Math.floor(rng() * 4) : Infinity;
      let last = position;
      for (const [n, [id, name, data]] of answer.entries()) {
        if (this.readyState === 2) return;
        if (n >= cutAfter) {
          stats.cuts += 1;
          this.readyState = 0; // reconnect with Last-Event-ID: the last id it dispatched
          this._emit("error", { type: "error" });
          return setTimeout(() => this._play(last), 0);
        }
        last = id;
        this._emit(name, { type: name, data: JSON.stringify(data), lastEventId: String(id) });
      }
    }
  };
}

const recordingFile = process.env.SSE_RECORDING;

test("random cuts and reloads over a recorded stream always end with the exact turn", {
  skip: recordingFile ? false : "run through tests/test_client_js.py (it records a stream)",
}, async () => {
  const recording = JSON.parse(readFileSync(recordingFile, "utf8"));
  const whole = newTurn();
  for (const [id, name, data] of recording.answers["0"]) applyEvent(whole, id, name, data);
  assert.equal(whole.state, "done");
  let totalCuts = 0;
  let totalReloads = 0;
  for (let seed = 1; seed <= 200; seed++) {
    const rng = random(seed);
    const stats = { opened: [], cuts: 0, noContent: 0 };
    const store = new MemoryStore();
    const EventSource = fakeEventSource(recording, rng, stats);
    let follower;
    let reloads = 0;
    const ended = new Promise((resolve) => {
      const open = () => {
        follower = followStream("/api/streams/s", {
          store, EventSource, events: Object.keys(recording.latest).concat(recording.durableNames),
          onState: (state, f) => {
            if (["done", "error", "cancelled"].includes(state)) resolve(f);
          },
        });
        if (["done", "error", "cancelled"].includes(follower.state)) resolve(follower);
      };
      open();
      // Reload the "page" a few times at random moments: a new follower from the store.
      const reload = () => {
        if (reloads >= 3 || ["done", "error", "cancelled"].includes(follower.state)) return;
        reloads += 1;
        follower.close();
        if (rng() < 0.5) store.rollBack(rng);
        open();
        setTimeout(reload, Math.floor(rng() * 3));
      };
      setTimeout(reload, Math.floor(rng() * 3));
    });
    const done = await ended;
    totalCuts += stats.cuts;
    totalReloads += reloads;
    assert.deepEqual(done.turn.blocks, whole.blocks, `seed ${seed}`);
    const durable = done.turn.events.filter((e) => recording.durableNames.includes(e.name));
    assert.deepEqual(durable.map((e) => [e.name, e.data]), recording.durable, `seed ${seed}`);
    assert.deepEqual(done.turn.latest, whole.latest, `seed ${seed}`);
    assert.equal(done.turn.state, "done");
    // Never an id twice: every connection asked from a position it held.
    const ids = done.turn.events.map((e) => e.id);
    assert.deepEqual(ids, [...new Set(ids)].sort((a, b) => a - b));
    done.close();
  }
  console.log(`200 schedules: ${totalCuts} cuts, ${totalReloads} reloads`);
  assert.ok(totalCuts > 200, `only ${totalCuts} cuts`);
  assert.ok(totalReloads > 50, `only ${totalReloads} reloads`);
});

test("a finished turn in the store asks nothing; a 204 ends a follower whose store lags", () => {
  const store = new MemoryStore();
  const turn = newTurn();
  applyEvent(turn, 1, "text_delta", { block: 0, text: "x" });
  applyEvent(turn, 2, "done", {});
  store.setItem("sse:/api/streams/s", JSON.stringify(turn));
  const opened = [];
  class NeverOpened {
    constructor(url) {
      opened.push(url);
    }
  }
  const follower = followStream("/api/streams/s", { store, EventSource: NeverOpened });
  assert.equal(follower.state, "done");
  assert.deepEqual(opened, []);
  assert.deepEqual(follower.turn.blocks[0].content, "x");
});
