"""The reference app plus relay producers aimed at the local upstream (``FLASK_RELAY_UPSTREAM``).

Each producer relays the model named in its input through the official SDK, with the test's
``retries`` and ``stall_timeout``; the SDK clients carry :data:`tests.helpers.upstream.SECRET_KEY`.
"""

from __future__ import annotations

import os
from typing import Any

import anthropic
import openai

from app import create_app, sse
from sse_blueprint import ProducerContext
from sse_blueprint.relays import (
    RelayResult,
    relay_chat_completions,
    relay_messages,
    relay_responses,
)
from tests.helpers.upstream import SECRET_KEY

UPSTREAM = os.environ.get("FLASK_RELAY_UPSTREAM", "http://127.0.0.1:9")
openai_client = openai.OpenAI(base_url=UPSTREAM + "/v1", api_key=SECRET_KEY)
anthropic_client = anthropic.Anthropic(base_url=UPSTREAM, api_key=SECRET_KEY)
HELLO = [{"role": "user", "content": "hello"}]


def _options(ctx: ProducerContext) -> dict[str, Any]:
    return {
        "model": str(ctx.input["model"]),
        "retries": int(ctx.input.get("retries", 2)),
        "stall_timeout": float(ctx.input.get("stall_timeout", 10)),
    }


@sse.producer("relay_chat")
def relay_chat(ctx: ProducerContext) -> RelayResult:
    return relay_chat_completions(ctx, openai_client, messages=HELLO, **_options(ctx))


@sse.producer("relay_chat_brief", timeout=0.5)
def relay_chat_brief(ctx: ProducerContext) -> RelayResult:
    """As ``relay_chat``, ended by a 0.5 s stream timeout."""
    return relay_chat_completions(ctx, openai_client, messages=HELLO, **_options(ctx))


@sse.producer("relay_responses")
def relay_responses_(ctx: ProducerContext) -> RelayResult:
    return relay_responses(ctx, openai_client, input="hello", **_options(ctx))


@sse.producer("relay_messages")
def relay_messages_(ctx: ProducerContext) -> RelayResult:
    return relay_messages(ctx, anthropic_client, max_tokens=1024, messages=HELLO, **_options(ctx))


app = create_app()
