"""Open responses per client address, counted across every worker and instance.

``sse:clients:{<address>}`` is a sorted set of the open responses of one address everywhere
(member: a response's token, score: when it expires, by Redis's clock). A Lua script drops the
expired members, counts and adds in one step, so ``SSE_MAX_CLIENTS_PER_ADDRESS`` holds across
the deployment. This worker renews its members every ``lease`` seconds and removes them when the
responses end; a worker that dies without doing so frees its places within three leases. One
greenlet sends all of that, batched in pipelines on one connection: however many clients
connect at once, counting them takes one connection per worker.

Imports the connection and the scripts; nothing of the engine.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time

import gevent
import gevent.event
import redis

from .connection import REDIS_ERRORS, RedisConnection
from .scripts import CLAIM_CLIENT, RENEW_CLIENTS, client_key

__all__ = ["ClientCounter"]

log = logging.getLogger("sse_blueprint")


class ClientCounter:
    """This worker's part of the count of open responses per address (see the module)."""

    def __init__(self, conn: RedisConnection, lease: float) -> None:
        self.conn = conn
        self.lease = lease
        self._claim = conn.script(CLAIM_CLIENT)
        self._renew = conn.script(RENEW_CLIENTS)
        self._clients: dict[str, str] = {}  # token -> address: this worker's open responses
        self._tokens = f"{secrets.token_hex(6)}:"
        self._serial = 0
        # Work for the accountant greenlet: (address, token, limit, result), (address, token).
        self._claims: list[tuple[str, str, int, gevent.event.AsyncResult]] = []
        self._releases: list[tuple[str, str]] = []
        self._wanted = gevent.event.Event()
        self._accountant: gevent.Greenlet | None = None

    def claim(self, address: str, limit: int) -> str | None:
        """Count one more open response from ``address`` everywhere: its token, or None if the
        address is at ``limit``. If Redis cannot be reached the response is let through (""),
        so an outage does not refuse readers; this worker's own count still applies."""
        self._serial += 1
        token = f"{self._tokens}{self._serial}"
        result = gevent.event.AsyncResult()
        self._claims.append((address, token, limit, result))
        self._account()
        try:
            added = result.get(timeout=self.conn.patience)
        except (*REDIS_ERRORS, gevent.Timeout) as exc:
            log.warning("cannot count clients of %s in Redis: %s", address, exc)
            return ""
        if not added:
            return None
        self._clients[token] = address
        return token

    def release(self, token: str) -> None:
        """The response of ``token`` (from :meth:`claim`) has ended."""
        address = self._clients.pop(token, None)
        if address is not None:
            self._releases.append((address, token))
            self._account()

    def _account(self) -> None:
        self._wanted.set()
        if self._accountant is None or self._accountant.dead:
            self._accountant = gevent.spawn(self._run)

    def _run(self) -> None:
        """Send the claims, releases and renewals of this worker's clients, batched."""
        renewed = time.monotonic()
        while self._claims or self._releases or self._clients:
            self._wanted.wait(max(renewed + self.lease - time.monotonic(), 0))
            self._wanted.clear()
            claims, self._claims = self._claims, []
            releases, self._releases = self._releases, []
            renew: dict[str, list[str]] = {}
            if time.monotonic() - renewed >= self.lease:
                renewed = time.monotonic()
                for token, address in self._clients.items():
                    renew.setdefault(address, []).append(token)
            if not (claims or releases or renew):
                continue
            ttl = 3 * self.lease
            pipe = self.conn.redis.pipeline(transaction=False)
            for address, token in releases:  # first: the places they free count at once
                pipe.zrem(client_key(address), token)
            for address, token, limit, _ in claims:
                self._claim.queue(pipe, [client_key(address)], [token, limit, ttl])
            for address, tokens in renew.items():
                self._renew.queue(pipe, [client_key(address)], [ttl, *tokens])
            try:
                replies = pipe.execute(raise_on_error=False)
            except REDIS_ERRORS as exc:
                replies = [exc] * (len(releases) + len(claims) + len(renew))
                if releases or renew:  # the members expire by themselves
                    log.warning("cannot update this worker's clients in Redis: %s", exc)
            finally:
                pipe.reset()
            if any(isinstance(reply, redis.exceptions.NoScriptError) for reply in replies):
                # A restarted Redis or a promoted replica: these claims are let through, the
                # next ones find the scripts.
                with contextlib.suppress(*REDIS_ERRORS):
                    self.conn.load_scripts()
            for (_, _, _, result), reply in zip(claims, replies[len(releases) :], strict=False):
                if isinstance(reply, Exception):
                    result.set_exception(reply)
                else:
                    result.set(reply)
