"""Redis backend: one stream, many workers and instances (``SSE_REDIS_URL``).

Redis is the distributed engine; there is no broker of our own. Per stream (keys hash-tagged
``{id}`` so that one stream's keys share a Redis Cluster slot):

* ``sse:{id}:events``: a Redis Stream of the events, entry id ``<event id>-0``;
* ``sse:{id}:meta``: a hash: producer, state, generation, last id, times;
* ``sse:{id}:lease``: the owner's lease (its generation, with a TTL);
* channel ``sse:{id}``: every event, published in the same Lua call that appends it (``"o": 1``
  marks the owner's own appends), for the other workers' mirrors;
* channel ``sse:{id}:ends``: an end written by another worker (a cancel, a lost lease), for the
  owner, which does not follow the stream's own channel.

**One producer per stream.** The worker that starts a stream writes a random generation into
``meta``; every append is a Lua script that checks the generation and that the stream is still
running, then ``XADD``\\ s and ``PUBLISH``\\ es atomically. A stale or fenced-out writer is refused.
The owner renews its lease; if the owner dies, the lease expires and any worker that follows the
stream appends ``error: producer lost`` (atomically, once) so readers everywhere end.

**One reader per stream per worker.** A worker has one Pub/Sub connection. A stream with
readers on a worker other than its owner gets one *mirror* there: a :class:`Stream` without a
producer, filled from ``XRANGE`` once its channel subscription is confirmed, then fed by the
published events (a gap in ids is filled with ``XRANGE``). All of that worker's readers follow the
mirror with the engine's usual cursors: the commands per event do not grow with the clients.

**Clients per address, everywhere.** ``sse:clients:{<address>}`` is a sorted set of the open
responses of one client address on every worker and instance (member: a response's token,
score: when it expires, by Redis's clock). A Lua script drops the expired members, counts and
adds in one step, so ``SSE_MAX_CLIENTS_PER_ADDRESS`` holds across the deployment. Each worker
renews its members every ``lease`` seconds and removes them when the responses end; a worker that
dies without doing so frees its places within three leases. One greenlet per worker sends all of
that, batched in pipelines on one connection: however many clients connect at once, counting
them takes one connection per worker.

**Cancel from anywhere.** A Lua script appends ``cancelled`` itself (if the stream still runs)
and publishes it; the owner adopts that terminal event and stops its producer. The state in
``meta`` is the durable flag, re-read when the owner renews its lease, so a lost message only
delays the stop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gevent
import gevent.event
import redis
from redis.client import Pipeline

from . import _wire
from ._batch import Batcher
from ._records import BlockStore
from .engine import Event, Stream, StreamClosed, StreamState, lost, lost_data

__all__ = ["RedisBackend"]

log = logging.getLogger("sse_blueprint")

#: The end of a stream whose state Redis lost while it ran (the owner's, written to the store).
LOST_IN_REDIS = "stream state lost in Redis"

# KEYS: meta, events, lease.  ARGV: gen, id, event, data, terminal state or "", ttl, now, channel,
# the message to publish (wire.relay_message)
# Returns 1, or 2 for an append that is already there: a retry whose first attempt ran but whose
# reply was lost (Redis stopped, the connection broke). Only the generation's holder appends while
# the stream runs, so an id it already has can only be that.
_APPEND = """
local gen = redis.call('HGET', KEYS[1], 'gen')
if not gen then return redis.error_reply('LOST') end
if gen ~= ARGV[1] then return redis.error_reply('FENCED') end
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return redis.error_reply('CLOSED') end
if tonumber(ARGV[2]) <= tonumber(redis.call('HGET', KEYS[1], 'last_id') or '0') then return 2 end
redis.call('XADD', KEYS[2], ARGV[2] .. '-0', 'e', ARGV[3], 'd', ARGV[4])
redis.call('HSET', KEYS[1], 'last_id', ARGV[2])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'state', ARGV[5], 'finished_at', ARGV[7])
  redis.call('DEL', KEYS[3])
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
redis.call('PUBLISH', ARGV[8], ARGV[9])
return 1
"""

# End a running stream from any worker. KEYS: meta, events, lease.
# ARGV: state ("cancelled" or "error"), data json, ttl, now, channel, only_if_lease_gone ("1"/"0"),
# the message to publish less its id (wire.relay_message_head: the script adds the id and "}"),
# the ends channel (where the owner hears of it)
_END = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return nil end
if state ~= 'running' then return state end
if ARGV[6] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then return 'running' end
local id = tonumber(redis.call('HGET', KEYS[1], 'last_id')) + 1
redis.call('XADD', KEYS[2], id .. '-0', 'e', ARGV[1], 'd', ARGV[2])
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'last_id', id, 'finished_at', ARGV[4])
redis.call('DEL', KEYS[3])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[5], ARGV[7] .. id .. '}')
redis.call('PUBLISH', ARGV[8], ARGV[7] .. id .. '}')
return 'ok'
"""

# KEYS: meta. ARGV: gen, metadata json. The owner's writes only, while it runs.
_SET_METADATA = """
local gen = redis.call('HGET', KEYS[1], 'gen')
if not gen then return redis.error_reply('LOST') end
if gen ~= ARGV[1] then return redis.error_reply('FENCED') end
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return redis.error_reply('CLOSED') end
redis.call('HSET', KEYS[1], 'metadata', ARGV[2])
return 1
"""

# KEYS: meta, lease. ARGV: gen, lease ms. Returns the state (the owner stops if not running).
_RENEW = """
local gen = redis.call('HGET', KEYS[1], 'gen')
if not gen then return 'lost' end
if gen ~= ARGV[1] then return 'fenced' end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'running' then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2]) end
return state
"""


# KEYS: an address's set. ARGV: token, limit, ttl s. 1: added; 0: the address is at its limit.
_CLAIM_CLIENT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])))
return 1
"""

# KEYS: an address's set. ARGV: ttl s, then this worker's tokens in it (renewed if still there).
_RENEW_CLIENTS = """
local t = redis.call('TIME')
local expires = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', expires, ARGV[i]) end
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])))
return 1
"""


# Error replies for a command Redis did not run because it cannot now (not a refusal).
_BUSY_REPLIES = ("BUSY ", "TRYAGAIN ", "MASTERDOWN ")


def is_transient(exc: BaseException) -> bool:
    """Whether Redis did not run the call and will answer it later: the connection broke or
    timed out, or Redis is busy (another client's long script, loading its data set, a
    failover) and refused it untried."""
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):  # LOADING is one of them
        return True
    if not isinstance(exc, redis.ResponseError):
        return False
    # In a pipeline redis-py prefixes the reply: "Command # 1 (HSET ...) of pipeline caused
    # error: BUSY ...".
    return str(exc).rpartition(" of pipeline caused error: ")[2].startswith(_BUSY_REPLIES)


def _keys(stream_id: str) -> tuple[str, str, str, str]:
    tag = "{" + stream_id + "}"
    return f"sse:{tag}:meta", f"sse:{tag}:events", f"sse:{tag}:lease", f"sse:{tag}"


def _ends_channel(stream_id: str) -> str:
    """Where an end written by another worker (a cancel, a lost lease) is published for the
    owner, besides the stream's channel."""
    return "sse:{" + stream_id + "}:ends"


def _client_key(address: str) -> str:
    return "sse:clients:{" + address + "}"


def _event_from_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> Event:
    """An event from a Redis Stream entry (``<id>-0``, fields ``e`` and ``d``)."""
    return Event(int(entry_id.split(b"-")[0]), fields[b"e"].decode(), json.loads(fields[b"d"]))


class RedisBackend:
    """Streams shared through Redis. One per app per worker; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        lease: float = 10.0,
        retention: float = 300.0,
        make_mirror: Callable[[str], Stream] | None = None,
        store: BlockStore | None = None,
    ) -> None:
        # A bounded pool (greenlets wait for a connection rather than open more); blocking reads
        # stay shorter than the socket timeout; dead connections are noticed by health checks.
        # Each connection is named for its worker, so CLIENT LIST tells whose it is.
        pool = redis.BlockingConnectionPool.from_url(
            url,
            client_name=f"sse-blueprint:{socket.gethostname()}:{os.getpid()}",
            max_connections=16,
            timeout=10,
            socket_timeout=10,
            socket_connect_timeout=5,
            health_check_interval=15,
        )
        self.redis = redis.Redis(connection_pool=pool)
        self.url = url
        self.lease = lease
        self.retention = retention
        self.make_mirror = make_mirror
        self.store = store  # where a mirror learns how a stream that Redis lost ended
        self._append = self.redis.register_script(_APPEND)
        # Owners' appends, batched across streams (each producer waits for its own).
        self._appends: Batcher[tuple[list[str], list[Any]], Any] = Batcher(self._append_all)
        self._end = self.redis.register_script(_END)
        self._renew = self.redis.register_script(_RENEW)
        self._set_metadata = self.redis.register_script(_SET_METADATA)
        self._claim_client = self.redis.register_script(_CLAIM_CLIENT)
        self._renew_clients = self.redis.register_script(_RENEW_CLIENTS)
        self._clients: dict[str, str] = {}  # token -> address: this worker's open responses
        self._client_tokens = f"{secrets.token_hex(6)}:"
        self._client_serial = 0
        # Work for the accountant greenlet: (address, token, limit, result), (address, token).
        self._claims: list[tuple[str, str, int, gevent.event.AsyncResult]] = []
        self._releases: list[tuple[str, str]] = []
        self._accounting = gevent.event.Event()
        self._accountant: gevent.Greenlet | None = None
        self.owned: dict[str, tuple[Stream, str]] = {}  # stream id -> (stream, generation)
        self.mirrors: dict[str, Stream] = {}
        self._making: dict[str, gevent.event.AsyncResult] = {}  # mirrors being made
        self._early: dict[str, list[Event]] = {}  # events that came before the first fill
        self._channels: dict[str, Stream] = {}  # channel -> stream followed on this worker
        self._confirmed: dict[str, gevent.event.Event] = {}
        self._pending: list[tuple[str, str]] = []  # ("subscribe"|"unsubscribe", channel)
        self._pubsub: Any = None
        self._listener: gevent.Greenlet | None = None
        self._watchdog: gevent.Greenlet | None = None

    # -- owner side --------------------------------------------------------------------------

    def claim(self, stream: Stream) -> None:
        meta, _, lease, _ = _keys(stream.id)
        gen = secrets.token_hex(8)

        def start(pipe: Pipeline) -> None:
            pipe.hset(
                meta,
                mapping={
                    "gen": gen,
                    "state": "running",
                    "producer": stream.producer_name,
                    "created_at": repr(stream.created_at),
                    "last_id": 0,
                    "metadata": json.dumps(stream.metadata),
                },
            )
            pipe.set(lease, gen, px=int(self.lease * 1000))

        self._pipelined(start, transaction=True)
        self.owned[stream.id] = (stream, gen)
        # To hear of a cancel made elsewhere; not the stream's own channel, which would bring it
        # every event it appends (the Pub/Sub reader parsing them took a quarter of its time).
        self._follow(_ends_channel(stream.id), stream)
        self._start_greenlets()
        gevent.spawn(self._renew_loop, stream, gen)

    def append(self, stream: Stream, event: Event) -> None:
        meta, events, lease, channel = _keys(stream.id)
        gen = self.owned[stream.id][1]
        terminal = event.event if event.terminal else ""
        args = [
            gen,
            event.id,
            event.event,
            event.json,
            terminal,
            int(self.retention),
            time.time(),
            channel,
            _wire.relay_message(event.id, event.event, event.json, own=True),
        ]
        try:
            self._appends.submit(([meta, events, lease], args))
        except redis.ResponseError as exc:
            self._refused(stream, exc)
            raise StreamClosed(stream.id) from exc

    def _append_all(self, batch: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
        """The appends of every stream that are waiting, in one pipeline: one round trip for
        all (each script call's refusal is its own caller's). Retried whole while Redis cannot
        answer: an append that already ran answers 2 the second time."""

        def queue(pipe: Pipeline) -> None:
            for keys, args in batch:
                self._append(keys=keys, args=args, client=pipe)

        results: list[Any] = self._pipelined(queue, replies=True)
        return results

    def _refused(self, stream: Stream, exc: Exception) -> None:
        """Our write was refused: the stream ended elsewhere, another producer owns it, or Redis
        no longer knows it (restarted empty, flushed, evicted, a failover that lost writes)."""
        text = str(exc)
        if "LOST" in text or "FENCED" in text:
            # Not ours any more, or nobody's: end it here (for this worker's readers), unwritten.
            why = LOST_IN_REDIS if "LOST" in text else "producer fenced out"
            log.error("stream %s: %s; stopping", stream.id, why, extra={"stream_id": stream.id})
            end = Event(stream.last_event_id + 1, "error", lost_data(stream.id, why))
            stream._adopt_terminal(end)
        else:
            self._adopt_remote_end(stream)  # cancelled, or lost while we could not renew

    def set_metadata(self, stream: Stream, metadata: Mapping[str, Any]) -> None:
        meta = _keys(stream.id)[0]
        gen = self.owned[stream.id][1]
        try:
            self._retrying(self._set_metadata, keys=[meta], args=[gen, json.dumps(metadata)])
        except redis.ResponseError as exc:
            self._refused(stream, exc)
            raise StreamClosed(stream.id) from exc

    def persisted(self, stream: Stream, up_to_id: int) -> None:
        _, events, _, channel = _keys(stream.id)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xtrim(events, minid=f"{up_to_id}-0")  # keeps up_to_id itself: never empty
            pipe.publish(channel, json.dumps({"persisted": up_to_id}))
            pipe.execute()
        except redis.RedisError as exc:
            log.warning(
                "stream %s: trimming Redis failed (%s); it will be trimmed later",
                stream.id,
                exc,
                extra={"stream_id": stream.id},
            )

    def _adopt_remote_end(self, stream: Stream) -> None:
        _, events, _, _ = _keys(stream.id)
        entries = self._retrying(self.redis.xrevrange, events, count=1)
        if entries:
            event = _event_from_entry(*entries[0])
            if event.terminal:
                stream._adopt_terminal(event)

    def _renew_loop(self, stream: Stream, gen: str) -> None:
        meta, _, lease, _ = _keys(stream.id)
        while True:
            gevent.sleep(self.lease / 3)
            if stream.finished:
                break
            try:
                state = self._renew(keys=[meta, lease], args=[gen, int(self.lease * 1000)])
            except redis.RedisError as exc:
                log.warning(
                    "stream %s: lease renewal failed (%s)",
                    stream.id,
                    exc,
                    extra={"stream_id": stream.id},
                )
                continue
            state = state.decode() if isinstance(state, bytes) else state
            if state in ("fenced", "lost"):
                self._refused(stream, redis.ResponseError(state.upper()))
            elif state != StreamState.RUNNING.value:
                self._adopt_remote_end(stream)  # the durable flag says it ended (a lost message)
        self.owned.pop(stream.id, None)
        self._unfollow(_ends_channel(stream.id))

    # -- from any worker ----------------------------------------------------------------------

    def end(
        self, stream_id: str, state: str, data: dict[str, Any], *, if_lease_gone: bool = False
    ) -> str | None:
        """End a running stream (``cancelled``, or ``error`` when its owner is gone).

        Returns ``"ok"`` if this call ended it, else its state (``running`` if its lease is still
        held and ``if_lease_gone``), or None if Redis does not know the stream.
        """
        meta, events, lease, channel = _keys(stream_id)
        data_json = _wire.dumps(data)
        result = self._retrying(
            self._end,
            keys=[meta, events, lease],
            args=[
                state,
                data_json,
                int(self.retention),
                time.time(),
                channel,
                "1" if if_lease_gone else "0",
                _wire.relay_message_head(state, data_json),
                _ends_channel(stream_id),
            ],
        )
        return result.decode() if isinstance(result, bytes) else result

    def status(self, stream_id: str) -> dict[str, Any] | None:
        meta = _keys(stream_id)[0]
        raw = self._retrying(self.redis.hgetall, meta)
        if not raw:
            return None
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        if fields.get("state") == "running" and not self._retrying(
            self.redis.exists, _keys(stream_id)[2]
        ):
            gone = lost_data(stream_id)
            if self.end(stream_id, "error", gone, if_lease_gone=True) == "ok":
                return self.status(stream_id)
        finished = fields.get("finished_at")
        return {
            "stream_id": stream_id,
            "state": fields.get("state", "running"),
            "last_event_id": int(fields.get("last_id", 0)),
            "producer": fields.get("producer", ""),
            "created_at": float(fields.get("created_at", 0)),
            "finished_at": float(finished) if finished else None,
            "metadata": json.loads(fields.get("metadata", "{}")),
        }

    def active(self, stream_ids: list[str]) -> dict[str, bool]:
        """Which of these streams are running, on any worker or instance."""

        def states_of(pipe: Pipeline) -> None:
            for stream_id in stream_ids:
                pipe.hget(_keys(stream_id)[0], "state")

        states = self._pipelined(states_of)
        return {sid: st == b"running" for sid, st in zip(stream_ids, states, strict=True)}

    def mirror(self, stream_id: str) -> Stream | None:
        """This worker's mirror of a stream that another worker runs, or None if unknown.

        The mirror is handed out only once it is filled and following: the subscription is
        confirmed first, then the Redis Stream is read, then what was published meanwhile is
        applied, so it misses nothing and holds nothing twice. Readers that ask while it is
        being made wait for that one mirror (the pending result is registered before the first
        call to Redis, so two readers can never make two).
        """
        pending = self._making.get(stream_id)
        if pending is not None:
            found: Stream | None = pending.get(timeout=15)
            return found
        mirror = self.mirrors.get(stream_id)
        if mirror is not None:
            return mirror
        pending = self._making[stream_id] = gevent.event.AsyncResult()
        try:
            mirror = self._make_mirror(stream_id)
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        else:
            pending.set(mirror)
            return mirror
        finally:
            del self._making[stream_id]

    def release_mirrors(self) -> int:
        """Shutdown: end the responses of every reader of a mirror (they resume elsewhere)."""
        return sum(mirror.release_readers() for mirror in list(self.mirrors.values()))

    def _make_mirror(self, stream_id: str) -> Stream | None:
        meta, _, _, channel = _keys(stream_id)
        producer, metadata = self._retrying(self.redis.hmget, meta, ["producer", "metadata"])
        if self.make_mirror is None or producer is None:
            return None
        stream = self.make_mirror(stream_id)
        stream.producer_name = producer.decode()
        stream.metadata = json.loads(metadata) if metadata else {}
        self._early[stream_id] = []
        self._start_greenlets()
        try:
            if not self._follow(channel, stream).wait(10):
                raise redis.TimeoutError("Redis did not confirm the subscription in time")
            self._fill(stream, first=True)
        except BaseException:
            self._unfollow(channel)
            self._early.pop(stream_id, None)
            raise
        for event in self._early.pop(stream_id, []):
            self._deliver(stream, event)
        self.mirrors[stream_id] = stream
        return stream

    def _fill(self, stream: Stream, *, first: bool = False) -> None:
        """Bring a mirror up to date from the Redis Stream (first, after a gap, a reconnect)."""
        _, events, _, _ = _keys(stream.id)
        start = f"{stream.last_event_id + 1}-0"
        entries = self._retrying(self.redis.xrange, events, min=start)
        if first and entries:
            # Everything before the first entry was trimmed after being persisted: a reader
            # older than that is caught up from the store (the engine's usual two tiers).
            first_id = _event_from_entry(*entries[0]).id
            stream._trimmed_id = stream._trim_to = first_id - 1
            stream._last_id = first_id - 1
            if first_id > 1:
                start_data = {"stream_id": stream.id, "producer": stream.producer_name}
                stream.start_event = Event(1, "start", start_data)
        for entry in entries:
            stream._ingest(_event_from_entry(*entry))

    def _deliver(self, stream: Stream, event: Event) -> None:
        if event.id > stream.last_event_id + 1:
            gevent.spawn(self._fill, stream)  # a gap: read it from the Redis Stream
        else:
            stream._ingest(event)

    # -- the worker's Pub/Sub connection -------------------------------------------------------

    def _follow(self, channel: str, stream: Stream) -> gevent.event.Event:
        self._channels[channel] = stream
        confirmed = self._confirmed.setdefault(channel, gevent.event.Event())
        self._pending.append(("subscribe", channel))
        return confirmed

    def _unfollow(self, channel: str) -> None:
        self._channels.pop(channel, None)
        self._confirmed.pop(channel, None)
        self._pending.append(("unsubscribe", channel))

    def _start_greenlets(self) -> None:
        if self._listener is None or self._listener.dead:
            self._listener = gevent.spawn(self._listen)
        if self._watchdog is None or self._watchdog.dead:
            self._watchdog = gevent.spawn(self._watch)

    def _listen(self) -> None:
        """The one Pub/Sub reader of this worker. Whatever fails (Redis gone, or busy and
        refusing a SUBSCRIBE), it reconnects with backoff and subscribes again to every channel
        it follows; each mirror then reads what it missed from the Redis Stream."""
        delay = 0.1
        while True:
            try:
                self._pubsub = self.redis.pubsub()  # type: ignore[no-untyped-call]
                channels = list(self._channels)
                self._pending.clear()
                if channels:
                    self._pubsub.subscribe(*channels)
                while True:
                    while self._pending:
                        action, channel = self._pending.pop(0)
                        getattr(self._pubsub, action)(channel)
                    message = self._pubsub.get_message(timeout=0.05)
                    if message is not None:
                        self._on_message(message)
                    delay = 0.1
            except Exception as exc:  # the worker's live events stop if this greenlet does
                if isinstance(exc, redis.RedisError | OSError):
                    log.warning("Redis Pub/Sub failed (%s); reconnecting in %.1fs", exc, delay)
                else:
                    log.exception("Redis Pub/Sub reader failed; reconnecting in %.1fs", delay)
                for event in self._confirmed.values():
                    event.clear()
                with contextlib.suppress(Exception):
                    self._pubsub.close()
                gevent.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _on_message(self, message: dict[str, Any]) -> None:
        channel = message["channel"].decode()
        if message["type"] == "subscribe":
            confirmed = self._confirmed.get(channel)
            if confirmed is not None:
                confirmed.set()
            stream = self._channels.get(channel)
            if stream is not None and stream.mirror and stream.id not in self._early:
                # (Re)subscribed after a reconnect, ours or redis-py's own: what was published
                # meanwhile is in the Redis Stream.
                gevent.spawn(self._fill, stream)
            return
        if message["type"] != "message":
            return
        stream = self._channels.get(channel)
        if stream is None:
            return
        payload = json.loads(message["data"])
        if "persisted" in payload:
            if stream.mirror:
                stream._trim_to = max(stream._trim_to, payload["persisted"])
                stream._trim(stream._trim_to)
            return
        event = Event(payload["id"], payload["e"], payload["d"])
        if not stream.mirror:
            # The owner follows only the ends channel: an end written elsewhere (a cancel, a
            # lost lease).
            if event.terminal:
                stream._adopt_terminal(event)
            return
        early = self._early.get(stream.id)
        if early is not None:
            early.append(event)  # the mirror is still being filled
            return
        self._deliver(stream, event)

    def _watch(self) -> None:
        """Lease watchdog and mirror housekeeping for the streams this worker follows."""
        idle: dict[str, float] = {}
        unknown: dict[str, float] = {}  # mirrored streams Redis has lost: since when
        while True:
            gevent.sleep(max(self.lease / 2, 0.2))
            now = time.monotonic()
            for stream_id, stream in list(self.mirrors.items()):
                if not stream.finished and stream_id not in self._early:
                    try:
                        lease = _keys(stream_id)[2]
                        if not self.redis.exists(lease):
                            gone = lost_data(stream_id)
                            ended = self.end(stream_id, "error", gone, if_lease_gone=True)
                            if ended is None:  # Redis lost the stream: its end is in the store
                                self._end_from_store(stream, unknown.setdefault(stream_id, now))
                            elif ended != "running":
                                # Ended (now, or while we were not listening): take the end.
                                self._fill(stream)
                    except redis.RedisError:
                        continue
                    except Exception:
                        log.exception(
                            "stream %s: could not end a stream Redis lost; retrying",
                            stream_id,
                            extra={"stream_id": stream_id},
                        )
                        continue
                if stream.finished:
                    unknown.pop(stream_id, None)
                if stream.subscriber_count:
                    idle.pop(stream_id, None)
                elif now - idle.setdefault(stream_id, now) > max(30.0, self.lease):
                    idle.pop(stream_id, None)
                    self.mirrors.pop(stream_id, None)
                    self._unfollow(_keys(stream_id)[3])

    def _end_from_store(self, mirror: Stream, missing_since: float) -> None:
        """End a mirror of a stream that Redis no longer knows (restarted empty, flushed,
        evicted, a failover that lost writes), as the store says it ended.

        The owner, refused at its next write or lease renewal, ends the stream and saves its end;
        a mirror takes that end. If the store still says "running" two leases on, the owner is
        gone too: the stream is ended there as lost (the first end saved wins).
        """
        store = self.store
        record = store.load_stream(mirror.id) if store is not None else None
        if record is None or record.terminal is None:
            if time.monotonic() - missing_since < 2 * self.lease:
                return  # give the owner time to notice and save its end
            if record is not None and store is not None:
                store.save(lost(record), [])
                record = store.load_stream(mirror.id)
        if record is not None and record.terminal is not None and record.terminal_id is not None:
            end = Event(record.terminal_id, record.terminal, record.terminal_data or {})
        else:  # no store, or it never heard of the stream
            end = Event(mirror.last_event_id + 1, "error", lost_data(mirror.id, LOST_IN_REDIS))
        log.warning(
            "stream %s: Redis lost this stream; it ended with %s", mirror.id, end.event,
            extra={"stream_id": mirror.id},
        )  # fmt: skip
        mirror._ingest(end)

    # -- clients per address ------------------------------------------------------------------

    @property
    def _patience(self) -> float:
        """Seconds a call waits for Redis (retrying) before it gives up."""
        return max(self.lease, 5.0)

    @property
    def _client_ttl(self) -> float:
        return 3 * self.lease

    def claim_client(self, address: str, limit: int) -> str | None:
        """Count one more open response from ``address`` everywhere: its token, or None if the
        address is at ``limit``. If Redis cannot be reached the response is let through (""),
        so an outage does not refuse readers; this worker's own count still applies."""
        self._client_serial += 1
        token = f"{self._client_tokens}{self._client_serial}"
        result = gevent.event.AsyncResult()
        self._claims.append((address, token, limit, result))
        self._account()
        try:
            added = result.get(timeout=self._patience)
        except (redis.RedisError, gevent.Timeout) as exc:
            log.warning("cannot count clients of %s in Redis: %s", address, exc)
            return ""
        if not added:
            return None
        self._clients[token] = address
        return token

    def release_client(self, token: str) -> None:
        """The response of ``token`` (from :meth:`claim_client`) has ended."""
        address = self._clients.pop(token, None)
        if address is not None:
            self._releases.append((address, token))
            self._account()

    def _account(self) -> None:
        self._accounting.set()
        if self._accountant is None or self._accountant.dead:
            self._accountant = gevent.spawn(self._accountant_loop)

    def _accountant_loop(self) -> None:
        """Send the claims, releases and renewals of this worker's clients, batched."""
        renewed = time.monotonic()
        while self._claims or self._releases or self._clients:
            self._accounting.wait(max(renewed + self.lease - time.monotonic(), 0))
            self._accounting.clear()
            claims, self._claims = self._claims, []
            releases, self._releases = self._releases, []
            renew: dict[str, list[str]] = {}
            if time.monotonic() - renewed >= self.lease:
                renewed = time.monotonic()
                for token, address in self._clients.items():
                    renew.setdefault(address, []).append(token)
            if not (claims or releases or renew):
                continue
            ttl = self._client_ttl
            pipe = self.redis.pipeline(transaction=False)
            for address, token in releases:  # first: the places they free count at once
                pipe.zrem(_client_key(address), token)
            for address, token, limit, _ in claims:
                self._claim_client([_client_key(address)], [token, limit, ttl], pipe)
            for address, tokens in renew.items():
                self._renew_clients([_client_key(address)], [ttl, *tokens], pipe)
            try:
                replies = pipe.execute(raise_on_error=False)
            except redis.RedisError as exc:
                replies = [exc] * (len(releases) + len(claims) + len(renew))
                if releases or renew:  # the members expire by themselves
                    log.warning("cannot update this worker's clients in Redis: %s", exc)
            finally:
                # redis-py loads the pipeline's scripts before the part of execute() that gives
                # its connection back: when that fails (an error reply such as BUSY), only
                # reset() gives it back before the pipeline is collected.
                pipe.reset()
            for (_, _, _, result), reply in zip(claims, replies[len(releases) :], strict=False):
                if isinstance(reply, Exception):
                    result.set_exception(reply)
                else:
                    result.set(reply)

    def _retrying(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call Redis; while it cannot answer (see :func:`is_transient`) retry with backoff for a
        while, then raise."""
        delay, deadline = 0.05, time.monotonic() + self._patience
        while True:
            try:
                return func(*args, **kwargs)
            except redis.RedisError as exc:
                if not is_transient(exc) or time.monotonic() + delay > deadline:
                    raise
                gevent.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _pipelined(
        self,
        build: Callable[[Pipeline], None],
        *,
        transaction: bool = False,
        replies: bool = False,
    ) -> Any:
        """Run the commands ``build`` queues, in one round trip, retried as :meth:`_retrying`
        does. Each attempt builds a new pipeline: one forgets its commands when it runs, sent
        or not, and retrying it would run nothing. With ``replies``, a command's error is its
        reply (an exception instance in the list) rather than raised, unless Redis could not
        run it (see :func:`is_transient`): then the whole pipeline is retried."""

        def run() -> Any:
            pipe = self.redis.pipeline(transaction=transaction)
            try:
                build(pipe)
                results = pipe.execute(raise_on_error=not replies)
            finally:
                # A pipeline with scripts loads them before the part of execute() that gives
                # its connection back: when that fails (BUSY), only reset() gives it back.
                pipe.reset()
            for result in results if replies else ():
                if isinstance(result, redis.RedisError) and is_transient(result):
                    raise result
            return results

        return self._retrying(run)
