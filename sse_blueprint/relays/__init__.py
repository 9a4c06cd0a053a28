"""Relays: a real model's stream as a producer, through the provider's official SDK.

    import openai
    from sse_blueprint.relays import relay_chat_completions

    client = openai.OpenAI()  # or OpenAI(base_url="http://localhost:11434/v1", api_key="-")

    @sse.producer("chat")
    def chat(ctx):
        return relay_chat_completions(
            ctx, client, model="gpt-4o-mini", messages=ctx.input["messages"]
        )

:func:`relay_chat_completions` (OpenAI Chat Completions and every compatible server),
:func:`relay_responses` (OpenAI Responses) and :func:`relay_messages` (Anthropic Messages) write
the upstream's text, reasoning and tool calls as the turn's typed blocks and return a
:class:`RelayResult`: the ``done`` data, and the tool calls and reply for a tool loop. Cancelling
the stream, or its timeout, closes the upstream connection at once. Install the SDK you use:
``pip install 'sse-blueprint[openai]'`` or ``'sse-blueprint[anthropic]'``.

Imports the engine's producer API; no Flask, and no SDK until the caller passes a client.
"""

from __future__ import annotations

from ._anthropic import relay_messages
from ._openai import relay_chat_completions, relay_responses
from ._relay import RelayResult, ToolCall

__all__ = [
    "RelayResult",
    "ToolCall",
    "relay_chat_completions",
    "relay_messages",
    "relay_responses",
]
