"""The generation engines against ``model.generate`` on the tiny fp32 demo models.

The anchor: greedy token ids equal ``generate(do_sample=False)`` token for token, alone and with 8
concurrent requests, for both engines. Async code runs under ``asyncio.run`` (no pytest-asyncio).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memserve.errors import InvalidArgument
from memserve.runner.engine import (
    ContinuousBatchingEngine,
    GenerateEngine,
    GenerationFailed,
    kv_cache_blocks,
    make_engine,
)
from memserve.wire.events import Engine, GenerationRequest, QueueFull, TokenEvent

MAX_NEW_TOKENS = 24
LONG_CONTEXT = 2048  # long requests outlive every check made while they run
LONG = 1900
KINDS = ["continuous-batching", "generate"]

AnyEngine = ContinuousBatchingEngine | GenerateEngine


def _load(path: Path) -> Any:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def _prompts(path: Path) -> list[tuple[int, ...]]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    topics = ["cats", "the sea", "bread", "a red bicycle", "winter", "prime numbers", "tea", "old maps"]
    prompts = []
    for i, topic in enumerate(topics):
        messages = [{"role": "user", "content": f"Tell me {i + 1} things about {topic}." + " Please." * i}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(tuple(tokenizer(text)["input_ids"]))
    return prompts


def _reference(model: Any, prompt: tuple[int, ...], stop_ids: tuple[int, ...], max_new_tokens: int) -> list[int]:
    input_ids = torch.tensor([prompt])
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids),
        pad_token_id=stop_ids[0],
    )
    return [int(t) for t in out[0, len(prompt) :]]


def _eos(model: Any) -> tuple[int, ...]:
    eos = model.generation_config.eos_token_id
    return tuple(eos) if isinstance(eos, list) else (eos,)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    return _load(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(tiny_model_dir: Path) -> list[tuple[int, ...]]:
    return _prompts(tiny_model_dir)


@pytest.fixture(scope="module")
def references(model: Any, prompts: list[tuple[int, ...]]) -> list[list[int]]:
    return [_reference(model, p, _eos(model), MAX_NEW_TOKENS) for p in prompts]


@pytest.fixture
def build(model: Any) -> Iterator[Callable[..., AnyEngine]]:
    """Build engines on the shared tiny model; each is closed after the test (CB's thread is not a daemon)."""
    built: list[AnyEngine] = []

    def _build(kind: str, *, target: Any = None, **sizes: Any) -> AnyEngine:
        sizes = {"max_sequences": 8, "max_queue": 8, "max_context_tokens": 512, **sizes}
        engine: AnyEngine
        if kind == "continuous-batching":
            sizes.setdefault("max_batch_tokens", 256)
            engine = ContinuousBatchingEngine(target if target is not None else model, **sizes)
        else:
            sizes.pop("max_batch_tokens", None)
            engine = GenerateEngine(target if target is not None else model, **sizes)
        built.append(engine)
        return engine

    yield _build
    for engine in built:
        asyncio.run(engine.close())


def _request(prompt: tuple[int, ...], rid: str = "r", **fields: Any) -> GenerationRequest:
    fields.setdefault("max_new_tokens", MAX_NEW_TOKENS)
    return GenerationRequest(request_id=rid, prompt_ids=prompt, **fields)


async def _collect(engine: Engine, request: GenerationRequest) -> list[TokenEvent]:
    return [event async for event in engine.generate(request)]


async def _wait_until(predicate: Callable[[], bool], timeout_seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_seconds
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# -- sizing ---------------------------------------------------------------------------------------------


def test_kv_cache_blocks_round_each_sequence_up_and_add_one_page_of_slack() -> None:
    # 100 tokens need 2 pages of 64 per sequence (pages are never shared): 8 * (2 + 1), not ceil(800 / 64)
    assert kv_cache_blocks(max_sequences=8, max_context_tokens=100, page_size=64) == 24
    assert kv_cache_blocks(max_sequences=1, max_context_tokens=64, page_size=64) == 2


def test_cb_cache_is_sized_from_the_plan_not_from_free_memory(model: Any, build: Callable[..., AnyEngine]) -> None:
    rss_before = psutil.Process().memory_info().rss
    engine = build("continuous-batching", max_sequences=4, max_context_tokens=256, max_batch_tokens=128)
    rss_growth = psutil.Process().memory_info().rss - rss_before

    assert isinstance(engine, ContinuousBatchingEngine)
    config = engine.cb_config
    assert (config.page_size, config.num_blocks) == (64, 4 * (256 // 64 + 1))
    assert (config.max_batch_tokens, config.max_requests_per_batch) == (128, 4)
    assert config.num_blocks is not None
    c = model.config
    block_bytes = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * config.page_size * 4
    assert engine.kv_cache_bytes == (config.num_blocks + 2) * block_bytes  # + the library's 2 trash sectors
    assert engine.stats().extra["kv_cache_bytes"] == engine.kv_cache_bytes
    # the library's default would zero-fill 60% of total RAM (12.7 GiB here) for this model
    assert rss_growth < 64 * 1024**2
    # a server that exits without awaiting close() must not hang on the library's thread
    thread = engine._manager._generation_thread
    assert thread is not None and thread.daemon


# -- the correctness anchor -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_equals_generate_alone_and_with_8_concurrent(
    kind: str, build: Callable[..., AnyEngine], prompts: list[tuple[int, ...]], references: list[list[int]]
) -> None:
    engine = build(kind)

    async def scenario() -> None:
        alone = await _collect(engine, _request(prompts[3], "alone"))
        assert [e.token_id for e in alone] == references[3]
        assert [e.index for e in alone] == list(range(len(alone)))
        assert [e.finish_reason for e in alone[:-1]] == [None] * (len(alone) - 1)
        assert alone[-1].finish_reason == "length"
        assert all(e.request_id == "alone" for e in alone)
        assert 0 < alone[0].elapsed_seconds <= alone[-1].elapsed_seconds

        together = await asyncio.gather(*(_collect(engine, _request(p, f"r{i}")) for i, p in enumerate(prompts)))
        for i, events in enumerate(together):
            assert [e.token_id for e in events] == references[i], f"request {i} differs from generate"
            assert all(e.request_id == f"r{i}" for e in events)

        stats = engine.stats()
        assert (stats.running, stats.waiting, stats.requests_total) == (0, 0, 9)
        assert stats.prompt_tokens_total == len(prompts[3]) + sum(len(p) for p in prompts)
        assert stats.generation_tokens_total == len(references[3]) + sum(len(r) for r in references)

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", KINDS)
def test_a_stop_token_ends_the_sequence_after_emitting_it(
    kind: str, build: Callable[..., AnyEngine], prompts: list[tuple[int, ...]], references: list[list[int]]
) -> None:
    engine = build(kind)
    stop = references[0][5]
    expected = references[0][: references[0].index(stop) + 1]

    events = asyncio.run(_collect(engine, _request(prompts[0], stop_token_ids=(stop,))))

    assert [e.token_id for e in events] == expected
    assert events[-1].finish_reason == "stop"


def test_cb_greedy_equals_generate_on_qwen2_with_tied_embeddings_and_biases(tiny_qwen_dir: Path) -> None:
    model = _load(tiny_qwen_dir)
    prompts = _prompts(tiny_qwen_dir)
    references = [_reference(model, p, _eos(model), MAX_NEW_TOKENS) for p in prompts]
    engine = ContinuousBatchingEngine(model, max_sequences=8, max_queue=0, max_context_tokens=256, max_batch_tokens=256)

    async def scenario() -> list[list[TokenEvent]]:
        try:
            return await asyncio.gather(*(_collect(engine, _request(p, f"q{i}")) for i, p in enumerate(prompts)))
        finally:
            await engine.close()

    results = asyncio.run(scenario())
    assert [[e.token_id for e in events] for events in results] == references


def test_cb_prompts_longer_than_max_batch_tokens_are_prefilled_in_chunks(
    build: Callable[..., AnyEngine], prompts: list[tuple[int, ...]], references: list[list[int]]
) -> None:
    engine = build("continuous-batching", max_batch_tokens=16)
    assert min(len(p) for p in prompts) > 16

    async def scenario() -> list[list[TokenEvent]]:
        return await asyncio.gather(*(_collect(engine, _request(p, f"r{i}")) for i, p in enumerate(prompts)))

    assert [[e.token_id for e in events] for events in asyncio.run(scenario())] == references


# -- cancellation and bounds ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_leaving_early_frees_the_slot_for_the_next_request(
    kind: str, build: Callable[..., AnyEngine], prompts: list[tuple[int, ...]], references: list[list[int]]
) -> None:
    engine = build(kind, max_sequences=1, max_queue=0, max_context_tokens=LONG_CONTEXT)
    long_request = _request(prompts[1], "long", max_new_tokens=LONG, stop_token_ids=(-1,))

    async def scenario() -> None:
        stream = engine.generate(long_request)
        assert isinstance(stream, AsyncIterator)
        await anext(stream)
        assert engine.stats().running == 1
        await stream.aclose()  # the client went away
        assert (engine.stats().running, engine.stats().waiting) == (0, 0)
        if isinstance(engine, ContinuousBatchingEngine):  # the library dropped it and freed its pages
            processor = engine._manager.batch_processor
            assert processor is not None
            await _wait_until(lambda: not processor.scheduler.active_requests)
            await _wait_until(lambda: not any(a.block_table for a in processor.cache.cache_allocators.values()))

        # a cancelled task frees its slot too
        task = asyncio.create_task(_collect(engine, long_request))
        await _wait_until(lambda: engine.stats().generation_tokens_total > 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.stats().running == 0

        events = await _collect(engine, _request(prompts[2], "next"))
        assert [e.token_id for e in events] == references[2]
        if isinstance(engine, ContinuousBatchingEngine):  # no result handler outlives its request
            assert engine._manager.output_router.result_handlers == {}

    asyncio.run(scenario())


def test_generate_engine_batches_what_waits_and_keeps_each_row_to_its_own_limits(
    build: Callable[..., AnyEngine], prompts: list[tuple[int, ...]], references: list[list[int]]
) -> None:
    """Static batching: requests that arrive while a call runs go together in the next one, left-padded
    (prompts of different lengths), each row ending at its own stop token or max_new_tokens."""
    engine = build("generate", max_sequences=8, max_context_tokens=LONG_CONTEXT)
    assert isinstance(engine, GenerateEngine)
    long_request = _request(prompts[1], "long", max_new_tokens=200, stop_token_ids=(-1,))
    stop = references[0][5]

    async def scenario() -> None:
        running = asyncio.create_task(_collect(engine, long_request))
        await _wait_until(lambda: engine.stats().generation_tokens_total > 0)  # the worker is busy
        waiting = [
            _request(prompts[0], "stops", stop_token_ids=(stop,)),
            _request(prompts[2], "short", max_new_tokens=3),
            _request(prompts[3], "full"),
            # decodes differently: its own call; no stop token, so a sampled end-of-text cannot cut it short
            _request(prompts[4], "sampled", temperature=0.9, top_p=0.95, stop_token_ids=(-1,)),
        ]
        results = await asyncio.gather(*(_collect(engine, r) for r in waiting))
        await running
        stops, short, full, sampled = results
        assert [e.token_id for e in stops] == references[0][: references[0].index(stop) + 1]
        assert stops[-1].finish_reason == "stop"
        assert [e.token_id for e in short] == references[2][:3] and short[-1].finish_reason == "length"
        assert [e.token_id for e in full] == references[3] and full[-1].finish_reason == "length"
        assert len(sampled) == MAX_NEW_TOKENS and sampled[-1].finish_reason == "length"
        extra = engine.stats().extra
        assert extra["largest_batch"] == 3  # the three greedy requests shared one call
        assert extra["generate_calls_total"] == 3  # the long one, the greedy three, the sampled one

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", KINDS)
def test_queue_full_beyond_max_sequences_plus_max_queue(
    kind: str, build: Callable[..., AnyEngine], prompts: list[tuple[int, ...]]
) -> None:
    engine = build(kind, max_sequences=1, max_queue=1, max_context_tokens=LONG_CONTEXT)
    long_request = _request(prompts[0], "long", max_new_tokens=LONG, stop_token_ids=(-1,))

    async def scenario() -> None:
        running = engine.generate(long_request)
        await anext(running)
        waiting = asyncio.create_task(_collect(engine, _request(prompts[1], "waiting")))
        await _wait_until(lambda: engine.stats().waiting == 1)

        with pytest.raises(QueueFull) as refused:
            await anext(engine.generate(_request(prompts[2], "refused")))
        assert (refused.value.running, refused.value.waiting) == (1, 1)
        assert engine.stats().extra["rejected_total"] == 1

        waiting.cancel()  # a waiter that leaves gives its place back
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert engine.stats().waiting == 0
        await running.aclose()
        assert len(await _collect(engine, _request(prompts[2], "after", max_new_tokens=3))) == 3

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", KINDS)
def test_waiting_requests_run_in_turn(
    kind: str, build: Callable[..., AnyEngine], prompts: list[tuple[int, ...]], references: list[list[int]]
) -> None:
    engine = build(kind, max_sequences=2, max_queue=6)

    async def scenario() -> list[list[TokenEvent]]:
        return await asyncio.gather(*(_collect(engine, _request(p, f"r{i}")) for i, p in enumerate(prompts)))

    results = asyncio.run(scenario())
    assert [[e.token_id for e in events] for events in results] == references


# -- sampling, validation, lifecycle --------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_runs_beside_greedy_and_respects_max_new_tokens(
    kind: str,
    build: Callable[..., AnyEngine],
    model: Any,
    prompts: list[tuple[int, ...]],
    references: list[list[int]],
) -> None:
    engine = build(kind)

    async def scenario() -> list[list[TokenEvent]]:
        sampled = [
            _request(p, f"s{i}", max_new_tokens=10, temperature=0.9, top_p=0.95 if i % 2 else 1.0, seed=7)
            for i, p in enumerate(prompts[:4])
        ]
        nucleus_of_one = [_request(p, f"n{i}", temperature=1.0, top_p=1e-6) for i, p in enumerate(prompts[4:6])]
        greedy = [_request(p, f"g{i}") for i, p in enumerate(prompts[6:])]
        return await asyncio.gather(*(_collect(engine, r) for r in sampled + nucleus_of_one + greedy))

    results = asyncio.run(scenario())
    for events in results[:4]:
        assert 1 <= len(events) <= 10
        assert events[-1].finish_reason in ("stop", "length")
        assert len(events) == 10 or events[-1].finish_reason == "stop"
        assert all(0 <= e.token_id < model.config.vocab_size for e in events)
    # a nucleus that holds one token is greedy, and greedy rows are untouched by their sampled neighbours
    assert [[e.token_id for e in events] for events in results[4:]] == references[4:]


def test_cb_sampling_processors_draw_from_the_softmax_and_leave_greedy_rows_alone() -> None:
    from memserve.runner.sampling import NucleusSampleProcessor, TemperatureProcessor, as_int32

    torch.manual_seed(0)
    rows = 20_000
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).repeat(rows, 1)

    def draw(temperature: float, top_p: float) -> torch.Tensor:
        scores = TemperatureProcessor()(logits, as_int32([temperature] * rows))
        scores = NucleusSampleProcessor()(scores, as_int32([top_p] * rows))
        return torch.bincount(scores.argmax(-1), minlength=4) / rows

    assert torch.allclose(draw(1.0, 1.0), logits[0].softmax(-1), atol=0.015)
    assert torch.allclose(draw(2.0, 1.0), (logits[0] / 2).softmax(-1), atol=0.015)
    # top_p 0.7 keeps the two most likely tokens (0.64 + 0.24), renormalised
    kept = logits[0][:2].softmax(-1)
    assert torch.allclose(draw(1.0, 0.7), torch.tensor([kept[0], kept[1], 0.0, 0.0]), atol=0.015)
    # temperature 0 and top_p 0 mark a greedy row: the scores come back as they were
    greedy = NucleusSampleProcessor()(TemperatureProcessor()(logits[:2], as_int32([0.0, 0.0])), as_int32([0.0, 0.0]))
    assert torch.equal(greedy, logits[:2])


def test_generate_engine_honours_seeds(build: Callable[..., AnyEngine], prompts: list[tuple[int, ...]]) -> None:
    engine = build("generate")
    request = _request(prompts[0], max_new_tokens=12, temperature=1.5, seed=1234, stop_token_ids=(-1,))

    async def scenario() -> tuple[list[int], list[int]]:
        first = await _collect(engine, request)
        second = await _collect(engine, request)
        return [e.token_id for e in first], [e.token_id for e in second]

    first, second = asyncio.run(scenario())
    assert first == second


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt_ids": ()}, "prompt_ids"),
        ({"prompt_ids": (5000,)}, "prompt_ids"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 500}, "max_new_tokens"),  # the prompt plus 500 overflows the 512-token context
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
    ],
)
def test_bad_requests_are_refused_before_any_token(
    fields: dict[str, Any], param: str, build: Callable[..., AnyEngine], prompts: list[tuple[int, ...]]
) -> None:
    engine = build("generate")
    request = _request(fields["prompt_ids"]) if "prompt_ids" in fields else _request(prompts[7], **fields)

    with pytest.raises(InvalidArgument) as refused:
        asyncio.run(_collect(engine, request))
    assert refused.value.param == param
    assert engine.stats().requests_total == 0


@pytest.mark.parametrize("kind", KINDS)
def test_close_fails_requests_in_flight(kind: str, model: Any, prompts: list[tuple[int, ...]]) -> None:
    engine: AnyEngine = (
        ContinuousBatchingEngine(
            model, max_sequences=1, max_queue=1, max_context_tokens=LONG_CONTEXT, max_batch_tokens=64
        )
        if kind == "continuous-batching"
        else GenerateEngine(model, max_sequences=1, max_queue=1, max_context_tokens=LONG_CONTEXT)
    )
    long_request = _request(prompts[0], max_new_tokens=LONG, stop_token_ids=(-1,))

    async def scenario() -> None:
        running = asyncio.create_task(_collect(engine, long_request))
        waiting = asyncio.create_task(_collect(engine, long_request))
        await _wait_until(lambda: engine.stats().waiting == 1 and engine.stats().generation_tokens_total > 0)
        await engine.close()
        for task in (running, waiting):
            with pytest.raises(GenerationFailed):
                await task
        with pytest.raises(GenerationFailed):
            await _collect(engine, long_request)

    asyncio.run(scenario())
    assert model.config._attn_implementation == "sdpa"  # restored (or never changed) after close


@pytest.mark.parametrize("kind", KINDS)
def test_a_failing_forward_fails_the_request_and_only_cb_stays_down(
    kind: str,
    build: Callable[..., AnyEngine],
    model: Any,
    prompts: list[tuple[int, ...]],
    references: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = build(kind)

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom in forward")

    async def scenario() -> None:
        with monkeypatch.context() as patch:
            patch.setattr(model, "forward", boom)
            with pytest.raises(GenerationFailed, match="boom in forward"):
                await _collect(engine, _request(prompts[0]))
        assert engine.stats().running == 0
        if kind == "generate":  # one request failed; the worker goes on
            assert [e.token_id for e in await _collect(engine, _request(prompts[1]))] == references[1]
            assert engine.failure is None
        else:  # the library's thread is gone: say so, and refuse at once
            await _wait_until(lambda: engine.failure is not None)
            assert "boom in forward" in (engine.failure or "")
            with pytest.raises(GenerationFailed, match="boom in forward"):
                await _collect(engine, _request(prompts[1]))

    asyncio.run(scenario())


def test_make_engine_prefers_continuous_batching(model: Any) -> None:
    engine, reason = make_engine(model, max_sequences=2, max_queue=2, max_context_tokens=128, max_batch_tokens=64)
    asyncio.run(engine.close())
    assert (engine.name, reason) == ("continuous-batching", None)

    engine, reason = make_engine(
        model, prefer="generate", max_sequences=2, max_queue=2, max_context_tokens=128, max_batch_tokens=64
    )
    asyncio.run(engine.close())
    assert (engine.name, reason) == ("generate", None)

    with pytest.raises(InvalidArgument):
        make_engine(model, prefer="vllm", max_sequences=2, max_queue=2, max_context_tokens=128, max_batch_tokens=64)


def test_make_engine_falls_back_to_generate_with_the_reason(
    model: Any, prompts: list[tuple[int, ...]], references: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(**kwargs: Any) -> None:
        raise ValueError("Implementation flex_attention is not supported for continuous batching")

    monkeypatch.setattr(model, "init_continuous_batching", refuse)
    engine, reason = make_engine(model, max_sequences=2, max_queue=2, max_context_tokens=512, max_batch_tokens=64)
    try:
        assert engine.name == "generate"
        assert reason is not None and "flex_attention is not supported" in reason
        events = asyncio.run(_collect(engine, _request(prompts[4])))
        assert [e.token_id for e in events] == references[4]
    finally:
        asyncio.run(engine.close())


def test_make_engine_raises_on_bad_sizes_instead_of_falling_back(model: Any) -> None:
    with pytest.raises(InvalidArgument):
        make_engine(model, max_sequences=0, max_queue=2, max_context_tokens=128, max_batch_tokens=64)


# ----------------------------------------------------------------------------------------------------------
# The plan's bounds: chunked prefill in the fallback, the worst-case warm-up in both engines


@pytest.fixture
def forward_tokens(model: Any) -> Iterator[list[int]]:
    """Tokens (rows × positions) of every forward the shared model runs while the test does."""
    seen: list[int] = []

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
        if ids is not None:
            seen.append(int(ids.numel()))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    yield seen
    handle.remove()


def test_generate_fallback_prefills_in_chunks_of_the_plans_batch_tokens(
    model: Any, prompts: list[tuple[int, ...]], forward_tokens: list[int]
) -> None:
    engine = GenerateEngine(
        model, max_sequences=2, max_queue=2, max_context_tokens=512, max_batch_tokens=64, warmup=False
    )
    assert engine.prefill_chunk_tokens(rows=2, prompt_tokens=150) == 32
    assert engine.prefill_chunk_tokens(rows=1, prompt_tokens=40) is None  # fits in one forward
    long_prompt = (prompts[0] * 10)[:150]

    async def run() -> list[list[TokenEvent]]:
        try:
            return list(
                await asyncio.gather(
                    *(_collect(engine, _request(long_prompt, f"r{i}", max_new_tokens=4)) for i in range(2))
                )
            )
        finally:
            await engine.close()

    results = asyncio.run(run())
    assert [len(events) for events in results] == [4, 4]
    assert max(forward_tokens) <= 64  # never the whole 150-token prompt (or two of them) in one forward
    assert sum(1 for n in forward_tokens if n > 2) >= 3  # the prompt went through in several chunks


def test_generate_without_batch_tokens_prefills_the_prompt_whole(
    model: Any, prompts: list[tuple[int, ...]], forward_tokens: list[int]
) -> None:
    engine = GenerateEngine(model, max_sequences=1, max_queue=1, max_context_tokens=512, warmup=False)
    assert engine.prefill_chunk_tokens(rows=1, prompt_tokens=150) is None
    long_prompt = (prompts[0] * 10)[:150]

    async def run() -> list[TokenEvent]:
        try:
            return await _collect(engine, _request(long_prompt, max_new_tokens=2))
        finally:
            await engine.close()

    assert len(asyncio.run(run())) == 2
    assert max(forward_tokens) == 150


@pytest.mark.parametrize("kind", KINDS)
def test_worst_case_warm_up_runs_the_largest_chunk_through_the_engine(
    kind: str, build: Callable[..., AnyEngine], forward_tokens: list[int]
) -> None:
    engine = build(kind, max_sequences=2, max_context_tokens=300, max_batch_tokens=128, warmup=False)
    if isinstance(engine, GenerateEngine):
        engine.max_batch_tokens = 128  # the fixture builds the fallback without one
    forward_tokens.clear()
    result = engine.warm_up_worst_case()
    assert result["prompt_tokens"] == 128  # one whole prefill chunk (sdpa): the largest forward a request causes
    assert result["measured_sequences"] == 1
    assert max(forward_tokens) == 128
    if isinstance(engine, ContinuousBatchingEngine):
        # every KV page and the preallocated masks were written, as full traffic writes them
        masks = engine._memory.get("attention_mask_bytes", 0)
        assert result["touched_bytes"] == engine.kv_cache_bytes + masks > engine.kv_cache_bytes
    else:
        assert result["touched_bytes"] == 0  # its cache grows per call: the caller adds the unmeasured rows


def test_eager_attention_warms_up_with_a_prompt_that_fills_the_context(build: Callable[..., AnyEngine]) -> None:
    engine = build("generate", max_sequences=1, max_context_tokens=300, warmup=False)
    assert isinstance(engine, GenerateEngine)
    engine.max_batch_tokens = 128
    original = engine.model.config._attn_implementation
    engine.model.config._attn_implementation = "eager"  # scores grow with the past: the last chunk is the worst
    try:
        assert engine.warm_up_worst_case()["prompt_tokens"] == 299
    finally:
        engine.model.config._attn_implementation = original
