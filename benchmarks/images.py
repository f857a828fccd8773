"""An image-text runner's peak memory under image traffic at the caps, against its plan.

    python benchmarks/images.py                      # tiny demo LLaVA: 512 × 1, 512 × 4, 2048 × 2; a few minutes
    python benchmarks/images.py --cases 512x4 --burst 3
    python benchmarks/images.py --arch idefics3      # the tiling tower (SmolVLM v1's shape): 17 tiles an image

For each ``CONTEXTxCONCURRENCY`` case the demo vision-language model (``memserve demo-model --arch llava`` or
``idefics3``, fp32) is planned as ``fit`` plans it on a 4 GiB CPU budget (engine ``image-text``:
``memory/vision.py`` prices the images) and served by a real runner process (``python -m memserve.runner --plan``).
Its load ends with the worst-case warm-up (one request with the most images at the pixel cap). Then, straight to
the runner (no gateway body cap), bursts of requests at once, each with 4 PNGs of 2048 × 2048 whose random levels
do not compress (5.0 MiB each, 25.6 MiB bodies): ``concurrency`` requests, then ``--burst`` × ``concurrency`` (the
extra ones wait in the runner's queue). Printed per case: the plan's total, the warm-up's peak RSS, the peak RSS
(``VmHWM``) after each burst, and plan ÷ the highest peak (≥ 1 means the plan held).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import tempfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from common import runner
from PIL import Image

from memserve.checkpoint.demo_vision import VISION_ARCHS, write_demo_vision_model
from memserve.engines.fit import fit_result
from memserve.memory.fit import PlanFile
from memserve.memory.probe import probe_inventory

MiB = 1024**2
SIDE = 2048  # the pixel cap (wire/images.py: ImageLimits)
IMAGES = 4  # the count cap


def noisy_png_url(seed: int) -> str:
    levels = np.random.default_rng(seed).integers(0, 4, (SIDE, SIDE, 3), dtype=np.uint8) * 60
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, "PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def burst(base: str, body: dict[str, Any], count: int) -> None:
    async with httpx.AsyncClient(timeout=600) as client:
        answers = await asyncio.gather(*(client.post(f"{base}/v1/chat/completions", json=body) for _ in range(count)))
    bad = [a for a in answers if a.status_code != 200]
    if bad:
        raise SystemExit(f"{len(bad)} of {count} requests failed: {bad[0].status_code} {bad[0].text[:500]}")


def measure(model: Path, folder: Path, context: int, concurrency: int, times: int, body: dict[str, Any]) -> str:
    inventory = probe_inventory(memory="cpu=4GiB")
    _, _, result = fit_result(str(model), context=context, concurrency=concurrency, inventory=inventory)
    if result.plan is None or result.plan.engine != "image-text":
        raise SystemExit(f"the demo model did not plan as image-text: {result}")
    launch = PlanFile(str(model), result.plan)
    with runner(launch, folder, name="m") as (_, base):

        def peak() -> int:
            return int(httpx.get(f"{base}/health", timeout=30).json()["memory"]["cpu"]["peak_rss_bytes"])

        check = httpx.get(f"{base}/health", timeout=30).json()["load"]["plan_check"]
        planned, warm = check["reserved_bytes"]["cpu"], check["peak_bytes"]["cpu"]
        sequences = check["sequences"]
        asyncio.run(burst(base, body, sequences))
        at_concurrency = peak()
        asyncio.run(burst(base, body, times * sequences))
        beyond = peak()
    highest = max(warm, at_concurrency, beyond)
    return (
        f"| {context} × {concurrency} | {planned / MiB:.1f} MiB | {warm / MiB:.1f} MiB "
        f"| {at_concurrency / MiB:.1f} MiB | {beyond / MiB:.1f} MiB | {planned / highest:.3f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="512x1,512x4,2048x2", help="CONTEXTxCONCURRENCY, comma-separated")
    parser.add_argument("--burst", type=int, default=2, help="the second burst, in multiples of concurrency")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--arch", choices=VISION_ARCHS, default="llava", help="the demo's tower")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="memserve-images-") as tmp:
        work = Path(tmp)
        model = work / f"demo-{args.arch}"
        write_demo_vision_model(model, arch=args.arch)
        urls = [noisy_png_url(seed) for seed in range(IMAGES)]
        content = [*({"type": "image_url", "image_url": {"url": u}} for u in urls), {"type": "text", "text": "what?"}]
        body = {
            "model": "m",
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "messages": [{"role": "user", "content": content}],
        }
        print(f"bodies of {len(str(body)) / MiB:.1f} MiB; {args.max_tokens} tokens each")
        print(
            "| context × concurrency | plan | worst-case warm-up peak | peak, `concurrency` at once "
            f"| peak, {args.burst} × that | plan / peak |"
        )
        print("|---|---|---|---|---|---|")
        for case in args.cases.split(","):
            context, concurrency = (int(x) for x in case.split("x"))
            for_case = work / case
            for_case.mkdir()
            print(measure(model, for_case, context, concurrency, args.burst, body), flush=True)


if __name__ == "__main__":
    main()
