"""A stand-in for ``vllm serve``: vLLM's argument names, a fake OpenAI API, and the faults a real server has.

Run as ``python tests/engines/fake_vllm.py serve SOURCE --host H --port P --served-model-name NAME ...`` (what
``memserve.engines.vllm.arguments`` emits; ``MEMSERVE_VLLM_COMMAND`` points the pool at it). Its arguments are
parsed with argparse and an unknown flag is an error, as in vLLM, so a flag the plan → argv table emits and
vLLM lacks fails here too. It serves ``GET /health``, ``GET /v1/models`` and the completions routes (streamed
and not) through ``memserve.wire.fake.FakeOpenAI``, and writes its parsed arguments as JSON to
``FAKE_VLLM_ARGS_FILE`` when that is set (with the names of its environment variables under ``environ``, and
``VLLM_WORKER_MULTIPROC_METHOD`` under ``multiproc``).

Faults, by environment variable:

- ``FAKE_VLLM_HOLD_MIB=N``: touch N MiB of RSS before serving (a load past its plan);
- ``FAKE_VLLM_GROW_MIB=N``: touch N MiB more on the first completion request (a server past its plan);
- ``FAKE_VLLM_NEVER_READY=1``: listen, log progress lines, answer /health 503 forever;
- ``FAKE_VLLM_IGNORE_SIGTERM=1``: ignore SIGTERM (only SIGKILL ends it);
- ``FAKE_VLLM_OTHER_PORT=1``: listen on another port than ``--port``;
- ``FAKE_VLLM_LOG_MIB=N``: write N MiB of log lines to stdout and stderr before it becomes ready;
- ``FAKE_VLLM_HOLD_FILE=PATH``: each stream stops after its first token until PATH exists (a test proves a
  token crossed the gateway while the rest was not generated yet, with no sleep to tune).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import uvicorn

from memserve.wire.fake import FakeOpenAI, Script

Message = MutableMapping[str, Any]
REPLY = "one two three four five six seven eight nine ten"


def parser() -> argparse.ArgumentParser:
    """The subset of ``vllm serve``'s flags memserve emits, spelled as vLLM spells them."""
    top = argparse.ArgumentParser(prog="vllm")
    sub = top.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("model")
    serve.add_argument("--host", required=True)
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--served-model-name", nargs="+", required=True)
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    serve.add_argument("--max-model-len", type=int)
    serve.add_argument("--max-num-seqs", type=int)
    serve.add_argument("--max-num-batched-tokens", type=int)
    serve.add_argument("--dtype", choices=["auto", "half", "float16", "bfloat16", "float", "float32"])
    serve.add_argument("--quantization", "-q", choices=["awq", "gptq", "bitsandbytes", "fp8", "compressed-tensors"])
    serve.add_argument("--enable-lora", action="store_true")
    serve.add_argument("--lora-modules", nargs="+")
    serve.add_argument("--max-loras", type=int)
    serve.add_argument("--max-lora-rank", type=int)
    serve.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    serve.add_argument("--generation-config")
    serve.add_argument("--disable-uvicorn-access-log", action="store_true")
    return top


class FakeVllm:
    """``/health`` and the OpenAI routes of a FakeOpenAI serving the ``--served-model-name`` names."""

    def __init__(self, names: list[str], *, never_ready: bool, grow_mib: int, hold_file: str | None) -> None:
        script = Script(hold_after_tokens=1) if hold_file else Script()
        self.openai = FakeOpenAI(models=names, reply_text=REPLY, script=script)
        self.never_ready, self.grow_mib, self.hold_file = never_ready, grow_mib, hold_file
        self.grown: list[bytearray] = []

    async def __call__(self, scope: Message, receive: Callable[[], Awaitable[Message]], send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/health":
            status = 503 if self.never_ready else 200
            await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        if scope["type"] == "http" and scope["method"] == "POST" and self.grow_mib and not self.grown:
            self.grown.append(touched(self.grow_mib))
            print(f"fake vllm: grew by {self.grow_mib} MiB", file=sys.stderr, flush=True)
        await self.openai(scope, receive, send)

    async def watch_hold_file(self) -> None:
        """Release held streams once the hold file exists (the test creates it)."""
        while self.hold_file is not None:
            if Path(self.hold_file).exists():
                self.openai.release()
                Path(self.hold_file).unlink()
            await asyncio.sleep(0.01)


def touched(mib: int) -> bytearray:
    """``mib`` MiB of memory with every page written, so it is resident."""
    return bytearray(b"\x01") * (mib << 20)


def flood_logs(mib: int) -> None:
    line = b"INFO 11-30 12:00:00 [fake_vllm.py:1] " + b"x" * 200 + b"\n"
    for _ in range(((mib << 20) // len(line)) // 2 + 1):
        sys.stdout.buffer.write(line)
        sys.stderr.buffer.write(line)
    sys.stdout.flush()
    sys.stderr.flush()


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    env = os.environ
    if env.get("FAKE_VLLM_ARGS_FILE"):
        seen = {"environ": sorted(env), "multiproc": env.get("VLLM_WORKER_MULTIPROC_METHOD")}
        Path(env["FAKE_VLLM_ARGS_FILE"]).write_text(json.dumps({**vars(args), **seen}))
    if env.get("FAKE_VLLM_IGNORE_SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    held = touched(int(env["FAKE_VLLM_HOLD_MIB"])) if env.get("FAKE_VLLM_HOLD_MIB") else None
    print(f"INFO fake vllm: serving {args.model} as {args.served_model_name}", file=sys.stderr, flush=True)
    if env.get("FAKE_VLLM_LOG_MIB"):
        flood_logs(int(env["FAKE_VLLM_LOG_MIB"]))
    never_ready = bool(env.get("FAKE_VLLM_NEVER_READY"))
    app = FakeVllm(
        args.served_model_name,
        never_ready=never_ready,
        grow_mib=int(env.get("FAKE_VLLM_GROW_MIB") or 0),
        hold_file=env.get("FAKE_VLLM_HOLD_FILE"),
    )
    port = args.port + 1 if env.get("FAKE_VLLM_OTHER_PORT") else args.port
    config = uvicorn.Config(
        app, host=args.host, port=port, log_config=None, log_level="warning", access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)

    async def serve() -> None:
        watcher = asyncio.create_task(app.watch_hold_file())
        await server.serve()
        watcher.cancel()

    # uvicorn serves in a thread, so it installs no signal handlers: SIGTERM is this main thread's to handle
    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    step = 0
    while thread.is_alive():
        time.sleep(0.05)
        if never_ready:
            step += 1
            print(f"INFO fake vllm: still loading weights, step {step}", file=sys.stderr, flush=True)
    del held
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
