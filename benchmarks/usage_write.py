"""How many usage rows per second the store takes on SQLite, and what ``record()`` costs the request path.

    python benchmarks/usage_write.py                      # 10 s, as fast as the producer can record
    python benchmarks/usage_write.py --rate 5000 --seconds 20
    python benchmarks/usage_write.py --dir /var/lib/memserve   # on another disk

A producer calls ``UsageLog.record`` in a loop on the event loop (yielding every ``--chunk`` rows, as a
busy gateway would between requests) while the store's own flusher writes in the background with its
defaults (every 1 s, or at once when 500 rows wait). At the end the rows the flusher wrote are counted
over the run's wall time (sustained rows/s: the backlog left is reported, not counted), then ``close``
writes the rest and the table is counted against what was recorded (nothing may be lost).

Prints: offered and written rows/s, the backlog at the end, the flush sizes, the time one flush of
``batch_rows`` rows takes, and ``record()`` latency p50/p99/max in µs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from memserve.store import Store, UsageRow, database_url


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


async def run(folder: Path, seconds: float, rate: float | None, chunk: int) -> None:
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
    one_flush: list[float] = []
    for _ in range(5):
        for r in batch:
            usage.record(r)
        await usage.flush()  # writes the backlog too on the first pass
        t0 = time.perf_counter()
        for r in batch:
            usage.record(r)
        await usage.flush()
        one_flush.append(time.perf_counter() - t0)
    await store.close()

    store = await Store.open(database_url(None, folder))
    total = await store.usage.summary("model", None, None)
    await store.close()
    in_table = sum(g["requests"] for g in total)
    expected = recorded + 10 * usage.batch_rows
    us = [n / 1000 for n in record_ns]
    print(f"store: SQLite (WAL, synchronous=NORMAL) at {folder / 'memserve.db'}")
    print(f"run: {elapsed:.1f} s, offered {recorded / elapsed:,.0f} rows/s ({recorded:,} rows, chunks of {chunk})")
    print(f"written by the flusher during the run: {written / elapsed:,.0f} rows/s ({written:,} rows)")
    print(f"backlog at the end: {backlog:,} rows (written by close)")
    if sizes:
        print(
            f"flushes: {len(sizes)}, rows per flush min/median/max {min(sizes)}/{statistics.median(sizes):.0f}/"
            f"{max(sizes)}"
        )
    print(
        f"one flush of {usage.batch_rows} rows: median {statistics.median(one_flush) * 1000:.1f} ms "
        f"({usage.batch_rows / statistics.median(one_flush):,.0f} rows/s while writing)"
    )
    print(f"record(): p50 {percentile(us, 0.5):.2f} µs, p99 {percentile(us, 0.99):.2f} µs, max {max(us):.0f} µs")
    print(f"rows in the table after close: {in_table:,} of {expected:,} recorded ({expected - in_table} lost)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=None, help="offered rows/s (default: as fast as it can)")
    parser.add_argument("--chunk", type=int, default=100, help="rows recorded between yields to the loop")
    parser.add_argument("--dir", type=Path, default=None, help="folder for memserve.db (default: a temporary one)")
    args = parser.parse_args()
    if args.dir is not None:
        asyncio.run(run(args.dir, args.seconds, args.rate, args.chunk))
        return
    with tempfile.TemporaryDirectory(prefix="memserve-usage-") as folder:
        asyncio.run(run(Path(folder), args.seconds, args.rate, args.chunk))


if __name__ == "__main__":
    main()
