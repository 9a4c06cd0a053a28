import anthropic
from flask import Flask

from sse_blueprint import SSE
from sse_blueprint.relays import relay_messages

client = anthropic.Anthropic()  # ANTHROPIC_API_KEY
sse = SSE()


@sse.producer("chat")
def chat(ctx):
    return relay_messages(
        ctx,
        client,
        model="claude-sonnet-4-5",
        max_tokens=4096,
        thinking={"type": "enabled", "budget_tokens": 2048},  # a reasoning block, then text
        messages=ctx.input["messages"],
    )


app = Flask(__name__)
app.config.from_prefixed_env()
sse.init_app(app)
