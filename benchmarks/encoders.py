"""Encoders under load: embeddings/s and classifications/s with 32 concurrent clients against one-at-a-time calls.

    python benchmarks/encoders.py                       # small BERT embedder and ELECTRA classifier, a few minutes
    python benchmarks/encoders.py --size tiny --requests 256

For each task a demo encoder (``memserve demo-model --arch bert --task embed`` / ``--arch electra --task
classify``, fp32) is planned by the encoder plan (``memory/encoders.py``) and served by a real runner process
(``python -m memserve.runner --plan``, engine ``encoder``) on a free port. Then, against that one runner:

- **one at a time**: one client sends ``--requests`` requests, each waiting for the previous answer;
- **concurrent**: ``--clients`` clients (32) send the same ``--requests`` requests at once.

Each request holds one input of about ``--words`` words (distinct texts, so nothing is answered from a cache).
Rounds (``--rounds``) alternate which way goes first, each with new texts. Printed: the medians of inputs per
second each way and their ratio (the goal is ≥ 3×: the runner's dynamic batching by token
budget is what turns concurrency into throughput), the batches the runner ran (``/stats``), and its peak RSS
(``VmHWM`` after all the traffic, which includes the worst-case warm-up) against the plan's total.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from common import runner

from memserve.checkpoint.demo_encoder import write_demo_encoder
from memserve.checkpoint.encoders import read_folder_encoder_facts
from memserve.checkpoint.facts import read_local_facts
from memserve.memory.encoders import encoder_plan
from memserve.memory.fit import PlanFile
from memserve.memory.planner import Policy, Request
from memserve.memory.probe import probe_inventory

MiB = 1024**2
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "bold",
    "wizards",
    "quietly",
    "vex",
    "many",
    "jolly",
    "old",
    "friends",
]
TASKS = {"embed": ("bert", "/v1/embeddings"), "classify": ("electra", "/v1/classify")}


def texts(count: int, words: int, offset: int) -> list[str]:
    """``count`` distinct texts of ``words`` words each."""
    return [
        " ".join(WORDS[(i * 7 + j * 3 + offset) % len(WORDS)] for j in range(words)) + f" #{i + offset}"
        for i in range(count)
    ]


def encoder_launch(model: Path, concurrency: int) -> PlanFile:
    """The encoder plan of ``model`` (``memory/encoders.py``) for ``concurrency`` clients, on an 8 GiB CPU budget."""
    facts, encoder = read_local_facts(model), read_folder_encoder_facts(model)
    assert encoder is not None
    inventory = probe_inventory(memory="cpu=8GiB")
    result = encoder_plan(
        facts, encoder, Request(context_tokens=encoder.max_tokens, concurrency=concurrency), inventory, Policy()
    )
    if result.plan is None:
        raise SystemExit(result.nofit.message if result.nofit else "no plan")
    return PlanFile(str(model), result.plan)


async def one_at_a_time(base: str, route: str, inputs: list[str]) -> float:
    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        for text in inputs:
            response = await client.post(f"{base}{route}", json={"model": "m", "input": text})
            response.raise_for_status()
        return len(inputs) / (time.perf_counter() - started)


async def concurrent(base: str, route: str, inputs: list[str], clients: int) -> float:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for text in inputs:
        queue.put_nowait(text)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                text = queue.get_nowait()
                response = await client.post(f"{base}{route}", json={"model": "m", "input": text})
                response.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return len(inputs) / (time.perf_counter() - started)


def measure(task: str, model: Path, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    route = TASKS[task][1]
    launch = encoder_launch(model, args.clients)
    files = folder / model.name  # the plan and the log; the runner serves the model as "m"
    files.mkdir(parents=True, exist_ok=True)
    with runner(launch, files, name="m", threads=args.threads) as (_, base):
        asyncio.run(one_at_a_time(base, route, texts(8, args.words, 10_000)))  # warm the path
        before = httpx.get(f"{base}/stats", timeout=10).json()
        singles, manys = [], []
        for r in range(args.rounds):  # alternate which goes first, so a busy minute falls on both
            offset = 100_000 * (r + 1)
            single_texts, many_texts = (
                texts(args.requests, args.words, offset),
                texts(args.requests, args.words, -offset),
            )
            if r % 2:
                manys.append(asyncio.run(concurrent(base, route, many_texts, args.clients)))
                singles.append(asyncio.run(one_at_a_time(base, route, single_texts)))
            else:
                singles.append(asyncio.run(one_at_a_time(base, route, single_texts)))
                manys.append(asyncio.run(concurrent(base, route, many_texts, args.clients)))
        single, many = statistics.median(singles), statistics.median(manys)
        after = httpx.get(f"{base}/stats", timeout=10).json()
        health = httpx.get(f"{base}/health", timeout=10).json()
    batches = after["extra"]["batches_total"] - before["extra"]["batches_total"]
    peak = health["memory"]["cpu"]["peak_rss_bytes"]
    planned = launch.plan.devices["cpu"].total_bytes
    return {
        "task": task,
        "model": model.name,
        "one_at_a_time_per_second": round(single, 1),
        "concurrent_per_second": round(many, 1),
        "ratio": round(many / single, 2),
        "round_ratios": [round(m / s, 2) for s, m in zip(singles, manys, strict=True)],
        "inputs": 2 * args.requests * args.rounds,
        "batches": batches,
        "largest_batch_inputs": after["extra"]["largest_batch_inputs"],
        "peak_rss_mib": round(peak / MiB, 1),
        "plan_mib": round(planned / MiB, 1),
        "plan_over_peak": round(planned / peak, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "small"), default="small")
    parser.add_argument("--tasks", default="embed,classify")
    parser.add_argument("--requests", type=int, default=512, help="requests each way (one input each)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--words", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, alternating which way goes first")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="the runner's torch threads (OMP_NUM_THREADS; default torch's: one per core). On a machine busier than "
        "its cores, 1 avoids OpenMP threads waiting for each other at every op (tiny BERT: 6 ms a forward, not 270)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per task instead of a table")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="memserve-encoders-") as tmp:
        folder = Path(tmp)
        for task in args.tasks.split(","):
            arch = TASKS[task][0]
            model = write_demo_encoder(folder / f"{arch}-{task}-{args.size}", arch=arch, task=task, size=args.size).path
            rows.append(measure(task, model, folder, args))
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(
        f"cpu cores: {os.cpu_count()}, runner threads {args.threads or 'default'}, load average "
        f"{os.getloadavg()[0]:.2f}; {args.rounds} rounds of {args.requests} "
        f"requests each way, {args.clients} concurrent clients (medians of the rounds)"
    )
    print(f"{'task':<9} {'model':<22} {'1-at-a-time/s':>13} {'concurrent/s':>12} {'ratio':>6} {'batches':>8} "
          f"{'largest':>7} {'peak MiB':>9} {'plan MiB':>9} {'plan/peak':>9}")  # fmt: skip
    for r in rows:
        print(
            f"{r['task']:<9} {r['model']:<22} {r['one_at_a_time_per_second']:>13} {r['concurrent_per_second']:>12} "
            f"{r['ratio']:>6} {r['batches']:>8} {r['largest_batch_inputs']:>7} {r['peak_rss_mib']:>9} "
            f"{r['plan_mib']:>9} {r['plan_over_peak']:>9}   rounds {r['round_ratios']}"
        )


if __name__ == "__main__":
    main()
