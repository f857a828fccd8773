"""What ``memserve batch run`` costs: the same requests through it and from a plain asyncio client, side by side.

    python benchmarks/batch_throughput.py                          # tiny demo model, 200 requests, concurrency 8
    python benchmarks/batch_throughput.py --model /tmp/mb/demo-small --requests 100 --max-tokens 32
    python benchmarks/batch_throughput.py --url http://127.0.0.1:8000 --model-name NAME   # a server already up

One runner is started (``memserve run-model``) unless ``--url`` names a server. Each round sends the same
``--requests`` greedy chat requests two ways, at the same ``--concurrency``, the order swapped every other round
so a slow minute of a shared machine hits both:

- ``plain``: an ``httpx.AsyncClient`` and a semaphore, nothing written anywhere (the ceiling);
- ``batch``: ``memserve batch run IN --output OUT --url URL`` as a child process: the input checked whole,
  the lock, one fsynced line per result.

Tokens/s is the answers' ``usage.completion_tokens`` over wall time. For ``batch`` two walls are printed:
the process's (Python start-up and the input check included: what a user waits for) and the run's own
(``elapsed_seconds`` in its progress file: from the lock to the last result). The ratio (goal ≥ 0.95) is the
median over rounds of batch ÷ plain, for each wall.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bodies(count: int, model: str, max_tokens: int) -> list[dict[str, Any]]:
    return [
        {
            "model": model,
            "messages": [{"role": "user", "content": f"Tell me about lighthouse number {i} and its keeper"}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        for i in range(count)
    ]


def write_input(path: Path, requests: list[dict[str, Any]]) -> None:
    with path.open("w") as out:
        for i, body in enumerate(requests):
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            out.write(json.dumps(line) + "\n")


async def plain(url: str, requests: list[dict[str, Any]], concurrency: int) -> dict[str, float]:
    slots = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
        nonlocal tokens
        async with slots:
            response = await client.post("/chat/completions", json=body)
            response.raise_for_status()
            tokens += int(response.json()["usage"]["completion_tokens"])

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, body) for body in requests))
        wall = time.perf_counter() - start
    return {"tokens": tokens, "wall_seconds": wall, "tokens_per_second": tokens / wall}


def batch(url: str, folder: Path, round_index: int, concurrency: int) -> dict[str, float]:
    output = folder / f"out-{round_index}.jsonl"
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "memserve", "batch", "run", str(folder / "in.jsonl"), "--output", str(output),
         "--url", url, "--concurrency", str(concurrency)],
        check=True, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wall = time.perf_counter() - start
    tokens = sum(json.loads(raw)["response"]["body"]["usage"]["completion_tokens"] for raw in output.open("rb"))
    in_run = json.loads(output.with_name(output.name + ".progress.json").read_text())["elapsed_seconds"]
    return {
        "tokens": tokens,
        "wall_seconds": wall,
        "tokens_per_second": tokens / wall,
        "run_seconds": in_run,
        "run_tokens_per_second": tokens / in_run,
    }


def start_runner(model: str, name: str, concurrency: int, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "memserve", "run-model", model, "--port", str(port), "--name", name,
             "--concurrency", str(concurrency), "--context", "512"],
            stdout=sink, stderr=sink,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the runner exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the runner was not ready in 300 s: {log.read_text()[-2000:]}")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="A model folder [default: the tiny demo model, written to a temp folder].")
    parser.add_argument("--url", help="A server already running (then --model-name names its model).")
    parser.add_argument("--model-name", default="bench", help="The model name the requests carry.")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="Write the rounds and ratios here.")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="memserve-batch-bench-"))
    runner: subprocess.Popen[bytes] | None = None
    try:
        url = args.url
        if url is None:
            model = args.model
            if model is None:
                from memserve.checkpoint.demo import write_demo_model

                model = str(write_demo_model(folder / "tiny", size="tiny").path)
            runner, url = start_runner(model, args.model_name, args.concurrency, folder / "runner.log")
        url = url.rstrip("/") if url.rstrip("/").endswith("/v1") else url.rstrip("/") + "/v1"
        requests = bodies(args.requests, args.model_name, args.max_tokens)
        write_input(folder / "in.jsonl", requests)
        asyncio.run(plain(url, requests[: args.concurrency], args.concurrency))  # warm-up, not counted
        rounds = []
        for index in range(args.rounds):
            order = ("plain", "batch") if index % 2 == 0 else ("batch", "plain")
            row: dict[str, Any] = {}
            for kind in order:
                row[kind] = (
                    asyncio.run(plain(url, requests, args.concurrency))
                    if kind == "plain"
                    else batch(url, folder, index, args.concurrency)
                )
            row["ratio_process"] = row["batch"]["tokens_per_second"] / row["plain"]["tokens_per_second"]
            row["ratio_run"] = row["batch"]["run_tokens_per_second"] / row["plain"]["tokens_per_second"]
            rounds.append(row)
            print(
                f"round {index + 1}: plain {row['plain']['tokens_per_second']:.1f} tok/s "
                f"({row['plain']['wall_seconds']:.1f} s) · batch {row['batch']['tokens_per_second']:.1f} tok/s "
                f"({row['batch']['wall_seconds']:.1f} s with start-up), "
                f"{row['batch']['run_tokens_per_second']:.1f} tok/s ({row['batch']['run_seconds']:.1f} s in the run) · "
                f"ratio {row['ratio_process']:.3f} / {row['ratio_run']:.3f}",
                flush=True,
            )
        process_ratio = statistics.median(r["ratio_process"] for r in rounds)
        run_ratio = statistics.median(r["ratio_run"] for r in rounds)
        print(
            f"\n{args.requests} requests × {args.max_tokens} tokens, concurrency {args.concurrency}, "
            f"{args.rounds} rounds, {os.cpu_count()} cores\n"
            f"batch ÷ plain tokens/s (median): {process_ratio:.3f} with the CLI's start-up, "
            f"{run_ratio:.3f} in the run (goal ≥ 0.95)"
        )
        if args.json is not None:
            args.json.write_text(
                json.dumps(
                    {
                        "args": vars(args) | {"json": str(args.json)},
                        "rounds": rounds,
                        "ratio_process": process_ratio,
                        "ratio_run": run_ratio,
                    },
                    indent=2,
                )
            )
    finally:
        if runner is not None:
            runner.terminate()
            runner.wait(timeout=30)


if __name__ == "__main__":
    main()
