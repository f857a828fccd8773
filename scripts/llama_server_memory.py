"""Does the llama.cpp plan bound the real llama-server? The plan against llama.cpp's own buffers and its peak.

For each case ``CONTEXTxSLOTS[:BATCH]`` it plans the GGUF (``memserve.engines.llamacpp.plan``), starts
llama-server with ``arguments()``, waits for ``/health``, sends one prompt per slot at once that fills the
slot's context, and prints what llama.cpp says it allocated (its log's model, KV, compute and output
buffers), the process's peak resident memory (``VmHWM``) and ``plan / peak`` (the project's estimates
are held to [1.00, 1.10]).

    python scripts/llama_server_memory.py MODEL.gguf 512x1 512x4 2048x1:512
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from memserve.checkpoint.gguf import read_gguf_facts
from memserve.engines.llamacpp import arguments, plan
from memserve.memory.fit import PlanFile
from memserve.memory.inventory import Device, Inventory
from memserve.memory.planner import Request

MiB = 1024**2
_BUFFER = re.compile(r"(\w+) +(model|KV|compute|output) buffer size = +([\d.]+) MiB")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


async def _fill(url: str, context: int, slots: int, new_tokens: int) -> None:
    prompt = [(7 * i) % 1000 + 3 for i in range(context - new_tokens)]
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(
            *(
                client.post(
                    f"{url}/completion",
                    json={"prompt": prompt, "n_predict": new_tokens, "temperature": 0, "ignore_eos": True},
                )
                for _ in range(slots)
            )
        )


def run_case(model: Path, context: int, slots: int, batch: int, threads: int) -> None:
    facts = read_gguf_facts(model)
    inventory = Inventory((Device("cpu", "cpu", 64 * 1024**3, 64 * 1024**3),))
    result = plan(facts, Request(context_tokens=context, concurrency=slots, max_batch_tokens=batch), inventory)
    assert result.plan is not None
    need = result.plan.devices["cpu"]
    port = _free_port()
    argv = arguments("m", PlanFile(str(model), result.plan), host="127.0.0.1", port=port, threads=threads)
    argv += ["--log-verbosity", "4"]  # info: llama.cpp's buffer sizes
    with tempfile.NamedTemporaryFile("w+b", suffix=".log") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            while True:
                if process.poll() is not None:
                    sys.exit(f"llama-server exited: {Path(log.name).read_text()[-3000:]}")
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            ready = _status(process.pid, "VmHWM")
            asyncio.run(_fill(url, context, slots, 16))
            peak = _status(process.pid, "VmHWM")
            rss = _status(process.pid, "VmRSS")
        finally:
            process.terminate()
            process.wait()
        text = Path(log.name).read_text(errors="replace")
    buffers = {f"{m.group(1).strip()} {m.group(2)}": float(m.group(3)) for m in _BUFFER.finditer(text)}
    print(
        f"{model.name} {context}x{slots} batch {batch}: plan {need.total_bytes / MiB:.1f} MiB "
        f"(weights {need.weights_bytes / MiB:.1f}, KV {need.kv_cache_bytes / MiB:.2f}, "
        f"act {need.activation_bytes / MiB:.2f}, runtime {need.runtime_bytes / MiB:.1f}); llama.cpp: "
        + ", ".join(f"{k} {v:.2f}" for k, v in buffers.items())
        + f"; VmHWM ready {ready / MiB:.1f}, after traffic {peak / MiB:.1f}, VmRSS {rss / MiB:.1f} MiB; "
        f"plan/peak {need.total_bytes / peak:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("cases", nargs="+", help="CONTEXTxSLOTS[:BATCH]")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for case in args.cases:
        shape, _, batch = case.partition(":")
        context, _, slots = shape.partition("x")
        run_case(args.model, int(context), int(slots), int(batch or 2048), args.threads)


if __name__ == "__main__":
    main()
