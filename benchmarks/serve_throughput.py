"""Aggregate tokens/s, TTFT p50 and peak memory at 1, 4 and 8 concurrent streams, for three setups
on the same model in one run:

- ``runner``: ``python -m memserve.runner`` with a plan from ``memserve fit`` (continuous batching
  sized from the plan);
- ``sequential``: plain ``model.generate`` per request, one after another (the pattern our users
  started from); TTFT includes the wait for the requests ahead;
- ``transformers-serve``: ``transformers serve --continuous-batching`` with a bounded cache;
- ``runner-unpacked`` (only when named in ``--setups``): the runner with ``MEMSERVE_PACK_LINEAR=0``,
  its Linears on plain ``F.linear`` as in transformers serve, to show what packing them does.

    python benchmarks/serve_throughput.py --model models/demo-1b            # builds it if missing
    python benchmarks/serve_throughput.py --model models/demo-tiny --levels 1,4 --max-tokens 16

The two servers are up at the same time (an idle one costs nothing but memory) and take turns: for each
level, ``--rounds`` rounds, each server once per round, the order reversed every other round (A B, B A,
...), so that a slow minute of the machine hits both. Each cell is the median over the rounds; the
spread (min–max) is printed next to it. ``sequential`` runs in a child process of its own.

Greedy, the same prompts for every setup; each stream asks for ``--max-tokens`` tokens. Tokens are
counted from the ``usage`` the server returns, or one per content chunk when it sends none. Peak
memory is the largest RSS of the server process seen by a 20 Hz sampler over the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from common import PeakRss

from memserve.net import free_port

PROMPT = "Write a long story about a lighthouse keeper who finds a map in a bottle and sails to the island"
GiB = 1024**3


async def stream_one(client: httpx.AsyncClient, url: str, model: str, max_tokens: int) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]
            for choice in data.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    chunks += 1
    tokens = usage["completion_tokens"] if usage else chunks
    return {"ttft_seconds": ttft or 0.0, "tokens": tokens, "seconds": time.perf_counter() - start}


async def http_round(url: str, model: str, streams: int, max_tokens: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_one(client, url, model, max_tokens) for _ in range(streams)))
        wall = time.perf_counter() - start
    return summarize(results, wall)


def summarize(results: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in results)
    return {
        "tokens": tokens,
        "wall_seconds": wall,
        "tokens_per_second": tokens / wall,
        "ttft_p50_seconds": statistics.median(r["ttft_seconds"] for r in results),
    }


def median_row(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each measure over the rounds, with the tokens/s of every round kept for the spread."""
    return {
        "tokens_per_second": statistics.median(r["tokens_per_second"] for r in rounds),
        "ttft_p50_seconds": statistics.median(r["ttft_p50_seconds"] for r in rounds),
        "rounds_tokens_per_second": [r["tokens_per_second"] for r in rounds],
    }


def wait_ready(
    url: str, proc: subprocess.Popen[bytes], path: str = "/health", timeout: float = 600, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log else ""
            raise SystemExit(f"server exited with {proc.returncode}:\n{tail}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready in {timeout} s")


class Server:
    """One HTTP setup: its process, its log, and a peak-RSS sampler running for the whole benchmark."""

    def __init__(self, name: str, cmd: list[str], url: str, model: str, env: dict[str, str]) -> None:
        self.name, self.url, self.model = name, url, model
        self.log = Path(f"/tmp/memserve-bench-{name}-{os.getpid()}.log")
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sink, env=env)
        self.sampler: PeakRss | None = None

    def ready(self) -> None:
        wait_ready(self.url, self.proc, log=self.log)
        asyncio.run(stream_one_alone(self.url, self.model))  # warm-up, not counted
        self.sampler = PeakRss(self.proc.pid)

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        self.proc.terminate()
        self.proc.wait(timeout=60)


async def stream_one_alone(url: str, model: str) -> None:
    async with httpx.AsyncClient(timeout=600) as client:
        await stream_one(client, url, model, 4)


def run_alternating(
    servers: list[Server], levels: list[int], max_tokens: int, rounds: int
) -> dict[str, list[dict[str, Any]]]:
    """Each level: ``rounds`` rounds, every server once per round, the order reversed every other round."""
    rows: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
    for streams in levels:
        measured: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
        for index in range(rounds):
            for server in servers if index % 2 == 0 else list(reversed(servers)):
                measured[server.name].append(asyncio.run(http_round(server.url, server.model, streams, max_tokens)))
        for server in servers:
            assert server.sampler is not None
            row = median_row(measured[server.name])
            row.update(streams=streams, peak_rss_bytes=server.sampler.peak_bytes)
            rows[server.name].append(row)
            spread = row["rounds_tokens_per_second"]
            print(
                f"  {server.name:<18} {streams} streams: {row['tokens_per_second']:.2f} tok/s "
                f"(rounds {min(spread):.2f}–{max(spread):.2f}), TTFT p50 {row['ttft_p50_seconds']:.2f} s, "
                f"peak {row['peak_rss_bytes'] / GiB:.2f} GiB",
                flush=True,
            )
    return rows


def sequential_child(model_dir: str, levels: list[int], max_tokens: int) -> None:
    """Runs in a child: plain generate, one request after another; prints JSON rows."""
    import resource

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls, self.first = 0, None

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls == 2 and self.first is None:  # call 1 is the prompt
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    def one(start: float) -> dict[str, Any]:
        streamer = FirstToken()
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, streamer=streamer)
        return {
            "ttft_seconds": (streamer.first or time.perf_counter()) - start,
            "tokens": int(out.shape[1] - ids["input_ids"].shape[1]),
        }

    one(time.perf_counter())  # warm-up
    for streams in levels:
        start = time.perf_counter()
        results = [one(start) for _ in range(streams)]  # all arrived at `start`, served in turn
        row = summarize(results, time.perf_counter() - start)
        row.update(streams=streams, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        print(json.dumps(row), flush=True)


def _transformers_cli() -> str:
    """The ``transformers`` command of this interpreter's environment, also when it is not activated."""
    beside = Path(sys.executable).with_name("transformers")
    return str(beside) if beside.exists() else "transformers"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/demo-1b"))
    parser.add_argument("--size", default="1b", help="demo size to build when --model is missing")
    parser.add_argument("--levels", default="1,4,8")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--setups", default="runner,sequential,transformers-serve")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per level for the servers (median)")
    parser.add_argument("--json", type=Path, help="also write all rows as JSON here")
    parser.add_argument("--sequential-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    if args.sequential_child:
        sequential_child(str(args.model), levels, args.max_tokens)
        return
    if not (args.model / "config.json").exists():
        from memserve.checkpoint.demo import write_demo_model

        write_demo_model(args.model, size=args.size, force=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    concurrency = max(levels)
    results: dict[str, list[dict[str, Any]]] = {}
    setups = args.setups.split(",")
    if "sequential" in setups:
        print("sequential model.generate", flush=True)
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--sequential-child",
                "--model",
                str(args.model),
                "--levels",
                args.levels,
                "--max-tokens",
                str(args.max_tokens),
            ],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        results["sequential"] = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
        for row in results["sequential"]:
            print(
                f"  {row['streams']} streams: {row['tokens_per_second']:.2f} tok/s, TTFT p50 "
                f"{row['ttft_p50_seconds']:.2f} s, peak {row['peak_rss_bytes'] / GiB:.2f} GiB",
                flush=True,
            )
    servers: list[Server] = []
    reserved = 0
    runners = [
        (name, extra)
        for name, extra in (("runner", {}), ("runner-unpacked", {"MEMSERVE_PACK_LINEAR": "0"}))
        if name in setups
    ]
    if runners:
        fit = subprocess.run(
            [
                sys.executable,
                "-m",
                "memserve",
                "fit",
                str(args.model),
                "--context",
                str(args.context),
                "--concurrency",
                str(concurrency),
                "--json",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        reserved = json.loads(fit.stdout)["plan"]["devices"]["cpu"]["total_bytes"]
        print(f"runner (memserve): plan reserves {reserved / GiB:.2f} GiB on cpu", flush=True)
    for name, extra in runners:
        port = free_port()
        plan_file = Path(f"/tmp/memserve-bench-plan-{port}.json")
        plan_file.write_text(fit.stdout)
        servers.append(
            Server(
                name,
                [sys.executable, "-m", "memserve.runner", "--plan", str(plan_file), "--port", str(port), "--name", "m"],
                f"http://127.0.0.1:{port}",
                "m",
                {**env, **extra},
            )
        )
    if "transformers-serve" in setups:
        print("transformers serve --continuous-batching (bounded cache)", flush=True)
        port = free_port()
        blocks = -(-args.context * concurrency // 64)
        model_id = str(args.model.resolve())
        servers.append(
            Server(
                "transformers-serve",
                [
                    _transformers_cli(),
                    "serve",
                    model_id,
                    "--continuous-batching",
                    "--cb-block-size",
                    "64",
                    "--cb-num-blocks",
                    str(blocks),
                    "--cb-max-batch-tokens",
                    "2048",
                    "--device",
                    "cpu",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                f"http://127.0.0.1:{port}",
                model_id,
                env,
            )
        )
    try:
        for server in servers:
            server.ready()
        if servers:
            print(f"alternating {', '.join(s.name for s in servers)}: {args.rounds} rounds per level", flush=True)
            results.update(run_alternating(servers, levels, args.max_tokens, args.rounds))
    finally:
        for server in servers:
            server.stop()
    for row in [*results.get("runner", []), *results.get("runner-unpacked", [])]:
        row["plan_reserved_bytes"] = reserved

    print(
        "\nratios at each level (runner ÷ peer): tokens/s (ratio of medians; against a server, also the median\n"
        "of the rounds' own ratios), TTFT p50"
    )
    for peer in ("sequential", "transformers-serve", "runner-unpacked"):
        if "runner" not in results or peer not in results:
            continue
        for ours, theirs in zip(results["runner"], results[peer], strict=True):
            paired = ""
            if ours.get("rounds_tokens_per_second") and theirs.get("rounds_tokens_per_second"):
                # rounds ran side by side (A B, then B A): a per-round ratio cancels the machine's drift
                ratios = [
                    a / b
                    for a, b in zip(ours["rounds_tokens_per_second"], theirs["rounds_tokens_per_second"], strict=True)
                ]
                ours["rounds_ratio_vs_" + peer] = ratios
                paired = f"; per round ×{statistics.median(ratios):.2f} median (×{min(ratios):.2f}–×{max(ratios):.2f})"
            print(
                f"  vs {peer:<18} {ours['streams']} streams: throughput ×"
                f"{ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}{paired}, TTFT ×"
                f"{ours['ttft_p50_seconds'] / max(theirs['ttft_p50_seconds'], 1e-9):.2f}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
