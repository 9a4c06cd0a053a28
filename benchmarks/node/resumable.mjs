// vercel's resumable-stream (npm) on Node, the chat shape: what users compare us with for
// "resumable streams on Redis". One producer per stream, made by the stream's first reader's
// request (resumable-stream's design); every further reader resumes through Redis Pub/Sub.
//
//   node resumable.mjs PORT REDIS_URL
//
// GET /chat/<k> follows stream k; POST /publish_chat?tokens=&rate= starts every stream's
// producer. Events are SSE text of the same shape as the other servers' (id, text_delta,
// {"t", "n", "block", "text"}), no persistence (resumable-stream has none).

import http from "node:http";
import { createClient } from "redis";
import { createResumableStreamContext } from "resumable-stream";

const [port, redisUrl] = process.argv.slice(2);
const publisher = createClient({ url: redisUrl });
const subscriber = createClient({ url: redisUrl });
await publisher.connect();
await subscriber.connect();
const context = createResumableStreamContext({
  waitUntil: null, // a server: nothing suspends the process
  publisher,
  subscriber,
  keyPrefix: `bench-${process.pid}-${Date.now()}`,
});

let go;
const started = new Promise((resolve) => (go = resolve));
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const now = () => (performance.timeOrigin + performance.now()) / 1000;

function chat() {
  return new ReadableStream({
    async start(controller) {
      const { tokens, rate } = await started;
      const began = performance.now();
      for (let n = 0; n < tokens; n++) {
        const data = JSON.stringify({ t: now(), n, block: Math.floor(n / 80), text: "tok " });
        controller.enqueue(`id: ${n + 1}\nevent: text_delta\ndata: ${data}\n\n`);
        await sleep(Math.max(0, began + ((n + 1) * 1000) / rate - performance.now()));
      }
      controller.close();
    },
  });
}

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, "http://x");
  if (req.method === "POST" && url.pathname === "/publish_chat") {
    go({ tokens: Number(url.searchParams.get("tokens")), rate: Number(url.searchParams.get("rate")) });
    res.writeHead(200, { "content-type": "application/json" }).end("{}");
    return;
  }
  if (!url.pathname.startsWith("/chat/")) {
    res.writeHead(404).end();
    return;
  }
  const stream = await context.resumableStream(url.pathname.slice(6), chat);
  res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
  res.write("retry: 2000\n\n");
  if (stream === null) {
    res.end();
    return;
  }
  try {
    for await (const chunk of stream) res.write(chunk);
  } finally {
    res.end();
  }
});
server.listen(Number(port), "127.0.0.1");
