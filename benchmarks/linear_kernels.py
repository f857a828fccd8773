"""bf16 Linear on CPU: ``F.linear`` against the runner's packed oneDNN weights, side by side.

    python benchmarks/linear_kernels.py                      # 1b-sized layers (2.8 GB of weights)
    python benchmarks/linear_kernels.py --layers 4 --rows 1,8

The weights are the shapes of the 1b demo model's layers (q, k, v, o, gate, up, down), ``--layers`` times
over, all distinct, so every pass reads them from memory rather than cache, as a decode step does. For
each row count (running sequences at decode, prompt tokens at prefill) it prints the milliseconds of
one pass over every layer, the weight bandwidth that is, the packed ÷ plain speed-up and the largest
difference between the two outputs (0 means bit-identical). Each cell is the best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from memserve.runner.kernels import why_not_pack

HIDDEN, KV, INTERMEDIATE = 2048, 512, 8192


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--rows", default="1,4,8,16,64,320")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    reason = why_not_pack(torch.nn.Linear(8, 8, dtype=torch.bfloat16), env={})
    if reason is not None:
        raise SystemExit(f"packing is not available here: {reason}")

    shapes = [
        (HIDDEN, HIDDEN),
        (KV, HIDDEN),
        (KV, HIDDEN),
        (HIDDEN, HIDDEN),
        (INTERMEDIATE, HIDDEN),
        (INTERMEDIATE, HIDDEN),
        (HIDDEN, INTERMEDIATE),
    ] * args.layers
    generator = torch.Generator().manual_seed(0)
    plain = [(torch.randn(*s, generator=generator) / 40).to(torch.bfloat16) for s in shapes]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in plain]
    weight_bytes = sum(w.numel() * w.element_size() for w in plain)
    print(f"{len(shapes)} layers, {weight_bytes / 1e9:.2f} GB of bf16 weights, {torch.get_num_threads()} threads")
    print(f"{'rows':>5} {'F.linear ms':>12} {'GB/s':>6} {'packed ms':>10} {'GB/s':>6} {'speed-up':>9} {'max diff':>9}")

    for rows in (int(r) for r in args.rows.split(",")):
        inputs = {k: torch.randn(rows, k, generator=generator).to(torch.bfloat16) for k in (HIDDEN, INTERMEDIATE)}

        with torch.inference_mode():
            plain_s = best_of(lambda x=inputs: plain_pass(plain, x), args.repeats)
            packed_s = best_of(lambda x=inputs: packed_pass(plain, packed, x), args.repeats)
            x = inputs[HIDDEN]
            diff = max(
                (F.linear(x, w).float() - torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "").float())
                .abs()
                .max()
                .item()
                for w, p in zip(plain[:7], packed[:7], strict=True)
                if w.shape[1] == HIDDEN
            )
        print(
            f"{rows:>5} {plain_s * 1e3:>12.0f} {weight_bytes / plain_s / 1e9:>6.1f} {packed_s * 1e3:>10.0f} "
            f"{weight_bytes / packed_s / 1e9:>6.1f} {plain_s / packed_s:>8.2f}× {diff:>9.3g}",
            flush=True,
        )


def plain_pass(plain: list[torch.Tensor], inputs: dict[int, torch.Tensor]) -> None:
    for w in plain:
        F.linear(inputs[w.shape[1]], w)


def packed_pass(plain: list[torch.Tensor], packed: list[torch.Tensor], inputs: dict[int, torch.Tensor]) -> None:
    for w, p in zip(plain, packed, strict=True):
        torch.ops.mkldnn._linear_pointwise(inputs[w.shape[1]], p, None, "none", [], "")


def best_of(fn: Callable[[], None], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


if __name__ == "__main__":
    main()
