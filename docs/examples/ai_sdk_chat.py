import openai
from flask import Flask, request

from sse_blueprint import SSE
from sse_blueprint.relays import relay_chat_completions

client = openai.OpenAI()
sse = SSE()
replies = {}  # chat id -> the stream writing its reply (in your database with several workers)


@sse.producer("reply")
def reply(ctx):
    return relay_chat_completions(ctx, client, model="gpt-4o-mini", messages=ctx.input["messages"])


app = Flask(__name__)
app.config.from_prefixed_env()
sse.init_app(app, url_prefix="/api")


def text_of(message):  # an AI SDK UIMessage's text parts
    return "".join(part["text"] for part in message["parts"] if part["type"] == "text")


@app.post("/api/chat")  # useChat's sendMessage: answer with the reply's UI message stream
def send():
    body = request.get_json(silent=True) or {}
    messages = [{"role": m["role"], "content": text_of(m)} for m in body.get("messages", [])]
    if not messages or not isinstance(body.get("id"), str):
        return {"error": "send the chat's id and messages"}, 400
    stream = sse.start("reply", {"messages": messages})
    replies[body["id"]] = stream.id
    return sse.stream_response(stream.id, format="ai-sdk")


@app.get("/api/chat/<chat_id>/stream")  # useChat's resume: the running reply, from its start
def resume(chat_id):
    stream_id = replies.get(chat_id)
    if stream_id is None or not sse.active([stream_id])[stream_id]:
        return "", 204  # nothing running: useChat keeps the messages it has
    return sse.stream_response(stream_id, format="ai-sdk")
