"""Flask-SSE (Redis Pub/Sub, one subscription per client) on the same gunicorn gevent worker."""

from __future__ import annotations

import os

from flask import Flask, request
from flask_sse import sse

from benchmarks.common import dumps, tick

app = Flask(__name__)
app.config["REDIS_URL"] = os.environ["BENCH_REDIS_URL"]
app.register_blueprint(sse, url_prefix="/stream")


@app.post("/publish")
def publish() -> dict[str, int]:
    count, pad = int(request.args["count"]), "x" * int(request.args.get("pad", 0))
    for n in range(count):
        sse.publish(dumps(tick(n, pad)), type="tick", id=n + 1)
    return {"count": count}
