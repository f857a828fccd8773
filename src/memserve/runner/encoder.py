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
  ``POST /adapters`` (``{"name", "source"}``) adds one at run time and ``DELETE /adapters/{name}`` removes one,
  as the generation runner's routes do: the change runs on the engine's thread between two forwards, the
  base is never reloaded, and an adapter removed while requests use it goes when the last of them ends (new
  ones get 404 at once).

Routes: ``POST /v1/embeddings``, ``POST /v1/classify`` (the one the model does not do answers a 400 naming
the right one), ``GET /v1/models`` (the base, and each adapter with the base as ``parent``, as vLLM lists
them), ``GET /health`` and ``GET /stats`` (the generation runner's shapes). Tokenizing stays on the event
loop thread (a fast tokenizer used from two threads at once fails with "Already borrowed").
"""

from __future__ import annotations

import asyncio
import contextlib
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
from memserve.wire.events import AdapterSpec, QueueFull
from memserve.wire.http import handles, install_error_handlers, until_disconnected
from memserve.wire.routes import HEALTH, MODELS, RUNNER_ADAPTER_ADD, RUNNER_ADAPTER_REMOVE, STATS, describe

if TYPE_CHECKING:
    import numpy as np
    import torch

    from memserve.memory.fit import PlanFile
    from memserve.memory.planner import Plan

__all__ = ["BASE_ADAPTER", "EncoderModel", "build_encoder", "create_encoder_app", "load_encoder"]

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in adapter_names
GHOST_SWAP = "__memserve_swap__"  # a moment's name for an adapter replacing a removed one of the same name
CLIENT_CLOSED_REQUEST = 499


class EncoderModel:
    """The loaded model and what a forward needs: rows of token ids in, one result per row out."""

    def __init__(self, model: Any, tokenizer: Any, facts: EncoderFacts, *, adapters: Sequence[str] = ()) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.facts = facts
        self.adapters = tuple(adapters)
        self.ghost: str | None = None  # the last adapter removed, kept in PEFT's wrapper (``remove_adapter``)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) else 0
        self.vocab_size = len(tokenizer)
        self.mixed_batches = bool(self.adapters) and mixed_batches_supported(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def add_adapter(self, name: str, folder: Path) -> None:
        """Load adapter ``name`` beside the others (on the engine's thread: ``EncoderBatcher.on_worker``); the base
        is wrapped by PEFT with its first adapter. A bad folder is a CheckpointError and changes nothing."""
        if hasattr(self.model, "peft_config"):  # wrapped already
            if self.ghost == name:  # the last one removed, kept under this very name: make way for the new one
                _load_adapter(self.model, GHOST_SWAP, folder)
                self.model.delete_adapter(name)
                self.ghost = GHOST_SWAP
            _load_adapter(self.model, name, folder)
            if self.ghost is not None:  # the last one removed, kept until now (``remove_adapter``)
                self.model.delete_adapter(self.ghost)
                self.ghost = None
            self.model.set_adapter(name)
        else:
            self.model = _with_adapters(self.model, {name: folder})
        self.model.eval()
        self.adapters = (*self.adapters, name)
        self.mixed_batches = mixed_batches_supported(self.model)

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name``'s weights (on the engine's thread, once no request uses it). PEFT cannot hold no
        adapter at all (its ``disable_adapter`` and ``load_adapter`` then fail) nor ``unload`` a classifier without
        putting the adapter's copy of its head in place of the base's, so the last one is kept, unserved, until
        the next one is added."""
        self.adapters = tuple(a for a in self.adapters if a != name)
        self.mixed_batches = bool(self.adapters) and mixed_batches_supported(self.model)
        if self.adapters:
            self.model.delete_adapter(name)
        else:
            self.ghost = name
            self.model.set_adapter(name)  # PEFT's active adapter must be one it holds

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
        wrapped = hasattr(self.model, "peft_config")  # by PEFT, even with every adapter removed
        if self.mixed_batches:
            kwargs["adapter_names"] = [a or BASE_ADAPTER for a in adapters]
        elif wrapped and adapters[0] is None:
            scope = self.model.disable_adapter()
        elif wrapped:
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
        if wrapped is None:
            try:
                wrapped = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
            except (OSError, ValueError, RuntimeError, KeyError) as exc:
                raise _does_not_load(name, folder, exc) from exc
        else:
            _load_adapter(wrapped, name, folder)
    return wrapped


def _load_adapter(wrapped: Any, name: str, folder: Path) -> None:
    try:
        wrapped.load_adapter(str(folder), adapter_name=name)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        with contextlib.suppress(Exception):  # what PEFT began to install for it
            wrapped.delete_adapter(name)
        raise _does_not_load(name, folder, exc) from exc


def _does_not_load(name: str, folder: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"the adapter '{name}' at {folder} does not load on this base ({type(exc).__name__}: {exc}); "
        "check that it was trained for this model"
    )


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
        self.sources: dict[str, str] = {}  # adapters added at run time: their folders
        self.in_flight: dict[str, int] = {}  # requests answering on each adapter (event loop only)
        self.leaving: set[str] = set()  # removed while in flight: their weights go with the last request
        self.changing = asyncio.Lock()  # one add or remove at a time

    async def add_adapter(self, spec: AdapterSpec) -> dict[str, Any]:
        """Adapter ``spec.name`` from ``spec.source``, loaded between two forwards; the base is never reloaded."""
        async with self.changing:
            if spec.name == self.model_name or spec.name in self.encoder.adapters or spec.name in self.leaving:
                raise InvalidArgument(
                    f"the name {spec.name} is taken on this runner; remove that adapter first or pick another",
                    param="name",
                    code="adapter_exists",
                )
            folder = Path(spec.source).expanduser()
            if not (folder / "adapter_config.json").is_file():
                raise InvalidArgument(
                    f"{spec.source} is not a LoRA adapter folder (no adapter_config.json); give the folder PEFT's "
                    "save_pretrained wrote",
                    param="source",
                )
            await self.engine.on_worker(lambda: self.encoder.add_adapter(spec.name, folder))
            self.sources[spec.name] = str(folder)
        return {"id": spec.name, "object": "model", "parent": self.model_name, "root": str(folder)}

    async def remove_adapter(self, name: str) -> dict[str, Any]:
        """New requests on ``name`` get 404 at once; its weights go when its last request in flight ends."""
        async with self.changing:
            if name not in self.encoder.adapters or name in self.leaving:
                served = ", ".join(a for a in self.encoder.adapters if a not in self.leaving) or "none"
                raise ModelNotFound(f"no adapter named {name} is on this runner (its adapters: {served})", param="name")
            self.leaving.add(name)
            if not self.in_flight.get(name):
                await self._drop(name)
        return {"id": name, "object": "model", "parent": self.model_name, "deleted": True}

    async def _drop(self, name: str) -> None:
        await self.engine.on_worker(lambda: self.encoder.remove_adapter(name))
        self.leaving.discard(name)
        self.sources.pop(name, None)

    def adapter_of(self, model: str) -> str | None:
        base, sep, adapter = model.partition(":")
        served_adapters = [a for a in self.encoder.adapters if a not in self.leaving]
        if sep and base == self.model_name and adapter in served_adapters:
            return adapter
        if model == self.model_name:
            return None
        if model in served_adapters:
            return model
        served = ", ".join([self.model_name, *served_adapters])
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
        if adapter is not None:
            self.in_flight[adapter] = self.in_flight.get(adapter, 0) + 1
        try:
            results = await until_disconnected(request.receive, self.engine.run(rows, adapter))
        except QueueFull as exc:
            raise Overloaded(
                f"the encoder is at capacity ({exc.running} requests admitted, {exc.waiting} inputs waiting); "
                f"retry in {exc.retry_after_seconds:g} s",
                retry_after_seconds=exc.retry_after_seconds,
            ) from exc
        finally:
            if adapter is not None:
                self.in_flight[adapter] -= 1
                if not self.in_flight[adapter] and adapter in self.leaving:
                    await self._drop(adapter)  # removed while this request used it: its weights go now
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
    routes = (*ENCODER_ROUTES, MODELS, HEALTH, STATS, RUNNER_ADAPTER_ADD, RUNNER_ADAPTER_REMOVE)
    install_error_handlers(app, serves=f"this runner serves {describe(routes)}")

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
        adapters = [
            {"id": name, **card, "task": encoder.facts.task, "parent": model_name}
            | ({"root": answerer.sources[name]} if name in answerer.sources else {})
            for name in encoder.adapters
            if name not in answerer.leaving
        ]
        return {"object": "list", "data": [base, *adapters]}

    @handles(app, RUNNER_ADAPTER_ADD)
    async def add_adapter(body: AdapterSpec) -> dict[str, Any]:
        return await answerer.add_adapter(body)

    @handles(app, RUNNER_ADAPTER_REMOVE)
    async def remove_adapter(name: str) -> dict[str, Any]:
        return await answerer.remove_adapter(name)

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
