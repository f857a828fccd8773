"""LoRA adapters on a vision-language base (LLaVA and Idefics3 demos), served by its one image runner: requests on
different adapters and on the base, with and without images, at once, each answer its own PEFT model's greedy
text on the processor's inputs; an adapter added at run time answers as one loaded at start; an adapter that
targets the vision tower is refused naming the module, and the runner keeps serving; base + adapters stay in a
plan that prices them."""

from __future__ import annotations

import asyncio
import io
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from memserve.checkpoint.demo_adapter import write_demo_adapter
from memserve.checkpoint.facts import read_adapter_facts
from tests.serving import runner_process
from tests.vision.helpers import data_url, image_message, png

MAX_NEW = 10
RED, GREEN = png(50, 40, (200, 10, 30)), png(64, 64, (10, 200, 30))
# (model, images, text): adapters and the base, with an image and without, in one burst
CASES: list[tuple[str, list[bytes], str]] = [
    ("ad1", [RED], "what is this?"),
    ("vis", [RED], "what is this?"),
    ("vis:ad2", [GREEN], "what is this?"),
    ("ad1", [], "no picture here"),
    ("vis", [GREEN], "what is this?"),
    ("ad2", [RED], "what is this?"),
]


@pytest.fixture(scope="module", params=["llava", "idefics3"])
def setup(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, dict[str, Path], Path]]:
    """(runner URL, base folder, adapters by name, runner folder): the demo of one arch with two adapters."""
    base_dir = Path(request.getfixturevalue("tiny_vision_dir" if request.param == "llava" else "tiny_idefics3_dir"))
    root = tmp_path_factory.mktemp(f"vision-adapters-{request.param}")
    adapters = {
        name: write_demo_adapter(base_dir, root / name, seed=seed).path for name, seed in (("ad1", 1), ("ad2", 2))
    }
    folder = root / "runner"
    folder.mkdir()
    env = {"OMP_NUM_THREADS": "1"}
    with runner_process(
        base_dir, folder, name="vis", context=512, concurrency=4, env=env, adapters=tuple(adapters.values())
    ) as base:
        yield base, base_dir, adapters, folder


def content(images: list[bytes], text: str) -> Any:
    return [*({"type": "image"} for _ in images), {"type": "text", "text": text}] if images else text


def reference(base_dir: Path, adapter: Path | None, images: list[bytes], text: str) -> str:
    """Greedy ``generate`` of the base with ``adapter`` loaded by PEFT (unmerged: ``base(x) + scale · B(A(x))``, as
    the runner computes it; ``tests/adapters/conftest.py: peft_greedy`` says why not merged) on the processor's
    inputs, decoded as the runner decodes."""
    import torch
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(base_dir)
    model: Any = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32)
    if adapter is not None:
        with warnings.catch_warnings():  # PEFT 0.21 reads a property transformers 5.24 deprecates
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = PeftModel.from_pretrained(model, str(adapter))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": content(images, text)}], add_generation_prompt=True, tokenize=False
    )
    pictures = [Image.open(io.BytesIO(i)).convert("RGB") for i in images]
    inputs = processor(images=pictures or None, text=prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    return str(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :].tolist(), skip_special_tokens=True))


def messages(images: list[bytes], text: str) -> list[dict[str, Any]]:
    return [image_message(*(data_url(i) for i in images), text=text)] if images else [{"role": "user", "content": text}]


def ask_all(base: str, cases: list[tuple[str, list[bytes], str]]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            calls = (
                client.post(
                    f"{base}/v1/chat/completions",
                    json={"model": m, "messages": messages(i, t), "max_tokens": MAX_NEW, "temperature": 0},
                )
                for m, i, t in cases
            )
            return list(await asyncio.gather(*calls))

    return asyncio.run(run())


def test_adapters_and_the_base_at_once_equal_each_peft_model(setup: tuple[str, Path, dict[str, Path], Path]) -> None:
    base, base_dir, adapters, _ = setup
    answers = ask_all(base, CASES)
    assert [a.status_code for a in answers] == [200] * len(CASES), [a.text for a in answers]
    got = [a.json()["choices"][0]["message"]["content"] for a in answers]
    adapter_of = {"vis": None, "ad1": adapters["ad1"], "ad2": adapters["ad2"], "vis:ad2": adapters["ad2"]}
    expected = [reference(base_dir, adapter_of[m], i, t) for m, i, t in CASES]
    assert got == expected
    assert expected[0] != expected[1], "the adapter should change the answer, or the test proves nothing"


def test_an_adapter_added_at_run_time_answers_as_one_loaded_at_start_and_goes_when_removed(
    setup: tuple[str, Path, dict[str, Path], Path],
) -> None:
    base, _, adapters, _ = setup
    added = httpx.post(f"{base}/adapters", json={"name": "again", "source": str(adapters["ad1"])}, timeout=120)
    assert added.status_code == 200, added.text
    first, again = ask_all(base, [("ad1", [RED], "what is this?"), ("again", [RED], "what is this?")])
    assert first.status_code == again.status_code == 200
    assert again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert httpx.delete(f"{base}/adapters/again", timeout=60).status_code == 200
    [gone] = ask_all(base, [("again", [RED], "what is this?")])
    assert gone.status_code == 404, gone.text


def test_an_adapter_on_the_vision_tower_is_refused_naming_the_module(
    setup: tuple[str, Path, dict[str, Path], Path], tmp_path: Path
) -> None:
    """PEFT's plain ``target_modules=["q_proj", "v_proj"]`` matches the tower's attention too; memserve routes an
    adapter by batch row, which the tower's batch (its images) is not, so it serves adapters on the language
    model only and says so."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base, base_dir, _, _ = setup
    model = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "tower")
    refused = httpx.post(f"{base}/adapters", json={"name": "tower", "source": str(tmp_path / "tower")}, timeout=120)
    assert refused.status_code == 400, refused.text
    message = refused.json()["error"]["message"]
    assert "outside this vision-language model's language model" in message
    assert ".self_attn.q_proj" in message and ("vision_tower" in message or "vision_model" in message)
    language_model = (
        "model.text_model" if "Idefics3" in (base_dir / "config.json").read_text() else "model.language_model"
    )
    assert f"a regex such as '^{re.escape(language_model)}" in message  # the regex to train with, for this model
    [served] = ask_all(base, [("ad1", [RED], "what is this?")])
    assert served.status_code == 200


def test_base_and_adapters_stay_in_the_plan_that_prices_them(setup: tuple[str, Path, dict[str, Path], Path]) -> None:
    base, _, adapters, folder = setup
    plan = json.loads((folder / "plan.json").read_text())
    header_bytes = sum(read_adapter_facts(p).weights_bytes for p in adapters.values())
    assert sum(a["weights_bytes"] for a in plan["model"]["adapters"]) == header_bytes
    health = httpx.get(f"{base}/health").json()
    assert [a["name"] for a in health["adapters"]] == ["ad1", "ad2"]
    check = health["load"]["plan_check"]
    assert check["fits"], check
    ask_all(base, CASES)
    health = httpx.get(f"{base}/health").json()
    reserved, peak = check["reserved_bytes"]["cpu"], health["memory"]["cpu"]["peak_rss_bytes"]
    assert peak <= reserved, f"the runner peaked at {peak} bytes, over its plan's {reserved}"
