"""The CPU rungs side by side: bf16 (the ``cpu`` rung) against ``cpu-int8`` and ``cpu-4bit`` on one demo model.

    python benchmarks/cpu_quant.py                        # the small demo model (bf16, ~0.1B)
    python benchmarks/cpu_quant.py --size tiny --tokens 256 --decode-tokens 32 --rounds 3
    python benchmarks/cpu_quant.py --skip-memory --threads 1    # quality and speed only, one thread

Three measurements, each rung in the same run:

- **quality**: greedy top-1 agreement with bf16 under teacher forcing: every position of ``--tokens`` tokens
  of the demo corpus is scored by one forward of each model, and the share of positions whose argmax equals
  bf16's is printed, with the mean KL divergence of each from bf16 (nats per token). The demo models are
  random-initialised, with nearly flat logits whose argmax the smallest change can flip: the row ``fp32
  (noise)`` (the same bf16 weights, computed in fp32) shows how fragile it is. So this measures how far
  quantizing moves the logits, not how a trained model's answers change.
- **speed**: decode at batch 1, the milliseconds per token of ``--decode-tokens`` greedy steps after a short
  prefill (the model's own forward with its KV cache, in this process, no server), over ``--rounds`` rounds in
  which the rungs alternate (the order rotates each round); the median round is printed, and the ratio to bf16.
- **kernels**: one Linear of each shape in the model's layers at one row, bf16 against int8 and 4-bit, alone
  (what the model-level decode adds on top is attention, norms, the unquantized LM head and Python).
- **memory**: the real runner (``python -m memserve.runner``) on each rung's plan (``memserve fit --quantization
  none|int8|4bit --device cpu --json``, at ``--context`` × 1), one at a time: its worst-case warm-up's peak
  (``VmHWM``, which the runner measures before it says it is ready) against the plan's total.

The machine's load average is printed before and after: other work on the cores slows every rung, and the
alternation only makes that even across them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from common import runner

from memserve.checkpoint.demo import write_demo_model
from memserve.memory.fit import PlanFile
from memserve.runner.kernels import pack_linear_weights
from memserve.runner.quantize import INT8_KERNEL_ENV, int8_kernel, quantize_linears

MiB = 1024**2
# rung → (quantization, int8 kernel): the int8 rung once with this machine's kernel and once weight-only
RUNGS = {
    "cpu": ("none", "auto"),
    "cpu-int8": ("int8", "auto"),
    "cpu-int8 w/o": ("int8", "weight-only"),
    "cpu-4bit": ("4bit", "auto"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", help="demo model size (tiny, small, 1b)")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "memserve-bench-models")
    parser.add_argument("--tokens", type=int, default=512, help="teacher-forced tokens scored for quality")
    parser.add_argument("--decode-tokens", type=int, default=32, help="greedy decode steps timed per round")
    parser.add_argument("--prefill-tokens", type=int, default=128, help="prompt tokens of the timed prefill")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--context", type=int, default=512, help="the runner's context for the memory check")
    parser.add_argument("--skip-memory", action="store_true", help="no runner processes (quality and speed only)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in this process (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = ensure_model(args.models, args.size)
    print(f"model {path} · torch {torch.__version__} · {torch.get_num_threads()} threads · {os.cpu_count()} cores")
    print(f"load average before: {_load()}", flush=True)
    print(f"int8 kernel on this machine: {int8_kernel()}")
    models = {rung: load(path, quantization, kernel=kernel) for rung, (quantization, kernel) in RUNGS.items()}

    print(f"\nquality: teacher forcing on {args.tokens} tokens of the demo corpus, against the cpu rung (as stored)")
    ids = corpus_ids(path, args.tokens)
    with torch.inference_mode():
        logits = {rung: model(input_ids=ids).logits[0].float() for rung, model in models.items()}
    reference = logits["cpu"]
    if next(models["cpu"].parameters()).dtype != torch.float32:
        # how fragile the argmax is on this model: the same weights, only computed in fp32
        with torch.inference_mode():
            logits["fp32 (noise)"] = load(path, "none", torch.float32)(input_ids=ids).logits[0].float()
    print(f"{'rung':<13} {'top-1 agreement':>16} {'mean KL (nats)':>15}")
    for rung, rung_logits in logits.items():
        agreement = (rung_logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        kl = torch.nn.functional.kl_div(
            rung_logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean"
        ).item()
        print(f"{rung:<13} {agreement:>15.1%} {kl:>15.5f}")

    print(
        f"\nspeed: decode at batch 1 (ms per token over {args.decode_tokens} steps) and prefill of "
        f"{args.prefill_tokens} tokens (ms), {args.rounds} rounds alternating"
    )
    decode: dict[str, list[float]] = {rung: [] for rung in models}
    prefill: dict[str, list[float]] = {rung: [] for rung in models}
    order = list(models)
    for round_ in range(args.rounds):
        for rung in order[round_ % len(order) :] + order[: round_ % len(order)]:
            decode[rung].append(decode_seconds_per_token(models[rung], ids[:, :16], args.decode_tokens))
            prefill[rung].append(prefill_seconds(models[rung], ids[:, : args.prefill_tokens]))
    print(f"{'rung':<13} {'decode ms':>10} {'min':>7} {'max':>7} {'vs cpu':>7} {'prefill ms':>11} {'vs cpu':>7}")
    for rung in models:
        median, filled = statistics.median(decode[rung]), statistics.median(prefill[rung])
        print(
            f"{rung:<13} {median * 1e3:>10.2f} {min(decode[rung]) * 1e3:>7.2f} {max(decode[rung]) * 1e3:>7.2f} "
            f"{statistics.median(decode['cpu']) / median:>6.2f}× {filled * 1e3:>11.1f} "
            f"{statistics.median(prefill['cpu']) / filled:>6.2f}×"
        )
    print(f"load average after speed: {_load()}", flush=True)
    del models, logits
    kernels(path, args.rounds)

    if args.skip_memory:
        return
    print(f"\nmemory: the real runner's worst-case warm-up peak against its plan ({args.context} × 1)")
    print(f"{'rung':<13} {'weights MiB':>12} {'plan MiB':>9} {'peak MiB':>9} {'plan/peak':>10} {'load s':>7}")
    for rung, (quantization, kernel) in RUNGS.items():
        plan, health, seconds = run_runner(path, quantization, args.context, kernel)
        planned = plan["devices"]["cpu"]["total_bytes"]
        peak = health["load"]["plan_check"]["peak_bytes"]["cpu"]
        weights = plan["devices"]["cpu"]["weights_bytes"]
        assert rung.startswith(plan["rung"]), plan["rung"]
        print(
            f"{rung:<13} {weights / MiB:>12.1f} {planned / MiB:>9.1f} {peak / MiB:>9.1f} {planned / peak:>10.3f} "
            f"{seconds:>7.1f}",
            flush=True,
        )
    print(f"load average after: {_load()}")


def kernels(path: Path, rounds: int) -> None:
    """One Linear of each shape the model's layers have, at one row (decode): the kernels alone, alternating."""
    from transformers import AutoConfig

    from memserve.runner.quantize import Int4Linear, Int8Linear

    config = AutoConfig.from_pretrained(path)
    hidden, inner = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    print(f"\nkernels: one Linear at 1 row, ms (median of {rounds} rounds alternating), bf16 activations")
    print(f"{'out × in':<12} {'bf16':>8} {'int8':>8} {'4-bit':>8} {'int8 vs':>8} {'4-bit vs':>9}")
    generator = torch.Generator().manual_seed(0)
    for rows, cols in sorted({(hidden, hidden), (kv, hidden), (inner, hidden), (hidden, inner)}):
        dense = torch.nn.Linear(cols, rows, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            dense.weight.copy_(torch.randn(rows, cols, generator=generator) * 0.02)
        layers = {"bf16": dense, "int8": Int8Linear.from_linear(dense), "4-bit": Int4Linear.from_linear(dense)}
        x = torch.randn(1, cols, generator=generator).to(torch.bfloat16)
        times: dict[str, list[float]] = {name: [] for name in layers}
        with torch.inference_mode():
            for _ in range(rounds):
                for name, layer in layers.items():
                    layer(x)
                    started = time.perf_counter()
                    for _ in range(20):
                        layer(x)
                    times[name].append((time.perf_counter() - started) / 20)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        print(
            f"{f'{rows} × {cols}':<12} {ms['bf16']:>8.3f} {ms['int8']:>8.3f} {ms['4-bit']:>8.3f} "
            f"{ms['bf16'] / ms['int8']:>7.2f}× {ms['bf16'] / ms['4-bit']:>8.2f}×"
        )
    print(f"load average after kernels: {_load()}", flush=True)


def ensure_model(models: Path, size: str) -> Path:
    path = models / f"demo-{size}"
    if not (path / "config.json").exists():
        info = write_demo_model(path, size=size, arch="llama", force=True)
        print(f"built {path}: {info.params / 1e9:.3f}B params in {info.seconds:.1f}s", flush=True)
    return path


def load(path: Path, quantization: str, dtype: torch.dtype | str = "auto", *, kernel: str = "auto") -> Any:
    """The model as the runner loads it on CPU: mapped in its stored dtype, the layers' Linears quantized, then
    the bf16 Linears left packed for oneDNN where this CPU has native bf16 (``runner/load.py``'s order)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if quantization != "none":
        os.environ[INT8_KERNEL_ENV] = kernel
        report = quantize_linears(model, quantization)
        print(f"quantized {quantization}: {report.kernel} ({report.kernel_reason})")
    probe = torch.zeros(1, 8, dtype=torch.long)
    packing = pack_linear_weights(model, probe=lambda: model(input_ids=probe))
    print(f"loaded {quantization} ({dtype}): linear {packing.to_json()}", flush=True)
    return model


def corpus_ids(path: Path, tokens: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    text = (Path(__file__).resolve().parents[1] / "src/memserve/checkpoint/demo_corpus.txt").read_text()
    ids = AutoTokenizer.from_pretrained(path)(text, add_special_tokens=False)["input_ids"]
    while len(ids) < tokens:
        ids = ids + ids
    return torch.tensor([ids[:tokens]])


def decode_seconds_per_token(model: Any, prompt: torch.Tensor, steps: int) -> float:
    """Seconds per greedy step after the prefill, with the model's KV cache (batch 1)."""
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - started) / steps


def prefill_seconds(model: Any, prompt: torch.Tensor) -> float:
    """Seconds of one forward over the whole prompt (a prefill at batch 1)."""
    with torch.inference_mode():
        started = time.perf_counter()
        model(input_ids=prompt, use_cache=True)
        return time.perf_counter() - started


def run_runner(
    path: Path, quantization: str, context: int, kernel: str
) -> tuple[dict[str, Any], dict[str, Any], float]:
    """Plan with ``memserve fit``, start the real runner on it, and return the plan, its /health and load time."""
    command = [sys.executable, "-m", "memserve", "fit", str(path), "--context", str(context), "--concurrency", "1"]
    fit = subprocess.run(
        [*command, "--device", "cpu", "--quantization", quantization, "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    with tempfile.TemporaryDirectory() as folder:
        started = time.monotonic()
        with runner(PlanFile.from_json(json.loads(fit.stdout)), Path(folder), env={INT8_KERNEL_ENV: kernel}) as (
            _,
            base,
        ):
            seconds = time.monotonic() - started
            health: dict[str, Any] = httpx.get(f"{base}/health", timeout=30).json()
    return json.loads(fit.stdout)["plan"], health, seconds


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" (1, 5, 15 min; {os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
