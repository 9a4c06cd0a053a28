import json

import openai
from flask import Flask

from sse_blueprint import SSE
from sse_blueprint.relays import relay_chat_completions

client = openai.OpenAI()  # OPENAI_API_KEY; OPENAI_BASE_URL for vLLM, Ollama, LiteLLM, ...
MODEL = "gpt-4o-mini"
sse = SSE()


@sse.producer("chat")
def chat(ctx):
    # {"producer": "chat", "input": {"messages": [{"role": "user", "content": "Hi!"}]}}
    return relay_chat_completions(ctx, client, model=MODEL, messages=ctx.input["messages"])


def get_weather(city):
    return {"city": city, "temp_c": 21}


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city, now",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@sse.producer("agent")
def agent(ctx):
    messages = list(ctx.input["messages"])
    for _ in range(5):  # at most five model calls in one turn
        result = relay_chat_completions(ctx, client, model=MODEL, messages=messages, tools=TOOLS)
        if not result.tool_calls:
            break
        messages.append(result.assistant)  # the reply, with its tool calls
        for call in result.tool_calls:
            output = json.dumps(get_weather(**(call.input or {})))
            with ctx.block("tool_result", {"call_id": call.id}) as block:
                block.write(output)  # the client sees the result as a block of the turn
            messages.append({"role": "tool", "tool_call_id": call.id, "content": output})
    return result  # the done event's data: finish_reason, usage, model


app = Flask(__name__)
app.config.from_prefixed_env()
sse.init_app(app)
