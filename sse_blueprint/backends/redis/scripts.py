"""The Redis backend's data: its keys, channels and Lua scripts, and events read from it.

Per stream (keys hash-tagged ``{id}`` so that one stream's keys share a Redis Cluster slot):
``sse:{id}:meta`` (a hash), ``sse:{id}:events`` (a Redis Stream, entry id ``<event id>-0``),
``sse:{id}:lease`` (the owner's lease), channel ``sse:{id}`` (every event) and channel
``sse:{id}:ends`` (an end written by another worker, for the owner). Per client address:
``sse:clients:{<address>}`` (a sorted set of open responses).

Imports the event type only.
"""

from __future__ import annotations

import json

from ..._event import DURABLE
from ...engine import Event

__all__ = [
    "APPEND", "CLAIM_CLIENT", "END", "LOST_IN_REDIS", "RENEW", "RENEW_CLIENTS", "SET_METADATA",
    "client_key", "ends_channel", "event_from_entry", "stream_keys",
]  # fmt: skip

#: The end of a stream whose state Redis lost while it ran (the owner's, written to the store).
LOST_IN_REDIS = "stream state lost in Redis"

# One producer's next events, in one call. KEYS: meta, events, lease.
# ARGV: gen, ttl, channel, the publish command (PUBLISH, or SPUBLISH in a cluster), the terminal
# state of the last event or "", now, "1" to write them after a gap (the owner writes again what
# a failover lost: what it no longer buffers was persisted), then five per event: id, event,
# data, the message to publish (wire.relay_message), and the replay mode of an app event that
# is not durable or "" (entry field "r").
# While the stream runs only the generation's holder appends, so an id Redis already has is
# this owner's own earlier call: one whose reply was lost (Redis stopped, the connection broke),
# or one that failed for want of an answer and is sent again. Such events are skipped, and a
# call that is all there answers 2. So is a call that ended the stream itself ("ended_by"), sent
# again; any other call to an ended stream is refused (CLOSED). A call's first new id past the
# next one is refused ("GAP <last id>"): Redis lost events it had acknowledged (a failover
# promoted a replica that had not got them yet), and the owner writes them again. What it no
# longer buffers it had persisted: when it cannot write from the next id, the entries before
# its first are trimmed, so that Redis never holds a hole (a mirror filled from it follows from
# there, and its older readers catch up from the store).
APPEND = """
local meta = redis.call('HMGET', KEYS[1], 'gen', 'state', 'last_id', 'ended_by')
if not meta[1] then return redis.error_reply('LOST') end
if meta[1] ~= ARGV[1] then return redis.error_reply('FENCED') end
local last = tonumber(meta[3] or '0')
local final = tonumber(ARGV[#ARGV - 4])
if meta[2] ~= 'running' then
  if meta[4] == ARGV[1] and final <= last then return 2 end
  return redis.error_reply('CLOSED')
end
if final <= last then return 2 end
local first = true
for i = 8, #ARGV, 5 do
  local id = tonumber(ARGV[i])
  if id > last then
    if first and id > last + 1 then
      if ARGV[7] ~= '1' then return redis.error_reply('GAP ' .. last) end
      redis.call('XTRIM', KEYS[2], 'MINID', ARGV[i] .. '-0')
    end
    first = false
    if ARGV[i + 4] == '' then
      redis.call('XADD', KEYS[2], ARGV[i] .. '-0', 'e', ARGV[i + 1], 'd', ARGV[i + 2])
    else
      redis.call('XADD', KEYS[2], ARGV[i] .. '-0', 'e', ARGV[i + 1], 'd', ARGV[i + 2],
        'r', ARGV[i + 4])
    end
    redis.call(ARGV[4], ARGV[3], ARGV[i + 3])
  end
end
redis.call('HSET', KEYS[1], 'last_id', final)
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'state', ARGV[5], 'finished_at', ARGV[6], 'ended_by', ARGV[1])
  redis.call('DEL', KEYS[3])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return 1
"""

# End a running stream from any worker. KEYS: meta, events, lease.
# ARGV: state ("cancelled" or "error"), data json, ttl, now, channel, only_if_lease_gone ("1"/"0"),
# the message to publish less its id (wire.relay_message_head: the script adds the id and "}"),
# the ends channel (where the owner hears of it), the publish command
END = """
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
redis.call(ARGV[9], ARGV[5], ARGV[7] .. id .. '}')
redis.call(ARGV[9], ARGV[8], ARGV[7] .. id .. '}')
return 'ok'
"""

# KEYS: meta. ARGV: gen, metadata json. The owner's writes only, while it runs.
SET_METADATA = """
local meta = redis.call('HMGET', KEYS[1], 'gen', 'state')
if not meta[1] then return redis.error_reply('LOST') end
if meta[1] ~= ARGV[1] then return redis.error_reply('FENCED') end
if meta[2] ~= 'running' then return redis.error_reply('CLOSED') end
redis.call('HSET', KEYS[1], 'metadata', ARGV[2])
return 1
"""

# KEYS: meta, lease. ARGV: gen, lease ms. Returns the state (the owner stops if not running).
RENEW = """
local meta = redis.call('HMGET', KEYS[1], 'gen', 'state')
if not meta[1] then return 'lost' end
if meta[1] ~= ARGV[1] then return 'fenced' end
local state = meta[2]
if state == 'running' then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2]) end
return state
"""


# KEYS: an address's set. ARGV: token, limit, ttl s. 1: added; 0: the address is at its limit.
CLAIM_CLIENT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])))
return 1
"""

# KEYS: an address's set. ARGV: ttl s, then this worker's tokens in it (renewed if still there).
RENEW_CLIENTS = """
local t = redis.call('TIME')
local expires = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', expires, ARGV[i]) end
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])))
return 1
"""


def stream_keys(stream_id: str) -> tuple[str, str, str, str]:
    """A stream's meta, events and lease keys, and its channel."""
    tag = "{" + stream_id + "}"
    return f"sse:{tag}:meta", f"sse:{tag}:events", f"sse:{tag}:lease", f"sse:{tag}"


def ends_channel(stream_id: str) -> str:
    """Where an end written by another worker (a cancel, a lost lease) is published for the
    owner, besides the stream's channel."""
    return "sse:{" + stream_id + "}:ends"


def client_key(address: str) -> str:
    return "sse:clients:{" + address + "}"


def event_from_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> Event:
    """An event from a Redis Stream entry (``<id>-0``, fields ``e``, ``d`` and maybe ``r``)."""
    replay = fields[b"r"].decode() if b"r" in fields else DURABLE
    event_id = int(entry_id.split(b"-")[0])
    return Event(event_id, fields[b"e"].decode(), json.loads(fields[b"d"]), replay)
