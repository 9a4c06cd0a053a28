"""Reference app: a small chat and a job page on sse_blueprint, mounted at ``/api``.

Producers: ``demo`` (the contract's stand-in for an LLM), ``script`` (the contract's stand-in for
an agent's turn: typed blocks and app events), ``chat`` (the chat page's replies: a real model when
one is configured, see :mod:`models.assistant`, else a stand-in agent that reasons, calls a tool,
cites and answers; the answer is saved when the stream ends), ``assistant`` (the same replies for
the Vercel AI SDK's ``useChat``: ``POST /ai/chat`` and ``GET /ai/chat/<id>/stream``) and
``progress`` (a long job reporting progress).
Serve it with ``make run`` (gunicorn, gevent worker, ``gunicorn.conf.py``). Every ``SSE_*`` key
can be set from the environment as ``FLASK_SSE_*``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import gevent
from flask import Flask, abort, render_template, request

from models import ChatStore
from models.assistant import Assistant
from sse_blueprint import (
    SSE,
    InputError,
    ProducerContext,
    ProducerError,
    StreamClosed,
    StreamLimitReached,
)

sse = SSE()

#: A block ends after a blank line: the run of newlines stays with the block before it.
_BLOCK_BOUNDARY = re.compile(r"(?<=\n\n)(?=[^\n])")
MAX_DEMO_TEXT = 1_000_000


def split_blocks(text: str) -> list[str]:
    """Split ``text`` into blocks at blank lines; ``"".join(split_blocks(t)) == t``."""
    return [block for block in _BLOCK_BOUNDARY.split(text) if block]


def _int_field(input: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = input.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f'"{key}" must be an integer from {low} to {high}')
    return value


def validate_demo(input: Mapping[str, Any]) -> dict[str, Any]:
    """Check the demo's input: ``text`` (str), ``chunk_size`` and ``interval_ms`` (ints)."""
    text = input.get("text", "")
    if not isinstance(text, str):
        raise InputError('"text" must be a string')
    if len(text) > MAX_DEMO_TEXT:
        raise InputError(f'"text" must be at most {MAX_DEMO_TEXT} characters')
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError('"text" must be valid Unicode (no lone surrogates)') from None
    return {
        "text": text,
        "chunk_size": _int_field(input, "chunk_size", 8, 1, 1_000_000),
        "interval_ms": _int_field(input, "interval_ms", 30, 0, 60_000),
    }


def stream_text(
    ctx: ProducerContext, text: str, size: int, interval_ms: int, sent: list[str] | None = None
) -> int:
    """Stream ``text`` block by block as ``text_delta`` events; return the blocks sent.

    Each chunk is appended to ``sent`` once it is in the stream.
    """
    interval = interval_ms / 1000
    blocks = split_blocks(text)
    count = 0
    for index, block in enumerate(blocks):
        for start in range(0, len(block), size):
            chunk = block[start : start + size]
            ctx.text(index, chunk)
            if sent is not None:
                sent.append(chunk)
            count += 1
            if interval:
                ctx.sleep(interval)
            elif count % 64 == 0:
                gevent.sleep(0)  # let readers run during a long burst
        ctx.end_block(index)
    return len(blocks)


@sse.producer("demo", validate=validate_demo)
def demo(ctx: ProducerContext) -> dict[str, Any]:
    """A stand-in for an LLM: stream ``text`` block by block as ``text_delta`` events."""
    text: str = ctx.input["text"]
    blocks = stream_text(ctx, text, ctx.input["chunk_size"], ctx.input["interval_ms"])
    return {"blocks": blocks, "characters": len(text)}


#: What a ``script`` step's block kind and event name may be (the contract's kinds).
_KIND = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_ENGINE_EVENTS = frozenset(
    {"start", "done", "error", "cancelled", "turnblock_catchup", "block_start", "text_delta",
     "block_end"}
)  # fmt: skip
MAX_SCRIPT_STEPS = 10_000


def _script_step(index: int, step: Any) -> dict[str, Any]:
    where = f"steps[{index}]"
    if not isinstance(step, dict) or len(step.keys() & {"block", "event"}) != 1:
        raise InputError(f'{where} must be an object with either "block" or "event"')
    if "block" in step:
        block = step["block"]
        if not isinstance(block, dict):
            raise InputError(f"{where}.block must be an object")
        kind = block.get("kind")
        if not isinstance(kind, str) or _KIND.fullmatch(kind) is None:
            raise InputError(f"{where}.block.kind must match [a-z][a-z0-9_.-]{{0,63}}")
        text = block.get("text", "")
        if not isinstance(text, str):
            raise InputError(f"{where}.block.text must be a string")
        meta, end_meta = block.get("meta", {}), block.get("end_meta", {})
        if not isinstance(meta, dict) or not isinstance(end_meta, dict):
            raise InputError(f"{where}.block.meta and end_meta must be objects")
        return {"block": {"kind": kind, "meta": meta, "text": text, "end_meta": end_meta}}
    name, data = step["event"], step.get("data", {})
    if (
        not isinstance(name, str)
        or not name
        or name in _ENGINE_EVENTS
        or len(name) > 128
        or any(c in name for c in "\r\n\0")
    ):
        raise InputError(
            f"{where}.event must be an event name of at most 128 characters without CR, LF or "
            "NUL, and not one the engine sends"
        )
    if not isinstance(data, dict):
        raise InputError(f"{where}.data must be an object")
    replay = step.get("replay", "durable")
    if replay not in ("durable", "latest", "ephemeral"):
        raise InputError(f'{where}.replay must be "durable", "latest" or "ephemeral"')
    return {"event": name, "data": data, "replay": replay}


def validate_script(input: Mapping[str, Any]) -> dict[str, Any]:
    """Check the ``script`` input: ``steps`` (a list), ``chunk_size`` and ``interval_ms``."""
    steps = input.get("steps")
    if not isinstance(steps, list) or len(steps) > MAX_SCRIPT_STEPS:
        raise InputError(f'"steps" must be a list of at most {MAX_SCRIPT_STEPS} steps')
    checked = [_script_step(i, step) for i, step in enumerate(steps)]
    try:
        json.dumps(checked).encode("utf-8")
    except (UnicodeEncodeError, ValueError):
        raise InputError('"steps" must be valid Unicode JSON (no lone surrogates)') from None
    if sum(len(s["block"]["text"]) for s in checked if "block" in s) > MAX_DEMO_TEXT:
        raise InputError(f"the steps' text must be at most {MAX_DEMO_TEXT} characters in all")
    return {
        "steps": checked,
        "chunk_size": _int_field(input, "chunk_size", 8, 1, 1_000_000),
        "interval_ms": _int_field(input, "interval_ms", 30, 0, 60_000),
    }


def run_script(
    ctx: ProducerContext,
    steps: list[dict[str, Any]],
    size: int,
    interval_ms: int,
    answer: list[str] | None = None,
) -> int:
    """Play ``steps`` (see :func:`validate_script`) into the stream; return the blocks sent.

    The text of ``text`` blocks is appended to ``answer`` chunk by chunk, once it is sent.
    """
    interval = interval_ms / 1000
    blocks = sent = 0
    try:
        for step in steps:
            if "event" in step:
                ctx.send(step["event"], step["data"], replay=step["replay"])
                continue
            spec = step["block"]
            block = ctx.block(spec["kind"], spec["meta"])
            text: str = spec["text"]
            for start in range(0, len(text), size):
                block.write(text[start : start + size])
                if answer is not None and block.kind == "text":
                    answer.append(text[start : start + size])
                sent += 1
                if interval:
                    ctx.sleep(interval)
                elif sent % 64 == 0:
                    gevent.sleep(0)  # let readers run during a long burst
            block.end(spec["end_meta"])
            blocks += 1
    except ValueError as exc:  # a bound of the stream (SSE_MAX_DURABLE_EVENTS, meta size)
        raise ProducerError(str(exc)) from None
    return blocks


@sse.producer("script", validate=validate_script)
def script(ctx: ProducerContext) -> dict[str, Any]:
    """A stand-in for an agent's turn: plays the typed blocks and events of ``steps``."""
    blocks = run_script(ctx, ctx.input["steps"], ctx.input["chunk_size"], ctx.input["interval_ms"])
    return {"blocks": blocks, "steps": len(ctx.input["steps"])}


def compose_reply(prompt: str) -> str:
    """The stand-in LLM's answer: deterministic, a few paragraphs, so tests can check it."""
    topic = " ".join(prompt.split()[:8]) or "that"
    return (
        f"You asked: \u201c{topic}\u201d. Here is how I would think about it.\n\n"
        "A reply like this one is written by a producer that runs on its own greenlet, "
        "detached from the request that started it. Every reader follows the same buffer.\n\n"
        "If your connection drops, the browser reconnects with the id of the last event it "
        "saw and catches up exactly: finished paragraphs arrive whole, the rest as deltas.\n\n"
        "When the stream ends, the app saves this message, so it is here after a reload too."
    )


def compose_turn(prompt: str) -> list[dict[str, Any]]:
    """The stand-in agent's whole turn for ``prompt``, as ``script`` steps: it reasons, calls a
    search tool (streamed JSON arguments), reads the result, answers and cites its source."""
    topic = " ".join(prompt.split()[:8]) or "that"
    query = {"query": f"resumable streams {topic}"[:120]}
    source = {
        "title": "Server-sent events (HTML Living Standard)",
        "url": "https://html.spec.whatwg.org/multipage/server-sent-events.html",
    }
    call = {"name": "search", "call_id": "call_1"}
    return [
        {"event": "status", "data": {"phase": "thinking"}, "replay": "latest"},
        {"block": {"kind": "reasoning", "meta": {}, "end_meta": {}, "text": (
            f"The user asks about \u201c{topic}\u201d. I should check how resumable streams "
            "behave when a connection drops, then answer in a few short paragraphs."
        )}},
        {"event": "status", "data": {"phase": "searching"}, "replay": "latest"},
        {"block": {"kind": "tool_call", "meta": call, "text": json.dumps(query),
                   "end_meta": {"input": query}}},
        {"block": {"kind": "tool_result", "meta": {"call_id": "call_1"}, "end_meta": {},
                   "text": json.dumps({"results": [source]})}},
        {"event": "status", "data": {"phase": "writing"}, "replay": "latest"},
        *[
            {"block": {"kind": "text", "meta": {}, "end_meta": {}, "text": paragraph}}
            for paragraph in split_blocks(compose_reply(prompt))
        ],
        {"event": "citation", "data": {"index": 1, **source}, "replay": "durable"},
        {"event": "usage", "data": {"input_tokens": len(prompt.split()), "output_tokens": 96},
         "replay": "durable"},
    ]  # fmt: skip


def validate_chat(input: Mapping[str, Any]) -> Mapping[str, Any]:
    if not isinstance(input.get("store"), ChatStore) or not isinstance(
        input.get("message_id"), int
    ):
        raise InputError("chat replies are started by POST /chat/conversations/<id>/messages")
    return {
        **input,
        "chunk_size": _int_field(input, "chunk_size", 4, 1, 1000),
        "interval_ms": _int_field(input, "interval_ms", 25, 0, 10_000),
    }


def reply(ctx: ProducerContext, messages: list[dict[str, str]], sent: list[str]) -> dict[str, Any]:
    """The assistant's turn after ``messages``: the configured model's, or the stand-in's. The
    answer's text is appended to ``sent`` (the stand-in's chunk by chunk)."""
    assistant: Assistant | None = ctx.input.get("assistant")
    if assistant is not None and assistant.provider is not None:
        result = assistant.reply(ctx, messages)
        sent.append(result.text)
        return dict(result)
    prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    size, interval = ctx.input["chunk_size"], ctx.input["interval_ms"]
    run_script(ctx, compose_turn(prompt), size, interval, sent)
    return {}


@sse.producer("chat", validate=validate_chat)
def chat(ctx: ProducerContext) -> dict[str, Any]:
    """Write the assistant's turn for ``prompt``; save its answer as message ``message_id``."""
    store: ChatStore = ctx.input["store"]
    message_id: int = ctx.input["message_id"]
    history = ctx.input.get("history") or [{"role": "user", "content": str(ctx.input["prompt"])}]
    sent: list[str] = []
    state = "error"
    done: dict[str, Any] = {}
    try:
        done = reply(ctx, history, sent)
        state = "done"
    except StreamClosed:
        state = "cancelled"
        raise
    finally:  # saved when the stream ends, however it ends; no transaction held meanwhile
        store.update_message(message_id, content="".join(sent), state=state)
    return {**done, "message_id": message_id}


MAX_AI_MESSAGES = 200
_CHAT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")


def ui_messages(value: Any) -> list[dict[str, str]]:
    """The AI SDK's ``UIMessage`` list as ``{"role", "content"}`` (their text parts)."""
    if not isinstance(value, list) or not 0 < len(value) <= MAX_AI_MESSAGES:
        raise InputError(f'"messages" must be a list of 1 to {MAX_AI_MESSAGES} messages')
    out = []
    for message in value:
        role = message.get("role") if isinstance(message, dict) else None
        parts = message.get("parts") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant") or not isinstance(parts, list):
            raise InputError('each message must have a "role" and a list of "parts"')
        text = "".join(
            p["text"] for p in parts
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )  # fmt: skip
        if len(text) > 100_000:
            raise InputError("a message's text must be at most 100000 characters")
        out.append({"role": role, "content": text})
    if out[-1]["role"] != "user":
        raise InputError("the last message must be the user's")
    return out


def validate_assistant(input: Mapping[str, Any]) -> Mapping[str, Any]:
    return {
        **input,
        "messages": ui_messages(input.get("messages")),
        "chunk_size": _int_field(input, "chunk_size", 4, 1, 1000),
        "interval_ms": _int_field(input, "interval_ms", 25, 0, 10_000),
    }


@sse.producer("assistant", validate=validate_assistant)
def assistant_reply(ctx: ProducerContext) -> dict[str, Any]:
    """The reply to an AI SDK chat's ``messages``."""
    return reply(ctx, ctx.input["messages"], [])


def validate_progress(input: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "steps": _int_field(input, "steps", 20, 1, 1000),
        "interval_ms": _int_field(input, "interval_ms", 100, 0, 60_000),
    }


@sse.producer("progress", validate=validate_progress)
def progress(ctx: ProducerContext) -> dict[str, Any]:
    """A long job: ``progress`` events with a percentage, then ``done`` with a result."""
    steps: int = ctx.input["steps"]
    for step in range(1, steps + 1):
        ctx.sleep(ctx.input["interval_ms"] / 1000)
        percent = round(100 * step / steps)
        # Only the newest progress matters to a client that resumes: "latest", not one stored
        # row per step.
        ctx.send(
            "progress",
            {"percent": percent, "message": f"step {step} of {steps}"},
            replay="latest",
        )
    return {"result": f"processed {steps} items"}


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the reference app; ``config`` overrides the environment (``FLASK_*``)."""
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_prefixed_env()
    if config:
        app.config.update(config)
    if not app.config.get("SSE_DATABASE_URL"):
        # One database for the app's tables and the library's, as a real app would have.
        os.makedirs(app.instance_path, exist_ok=True)
        app.config["SSE_DATABASE_URL"] = "sqlite:///" + os.path.join(
            app.instance_path, "app.sqlite3"
        )
    sse.init_app(app, url_prefix="/api")
    store = app.extensions["chat_store"] = ChatStore(app.config["SSE_DATABASE_URL"])
    assistant = app.extensions["chat_assistant"] = Assistant.from_config(app.config)

    @app.get("/")
    def index() -> str:
        return render_template("index.html", conversations=store.conversations())

    @app.get("/chat/conversations")
    def list_conversations() -> dict[str, Any]:
        return {"conversations": store.conversations()}

    @app.post("/chat/conversations")
    def create_conversation() -> tuple[dict[str, Any], int]:
        body = request.get_json(silent=True) or {}
        title = body.get("title") if isinstance(body, dict) else None
        return store.create_conversation(title if isinstance(title, str) else "New chat"), 201

    @app.get("/chat/conversations/<int:conversation_id>")
    def show_conversation(conversation_id: int) -> dict[str, Any]:
        conversation = store.conversation(conversation_id)
        if conversation is None:
            abort(404)
        return conversation

    @app.post("/chat/conversations/<int:conversation_id>/messages")
    def post_message(conversation_id: int) -> tuple[dict[str, Any], int]:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            body = {}
        text = body.get("text")
        if not isinstance(text, str) or not text.strip() or len(text) > 10_000:
            return {"error": '"text" must be a non-empty string (at most 10000 characters)'}, 400
        saved = store.add_exchange(conversation_id, text.strip())
        if saved is None:
            return {"error": "conversation not found"}, 404
        user, reply_id, history = saved
        options = {k: body[k] for k in ("chunk_size", "interval_ms") if k in body}
        input = {"prompt": text, "message_id": reply_id, "store": store, "history": history}
        try:
            stream = sse.start("chat", {**input, "assistant": assistant, **options})
        except InputError as exc:
            store.update_message(reply_id, state="error")
            return {"error": str(exc)}, 400
        except StreamLimitReached:
            store.update_message(reply_id, state="error")
            return {"error": "too many replies in progress; retry shortly"}, 503
        store.update_message(reply_id, stream_id=stream.id)
        return {
            "user": user,
            "reply": {"id": reply_id, "stream_id": stream.id},
            "stream_url": f"/api/streams/{stream.id}",
        }, 201

    # -- the two routes the AI SDK's useChat calls (DefaultChatTransport, api="/ai/chat") --

    @app.post("/ai/chat")
    def ai_chat() -> Any:
        """Send a message: starts the reply and answers with its UI message stream."""
        body = request.get_json(silent=True)  # JSON only: a form cannot post here (CSRF)
        if not isinstance(body, dict):
            return {"error": "send a JSON object with the chat's id and messages"}, 400
        chat_id = body.get("id")
        if not isinstance(chat_id, str) or not _CHAT_ID.match(chat_id):
            return {"error": '"id" must be 1 to 64 letters, digits, "_" or "-"'}, 400
        options = {k: body[k] for k in ("chunk_size", "interval_ms") if k in body}
        try:
            stream = sse.start(
                "assistant", {"messages": body.get("messages"), "assistant": assistant, **options}
            )
        except InputError as exc:
            return {"error": str(exc)}, 400
        except StreamLimitReached:
            return {"error": "too many replies in progress; retry shortly"}, 503
        store.set_active_stream(chat_id, stream.id)
        return sse.stream_response(stream.id, format="ai-sdk")

    @app.get("/ai/chat/<chat_id>/stream")
    def ai_chat_stream(chat_id: str) -> Any:
        """Resume: the chat's reply from its start while it runs; ``204`` when none runs."""
        stream_id = store.active_stream(chat_id) if _CHAT_ID.match(chat_id) else None
        if stream_id is None or not sse.active([stream_id]).get(stream_id):
            return "", 204
        return sse.stream_response(stream_id, format="ai-sdk")

    @app.errorhandler(404)
    def not_found(error: Exception) -> tuple[dict[str, str], int]:
        return {"error": "not found"}, 404

    return app


app = create_app()
