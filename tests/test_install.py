"""A new user's first hour: the package installed alone into a fresh virtualenv, and the README's
own "Register the blueprint in your own Flask app" example served by ``gunicorn -k gevent``.

No extras, no development tools, none of this repository's modules on the path: what ``pip
install sse-blueprint`` gives a user. (A clean install once could not start the gevent worker:
gunicorn's worker imports ``packaging``, which only gunicorn's ``gevent`` extra brings.)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port, janitor, read_stream

README = ROOT / "README.md"


def readme_example() -> str:
    """The first Python block of the README's section on registering the blueprint."""
    text = README.read_text()
    section = text.split("## Register the blueprint in your own Flask app", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README lost its example"
    return match.group(1)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with ``pip install <repo>`` and nothing else."""
    home = tmp_path_factory.mktemp("clean-install")
    subprocess.run([sys.executable, "-m", "venv", str(home / "venv")], check=True, timeout=120)
    pip = [str(home / "venv/bin/python"), "-m", "pip", "install", "-q"]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    # From a copy of the sources, as a user's clone: building in place would leave build/ here.
    source = home / "sse-blueprint"
    skip = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".*cache")
    shutil.copytree(ROOT, source, ignore=skip)
    subprocess.run([*pip, str(source)], check=True, timeout=600, env=env, cwd=home)
    (home / "app").mkdir()
    (home / "app/myapp.py").write_text(readme_example())
    return home


@contextlib.contextmanager
def gunicorn(
    venv: Path, *args: str, wait_up: bool = True
) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """``gunicorn -k gevent myapp:app`` as the README says, from the app's own folder."""
    port = free_port()
    log = venv / f"gunicorn-{port}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASK_") and k != "PYTHONPATH"}
    env["GEVENT_MONITOR_THREAD_ENABLE"] = "1"
    cmd = [str(venv / "venv/bin/gunicorn"), "-k", "gevent", "--bind", f"127.0.0.1:{port}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, *args, "myapp:app"], cwd=venv / "app", env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    janitor.started("group", proc.pid)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while wait_up and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(url + "/api/streams/x", timeout=2)
                break
            time.sleep(0.1)
        yield url, proc, log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=40)
        janitor.stopped("group", proc.pid)


def test_a_clean_install_serves_the_readme_example_with_the_gevent_worker(venv: Path) -> None:
    assert list((venv / "venv/lib").glob("python*/site-packages/sse_blueprint"))
    assert not list((venv / "venv/lib").glob("python*/site-packages/models"))  # not ours to claim
    with gunicorn(venv, "--workers", "1") as (url, _, log):
        response = httpx.post(
            f"{url}/api/streams", json={"producer": "reply", "input": {"prompt": "hi"}}
        )
        assert response.status_code == 201, log.read_text()
        result = read_stream(url, response.json()["stream_id"])
        assert result.events[0].type == "start"
        assert result.transcript.text() == "You said: hi\n\nThat is all."
        assert result.transcript.terminal == "done"
        refused = httpx.post(f"{url}/api/streams", json={"producer": "reply", "input": {}})
        assert refused.status_code == 400
    assert "Traceback" not in log.read_text()


def test_several_workers_without_redis_are_refused(venv: Path) -> None:
    """``-w 2`` without SSE_REDIS_URL in an app of one's own (no reference gunicorn.conf.py):
    every request under the blueprint is refused with a message that says what to do, so no
    worker can end as "lost" a stream that another worker is running."""
    with gunicorn(venv, "--workers", "2") as (url, _, log):
        for _ in range(6):  # whichever worker takes it
            response = httpx.post(
                f"{url}/api/streams", json={"producer": "reply", "input": {"prompt": "hi"}}
            )
            assert response.status_code == 500
            assert "SSE_REDIS_URL" in response.json()["error"]
            status = httpx.get(f"{url}/api/streams/AAAAAAAAAAAAAAAAAAAAAA/status")
            assert status.status_code == 500
    assert "Traceback" not in log.read_text()
    assert "several worker processes" in log.read_text()


def test_the_gunicorn_hooks_refuse_to_boot_several_workers_without_redis(venv: Path) -> None:
    """With the README's hooks in a config of one's own, gunicorn stops at once instead."""
    conf = venv / "app/hooks.conf.py"
    conf.write_text(
        "def post_worker_init(worker):\n"
        "    from sse_blueprint.gunicorn import post_worker_init\n"
        "    post_worker_init(worker)\n"
    )
    with gunicorn(venv, "-c", str(conf), "--workers", "2", wait_up=False) as (_, proc, log):
        assert proc.wait(timeout=30) != 0
    assert "SSE_REDIS_URL" in log.read_text()
