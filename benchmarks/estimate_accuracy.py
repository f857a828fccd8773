"""Does the plan bound the real runner? ``memserve fit``'s CPU plan against the runner process's own peak.

For each case it builds (or reuses) the model, writes the plan with ``memserve fit MODEL --context C
--concurrency N --json``, starts the real runner (``python -m memserve.runner --plan PLAN --port P``)
and, once it is ready, sends token-id prompts that fill the context (``context - new_tokens`` prompt
tokens, ``new_tokens`` generated): one alone, then ``N`` at once streamed, then ``N`` at once not
streamed. The runner's peak is its ``VmHWM`` (the kernel's high-water mark of resident memory:
anonymous and file-backed pages together, since the mapped weights are file-backed), read from
``/proc/PID/status`` after each step. It prints the plan, the peak after load and after traffic, and
``plan / peak``, which should lie in [1.00, 1.10].

    python benchmarks/estimate_accuracy.py                             # the default cases
    python benchmarks/estimate_accuracy.py --cases tiny:512x2          # quick
    python benchmarks/estimate_accuracy.py --cases gemma2:2048x4       # a family checkpoint (family_models.py)
    python benchmarks/estimate_accuracy.py --engine generate --cases small:1024x2      # the fallback engine

Case names: the demo sizes ``tiny``, ``small``, ``1b`` (llama), ``small-qwen2`` (each also as ``<name>-fp32``,
stored in float32), and the ~150M random-init
families of ``benchmarks/family_models.py`` (``llama``, ``qwen2``, ``mistral``, ``gemma2``, ``gpt2``,
``mixtral``), each also as ``<family>-fp32`` (stored in float32). One model process runs at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from memserve.memory.fit import PlanFile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import runner
from family_models import ensure_family_model, is_family

GiB = 1024**3
MiB = 1024**2
DEFAULT_CASES = "tiny:512x1,tiny:2048x8,small:512x1,small:1024x1,small:2048x8,small:4096x4,1b:1024x1,1b:2048x2"


def ensure_model(models: Path, name: str) -> Path:
    """A demo model (``tiny``, ``small``, ``1b``, ``small-qwen2``) or a family checkpoint, built once."""
    if is_family(name):
        return ensure_family_model(models, name)
    from memserve.checkpoint.demo import write_demo_model

    size, _, arch = name.removesuffix("-fp32").partition("-")
    path = models / f"demo-{name}"
    if not (path / "config.json").exists():
        dtype = "float32" if name.endswith("-fp32") else None
        info = write_demo_model(path, size=size, arch=arch or "llama", dtype=dtype, force=True)
        print(f"built {path}: {info.params / 1e9:.3f}B params in {info.seconds:.1f}s", flush=True)
    return path


def write_plan(path: Path, context: int, concurrency: int, out: Path, engine: str) -> dict[str, Any]:
    """``memserve fit MODEL --json`` exactly as a user runs it, CPU only."""
    fit = subprocess.run(
        [
            sys.executable,
            "-m",
            "memserve",
            "fit",
            str(path),
            "--context",
            str(context),
            "--concurrency",
            str(concurrency),
            "--device",
            "cpu",
            "--engine",
            engine,
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    out.write_text(fit.stdout)
    plan: dict[str, Any] = json.loads(fit.stdout)["plan"]
    return plan


def proc_status(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            values[key] = int(value.split()[0]) * 1024
    return values


async def one_request(client: httpx.AsyncClient, prompt: list[int], new_tokens: int, stream: bool) -> int:
    body = {"model": "m", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": stream}
    if not stream:
        response = await client.post("/v1/completions", json=body)
        response.raise_for_status()
        return int(response.json()["usage"]["completion_tokens"])
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                tokens += 1
    return tokens


async def traffic(
    port: int,
    pid: int,
    vocab: int,
    context: int,
    concurrency: int,
    new_tokens: int,
    streams: list[bool],
    engine: str = "continuous-batching",
) -> list[dict[str, Any]]:
    """Full-context prompts: one alone, then ``concurrency`` at once (streamed and not, alternating when both
    are asked for); VmHWM after each step, and the engine's own figures (``/stats``).

    The ``generate`` engine batches the requests waiting when its worker starts a call: a request sent a moment
    before the others would run alone and leave the rest to a smaller batch. So its step first keeps the worker
    busy with a short request, and the ``concurrency`` prompts then wait together and run as one batch (the
    worst case its plan admits)."""
    prompt_tokens = context - new_tokens
    steps: list[dict[str, Any]] = []
    timeout = httpx.Timeout(3600.0)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=timeout) as client:
        shapes = [1, concurrency] if concurrency > 1 else [1]
        for n in shapes:
            started = time.perf_counter()
            prompts = [[3 + (7 * i + 13 * j) % (vocab - 3) for j in range(prompt_tokens)] for i in range(n)]
            modes = [streams[(i + len(steps)) % len(streams)] for i in range(n)]
            blocker = None
            if engine == "generate" and n > 1:
                blocker = asyncio.create_task(one_request(client, [3] * 8, 32, False))
                await asyncio.sleep(0.5)
            await asyncio.gather(*(one_request(client, p, new_tokens, m) for p, m in zip(prompts, modes, strict=True)))
            if blocker is not None:
                await blocker
            steps.append(
                {
                    "sequences": n,
                    "streamed": sum(modes),
                    "seconds": round(time.perf_counter() - started, 1),
                    **proc_status(pid),
                    "engine_stats": (await client.get("/stats")).json(),
                }
            )
    return steps


def _event(line: str) -> dict[str, Any]:
    """One of the runner's JSON log lines (``{"event": ...}``), or {} for any other line."""
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return event if isinstance(event, dict) else {}


def run_case(
    model: str,
    context: int,
    concurrency: int,
    models: Path,
    new_tokens: int,
    streams: list[bool],
    work: Path,
    *,
    traffic_on: bool = True,
    engine: str = "continuous-batching",
) -> dict[str, Any]:
    path = ensure_model(models, model)
    plan_path = work / f"{model}-{context}x{concurrency}-{engine}.plan.json"
    plan = write_plan(path, context, concurrency, plan_path, engine)
    config = json.loads((path / "config.json").read_text())
    vocab = int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size"))
    folder = work / f"{model}-{context}x{concurrency}-{engine}"  # its plan and log: folder / "m.log"
    folder.mkdir(parents=True, exist_ok=True)
    with runner(PlanFile.read(plan_path), folder, env={"MEMSERVE_PROGRESS": "0"}) as (process, base):
        events = [_event(line) for line in (folder / "m.log").read_text().splitlines()]
        ready = next((e for e in events if e.get("event") == "ready"), {})
        time.sleep(0.5)
        loaded = proc_status(process.pid)
        port = int(base.rsplit(":", 1)[1])
        steps = (
            asyncio.run(traffic(port, process.pid, vocab, context, concurrency, new_tokens, streams, engine))
            if traffic_on
            else []
        )
        health = httpx.get(f"{base}/health", timeout=30).json()
    reserved = int(plan["devices"]["cpu"]["total_bytes"])
    peak = max([loaded["VmHWM"], *(s["VmHWM"] for s in steps)])
    check = (health.get("load") or {}).get("plan_check") or {}
    return {
        "model": model,
        "context_tokens": context,
        "concurrency": concurrency,
        "engine": ready.get("engine"),
        "admitted_sequences": check.get("sequences"),
        "warm_up_peak_bytes": (check.get("peak_bytes") or {}).get("cpu"),
        "plan_bytes": reserved,
        "plan": plan["devices"]["cpu"],
        "ready_peak_bytes": loaded["VmHWM"],
        "peak_bytes": peak,
        "ratio": reserved / peak,
        "steps": steps,
        "load": health.get("load"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=DEFAULT_CASES, help="model:CONTEXTxCONCURRENCY, comma-separated")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/memserve-estimate"))
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--stream", choices=("both", "yes", "no"), default="both")
    parser.add_argument(
        "--engine",
        choices=("continuous-batching", "generate"),
        default="continuous-batching",
        help="the engine the plan names (memserve fit --engine), and so the one the runner builds",
    )
    parser.add_argument(
        "--no-traffic", action="store_true", help="only load (the runner's own worst-case warm-up), send no requests"
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    streams = {"both": [True, False], "yes": [True], "no": [False]}[args.stream]

    rows = []
    print(
        f"{'model':<12} {'context×seq':>11} {'engine':>8} {'admits':>6} {'plan':>10} {'warm-up':>10} {'peak':>10} "
        f"{'plan/peak':>9}   plan: weights kv act runtime (MiB)",
        flush=True,
    )
    for case in args.cases.split(","):
        model, _, shape = case.partition(":")
        context, _, concurrency = shape.partition("x")
        row = run_case(
            model,
            int(context),
            int(concurrency),
            args.models_dir,
            args.new_tokens,
            streams,
            args.work_dir,
            traffic_on=not args.no_traffic,
            engine=args.engine,
        )
        rows.append(row)
        p = row["plan"]
        engine = "cb" if row["engine"] == "continuous-batching" else str(row["engine"])
        print(
            f"{model:<12} {context + '×' + concurrency:>11} {engine:>8} {row['admitted_sequences']!s:>6} "
            f"{row['plan_bytes'] / MiB:>7.1f}Mi {(row['warm_up_peak_bytes'] or 0) / MiB:>7.1f}Mi "
            f"{row['peak_bytes'] / MiB:>7.1f}Mi {row['ratio']:>9.3f}   "
            f"{p['weights_bytes'] / MiB:.0f} {p['kv_cache_bytes'] / MiB:.0f} {p['activation_bytes'] / MiB:.0f} "
            f"{p['runtime_bytes'] / MiB:.0f}",
            flush=True,
        )
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
