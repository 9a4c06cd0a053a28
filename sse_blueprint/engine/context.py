"""What a producer gets: :class:`ProducerContext` (input, events, blocks, sleep, cancellation)
and :class:`Block`.

Imports the event and turn rules and gevent; the stream only for typing (it calls back into the
stream that runs it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .._event import DURABLE, RESERVED_EVENTS, Event

if TYPE_CHECKING:
    from .stream import Stream

__all__ = ["Block", "Producer", "ProducerContext"]


class ProducerContext:
    """What a producer gets: its input, a way to send events, and the cancellation signal.

    With a shared backend (Redis), sending does not wait for it: the events a producer writes
    before it pauses (:meth:`sleep`, a read from its model, any blocking call) go to Redis in
    one call, and readers get them once Redis has them. (A producer with 256 events or 1 MiB
    still on their way waits for room.) If Redis refuses them (the stream was cancelled
    elsewhere), they are dropped and the producer is stopped where it pauses.

    >>> def countdown(ctx: ProducerContext) -> dict[str, object]:
    ...     for n in range(ctx.input.get("from", 3), 0, -1):
    ...         ctx.send("tick", {"n": n})
    ...         ctx.sleep(1)
    ...     return {"liftoff": True}
    """

    __slots__ = ("_stream", "input")

    def __init__(self, stream: Stream, input: Mapping[str, Any]) -> None:
        self._stream = stream
        self.input = input

    @property
    def stream_id(self) -> str:
        return self._stream.id

    @property
    def metadata(self) -> dict[str, Any]:
        """The stream's metadata (a copy; change it with :meth:`set_metadata`)."""
        return dict(self._stream.metadata)

    def set_metadata(self, **values: Any) -> None:
        """Merge ``values`` (JSON) into the stream's metadata, shown by ``status`` everywhere."""
        self._stream.set_metadata(values)

    @property
    def cancelled(self) -> bool:
        """True once the stream is over (cancelled, timed out): stop producing."""
        return self._stream.finished

    def send(self, event: str, data: Mapping[str, Any], *, replay: str = DURABLE) -> int:
        """Append an app event to the stream and return its id.

        ``replay`` says what a client that resumes later gets: ``"durable"`` (the default) stores
        the event with the turn and replays it exactly once; ``"latest"`` keeps only the newest
        event of this name (progress, status); ``"ephemeral"`` is live only (a typing
        indicator). Raises :class:`StreamClosed` if the stream is already over, and
        ``ValueError`` for an event that cannot be sent (terminal names, CR/LF/NUL, data that is
        not JSON, more durable events than ``SSE_MAX_DURABLE_EVENTS``).
        """
        if event in RESERVED_EVENTS:
            raise ValueError(
                f"{event!r} is sent by the engine; return from the producer (done), raise "
                "ProducerError (error), or cancel the stream instead"
            )
        return self._stream.append(event, data, replay, check=True).id

    def block(self, kind: str = "text", meta: Mapping[str, Any] | None = None) -> Block:
        """Start the next block of the turn (numbered after every block so far): ``kind`` is
        ``text``, ``reasoning``, ``tool_call`` (meta ``name``, ``call_id``), ``tool_result``
        (meta ``call_id``) or your own, ``meta`` a JSON object. Sends ``block_start``.

        >>> def agent(ctx: ProducerContext) -> None:
        ...     with ctx.block("reasoning") as thinking:
        ...         thinking.write("The user wants the weather...")
        ...     call = ctx.block("tool_call", {"name": "weather", "call_id": "c1"})
        ...     call.write('{"city": "Paris"}')
        ...     call.end({"input": {"city": "Paris"}})
        ...     with ctx.block("tool_result", {"call_id": "c1"}) as result:
        ...         result.write('{"temp_c": 21}')
        ...     ctx.text(ctx.block().index, "It is 21 °C in Paris.")
        """
        index = self._stream.turn.next_block
        self._stream.append(
            "block_start", {"block": index, "kind": kind, "meta": dict(meta or {})}, check=True
        )
        return Block(self, index, kind)

    def text(self, block: int, text: str) -> int:
        """Send a ``text_delta``: append ``text`` to block ``block`` (a text block if new)."""
        return self._stream.append("text_delta", {"block": block, "text": text}, check=True).id

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake at once and raise :class:`StreamClosed` if the stream ends meanwhile.

        ``sleep(0)`` only lets the other greenlets run (readers then write what it sent so far).
        """
        self._stream.producer.sleep(seconds)

    def end_block(self, block: int, meta: Mapping[str, Any] | None = None) -> int:
        """End block ``block``: send ``block_end`` with ``meta`` (merged into the block's meta).

        The block is then complete, and persisted in the background. A ``tool_call`` block's
        end may carry the parsed arguments: ``ctx.end_block(i, {"input": json.loads(args)})``.
        """
        data = {"block": block, "meta": dict(meta or {})}
        return self._stream.append("block_end", data, check=True).id

    def snapshot(self) -> list[Event]:
        """The events in the live buffer now (oldest first; with a shared backend, not those
        still on their way to it)."""
        return list(self._stream.buffer.events)

    def trim(self, up_to_id: int) -> int:
        """Drop buffered events up to ``up_to_id``, for producers that persist their own way.

        Only call it once the stream's store can serve catch-up for those events. Events that a
        connected reader has not taken yet, and the newest event, stay. Returns how many went.
        """
        return self._stream.readers.trim(up_to_id)


class Block:
    """A block a producer started with :meth:`ProducerContext.block`.

    Used as a context manager, it ends when the ``with`` body finishes without an exception.
    """

    __slots__ = ("_ctx", "ended", "index", "kind")

    def __init__(self, ctx: ProducerContext, index: int, kind: str) -> None:
        self._ctx = ctx
        self.index = index
        self.kind = kind
        self.ended = False

    def write(self, text: str) -> int:
        """Append ``text`` to the block's content (a ``text_delta``); returns the event id."""
        return self._ctx.text(self.index, text)

    def end(self, meta: Mapping[str, Any] | None = None) -> int:
        """End the block (``block_end``), merging ``meta`` into its meta."""
        event_id = self._ctx.end_block(self.index, meta)
        self.ended = True
        return event_id

    def __enter__(self) -> Block:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None and not self.ended:
            self.end()

    def __repr__(self) -> str:
        return f"Block(index={self.index}, kind={self.kind!r})"


Producer = Callable[[ProducerContext], "Mapping[str, Any] | None"]
