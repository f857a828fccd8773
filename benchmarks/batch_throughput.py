"""What batch work costs: ``memserve batch run``'s tokens/s against a plain asyncio client's, and an interactive
request's TTFT on the gateway while a ``/v1/batches`` job saturates its model.

    python benchmarks/batch_throughput.py                          # both, on the tiny demo model
    python benchmarks/batch_throughput.py --measure throughput --model /tmp/mb/demo-small --max-tokens 32
    python benchmarks/batch_throughput.py --measure throughput --url http://127.0.0.1:8000 --model-name NAME
    python benchmarks/batch_throughput.py --measure ttft --ttft-concurrency 4 --samples 15
    python benchmarks/batch_throughput.py --measure cpu --requests 2000 --rounds 2

**Throughput** (``--measure throughput``).

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

**Interactive TTFT under a batch** (``--measure ttft``). A ``memserve serve`` process serves the model at
``--ttft-concurrency`` (default 4). One interactive request at a time (a streamed completion of 4 tokens) is
timed to its first text event, ``--samples`` times, under each load:

- ``idle``: nothing else;
- ``1 stream``: one interactive background stream, the batch's requests' shape (96 tokens), sent back to back:
  one more interactive stream instead of the batch;
- ``C-1 streams`` and ``C streams``: as many as the batch may hold (a job never takes a model's last slot), and
  the whole concurrency (the request must queue);
- ``batch``: a ``/v1/batches`` job of 400 such requests, saturating what the model gives batches (one slot
  while interactive requests come: ``gateway/batch_jobs.py``);
- ``batch, quiet``: the same, each probe sent after ``INTERACTIVE_SECONDS`` + 1 s without interactive requests,
  when the batch has taken back ``C-1`` slots (at most 10 samples: each waits that long).

**CPU per request** (``--measure cpu``). What each client itself costs, with no model to share the cores
with: the fake OpenAI server (``memserve.wire.fake``, answering at once) in a child process, then, for each of
``--rounds`` rounds, ``memserve batch run --url`` and the plain client (each a child process, start-up
included) send it the ``--requests``; CPU from ``getrusage`` of the children, user and system apart.

The goal (issue 15): the ``batch`` median at most the ``1 stream`` median. The load average is printed beside
each row: on a shared 2-core machine the numbers are only as quiet as the machine was.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from memserve.gateway.batch_jobs import INTERACTIVE_SECONDS
from memserve.net import free_port


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


PLAIN_CHILD = """
import asyncio, sys
sys.path.insert(0, {here!r})
from batch_throughput import bodies, plain
asyncio.run(plain({url!r}, bodies({count}, "fake-model", {max_tokens}), {concurrency}))
"""


def cpu_per_request(args: argparse.Namespace, folder: Path) -> list[dict[str, float]]:
    """Each round: the batch CLI's and the plain client's CPU per request against the fake (see the docstring)."""
    port = free_port()
    serve = "import uvicorn; from memserve.wire.fake import FakeOpenAI; "
    serve += f"uvicorn.run(FakeOpenAI(), host='127.0.0.1', port={port}, log_level='warning')"
    fake = subprocess.Popen([sys.executable, "-c", serve])
    url = f"http://127.0.0.1:{port}/v1"
    rows = []
    try:
        deadline = time.monotonic() + 60
        while not _answers(f"{url}/models"):
            if fake.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the fake OpenAI server did not start")
            time.sleep(0.1)
        write_input(folder / "in.jsonl", bodies(args.requests, "fake-model", args.max_tokens))
        code = PLAIN_CHILD.format(
            here=str(Path(__file__).parent), url=url, count=args.requests, max_tokens=args.max_tokens,
            concurrency=args.concurrency,
        )  # fmt: skip
        for index in range(args.rounds):
            row: dict[str, float] = {}
            for name, command in (
                ("batch", [sys.executable, "-m", "memserve", "batch", "run", str(folder / "in.jsonl"), "--output",
                           str(folder / f"cpu-{index}.jsonl"), "--url", url, "--concurrency", str(args.concurrency)]),
                ("plain", [sys.executable, "-c", code]),
            ):  # fmt: skip
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                row[f"{name}_user_ms"] = 1000 * (after.ru_utime - before.ru_utime) / args.requests
                row[f"{name}_system_ms"] = 1000 * (after.ru_stime - before.ru_stime) / args.requests
            rows.append(row)
            print(
                f"round {index + 1}: CPU per request, start-up included: batch CLI "
                f"{row['batch_user_ms'] + row['batch_system_ms']:.2f} ms (system {row['batch_system_ms']:.2f}) · "
                f"plain client {row['plain_user_ms'] + row['plain_system_ms']:.2f} ms "
                f"(system {row['plain_system_ms']:.2f})",
                flush=True,
            )
    finally:
        fake.terminate()
        fake.wait(timeout=30)
    return rows


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


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


# ------------------------------------------------------------------------------------ interactive TTFT

TTFT_PROBE = {"prompt": "hello there", "max_tokens": 4, "temperature": 0, "stream": True}
BACKGROUND = {"prompt": "once upon a time", "max_tokens": 96, "temperature": 0}
BATCH_REQUESTS = 400


@contextlib.contextmanager
def gateway(model: str, name: str, concurrency: int, folder: Path) -> Iterator[str]:
    """``memserve serve`` with ``model`` preloaded as ``name`` at ``concurrency``; yield its origin."""
    config = folder / "memserve.yaml"
    config.write_text(
        "models:\n"
        f"  - name: {name}\n    source: {json.dumps(model)}\n    context: 256\n"
        f"    concurrency: {concurrency}\n    preload: true\n"
    )
    port = free_port()
    log = folder / "gateway.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "memserve", "serve", "--config", str(config), "--port", str(port),
             "--log-level", "warning"],
            stdout=sink, stderr=sink, env={**os.environ, "MEMSERVE_DATA_DIR": str(folder / "data")},
        )  # fmt: skip
    origin = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the gateway exited: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.post(f"{origin}/api/load", json={"model": name}, timeout=300).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"the gateway was not ready in 300 s: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield origin
    finally:
        process.terminate()
        process.wait(timeout=60)


async def ttft_once(client: httpx.AsyncClient, name: str) -> float:
    """Seconds from sending a streamed completion to its first event that carries text."""
    start = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json={**TTFT_PROBE, "model": name}) as answer:
        answer.raise_for_status()
        async for line in answer.aiter_lines():
            if line.startswith("data: {") and '"text"' in line:
                return time.perf_counter() - start
    raise SystemExit("the probe's stream ended without text")


async def leases(client: httpx.AsyncClient, name: str) -> int:
    """Requests the model holds now (``/api/ps``): between probes, what the background load keeps running."""
    rows = (await client.get("/api/ps")).json()["models"]
    return sum(int(row.get("leases") or 0) for row in rows if row["name"] == name)


async def probe(
    client: httpx.AsyncClient, name: str, samples: int, *, pause: float = 0.05
) -> tuple[list[float], list[int]]:
    """``samples`` TTFTs, one request at a time ``pause`` seconds apart, and the model's leases seen just before
    each."""
    seconds, held = [], []
    for _ in range(samples):
        await asyncio.sleep(pause)
        held.append(await leases(client, name))
        seconds.append(await ttft_once(client, name))
    return seconds, held


@contextlib.asynccontextmanager
async def streams(client: httpx.AsyncClient, name: str, count: int) -> Any:
    """``count`` interactive requests of the batch's shape, sent back to back until the block ends."""

    async def loop() -> None:
        while True:
            (await client.post("/v1/completions", json={**BACKGROUND, "model": name})).raise_for_status()

    tasks = [asyncio.create_task(loop()) for _ in range(count)]
    try:
        await asyncio.sleep(1.0)  # every stream past its prefill
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def saturating_batch(client: httpx.AsyncClient, name: str) -> Any:
    """A ``/v1/batches`` job of ``BATCH_REQUESTS`` background-shaped requests, running; cancelled at the end."""
    lines = b"".join(
        json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions",
                    "body": {**BACKGROUND, "model": name}}).encode() + b"\n"
        for i in range(BATCH_REQUESTS)
    )  # fmt: skip
    uploaded = await client.post("/v1/files", files={"file": ("b.jsonl", lines)}, data={"purpose": "batch"})
    uploaded.raise_for_status()
    created = await client.post(
        "/v1/batches",
        json={"input_file_id": uploaded.json()["id"], "endpoint": "/v1/completions", "completion_window": "24h"},
    )
    created.raise_for_status()
    batch_id = created.json()["id"]

    async def completed() -> int:
        batch = (await client.get(f"/v1/batches/{batch_id}")).json()
        return int((batch.get("request_counts") or {}).get("completed") or 0)

    while await completed() == 0:  # in progress, its slots taken
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    try:
        yield
    finally:
        await client.post(f"/v1/batches/{batch_id}/cancel")


async def ttft_rows(origin: str, name: str, concurrency: int, samples: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=2 * concurrency)
    async with httpx.AsyncClient(base_url=origin, timeout=600, limits=limits) as client:
        await probe(client, name, 2)  # warm-up, not counted

        async def row(label: str, load: Any, *, count: int = samples, pause: float = 0.05) -> None:
            async with load:
                seconds, held = await probe(client, name, count, pause=pause)
            found = {
                "load": label,
                "median_ms": 1000 * statistics.median(seconds),
                "p90_ms": 1000 * sorted(seconds)[int(0.9 * (len(seconds) - 1))],
                "max_ms": 1000 * max(seconds),
                "samples": len(seconds),
                "leases_before_each": held,
                "load_average": os.getloadavg()[0],
            }
            rows.append(found)
            print(
                f"{label:<10} median {found['median_ms']:8.1f} ms · p90 {found['p90_ms']:8.1f} ms · "
                f"max {found['max_ms']:8.1f} ms · leases held {min(held)}–{max(held)} · "
                f"load average {found['load_average']:.2f}",
                flush=True,
            )

        await row("idle", contextlib.nullcontext())
        await row("1 stream", streams(client, name, 1))
        await row(f"{concurrency - 1} streams", streams(client, name, concurrency - 1))
        await row(f"{concurrency} streams", streams(client, name, concurrency))
        await row("batch", saturating_batch(client, name))
        # each probe after the interactive traffic has been quiet long enough for the batch to take its slots back
        quiet = INTERACTIVE_SECONDS + 1.0
        await row("batch, quiet", saturating_batch(client, name), count=min(samples, 10), pause=quiet)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", choices=("throughput", "ttft", "both", "cpu"), default="both")
    parser.add_argument("--model", help="A model folder [default: the tiny demo model, written to a temp folder].")
    parser.add_argument("--url", help="Throughput only: a server already running (--model-name names its model).")
    parser.add_argument("--model-name", default="bench", help="The model name the requests carry.")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ttft-concurrency", type=int, default=4, help="The model's concurrency for the TTFT part.")
    parser.add_argument("--samples", type=int, default=15, help="Interactive requests timed under each load.")
    parser.add_argument("--json", type=Path, help="Write the rounds, ratios and TTFT rows here.")
    args = parser.parse_args()
    if args.url is not None and args.measure != "throughput":
        parser.error("--url measures throughput only (--measure throughput): the TTFT part starts its own gateway")

    folder = Path(tempfile.mkdtemp(prefix="memserve-batch-bench-"))
    model = args.model
    if model is None and args.url is None:
        from memserve.checkpoint.demo import write_demo_model

        model = str(write_demo_model(folder / "tiny", size="tiny").path)
    report: dict[str, Any] = {"args": vars(args) | {"json": str(args.json)}, "cores": os.cpu_count()}
    if args.measure == "cpu":
        report |= {"cpu": cpu_per_request(args, folder)}
    if args.measure in ("throughput", "both"):
        report |= throughput(args, model, folder)
    if args.measure in ("ttft", "both"):
        print(
            f"\ninteractive TTFT, {args.model_name} at concurrency {args.ttft_concurrency}, {args.samples} samples "
            f"per load, {os.cpu_count()} cores",
            flush=True,
        )
        assert model is not None
        with gateway(model, args.model_name, args.ttft_concurrency, folder) as origin:
            rows = asyncio.run(ttft_rows(origin, args.model_name, args.ttft_concurrency, args.samples))
        by_load = {row["load"]: row for row in rows}
        ratio = by_load["batch"]["median_ms"] / by_load["1 stream"]["median_ms"]
        print(f"batch ÷ 1 stream, median TTFT: {ratio:.2f} (goal ≤ 1)")
        report |= {"ttft": rows, "ttft_ratio_batch_to_one_stream": ratio}
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))


def throughput(args: argparse.Namespace, model: str | None, folder: Path) -> dict[str, Any]:
    runner: subprocess.Popen[bytes] | None = None
    try:
        url = args.url
        if url is None:
            assert model is not None
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
            row["load_average"] = os.getloadavg()[0]
            rounds.append(row)
            print(
                f"round {index + 1}: plain {row['plain']['tokens_per_second']:.1f} tok/s "
                f"({row['plain']['wall_seconds']:.1f} s) · batch {row['batch']['tokens_per_second']:.1f} tok/s "
                f"({row['batch']['wall_seconds']:.1f} s with start-up), "
                f"{row['batch']['run_tokens_per_second']:.1f} tok/s ({row['batch']['run_seconds']:.1f} s in the run) · "
                f"ratio {row['ratio_process']:.3f} / {row['ratio_run']:.3f} · load average {row['load_average']:.2f}",
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
        return {"rounds": rounds, "ratio_process": process_ratio, "ratio_run": run_ratio}
    finally:
        if runner is not None:
            runner.terminate()
            runner.wait(timeout=30)


if __name__ == "__main__":
    main()
