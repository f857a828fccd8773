"""How close is ``memserve fit``'s CPU estimate to the real peak of a process serving the model?

For each case it builds (or reuses) a demo model, asks the planner for the CPU plan's total bytes
(weights + KV cache for context × concurrency + activations + runtime), then runs a *separate*
process that loads the model with transformers, faults every weight in, and generates with that
context and concurrency (prompts of ``context - new_tokens`` tokens, ``new_tokens`` more generated,
prefill chunked to the plan's ``max_batch_tokens`` like the runner's engine). It prints the
estimate, the measured peak RSS (``ru_maxrss``: anonymous and file-backed pages together, since the
mapped weights are file-backed) and the error.

    python benchmarks/estimate_accuracy.py                       # small and 1b cases
    python benchmarks/estimate_accuracy.py --cases tiny:512x2    # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

GiB = 1024**3
DEFAULT_CASES = "small:4096x4,small:1024x1,1b:1024x4,1b:2048x1"


def measure(path: str, context: int, concurrency: int, max_batch_tokens: int, new_tokens: int) -> dict:
    """Runs in the child: load, fault in, generate; report peak RSS and what made it up."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(int(os.environ.get("MEMSERVE_BENCH_THREADS", "2")))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    model.eval()
    loaded = time.perf_counter()
    with torch.no_grad():
        for p in model.parameters():  # read every page of the mapped weights
            p.sum()
    faulted = time.perf_counter()
    prompt_tokens = context - new_tokens
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (concurrency, prompt_tokens), generator=generator)
    chunk = max(1, max_batch_tokens // concurrency)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            prefill_chunk_size=chunk if chunk < prompt_tokens else None,
            pad_token_id=0,
        )
    done = time.perf_counter()
    status = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("Rss")
    )
    return {
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_anon_bytes": int(status["RssAnon"].split()[0]) * 1024,
        "rss_file_bytes": int(status["RssFile"].split()[0]) * 1024,
        "generated_tokens": int(out.shape[1] - prompt_tokens) * concurrency,
        "load_seconds": loaded - t0,
        "fault_in_seconds": faulted - loaded,
        "generate_seconds": done - faulted,
    }


def estimate(path: Path, context: int, concurrency: int) -> tuple[int, dict, int]:
    from memserve.checkpoint.facts import read_local_facts
    from memserve.memory.inventory import Device, Inventory
    from memserve.memory.planner import Policy, Request, plan

    facts = read_local_facts(path)
    roomy = Inventory((Device("cpu", "cpu", 1024 * GiB, 1024 * GiB),))
    result = plan(facts, Request(context, concurrency), roomy, Policy(allow_gpu=False))
    assert result.plan is not None
    need = result.plan.devices["cpu"]
    return need.total_bytes, need.to_json(), result.plan.max_batch_tokens


def ensure_model(models: Path, size: str) -> Path:
    from memserve.checkpoint.demo import write_demo_model

    path = models / f"demo-{size}"
    if not (path / "config.json").exists():
        info = write_demo_model(path, size=size, force=True)
        print(f"built {path}: {info.params / 1e9:.3f}B params in {info.seconds:.1f}s", flush=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=DEFAULT_CASES, help="size:CONTEXTxCONCURRENCY, comma-separated")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--measure", nargs=4, metavar=("PATH", "CONTEXT", "CONCURRENCY", "MAX_BATCH_TOKENS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        path, context, concurrency, max_batch = args.measure
        print(json.dumps(measure(path, int(context), int(concurrency), int(max_batch), args.new_tokens)))
        return

    rows = []
    header = f"{'model':<8} {'context×seq':>12} {'estimate':>10} {'measured':>10} {'error':>8}   breakdown"
    print(header, flush=True)
    for case in args.cases.split(","):
        size, _, shape = case.partition(":")
        context, _, concurrency = shape.partition("x")
        path = ensure_model(args.models_dir, size)
        est, parts, max_batch = estimate(path, int(context), int(concurrency))
        child = subprocess.run(
            [sys.executable, __file__, "--new-tokens", str(args.new_tokens), "--measure", str(path), context,
             concurrency, str(max_batch)],
            check=True, capture_output=True, text=True,
        )
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        peak = measured["peak_rss_bytes"]
        error = (est - peak) / peak * 100
        row = {"model": size, "context_tokens": int(context), "concurrency": int(concurrency),
               "estimate_bytes": est, "estimate": parts, **measured, "error_percent": error}
        rows.append(row)
        print(
            f"{size:<8} {context + '×' + concurrency:>12} {est / GiB:>8.3f}Gi {peak / GiB:>8.3f}Gi {error:>+7.1f}%"
            f"   est weights {parts['weights_bytes'] / GiB:.3f} kv {parts['kv_cache_bytes'] / GiB:.3f} "
            f"act {parts['activation_bytes'] / GiB:.3f} runtime {parts['runtime_bytes'] / GiB:.3f}; "
            f"measured anon {measured['rss_anon_bytes'] / GiB:.3f} file {measured['rss_file_bytes'] / GiB:.3f} "
            f"(load {measured['load_seconds']:.1f}s, fault-in {measured['fault_in_seconds']:.1f}s, "
            f"generate {measured['generate_seconds']:.1f}s)",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
