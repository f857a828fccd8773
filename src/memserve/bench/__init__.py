"""``memserve bench``: an async load generator that streams, and the statistics of what it saw.

The parts, each importable alone and none importing torch:

- ``stats``: per-request records → per-step percentiles, throughput, errors, and the saturation point
  (the definitions of TTFT, ITL, TPOT and percentiles are in its docstring);
- ``load``: the httpx streaming client, closed loop (N concurrent) or open loop (Poisson arrivals);
- ``prompts``: dataset, tokenizer-cut or synthetic prompts;
- ``run``: warm-up, client-overhead measurement, the steps (A and B alternating for ``--vs``), the report;
- ``report``: live view, tables, JSON and the plot;

The instant (or scripted) OpenAI-compatible fake server it measures its own overhead against is
``memserve.wire.fake``, the tests' fake of every upstream too.
"""

from __future__ import annotations

from memserve.bench.load import LoadGenerator, Target, normalize_base_url, stream_request
from memserve.bench.prompts import DatasetPrompts, Prompt, PromptSource, SyntheticPrompts
from memserve.bench.run import BenchConfig, BenchReport, ClientOverhead, TargetResult, run_bench
from memserve.bench.stats import (
    Percentiles,
    RequestRecord,
    Saturation,
    Step,
    StepStats,
    find_saturation,
    percentile,
    summarize,
)

__all__ = [
    "BenchConfig",
    "BenchReport",
    "ClientOverhead",
    "DatasetPrompts",
    "LoadGenerator",
    "Percentiles",
    "Prompt",
    "PromptSource",
    "RequestRecord",
    "Saturation",
    "Step",
    "StepStats",
    "SyntheticPrompts",
    "Target",
    "TargetResult",
    "find_saturation",
    "normalize_base_url",
    "percentile",
    "run_bench",
    "stream_request",
    "summarize",
]
