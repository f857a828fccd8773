"""How many usage rows per second the store takes on SQLite, and what ``record()`` costs the request path.

    python benchmarks/usage_write.py                      # 2,000, 5,000, 10,000 rows/s and flat out, 10 s each
    python benchmarks/usage_write.py --rates 5000,20000 --seconds 20
    python benchmarks/usage_write.py --dir /var/lib/memserve   # on another disk

A producer calls ``UsageLog.record`` in a loop on the event loop (yielding every ``--chunk`` rows, as a
busy gateway would between requests) while the store's own flusher writes in the background with its
defaults (every 1 s, or at once when 500 rows wait). At the end the rows the flusher wrote are counted
over the run's wall time (the backlog left is reported, not counted), then ``close`` writes the rest
and the table is counted against what was recorded (nothing may be lost below the 100,000-row bound).
The sustained rate is the highest offered rate the store kept up with: at the end no more than two
flush intervals of rows waited, and nothing was lost.

Prints, per offered rate: written rows/s, the backlog at the end, the flush sizes, the time one flush
of 500 rows takes, ``record()`` latency p50/p99 in µs, and rows lost.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from memserve.store import Store, UsageRow, database_url

FLUSH_SECONDS = 1.0  # UsageLog's default, which the benchmark keeps


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def sample_row(i: int) -> UsageRow:
    return UsageRow(
        time=datetime.now(UTC),
        key_id=f"{i % 50:032x}",
        key_name=f"key-{i % 50}",
        end_user=f"user-{i % 1000}",
        model=("demo", "qwen", "gpt-4o-mini")[i % 3],
        provider="local" if i % 3 else "openai",
        endpoint="/v1/chat/completions",
        prompt_tokens=100 + i % 400,
        completion_tokens=i % 256,
        ttft_seconds=0.05,
        duration_seconds=1.5,
        status=200 if i % 50 else 429,
        error_type=None if i % 50 else "rate_limit_exceeded",
    )


async def run(folder: Path, seconds: float, rate: float | None, chunk: int) -> dict[str, Any]:
    """One run at one offered rate (None: as fast as the producer can) on a fresh database in ``folder``."""
    store = await Store.open(database_url(None, folder))
    usage = store.usage
    usage.start()
    record_ns: list[int] = []
    recorded = 0
    start = time.perf_counter()
    deadline = start + seconds
    while (now := time.perf_counter()) < deadline:
        if rate is not None and recorded >= rate * (now - start):
            await asyncio.sleep(min(0.001, deadline - now))
            continue
        for _ in range(chunk):
            row = sample_row(recorded)
            t0 = time.perf_counter_ns()
            usage.record(row)
            record_ns.append(time.perf_counter_ns() - t0)
            recorded += 1
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - start
    written = usage.flushed_rows
    backlog = usage.health()["pending_rows"]
    sizes = list(usage.flush_sizes)

    batch = [sample_row(i) for i in range(usage.batch_rows)]
    await usage.flush()  # the backlog
    one_flush: list[float] = []
    for _ in range(5):
        for r in batch:
            usage.record(r)
        t0 = time.perf_counter()
        await usage.flush()
        one_flush.append(time.perf_counter() - t0)
    await store.close()
    lost = usage.lost_rows

    store = await Store.open(database_url(None, folder))
    in_table = sum(g["requests"] for g in await store.usage.summary("model", None, None))
    await store.close()
    us = [n / 1000 for n in record_ns]
    return {
        "offered": recorded / elapsed,
        "written": written / elapsed,
        "backlog": backlog,
        "flushes": len(sizes),
        "median_flush_rows": statistics.median(sizes) if sizes else 0,
        "max_flush_rows": max(sizes) if sizes else 0,
        "flush_ms": statistics.median(one_flush) * 1000,
        "record_p50_us": percentile(us, 0.5),
        "record_p99_us": percentile(us, 0.99),
        "lost": lost,
        "missing": recorded + 5 * usage.batch_rows - in_table,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="per offered rate")
    parser.add_argument(
        "--rates", default="2000,5000,10000,max", help="offered rows/s, comma-separated; max: as fast as it can"
    )
    parser.add_argument("--chunk", type=int, default=100, help="rows recorded between yields to the loop")
    parser.add_argument("--dir", type=Path, default=None, help="folder for the databases (default: a temporary one)")
    args = parser.parse_args()
    rates = [None if r == "max" else float(r) for r in args.rates.split(",")]
    print(f"SQLite (WAL, synchronous=NORMAL), flusher defaults (1 s or 500 rows), {args.seconds:g} s per rate")
    print(
        f"{'offered/s':>10} {'written/s':>10} {'backlog':>8} {'flushes':>7} {'rows/flush':>11} "
        f"{'500-row flush':>13} {'record p50':>10} {'p99':>7} {'lost':>7}"
    )
    sustained = 0.0
    with tempfile.TemporaryDirectory(prefix="memserve-usage-", dir=args.dir) as parent:
        for i, rate in enumerate(rates):
            r = asyncio.run(run(Path(parent) / str(i), args.seconds, rate, args.chunk))
            if r["backlog"] <= 2 * r["offered"] * FLUSH_SECONDS and not r["lost"] + r["missing"]:
                sustained = max(sustained, r["offered"])  # kept up: never more than two intervals behind
            print(
                f"{r['offered']:>10,.0f} {r['written']:>10,.0f} {r['backlog']:>8,} {r['flushes']:>7} "
                f"{r['median_flush_rows']:>5.0f}/{r['max_flush_rows']:<5} {r['flush_ms']:>10.1f} ms "
                f"{r['record_p50_us']:>7.2f} µs {r['record_p99_us']:>4.1f} µs {r['lost'] + r['missing']:>7,}"
            )
    print(
        f"sustained (the highest offered rate it kept up with, ≤ 2 s of backlog, nothing lost): {sustained:,.0f} rows/s"
    )
    print("rows/flush: median/max during the run; lost: dropped past the 100,000-row bound, or missing after close")


if __name__ == "__main__":
    main()
