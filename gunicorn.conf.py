"""gunicorn settings for the reference app (command-line flags such as --bind override these).

gunicorn -c gunicorn.conf.py app:app
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile

wsgi_app = "app:app"
bind = [os.environ.get("SSE_BIND", "127.0.0.1:8000")]
worker_class = "gevent"
# With the in-process backend, streams live in one worker: keep one unless SSE_REDIS_URL is set.
workers = int(os.environ.get("SSE_WORKERS", "1"))
# Each open EventSource is a connection: size for thousands of streams per worker.
worker_connections = 10_000
# Seconds a worker may be silent before the arbiter restarts it (gevent workers notify while idle).
timeout = 30
# Seconds workers get to finish on SIGTERM/restart before they are killed.
graceful_timeout = 30
# Longer than a load balancer's idle timeout (60 s on AWS ALB), so the balancer, not gunicorn,
# closes idle connections; at shutdown sse_blueprint.gunicorn closes them at once.
keepalive = 75
preload_app = False  # the gevent worker must monkey-patch before the app is imported
accesslog = "-" if os.environ.get("SSE_ACCESS_LOG") else None
_made_dirs: list[str] = []


def on_starting(server: object) -> None:
    """Refuse several workers without Redis; give Prometheus a directory shared by the workers."""
    workers = getattr(getattr(server, "cfg", None), "workers", 1)
    if workers > 1 and not os.environ.get("FLASK_SSE_REDIS_URL"):
        raise SystemExit(
            f"sse-blueprint: {workers} workers need a shared backend. Set FLASK_SSE_REDIS_URL "
            "(e.g. redis://127.0.0.1:6379/0) or run one gevent worker (--workers 1)."
        )
    if os.environ.get("FLASK_SSE_METRICS", "").lower() in ("1", "true", "yes"):
        # Each worker writes its metrics to files here; the endpoint sums them (any worker).
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="sse-metrics-")
            _made_dirs.append(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        for stale in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
            os.remove(stale)  # values of an earlier run


def child_exit(server: object, worker: object) -> None:
    """A worker's gauges (streams, clients) stop counting when it exits."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:  # what prometheus_client.multiprocess.mark_process_dead does
        pid = getattr(worker, "pid", 0)
        for path in glob.glob(os.path.join(directory, f"gauge_live*_{pid}.db")):
            os.remove(path)


def on_exit(server: object) -> None:
    for directory in _made_dirs:
        shutil.rmtree(directory, ignore_errors=True)


def post_worker_init(worker: object) -> None:
    """Graceful shutdown: see sse_blueprint.gunicorn (imported here, after gevent patched)."""
    from sse_blueprint.gunicorn import post_worker_init

    post_worker_init(worker)


def worker_exit(server: object, worker: object) -> None:
    from sse_blueprint.gunicorn import worker_exit

    worker_exit(server, worker)
