"""The reference chat's language model: a real one when the app is configured for it.

``OPENAI_API_KEY`` / ``OPENAI_BASE_URL`` (any OpenAI-compatible server: vLLM, Ollama, LiteLLM, …)
or ``ANTHROPIC_API_KEY`` (and ``ANTHROPIC_BASE_URL``), as Flask config keys (``FLASK_…``) or plain
environment variables, and ``CHAT_MODEL`` for the model's name. With none of them the app uses
its stand-in, so ``make run`` works offline. The SDKs are imported only when configured.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from sse_blueprint import ProducerContext
from sse_blueprint.relays import RelayResult, relay_chat_completions, relay_messages

__all__ = ["Assistant"]

DEFAULT_OPENAI_MODEL = "gpt-4o-mini"
DEFAULT_ANTHROPIC_MODEL = "claude-sonnet-4-5"
MAX_TOKENS = 4096


def _setting(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key) or os.environ.get(key)
    return str(value) if value else None


class Assistant:
    """Who writes the chat's replies: ``provider`` is ``"openai"``, ``"anthropic"`` or None."""

    def __init__(self, provider: str | None = None, client: Any = None, model: str = "") -> None:
        self.provider = provider
        self.client = client
        self.model = model

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Assistant:
        model = _setting(config, "CHAT_MODEL")
        openai_key, openai_url = (
            _setting(config, "OPENAI_API_KEY"),
            _setting(config, "OPENAI_BASE_URL"),
        )
        if openai_key or openai_url:
            import openai

            # A local server often needs no key, but the SDK insists on one.
            openai_client = openai.OpenAI(api_key=openai_key or "unused", base_url=openai_url)
            return cls("openai", openai_client, model or DEFAULT_OPENAI_MODEL)
        anthropic_key = _setting(config, "ANTHROPIC_API_KEY")
        if anthropic_key:
            import anthropic

            url = _setting(config, "ANTHROPIC_BASE_URL")
            client = anthropic.Anthropic(api_key=anthropic_key, base_url=url)
            return cls("anthropic", client, model or DEFAULT_ANTHROPIC_MODEL)
        return cls()

    def reply(self, ctx: ProducerContext, messages: list[dict[str, str]]) -> RelayResult:
        """Stream the model's answer to ``messages`` (``{"role", "content"}``) into the turn."""
        if self.provider == "openai":
            return relay_chat_completions(ctx, self.client, model=self.model, messages=messages)
        if self.provider == "anthropic":
            system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
            chat = [m for m in messages if m["role"] != "system"]
            extra: dict[str, Any] = {"system": system} if system else {}
            return relay_messages(
                ctx, self.client, model=self.model, max_tokens=MAX_TOKENS, messages=chat, **extra
            )
        raise RuntimeError("no language model is configured")

    def __repr__(self) -> str:
        return f"Assistant(provider={self.provider!r}, model={self.model!r})"
