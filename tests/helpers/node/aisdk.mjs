// The Vercel AI SDK's own client against our server: the npm `ai` package's chat transport,
// UI message stream reader and Chat (what `useChat` runs), printing one JSON line.
// Usage: node aisdk.mjs '{"mode": ..., ...}'
//   read:   {"url"}: read a UI message stream (GET) to its end; {"message"} is what the SDK built.
//   chat:   {"api", "chatId", "text", "body", "stopWhen"}: send a message with a Chat; when its
//           reply first shows `stopWhen` ("text" or "tool-input"), stop (a closed tab) and
//           resume in a new Chat holding what the first one had (a reload, resume: true).
//           {"first", "resumed", "status"}.
//   resume: {"api", "chatId"}: a Chat resuming that chat's stream; {"messages", "status"}.
import { AbstractChat, DefaultChatTransport, readUIMessageStream } from "ai";

const args = JSON.parse(process.argv[2]);
const out = (value) => {
  process.stdout.write(JSON.stringify(value) + "\n");
  process.exit(0);
};
setTimeout(() => out({ timeout: true }), 45000);

class PlainState {
  constructor(messages = [], onChange = () => {}) {
    this.messages = messages;
    this.status = "ready";
    this.error = undefined;
    this.onChange = onChange;
  }
  pushMessage(message) {
    this.messages = this.messages.concat(message);
    this.onChange(this.messages);
  }
  popMessage() {
    this.messages = this.messages.slice(0, -1);
  }
  replaceMessage(index, message) {
    this.messages = [...this.messages.slice(0, index), message, ...this.messages.slice(index + 1)];
    this.onChange(this.messages);
  }
  snapshot(value) {
    return structuredClone(value);
  }
}

class Chat extends AbstractChat {
  constructor({ messages, onChange, ...init }) {
    super({ ...init, state: new PlainState(messages, onChange) });
  }
}

const showing = (messages, what) => {
  const last = messages[messages.length - 1];
  if (!last || last.role !== "assistant") return false;
  return last.parts.some((part) =>
    what === "text"
      ? part.type === "text" && part.state === "streaming" && part.text.length > 0
      : part.type.startsWith("tool-") && part.state === "input-streaming",
  );
};

async function main() {
  if (args.mode === "read") {
    const transport = new DefaultChatTransport({
      prepareReconnectToStreamRequest: () => ({ api: args.url }),
    });
    const stream = await transport.reconnectToStream({ chatId: "any" });
    if (stream === null) return out({ none: true });
    let message = null;
    for await (const snapshot of readUIMessageStream({ stream })) message = snapshot;
    return out({ message });
  }
  const transport = new DefaultChatTransport({ api: args.api, body: args.body ?? {} });
  const errors = [];
  if (args.mode === "resume") {
    const chat = new Chat({ id: args.chatId, transport, messages: args.messages ?? [],
                            onError: (e) => errors.push(String(e)) });
    await chat.resumeStream();
    return out({ messages: chat.messages, status: chat.status, errors });
  }
  let stopped = false;
  let first = null;
  const onChange = (messages) => {
    if (!stopped && args.stopWhen && showing(messages, args.stopWhen)) {
      stopped = true;
      first.stop();
    }
  };
  first = new Chat({ id: args.chatId, transport, onChange, onError: (e) => errors.push(String(e)) });
  await first.sendMessage({ text: args.text });
  const kept = structuredClone(first.messages);
  const second = new Chat({ id: args.chatId, transport, messages: kept,
                            onError: (e) => errors.push(String(e)) });
  await second.resumeStream();
  out({ first: kept, stopped, resumed: second.messages, status: second.status, errors });
}

main().catch((error) => out({ failed: String(error && error.stack || error) }));
