"""The results table (markdown) and the plot (PNG) from ``results.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OURS = "sse-blueprint"


def _ratio(ours: float, peer: float) -> str:
    if not peer or peer != peer:  # zero or NaN
        return "–"
    return f"{ours / peer:.1f}×"


def _fanout_rows(section: dict[str, Any], latency_only: bool = False) -> list[str]:
    ours = section.get(OURS, {})
    rows = [
        "| server | deliveries/s | ours ÷ peer | complete | all delivered in s | p50 ms | p99 ms "
        "| client CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in section.items():
        rate = r["deliveries_per_s"]
        if not ours:
            ratio = "–"  # every row is ours (Redis mode)
        elif name == OURS:
            ratio = "1.0×"
        else:
            ratio = _ratio(ours["deliveries_per_s"], rate)
        rows.append(
            f"| {name} | {rate:,.0f} | {ratio} | {r['completeness'] * 100:.1f} % "
            f"| {r['seconds']:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
            f"| {r.get('client_cpu', float('nan')) * 100:.0f} % |"
        )
    return rows


def markdown(results: dict[str, Any]) -> str:
    n, k = results["clients"], results["events"]
    out = [
        "# Benchmark results",
        "",
        f"Machine: {results['machine']}. Command: `make bench` (`python -m benchmarks.run`).",
        "Every server, every client on 127.0.0.1; one gevent worker unless stated. The same load",
        "client (gevent, `benchmarks/loadclient.py`) reads and verifies every event (sequence",
        "numbers without gap or repeat); *complete* is events verified / events sent.",
        "Latency: the producer's timestamp in the event to the client's receipt.",
        "",
    ]
    if "fanout" in results:
        out += [
            f"## Fan-out: a burst of {k} events to {n} clients, one stream",
            "",
            "Each server's producer yields after each event (`ctx.sleep(0)`, `await",
            "asyncio.sleep(0)`, `gevent.sleep(0)`); Flask-SSE publishes each to Redis.",
            "*ours ÷ peer* is how many times our rate is the peer's. Latency in a burst is",
            "queueing: our producer is never held back by delivery, so its events wait in the",
            "buffer while 1,000 sockets drain; the bare loop stamps an event only after writing",
            "the previous one to every socket. Compare *all delivered in*.",
            "",
            *_fanout_rows(results["fanout"]),
            "",
        ]
    if "paced" in results:
        out += [
            f"## Paced: {k} events at 100 events/s to {n} clients",
            "",
            "Every producer keeps an exact 100 events/s schedule, so each event is one write to",
            "every client. *client CPU* is the load client's share of a core while it reads:",
            "near 100 %, its own queueing is part of the latency (on 2 cores the client and the",
            "server compete), so compare latencies between servers rather than with a target.",
            "",
            *_fanout_rows(results["paced"]),
            "",
        ]
    if "redis" in results:
        out += [
            f"## Redis mode: the burst of {k} events to {n} clients (PostgreSQL for blocks)",
            "",
            *_fanout_rows(results["redis"]),
            "",
        ]
    if "delivery" in results:
        out += [
            "## Delivery modes: 300 events at 50 events/s to 10 clients, one stream",
            "",
            "`SSE_DELIVERY = live` hands an event to readers at once; `durable` only once the",
            "database has it (the stream's writes go one after another, each taking what came",
            "meanwhile). The difference in latency is the price of durable delivery.",
            "",
            *_fanout_rows(results["delivery"]),
            "",
        ]
    if "catchup" in results:
        out += [
            "## Reconnect to first catch-up byte",
            "",
            "From the buffer: resume in the middle of a running stream of 500 buffered events.",
            "From the database: resume from id 1 of a finished stream of 1,000 persisted blocks.",
            "",
            "| database | buffer p50 ms | buffer p99 ms | database p50 ms | database p99 ms |",
            "|---|---:|---:|---:|---:|",
        ]
        for db, r in results["catchup"].items():
            b, d = r["buffer"], r["database"]
            out.append(
                f"| {db} | {b['p50_ms']:.2f} | {b['p99_ms']:.2f} | {d['p50_ms']:.2f} "
                f"| {d['p99_ms']:.2f} |"
            )
        out.append("")
    if "idle" in results:
        out += [
            "## Idle connections held by one worker",
            "",
            "| server | connections | RSS before MB | RSS after MB | KB per connection |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, r in results["idle"].items():
            out.append(
                f"| {name} | {r['connected']:,} | {r['rss_before_mb']:.0f} "
                f"| {r['rss_after_mb']:.0f} | {r['kb_per_connection']:.1f} |"
            )
        out.append("")
    if "chat" in results:
        out += [
            "## The chat shape: many streams, 300 tokens at 30 tokens/s each",
            "",
            "One worker (one process) for every server unless a row says two. Ours: blocks of 80",
            "tokens and a tool call after every third block, every block persisted (SQLite,",
            "PostgreSQL, or Redis or a Redis Cluster with PostgreSQL). The peers send the same",
            "text deltas, with neither blocks nor persistence. On schedule: the 10 s schedule's",
            "length over the time it took (1.0 = on time). Latency: producer to client, per token.",
            "Persist lag: once the readers had everything, how long until every ended block was a",
            "row (0: kept up as blocks ended). Two workers: each counts only its own statements,",
            "so those rows leave out statements, bytes and lag; their server CPU is both workers'.",
            "",
            "Redis Cluster: three primaries on the same two cores, its Redis figures summed over",
            "them. DB CPU: the PostgreSQL server's. Rows come from more than one run where a",
            "run measured only some servers; the runs are listed under the table.",
            "",
            "| server, streams | offered tok/s | delivered tok/s | on schedule | complete "
            "| p50 ms | p99 ms | server CPU µs/token | DB statements/token | DB bytes/token "
            "| DB CPU µs/token | persist lag s | Redis calls/token | Redis CPU µs/token "
            "| RSS KB/stream |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]

        def cell(r: dict[str, Any], key: str, fmt: str) -> str:
            return format(r[key], fmt) if key in r else "–"

        order = ["SQLite", "PostgreSQL", "Redis", "Redis Cluster", "Redis (2 workers)",
                 "Redis Cluster (2 workers)", "bare-gevent", "sse-starlette",
                 "resumable-stream"]  # fmt: skip

        def rank(item: tuple[str, dict[str, Any]]) -> tuple[int, int, int]:
            name = item[0].rsplit(",", 1)[0]
            known = order.index(name) if name in order else len(order)
            return known, item[1]["readers"], item[1]["streams"]

        runs: dict[str, list[str]] = {}
        for key, r in sorted(results["chat"].items(), key=rank):
            runs.setdefault(r.get("run", "the last full run"), []).append(key)
            out.append(
                f"| {key} | {r['offered_tokens_per_s']:,.0f} | {r['delivered_tokens_per_s']:,.0f} "
                f"| {r['on_schedule']:.2f} | {r['completeness'] * 100:.1f} % | {r['p50_ms']:.1f} "
                f"| {r['p99_ms']:.1f} | {r['server_cpu_us_per_token']:.0f} "
                f"| {cell(r, 'db_statements_per_token', '.3f')} "
                f"| {cell(r, 'db_bytes_per_token', '.0f')} "
                f"| {cell(r, 'db_cpu_us_per_token', '.1f')} | {cell(r, 'persist_lag_s', '.2f')} "
                f"| {cell(r, 'redis_commands_per_token', '.1f')} "
                f"| {cell(r, 'redis_cpu_us_per_token', '.1f')} | {r['rss_kb_per_stream']:.0f} |"
            )
        out.append("")
        for run, keys in runs.items():
            names = sorted(
                {k.rsplit(",", 1)[0] for k in keys},
                key=lambda n: rank((n, {"readers": 0, "streams": 0})),
            )
            out.append(f"- {run}: {', '.join(names)} ({len(keys)} rows)")
        out.append("")
    if "encoding_ns" in results:
        enc = results["encoding_ns"]
        ours = enc.get("sse_blueprint_event", 0)
        out += [
            "## Encoding one event (pytest-benchmark, median)",
            "",
            "sse-blueprint encodes an event once per stream; the peers encode once per client.",
            "",
            "| encoder | µs per event | per delivery to 1,000 clients |",
            "|---|---:|---:|",
        ]
        for name, ns in enc.items():
            per = ns / 1000 if name == "sse_blueprint_event" else ns
            out.append(f"| {name} | {ns / 1000:.2f} | {per / 1000:.3f} µs |")
        out.append(f"\n(ours: {ours / 1000:.2f} µs once, shared by every client)\n")
    return "\n".join(out)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [s for s in ("fanout", "paced") if s in results]
    if not sections:
        return
    fig, grid = plt.subplots(
        1, len(sections) + 1, figsize=(5 * (len(sections) + 1), 4), squeeze=False
    )
    axes = list(grid[0])
    for ax, section in zip(axes, sections, strict=False):
        names = list(results[section])
        rates = [results[section][n]["deliveries_per_s"] / 1000 for n in names]
        complete = [results[section][n]["completeness"] for n in names]
        colors = ["#1f77b4" if n == OURS else "#999999" for n in names]
        bars = ax.bar(names, rates, color=colors)
        for bar, c in zip(bars, complete, strict=True):
            ax.annotate(f"{c * 100:.0f} %", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
        title = "burst" if section == "fanout" else "paced 100/s"
        ax.set_title(f"{title}: deliveries/s (thousands)\n(labels: completeness)")
        ax.tick_params(axis="x", rotation=20)
    ax = axes[-1]
    source = results.get("paced") or results.get("fanout") or {}
    names = list(source)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [source[n]["p50_ms"] for n in names], width=0.4,
           color="#aec7e8", label="p50")  # fmt: skip
    ax.bar([x + 0.2 for x in xs], [source[n]["p99_ms"] for n in names], width=0.4,
           color="#1f77b4", label="p99")  # fmt: skip
    ax.set_xticks(list(xs), names)
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("latency, ms (paced)" if "paced" in results else "latency, ms")
    ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"{results['clients']} clients, one stream, one worker — {results['machine']}",
                 fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_chat(results: dict[str, Any], path: Path) -> None:
    """On-schedule ratio and p99 latency against the number of streams, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[int, float, float]]] = {}
    for key, r in results.get("chat", {}).items():
        if r["readers"] != 1:
            continue
        name = key.rsplit(",", 1)[0]
        lines.setdefault(name, []).append((r["streams"], r["on_schedule"], r["p99_ms"]))
    if not lines:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in lines.items():
        points.sort()
        xs = [p[0] for p in points]
        style = "-o" if name.startswith(("SQLite", "PostgreSQL", "Redis")) else "--s"
        label = f"sse-blueprint, {name}" if style == "-o" else name
        left.plot(xs, [p[1] for p in points], style, label=label, markersize=4)
        right.plot(xs, [p[2] for p in points], style, label=label, markersize=4)
    left.set_title("on schedule (delivered / offered), 30 tokens/s per stream")
    left.set_ylim(0, 1.05)
    right.set_title("p99 latency per token, ms")
    right.set_yscale("log")
    for ax in (left, right):
        ax.set_xlabel("concurrent streams, one reader each, one worker")
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(results["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(results: dict[str, Any], out: Path) -> None:
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "fanout.png")
    plot_chat(results, out / "chat.png")


if __name__ == "__main__":
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results"
    write_report(json.loads((directory / "results.json").read_text()), directory)
