"""memserve's own runner against llama-server on the same demo model, as memserve would run each, side by side.

    python benchmarks/engines.py --size small --output-tokens 16 --requests-per-stream 2   # a few minutes
    python benchmarks/engines.py --size 1b                                                  # the README's run
    python benchmarks/engines.py --size 1b --pairs 8bit --streams 1,8 --rounds 2

Two pairs, each the same weights on both sides:

- ``bf16``: the safetensors checkpoint on memserve's runner (the ``cpu`` rung, ``--quantization none``) against
  the same weights as a bf16 GGUF on llama-server;
- ``8bit``: memserve's ``cpu-int8`` rung (int8 weight-only, ``--quantization int8``) against llama.cpp's q8_0 GGUF.

Each side is planned by ``memserve fit ... --device cpu --json`` for the same context, slots (the largest stream
count) and batch tokens, and started from that plan: ``python -m memserve.runner --plan`` for memserve, and
``memserve.engines.llamacpp.arguments`` for llama-server (so the comparison is what the pool would start). Both
get the same threads (``--threads``: ``OMP_NUM_THREADS`` for torch, ``--threads`` for llama.cpp) and serve the
model under one name. llama-server is ``MEMSERVE_LLAMA_SERVER_COMMAND``, else ``--llama-server``, else PATH.

Both servers of a pair are up at once (an idle one costs only memory) and are measured with ``memserve bench URL
--vs URL2`` (one invocation per stream count, so its alternation A@n, B@n puts a slow minute on both), with
``/v1/completions`` and prompts cut to exactly ``--prompt-tokens`` by the checkpoint's tokenizer (the GGUF files
carry the same vocabulary). Each round reverses which side goes first and changes the prompts' seed (no side
answers a repeated prompt from a cache). The ratio printed is llama-server ÷ memserve output tokens/s: of the
medians, and the median of the rounds' own ratios.

Peak memory is the ``VmHWM`` (peak resident set, mapped weights included: what the watchdog counts) of each
server's process tree, read after the last round, so it covers the load, its warm-up and all the traffic; it
is printed beside the plan's total for that side.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from memserve.engines.llamacpp import COMMAND_ENV, arguments
from memserve.memory.fit import PlanFile
from memserve.net import free_port

MiB = 1024**2
NAME = "demo"
PAIRS = {"bf16": ("none", "bf16"), "8bit": ("int8", "q8_0")}
"""Pair → (memserve's --quantization, the GGUF file's type)."""
BUILT_LLAMA_SERVER = Path.home() / ".cache/memserve/llama.cpp-0.3.36/build/bin/llama-server"
READY_TIMEOUT_SECONDS = 1800.0


@dataclass
class Side:
    """One server of a pair: how it was planned and started, and what it measured."""

    label: str
    plan: dict[str, Any]
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    rounds: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    """streams → that step's bench JSON, one per round."""
    peak_bytes: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def plan_bytes(self) -> int:
        return int(self.plan["devices"]["cpu"]["total_bytes"])

    def start(self, env: dict[str, str]) -> None:
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen(self.argv, stdout=sink, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self) -> None:
        """``/health`` answering 200, then ``/v1/models`` (the pool's readiness for an external server)."""
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        path = "/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
                raise SystemExit(f"{self.label} exited with {self.proc.returncode}:\n{tail}")
            try:
                if httpx.get(self.url + path, timeout=5).status_code == 200:
                    if path == "/v1/models":
                        return
                    path = "/v1/models"
                    continue
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.label} not ready in {READY_TIMEOUT_SECONDS:.0f} s; its log: {self.log}")

    def read_peak(self) -> None:
        assert self.proc is not None
        self.peak_bytes = tree_peak_bytes(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def tree_peak_bytes(pid: int) -> int:
    """The sum of ``VmHWM`` over a process and its descendants (each one's peak resident set)."""
    total = 0
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def memserve_cli() -> list[str]:
    return [sys.executable, "-m", "memserve"]


def ensure_models(folder: Path, size: str, pairs: list[str]) -> tuple[Path, dict[str, Path]]:
    """The demo checkpoint and its GGUF files, built with ``memserve demo-model`` when missing (same seed)."""
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / f"demo-{size}"
    if not (checkpoint / "config.json").exists():
        subprocess.run([*memserve_cli(), "demo-model", str(checkpoint), "--size", size, "--force"], check=True)
    ggufs = {}
    for pair in pairs:
        gguf_type = PAIRS[pair][1]
        path = folder / f"demo-{size}-{gguf_type}.gguf"
        if not path.exists():
            subprocess.run(
                [
                    *memserve_cli(),
                    "demo-model",
                    str(path),
                    "--format",
                    "gguf",
                    "--size",
                    size,
                    "--gguf-type",
                    gguf_type,
                ],
                check=True,
            )
        ggufs[pair] = path
    return checkpoint, ggufs


def fit(source: Path, args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    """``memserve fit SOURCE --json`` for this run's context, slots and batch, on the CPU."""
    command = [
        *memserve_cli(), "fit", str(source), "--device", "cpu", "--json",
        "--context", str(args.context), "--concurrency", str(max(args.streams)),
        "--max-batch-tokens", str(args.batch_tokens), *extra,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def sides(pair: str, checkpoint: Path, gguf: Path, args: argparse.Namespace, work: Path) -> tuple[Side, Side]:
    quantization = PAIRS[pair][0]
    ours = fit(checkpoint, args, "--quantization", quantization, "--runner", "transformers")
    theirs = fit(gguf, args, "--runner", "llama.cpp")
    memserve = Side(f"memserve {ours['plan']['rung']}", ours["plan"], [], work / f"{pair}-memserve.log")
    llama = Side(f"llama-server {gguf.name}", theirs["plan"], [], work / f"{pair}-llama-server.log")
    memserve.port, llama.port = free_port(), free_port()
    plan_path = work / f"{pair}-memserve-plan.json"
    plan_path.write_text(json.dumps(ours))
    memserve.argv = [
        sys.executable, "-m", "memserve.runner", "--plan", str(plan_path), "--port", str(memserve.port), "--name", NAME
    ]  # fmt: skip
    launch = PlanFile.from_json(theirs)
    llama.argv = arguments(NAME, launch, host="127.0.0.1", port=llama.port, threads=args.threads)
    return memserve, llama


def bench(first: Side, second: Side, streams: int, seed: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One ``memserve bench A --vs B`` step at ``streams`` concurrent requests; its JSON report."""
    command = [
        *memserve_cli(), "bench", f"{first.url}/v1", "--model", NAME, "--vs", f"{second.url}/v1",
        "--vs-model", NAME, "--tokenizer", str(args.tokenizer), "--endpoint", "completions",
        "--concurrency", str(streams), "--requests", str(args.requests_per_stream * streams),
        "--prompt-tokens", str(args.prompt_tokens), "--output-tokens", str(args.output_tokens),
        "--seed", str(seed), "--timeout", str(args.timeout), "--no-overhead", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def run_pair(pair: str, checkpoint: Path, gguf: Path, args: argparse.Namespace, work: Path) -> tuple[Side, Side]:
    memserve, llama = sides(pair, checkpoint, gguf, args, work)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print(f"\n[{pair}] {memserve.label}: plan {memserve.plan_bytes / MiB:.1f} MiB; {' '.join(memserve.argv)}")
    print(f"[{pair}] {llama.label}: plan {llama.plan_bytes / MiB:.1f} MiB; {' '.join(llama.argv)}", flush=True)
    try:
        for side in (memserve, llama):
            started = time.monotonic()
            side.start(env)
            side.wait_ready()
            print(f"[{pair}] {side.label} ready in {time.monotonic() - started:.1f} s", flush=True)
        for round_ in range(args.rounds):
            order = (memserve, llama) if round_ % 2 == 0 else (llama, memserve)
            for streams in args.streams:
                out = work / f"{pair}-round{round_}-{streams}streams.json"
                report = bench(*order, streams, seed=1000 * round_ + streams, args=args, out=out)
                for side, target in zip(order, report["targets"], strict=True):
                    # a target whose warm-up or step failed entirely has no step: count it as nothing served
                    step = target["steps"][0] if target["steps"] else {"output_tokens_per_second": 0.0}
                    side.rounds.setdefault(streams, []).append(step)
                a, b = (s.rounds[streams][-1] for s in (memserve, llama))
                print(
                    f"[{pair}] round {round_ + 1} ({order[0].label.split()[0]} first), {streams} streams: "
                    f"memserve {a['output_tokens_per_second']:.2f}, llama-server {b['output_tokens_per_second']:.2f} "
                    f"tok/s; load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
        for side in (memserve, llama):
            side.read_peak()
    finally:
        for side in (memserve, llama):
            side.stop()
    return memserve, llama


def ratio(b: float, a: float) -> str:
    """``×b/a``, or a dash when ``a`` served nothing (every request of the step failed)."""
    return f"×{b / a:.2f}" if a else "—"


def p50(step: dict[str, Any], key: str) -> float:
    value = step.get(key) or {}
    return float(value.get("p50", float("nan")))


def table(results: list[tuple[str, Side, Side]], args: argparse.Namespace) -> str:
    """Markdown, as the benchmarks README writes its numbers."""
    lines = [
        "| pair | streams | memserve tok/s | llama-server tok/s | llama ÷ memserve | per round | "
        "TTFT p50 memserve / llama | output tokens memserve / llama | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pair, ours, theirs in results:
        for streams in args.streams:
            a = [s["output_tokens_per_second"] for s in ours.rounds[streams]]
            b = [s["output_tokens_per_second"] for s in theirs.rounds[streams]]
            per_round = [y / x for x, y in zip(a, b, strict=True) if x]
            ttft = (
                statistics.median(p50(s, "ttft_seconds") for s in ours.rounds[streams]),
                statistics.median(p50(s, "ttft_seconds") for s in theirs.rounds[streams]),
            )
            tokens = [sum(s.get("output_tokens_total", 0) for s in side.rounds[streams]) for side in (ours, theirs)]
            failed = sum(s.get("failed_requests", 0) for s in [*ours.rounds[streams], *theirs.rounds[streams]])
            spread = (
                f"×{statistics.median(per_round):.2f} (×{min(per_round):.2f}–×{max(per_round):.2f})"
                if len(per_round) > 1
                else "-"
            )
            lines.append(
                f"| {pair} | {streams} | {statistics.median(a):.2f} | {statistics.median(b):.2f} | "
                f"**{ratio(statistics.median(b), statistics.median(a))}** | {spread} | "
                f"{ttft[0] * 1e3:.0f} / {ttft[1] * 1e3:.0f} ms | {tokens[0]} / {tokens[1]} | {failed} |"
            )
    by_pair = {pair: (ours, theirs) for pair, ours, theirs in results}
    if {"bf16", "8bit"} <= by_pair.keys():
        # not alternated step by step (the pairs run one after the other): a slow minute can move these
        lines += ["", "| streams | memserve cpu-int8 ÷ cpu | llama.cpp q8_0 ÷ bf16 |", "|---|---|---|"]
        for streams in args.streams:
            speed = [
                [statistics.median(s["output_tokens_per_second"] for s in side.rounds[streams]) for side in pair_sides]
                for pair_sides in (by_pair["bf16"], by_pair["8bit"])
            ]
            lines.append(f"| {streams} | {ratio(speed[1][0], speed[0][0])} | {ratio(speed[1][1], speed[0][1])} |")
    lines += ["", "| side | rung | plan MiB | peak (VmHWM) MiB | plan / peak |", "|---|---|---|---|---|"]
    for _pair, ours, theirs in results:
        for side in (ours, theirs):
            lines.append(
                f"| {side.label} | {side.plan['rung']} ({side.plan['runner']}) | {side.plan_bytes / MiB:.1f} | "
                f"{side.peak_bytes / MiB:.1f} | {side.plan_bytes / max(side.peak_bytes, 1):.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1b", choices=["tiny", "small", "1b"], help="demo model size")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "memserve-bench-engines")
    parser.add_argument("--pairs", default="bf16,8bit", help="bf16 and/or 8bit")
    parser.add_argument("--streams", default="1,4,8", help="concurrent streams, one step each")
    parser.add_argument("--output-tokens", type=int, default=32, help="max_tokens per request")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--requests-per-stream", type=int, default=2, help="requests per step = this × streams")
    parser.add_argument("--rounds", type=int, default=1, help="passes over the stream counts, first side swapped")
    parser.add_argument("--context", type=int, default=512, help="tokens per sequence, both sides")
    parser.add_argument("--batch-tokens", type=int, default=512, help="tokens per forward (prefill chunk), both")
    parser.add_argument("--threads", type=int, default=2, help="threads of each server")
    parser.add_argument("--timeout", type=int, default=300, help="seconds one request may take (memserve bench)")
    parser.add_argument("--llama-server", type=Path, default=BUILT_LLAMA_SERVER, help=f"when {COMMAND_ENV} is unset")
    parser.add_argument("--json", type=Path, help="also write every step of every side here")
    args = parser.parse_args()
    # stopped by a signal (timeout, kill): leave through the finally blocks, which stop both servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.streams = [int(s) for s in args.streams.split(",")]
    pairs = [p for p in args.pairs.split(",") if p]
    if unknown := set(pairs) - set(PAIRS):
        parser.error(f"--pairs: unknown {sorted(unknown)}; choose from {', '.join(PAIRS)}")
    if args.prompt_tokens + args.output_tokens > args.context:
        parser.error("--prompt-tokens + --output-tokens must fit in --context")
    if not os.environ.get(COMMAND_ENV) and args.llama_server.exists():
        os.environ[COMMAND_ENV] = str(args.llama_server)

    checkpoint, ggufs = ensure_models(args.models, args.size, pairs)
    args.tokenizer = checkpoint
    print(
        f"model {checkpoint} and {', '.join(p.name for p in ggufs.values())}; "
        f"llama-server {os.environ.get(COMMAND_ENV)}"
    )
    print(
        f"{args.threads} threads each, context {args.context} × {max(args.streams)} slots, batch {args.batch_tokens}; "
        f"{args.prompt_tokens} prompt + {args.output_tokens} output tokens; {os.cpu_count()} cores"
    )
    print(f"load average before: {load()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="memserve-engines-") as folder:
        for pair in pairs:
            ours, theirs = run_pair(pair, checkpoint, ggufs[pair], args, Path(folder))
            results.append((pair, ours, theirs))
    print(f"load average after: {load()}\n")
    print(table(results, args))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    pair: {
                        side.label: {"plan": side.plan, "peak_bytes": side.peak_bytes, "steps": side.rounds}
                        for side in (ours, theirs)
                    }
                    for pair, ours, theirs in results
                },
                indent=2,
            )
        )


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1, 5, 15 min)"


if __name__ == "__main__":
    main()
