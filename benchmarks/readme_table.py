"""Copy ``benchmarks/results/results.md`` into the README between its results markers."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    readme = ROOT / "README.md"
    text = readme.read_text()
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    body = (ROOT / "benchmarks" / "results" / "results.md").read_text()
    body = body.replace("# Benchmark results\n", "").replace("\n## ", "\n### ")
    readme.write_text(f"{head}{begin}\n{body.strip()}\n{end}{tail}")
