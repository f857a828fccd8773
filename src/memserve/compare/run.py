"""Run one question set through several models of a gateway, one model at a time, resumably.

Each model's run is a batch (``memserve.batch``: the executor and its output file as checkpoint) in
``REPORT/outputs/<model>.jsonl``: stop a compare any way and run it again, and each model resumes where it
stopped; a model whose output is complete is not loaded again. Around each batch the gateway is asked to
load the model (``POST /api/load``: its load time), ``/api/ps`` is sampled for the runner's measured
memory (its peak), and before the next model, when the budget cannot hold both (``GET /api/fit`` of the
next against the memory free now), the model is unloaded, and the terminal says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from memserve.batch.checkpoint import Checkpoint, errors_path_for
from memserve.batch.execute import Progress, RetryPolicy, run_requests
from memserve.batch.format import read_requests_file
from memserve.compare.questions import read_questions, write_batch_input
from memserve.compare.streaming import StreamingTimer
from memserve.errors import BadUpstream, InvalidArgument, UpstreamUnavailable

PS_SAMPLE_SECONDS = 0.5


@dataclass(frozen=True)
class Compare:
    """What one ``memserve compare`` was asked to do."""

    questions: Path
    models: tuple[str, ...]
    url: str
    report_dir: Path
    concurrency: int = 4
    max_tokens: int = 64
    max_retries: int = 5
    api_key: str | None = None


def output_path(report_dir: Path, model: str) -> Path:
    return report_dir / "outputs" / f"{_safe(model)}.jsonl"


def model_info_path(report_dir: Path, model: str) -> Path:
    return report_dir / "outputs" / f"{_safe(model)}.model.json"


def _safe(model: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in model)


async def run_compare(
    job: Compare,
    *,
    on_note: Callable[[str], None] | None = None,
    on_progress: Callable[[str, Progress], None] | None = None,
) -> None:
    """Run every model's batch to its end; the report is built from the files afterwards (``report.py``)."""
    note = on_note or (lambda text: None)
    if not job.models:
        raise InvalidArgument("give at least one --model to compare", param="model")
    if len(set(job.models)) != len(job.models):
        raise InvalidArgument("a --model is named twice; name each model once", param="model")
    questions = read_questions(job.questions)
    requests = job.report_dir / "requests.jsonl"
    write_batch_input(questions, requests, max_tokens=job.max_tokens)
    headers = {"Authorization": f"Bearer {job.api_key}"} if job.api_key else {}
    base = job.url.rstrip("/").removesuffix("/v1")
    transport = StreamingTimer(httpx.AsyncHTTPTransport(limits=httpx.Limits(max_keepalive_connections=job.concurrency)))
    async with (
        httpx.AsyncClient(base_url=base, headers=headers, timeout=httpx.Timeout(None, connect=10.0)) as api,
        httpx.AsyncClient(
            base_url=base, headers=headers, timeout=httpx.Timeout(None, connect=10.0), transport=transport
        ) as client,
    ):
        for index, model in enumerate(job.models):
            out = output_path(job.report_dir, model)
            info_path = model_info_path(job.report_dir, model)
            info = _read_json(info_path)
            loaded = False
            with Checkpoint(out, errors_path_for(out)) as checkpoint:
                left = len(questions) - len(checkpoint.finished)
                if left == 0 and info:
                    note(f"{model}: all {len(questions)} answers are in {out} already")
                else:
                    if checkpoint.finished:
                        note(f"{model}: resuming, {len(checkpoint.finished)} of {len(questions)} answered already")
                    note(f"loading {model} …")
                    row, seconds = await _load(api, model)
                    loaded = True
                    info["load_seconds"] = row.get("load_seconds") if row.get("load_seconds") is not None else seconds
                    info["reserved_bytes"] = _device_sum(row, "reserved_bytes")
                    peak = max(int(info.get("peak_measured_bytes") or 0), _device_sum(row, "measured_bytes"))
                    info["peak_measured_bytes"] = peak
                    note(f"{model} is loaded ({info['load_seconds'] or 0:.1f} s); {left} questions to go")
                    sampler = asyncio.create_task(_sample_peak(api, model, info), name=f"compare-ps-{model}")
                    try:
                        await run_requests(
                            read_requests_file(requests, model=model),
                            checkpoint,
                            client,
                            total=len(questions),
                            concurrency=job.concurrency,
                            retry=RetryPolicy(max_retries=job.max_retries),
                            on_progress=functools.partial(on_progress, model) if on_progress else None,
                        )
                    finally:
                        sampler.cancel()
                        with contextlib.suppress(BaseException):
                            await sampler
                        _write_json(info_path, info)
            if loaded and index + 1 < len(job.models) and not await fits_beside(api, job.models[index + 1]):
                note(
                    f"the budget holds one of these models at a time: unloading {model} before {job.models[index + 1]}"
                )
                await _post(api, "/api/unload", {"model": model})


async def _load(api: httpx.AsyncClient, model: str) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    answer = await _post(api, "/api/load", {"model": model})
    row = answer.get("model")
    return row if isinstance(row, dict) else {}, time.perf_counter() - started


async def _post(api: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    try:
        response = await api.post(path, json=body)
    except httpx.TransportError as exc:
        raise UpstreamUnavailable(
            f"no answer from the gateway at {api.base_url} ({exc}); start it (memserve serve) or fix --url"
        ) from None
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise BadUpstream(
            f"the gateway refused {path} {body}: HTTP {response.status_code}: {message}; "
            "check the model is configured there (memserve ps)"
        )
    answer = response.json()
    return answer if isinstance(answer, dict) else {}


def _device_sum(row: dict[str, Any], key: str) -> int:
    devices = row.get("devices") or {}
    return sum(int(d.get(key) or 0) for d in devices.values() if isinstance(d, dict))


async def _sample_peak(api: httpx.AsyncClient, model: str, info: dict[str, Any]) -> None:
    """Raise ``info["peak_measured_bytes"]`` to the runner's measured memory, read from /api/ps."""
    while True:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            for row in (await api.get("/api/ps")).json().get("models", []):
                if row.get("name") == model:
                    info["peak_measured_bytes"] = max(
                        int(info.get("peak_measured_bytes") or 0), _device_sum(row, "measured_bytes")
                    )
        await asyncio.sleep(PS_SAMPLE_SECONDS)


async def fits_beside(api: httpx.AsyncClient, model: str) -> bool:
    """Whether ``model``'s plan fits in the memory free now (with the current model still loaded)."""
    try:
        response = await api.get("/api/fit", params={"model": model})
        fit = response.json()
    except (httpx.HTTPError, ValueError):
        return False
    plan, free = (
        fit.get("plan") if isinstance(fit, dict) else None,
        fit.get("free_now") if isinstance(fit, dict) else None,
    )
    if response.status_code != 200 or not isinstance(plan, dict) or not isinstance(free, dict):
        return False
    for device, need in (plan.get("devices") or {}).items():
        if int((need or {}).get("total_bytes") or 0) > int(free.get(device) or 0):
            return False
    return True


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)


__all__ = ["Compare", "fits_beside", "model_info_path", "output_path", "run_compare"]
