"""py-spy on a benchmark's server while it runs, and a summary of where its samples went.

``BENCH_PYSPY=DIR python -m benchmarks.run --only chat ...`` records each of ours' workers
during every chat run (``DIR/<row>.txt``: py-spy's collapsed stacks), and prints the summary.
``python -m benchmarks.spy FILE...`` prints it again. Needs ``py-spy`` (``pip install py-spy``);
the benchmark itself does not.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["record", "summary"]


def record(pids: list[int], seconds: float, out: Path) -> list[subprocess.Popen[bytes]]:
    """Start py-spy on each of ``pids`` for ``seconds``; wait for the returned processes."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out.parent.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(max(1, int(seconds))),
                "--rate",
                "200",
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                f"{out}.{pid}" if len(pids) > 1 else str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid in pids
    ]


#: Where a frame comes from, for grouping: the first pattern its file matches.
GROUPS = [
    ("sse_blueprint persistence", r"sse_blueprint/(storage|engine/persister)"),
    ("sse_blueprint redis", r"sse_blueprint/backends/redis"),
    ("sse_blueprint other", r"sse_blueprint/"),
    ("redis-py", r"^(.*/)?redis/"),
    ("sqlalchemy", r"^(.*/)?sqlalchemy/"),
    ("psycopg", r"^(.*/)?psycopg"),
    ("sqlite3", r"^(.*/)?sqlite3/"),
    ("gunicorn", r"^(.*/)?gunicorn/"),
    ("werkzeug/flask", r"^(.*/)?(werkzeug|flask)/"),
    ("gevent", r"^(.*/)?gevent/"),
    ("the benchmark app", r"^(.*/)?benchmarks/"),
]


def _frames(stack: str) -> list[tuple[str, str]]:
    """``function (file:line)`` frames of a collapsed stack, outermost first: (function, file)."""
    frames = []
    for frame in stack.split(";"):
        m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
        frames.append((m.group(1), m.group(2)) if m else (frame, ""))
    return frames


def summary(paths: list[Path], top: int = 25) -> str:
    """Samples by group (of the innermost frame that belongs to one: self time), and the
    functions of ours with the most samples under them (inclusive)."""
    groups: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for path in paths:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = _frames(stack)
            group = "other"
            for _, file in reversed(frames):
                found = next((g for g, pat in GROUPS if re.search(pat, file)), None)
                if found:
                    group = found
                    break
            groups[group] += n
            seen = set()
            for func, file in frames:
                if file.startswith(("sse_blueprint/", "redis/")):
                    key = f"{file}:{func}"
                    if key not in seen:
                        seen.add(key)
                        inclusive[key] += n
    lines = [f"{total} samples"]
    lines += [f"  {n / total:6.1%}  {g}" for g, n in groups.most_common()]
    lines.append("under (inclusive):")
    lines += [f"  {n / total:6.1%}  {k}" for k, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(summary(args.files, args.top))


if __name__ == "__main__":
    main()
