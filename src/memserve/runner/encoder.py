"""The encoder runner: one embedding or classification model behind ``/v1/embeddings`` or ``/v1/classify``.

Chosen by ``Plan.engine == "encoder"`` (``runner/serve.py`` calls :func:`build_encoder`). Unlike the
generation runner there is no KV cache and no decode loop: each batch is one forward
(``runner/encoder_batch.py`` batches concurrent requests by token budget on one worker thread).

- **embed** (``AutoModel``): the last hidden states pooled as the checkpoint's sentence-transformers config
  declares (``checkpoint/encoders.py``): mean over the attended tokens, the first token (CLS) or the last
  attended one; then cut to ``dimensions`` when asked, then scaled to unit length when the model normalizes
  (vLLM's order: a Matryoshka prefix is normalized again).
- **classify** (``AutoModelForSequenceClassification``): the head's logits in fp32, through a softmax
  (a sigmoid per class for ``multi_label_classification``), as vLLM's classify answers.
- **LoRA adapters** (``adapters``: name → PEFT folder, e.g. a spam-filter adapter whose
  ``modules_to_save`` is the classifier head): loaded once on the base with PEFT; each row of a batch runs
  its own adapter through PEFT's ``adapter_names`` (``__base__`` for the base), so requests for different
  adapters and the base share forwards. A request names an adapter by its name or ``base:adapter``.

Routes: ``POST /v1/embeddings``, ``POST /v1/classify`` (the one the model does not do answers a 400 naming
the right one), ``GET /v1/models`` (the base, and each adapter with the base as ``parent``, as vLLM lists
them), ``GET /health`` and ``GET /stats`` (the generation runner's shapes). Tokenizing stays on the event
loop thread (a fast tokenizer used from two threads at once fails with "Already borrowed").
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from memserve.checkpoint.encoders import EncoderFacts, read_folder_encoder_facts
from memserve.checkpoint.tokens import longest_token_bytes, max_prompt_bytes
from memserve.errors import CheckpointError, InvalidArgument, MemserveError, ModelNotFound, Overloaded
from memserve.runner.app import closing_lifespan
from memserve.runner.encoder_batch import EncoderBatcher
from memserve.runner.load import LoadReport, process_memory, record_phase
from memserve.runner.progress import LoadProgress
from memserve.wire.encoders import (
    CLASSIFY,
    EMBEDDINGS,
    ENCODER_ROUTES,
    ClassifyRequest,
    EmbeddingRequest,
    EncoderRequest,
    check_encoder_request,
    classify_response,
    embedding_response,
    input_too_long,
)
from memserve.wire.events import QueueFull
from memserve.wire.http import handles, install_error_handlers, until_disconnected
from memserve.wire.routes import HEALTH, MODELS, STATS, describe

if TYPE_CHECKING:
    import numpy as np
    import torch

    from memserve.memory.fit import PlanFile
    from memserve.memory.planner import Plan

__all__ = ["BASE_ADAPTER", "EncoderModel", "build_encoder", "create_encoder_app", "load_encoder"]

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in adapter_names
CLIENT_CLOSED_REQUEST = 499


class EncoderModel:
    """The loaded model and what a forward needs: rows of token ids in, one result per row out."""

    def __init__(self, model: Any, tokenizer: Any, facts: EncoderFacts, *, adapters: Sequence[str] = ()) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.facts = facts
        self.adapters = tuple(adapters)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) else 0
        self.vocab_size = len(tokenizer)
        self.mixed_batches = bool(self.adapters) and mixed_batches_supported(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, rows: list[list[int]], adapters: list[str | None]) -> list[np.ndarray]:
        """Pooled vectors (embed, full size, not normalized) or class probabilities (classify), fp32.

        With adapters, one forward where PEFT mixes them per row (``adapter_names``), else one forward per
        adapter among the rows (the base with PEFT's adapters disabled)."""
        if not self.adapters or self.mixed_batches or len(set(adapters)) == 1:
            return self._forward(rows, adapters)
        results: list[Any] = [None] * len(rows)
        for adapter in dict.fromkeys(adapters):
            picked = [i for i, a in enumerate(adapters) if a == adapter]
            for i, result in zip(
                picked, self._forward([rows[i] for i in picked], [adapter] * len(picked)), strict=True
            ):
                results[i] = result
        return results

    def _forward(self, rows: list[list[int]], adapters: list[str | None]) -> list[np.ndarray]:
        import contextlib

        import torch

        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        kwargs: dict[str, Any] = {}
        scope: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self.mixed_batches:
            kwargs["adapter_names"] = [a or BASE_ADAPTER for a in adapters]
        elif self.adapters and adapters[0] is None:
            scope = self.model.disable_adapter()
        elif self.adapters:
            self.model.set_adapter(adapters[0])  # only the worker thread runs forwards
        with torch.inference_mode(), scope:
            out = self.model(input_ids=ids, attention_mask=mask, **kwargs)
            if self.facts.task == "classify":
                logits = out.logits.float()
                probs = torch.sigmoid(logits) if self.facts.multi_label else torch.softmax(logits, dim=-1)
                return list(probs.cpu().numpy())
            return list(pool(out.last_hidden_state.float(), mask, self.facts).cpu().numpy())


def mixed_batches_supported(model: Any) -> bool:
    """Whether PEFT can mix adapters per row in ``model``: its ``adapter_names`` path takes Linear, Embedding
    and Conv modules only, so a head saved whole that is another module (ELECTRA's two-layer
    ``ElectraClassificationHead``) rules it out, and rows are grouped per adapter instead."""
    import torch
    from peft.utils.other import ModulesToSaveWrapper

    supported = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return all(isinstance(m.original_module, supported) for m in model.modules() if isinstance(m, ModulesToSaveWrapper))


def pool(hidden: torch.Tensor, mask: torch.Tensor, facts: EncoderFacts) -> torch.Tensor:
    """sentence-transformers' pooling of ``hidden`` ([rows, tokens, width]) over the attended tokens."""
    import torch

    assert facts.pooling is not None
    if facts.pooling.mode == "cls":
        return hidden[:, 0]
    if facts.pooling.mode == "last":
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def finish_embedding(vector: np.ndarray, facts: EncoderFacts, dimensions: int | None) -> np.ndarray:
    """Cut to ``dimensions`` (a Matryoshka prefix), then unit length when the model normalizes."""
    import numpy as np

    out = vector[:dimensions] if dimensions else vector
    if facts.pooling is not None and facts.pooling.normalize:
        out = out / max(float(np.linalg.norm(out)), 1e-12)  # torch's F.normalize eps
    return out


def _model_class(facts: EncoderFacts) -> Any:
    from transformers import AutoModel, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if facts.task == "classify" else AutoModel


def load_encoder(
    source: str,
    plan: Plan,
    report: LoadReport,
    *,
    adapters: Mapping[str, Path] | None = None,
    progress: LoadProgress | None = None,
) -> EncoderModel:
    """The encoder at ``source`` with its adapters, loaded, its weights read and one forward run; each phase
    timed into ``report`` (``resolve``, ``map``, ``fault_in``, ``warm_up``, as the generation runner's)."""
    from transformers import AutoTokenizer

    from memserve.checkpoint.locate import locate
    from memserve.runner.load import from_pretrained_kwargs, read_weights, weight_bytes

    progress = progress if progress is not None else LoadProgress.for_stderr()
    with progress:
        report.state = "loading"
        t = time.perf_counter()
        progress.phase_started("resolve")
        located = locate(source)
        if located.path is None:
            raise InvalidArgument(f"{source} is not available locally; download it first (huggingface-cli download)")
        facts = read_folder_encoder_facts(located.path)
        if facts is None:
            raise CheckpointError(
                f"{source} is not an encoder (no *ForSequenceClassification architecture, no sentence-transformers "
                "Pooling module, no bare encoder model); plan it with a generation engine instead"
            )
        record_phase(report, progress, "resolve", t, path=str(located.path), task=facts.task)

        t = time.perf_counter()
        progress.phase_started("map")
        model = _model_class(facts).from_pretrained(located.path, **from_pretrained_kwargs(plan))
        names = tuple((adapters or {}).keys())
        if adapters:
            model = _with_adapters(model, adapters)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(located.path)
        record_phase(report, progress, "map", t, dtype=plan.dtype, adapters=list(names))

        t = time.perf_counter()
        progress.phase_started("fault_in", total_bytes=weight_bytes(model))
        read_weights(model, progress)
        record_phase(report, progress, "fault_in", t)

        encoder = EncoderModel(model, tokenizer, facts, adapters=names)
        report.state = "warming"
        t = time.perf_counter()
        progress.phase_started("warm_up")
        encoder.forward([filler(8, encoder)], [None])
        record_phase(report, progress, "warm_up", t)
        report.state = "ready"
    return encoder


def _with_adapters(model: Any, adapters: Mapping[str, Path]) -> Any:
    """``model`` wrapped by PEFT with every adapter loaded under its name; a bad folder is a clear error."""
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise MemserveError("LoRA adapters need PEFT: pip install peft") from exc
    wrapped: Any = None
    for name, folder in adapters.items():
        try:
            if wrapped is None:
                wrapped = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
            else:
                wrapped.load_adapter(str(folder), adapter_name=name)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise CheckpointError(
                f"the adapter '{name}' at {folder} does not load on this base ({type(exc).__name__}: {exc}); "
                "check that it was trained for this model"
            ) from exc
    return wrapped


def filler(tokens: int, encoder: EncoderModel) -> list[int]:
    """``tokens`` ordinary token ids (never the pad id), for warm-ups."""
    ids = [t for t in range(min(encoder.vocab_size, 4096)) if t != encoder.pad_id][8:] or [0]
    return [ids[i % len(ids)] for i in range(max(1, tokens))]


def worst_case_inputs(encoder: EncoderModel, max_batch_tokens: int) -> list[list[int]]:
    """The heaviest batch the budget admits: as many inputs of the model's limit as fit (at least one).
    Attention grows with rows × length², so the longest inputs cost the most for a given budget."""
    length = encoder.facts.max_tokens
    return [filler(length, encoder) for _ in range(max(1, max_batch_tokens // length))]


class EncoderEngine(EncoderBatcher):
    """The batcher with the model's worst-case warm-up, as ``runner/serve.py: fit_to_reservation`` runs it."""

    def __init__(self, encoder: EncoderModel, *, max_batch_tokens: int, max_requests: int) -> None:
        super().__init__(encoder.forward, max_batch_tokens=max_batch_tokens, max_requests=max_requests)
        self.encoder = encoder

    def warm_up_worst_case(self) -> dict[str, Any]:
        inputs = worst_case_inputs(self.encoder, self.max_batch_tokens)
        self.warm_up(inputs)
        return {"prompt_tokens": sum(len(i) for i in inputs), "measured_sequences": len(inputs)}


class _Encoder:
    """Turns a validated request into token ids, runs them through the engine, and builds the answer."""

    def __init__(self, engine: EncoderBatcher, encoder: EncoderModel, model_name: str) -> None:
        self.engine = engine
        self.encoder = encoder
        self.facts = encoder.facts
        self.model_name = model_name
        self.max_text_bytes = max_prompt_bytes(
            self.facts.max_tokens, longest_token_bytes(encoder.tokenizer.get_vocab())
        )

    def adapter_of(self, model: str) -> str | None:
        base, sep, adapter = model.partition(":")
        if sep and base == self.model_name and adapter in self.encoder.adapters:
            return adapter
        if model == self.model_name:
            return None
        if model in self.encoder.adapters:
            return model
        served = ", ".join([self.model_name, *self.encoder.adapters])
        raise ModelNotFound(
            f"this runner serves {served}, not '{model}'; send one of those names, or ask the gateway for the other "
            "model",
            param="model",
        )

    def token_ids(self, body: EncoderRequest) -> list[list[int]]:
        cut = body.max_tokens(self.facts.max_tokens)
        rows: list[list[int]] = []
        texts = [(i, t) for i, t in enumerate(body.input) if isinstance(t, str)]
        encoded: dict[int, list[int]] = {}
        if texts:
            # with truncation the text is first cut to bytes that surely hold its first `cut` tokens
            strings = [t[: self.max_text_bytes] if cut is not None else t for _, t in texts]
            ids = self.encoder.tokenizer(strings, truncation=cut is not None, max_length=cut)["input_ids"]
            encoded = {i: list(row) for (i, _), row in zip(texts, ids, strict=True)}
        for index, item in enumerate(body.input):
            row = encoded[index] if isinstance(item, str) else list(item)
            param = f"input[{index}]" if len(body.input) > 1 else "input"
            if isinstance(item, list):
                bad = [t for t in row if not 0 <= t < self.encoder.vocab_size]
                if bad:
                    raise InvalidArgument(
                        f"{param} has token ids outside [0, {self.encoder.vocab_size}): {bad[:5]}", param=param
                    )
                if cut is not None:
                    row = row[:cut]
            if len(row) > self.facts.max_tokens:
                raise input_too_long(param, f"{len(row)} tokens", self.facts.max_tokens)
            rows.append(row)
        return rows

    async def answer(self, request: Request, body: EncoderRequest) -> Response:
        adapter = self.adapter_of(body.model)
        check_encoder_request(body, self.facts, model=body.model, max_text_bytes=self.max_text_bytes)
        rows = self.token_ids(body)
        try:
            results = await until_disconnected(request.receive, self.engine.run(rows, adapter))
        except QueueFull as exc:
            raise Overloaded(
                f"the encoder is at capacity ({exc.running} requests admitted, {exc.waiting} inputs waiting); "
                f"retry in {exc.retry_after_seconds:g} s",
                retry_after_seconds=exc.retry_after_seconds,
            ) from exc
        if results is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        tokens = sum(len(r) for r in rows)
        if isinstance(body, EmbeddingRequest):
            vectors = [finish_embedding(v, self.facts, body.dimensions) for v in results]
            return JSONResponse(
                embedding_response(body.model, vectors, encoding_format=body.encoding_format, prompt_tokens=tokens)
            )
        return JSONResponse(classify_response(body.model, results, self.facts.labels, prompt_tokens=tokens))


def create_encoder_app(
    *, engine: EncoderBatcher, encoder: EncoderModel, model_name: str, health: Callable[[], dict[str, Any]]
) -> FastAPI:
    """The encoder runner's FastAPI app; its lifespan shutdown closes the engine."""
    answerer = _Encoder(engine, encoder, model_name)
    created = int(time.time())

    app = FastAPI(title=f"memserve encoder: {model_name}", lifespan=closing_lifespan(engine))
    install_error_handlers(app, serves=f"this runner serves {describe((*ENCODER_ROUTES, MODELS, HEALTH, STATS))}")

    @handles(app, EMBEDDINGS)
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return await answerer.answer(request, body)

    @handles(app, CLASSIFY)
    async def classify(body: ClassifyRequest, request: Request) -> Response:
        return await answerer.answer(request, body)

    @handles(app, MODELS)
    async def models() -> dict[str, Any]:
        card = {"object": "model", "created": created, "owned_by": "memserve"}
        base = {
            "id": model_name,
            **card,
            "context_tokens": encoder.facts.max_tokens,
            "task": encoder.facts.task,
            "parent": None,
        }
        adapters = [{"id": name, **card, "task": encoder.facts.task, "parent": model_name} for name in encoder.adapters]
        return {"object": "list", "data": [base, *adapters]}

    @handles(app, HEALTH)
    async def health_route() -> dict[str, Any]:
        return {**health(), "engine": engine.name, "encoder": encoder.facts.to_json()}

    @handles(app, STATS)
    async def stats() -> dict[str, Any]:
        return dataclasses.asdict(engine.stats())

    return app


def build_encoder(
    launch: PlanFile, *, name: str | None = None, adapters: Mapping[str, Path] | None = None
) -> tuple[FastAPI, EncoderBatcher]:
    """Everything short of listening, for ``runner/serve.py`` when ``plan.engine == "encoder"``: load, measure
    the worst-case batch against the reservation (``fit_to_reservation``: /health's ``plan_check``), and the app."""
    from memserve.runner.kernels import tune_allocator
    from memserve.runner.progress import emit
    from memserve.runner.serve import fit_to_reservation
    from memserve.runner.threads import on_fresh_thread
    from memserve.wire.events import Ready

    started = time.time()
    report = LoadReport()
    plan = launch.plan
    chosen = dict(adapters) if adapters is not None else {name: Path(source) for name, source in launch.adapters}

    def load() -> tuple[EncoderModel, EncoderEngine]:
        tune_allocator()
        encoder = load_encoder(launch.source, plan, report, adapters=chosen)
        engine = EncoderEngine(
            encoder,
            max_batch_tokens=max(plan.max_batch_tokens, encoder.facts.max_tokens),
            max_requests=plan.concurrency + launch.queue,
        )
        fit_to_reservation(engine, launch, report, rebuild=lambda _: engine)
        return encoder, engine

    encoder, engine = on_fresh_thread(load, name="memserve-load")
    served_name = name or Path(launch.source).name or launch.source

    def health() -> dict[str, Any]:
        return {
            "state": report.state,
            "model": served_name,
            "source": launch.source,
            "plan": launch.to_json()["plan"],
            "load": report.to_json(),
            "engine_fallback_reason": None,
            "memory": process_memory(),
            "uptime_seconds": round(time.time() - started, 3),
        }

    app = create_encoder_app(engine=engine, encoder=encoder, model_name=served_name, health=health)
    emit(Ready(served_name, engine.name, process_memory(), report.plan_check))
    return app, engine
