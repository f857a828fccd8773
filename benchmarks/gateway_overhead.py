"""What the gateway adds: the same runner reached directly and through ``memserve serve``, in one run.

    python benchmarks/gateway_overhead.py                       # tiny demo model (worst case: overhead is visible)
    python benchmarks/gateway_overhead.py --model /tmp/mb/demo-small --requests 100
    python benchmarks/gateway_overhead.py --auth      # keys on: every request checked and counted against limits
    python benchmarks/gateway_overhead.py --floor     # also what uvicorn alone adds (benchmarks/floor_relay.py)

One gateway is started with one model; once it is loaded, the benchmark talks to *that same runner*
two ways, alternating so both see the same machine state:

- ``direct``: the runner's own Unix socket (what the gateway itself speaks to);
- ``gateway``: ``http://127.0.0.1:PORT`` (TCP to the gateway, which leases the runner and relays).

Every request through the gateway writes a usage row (always on). With ``--auth`` the gateway runs with
``auth: keys`` and the benchmark calls it with a key that has limits (requests and tokens per minute, daily and
monthly tokens, all far above what it sends), so the key check and the limits are on the measured path too.

Latency: sequential non-streamed requests with ``max_tokens`` 1, direct and gateway interleaved one by
one; the added latency is the gateway's p50/p99 minus the direct p50/p99. Throughput: ``--streams``
concurrent streaming clients, each asking for ``--max-tokens`` tokens; each round runs both, the order
reversed every other round (so a slow minute of this shared machine hits both); tokens/s is usage
tokens over wall time, and the ratio is the median of the rounds' gateway ÷ direct, with its spread.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from memserve.net import free_port

PROMPT = [{"role": "user", "content": "Tell me about lighthouses and the people who keep them"}]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple[float, int]:
    start = time.perf_counter()
    if not body.get("stream"):
        response = await client.post(url, json=body)
        response.raise_for_status()
        return time.perf_counter() - start, int(response.json()["usage"]["completion_tokens"])
    tokens = 0
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                tokens = usage["completion_tokens"] if usage else tokens
    return time.perf_counter() - start, tokens


async def measure(
    gateway: str, sock: str, args: argparse.Namespace, key: str | None = None, floor: str | None = None
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    targets = {
        "direct": (
            httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=sock), timeout=600),
            "http://runner/v1/chat/completions",
        ),
        "gateway": (httpx.AsyncClient(timeout=600, headers=headers), f"{gateway}/v1/chat/completions"),
    }
    if floor is not None:
        targets["floor"] = (httpx.AsyncClient(timeout=600), f"{floor}/v1/chat/completions")
    latency: dict[str, list[float]] = {name: [] for name in targets}
    throughput: dict[str, list[float]] = {"direct": [], "gateway": []}
    short = {"model": "m", "messages": PROMPT, "max_tokens": 1, "temperature": 0}
    long = {
        "model": "m",
        "messages": PROMPT,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        for client, url in targets.values():  # warm both paths (connections, first-request costs)
            for _ in range(5):
                await one(client, url, short)
        names = list(targets)
        for i in range(args.requests):
            order = names[i % len(names) :] + names[: i % len(names)]  # each goes first in turn
            for name in order:
                client, url = targets[name]
                latency[name].append((await one(client, url, short))[0])
        for r in range(args.rounds):  # both once per round, the order reversed every other round
            for name in ("direct", "gateway") if r % 2 == 0 else ("gateway", "direct"):
                client, url = targets[name]
                start = time.perf_counter()
                results = await asyncio.gather(*(one(client, url, long) for _ in range(args.streams)))
                throughput[name].append(sum(tokens for _, tokens in results) / (time.perf_counter() - start))
    finally:
        for client, _ in targets.values():
            await client.aclose()
    return {"latency_seconds": latency, "tokens_per_second": throughput}


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
    except httpx.TransportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("/tmp/memserve-bench/demo-tiny"))
    parser.add_argument("--size", default="tiny", help="demo size to build when --model is missing")
    parser.add_argument("--requests", type=int, default=200, help="latency pairs (direct + gateway)")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6, help="throughput rounds (each runs both setups)")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument("--auth", action="store_true", help="keys on, and a key with limits on every request")
    parser.add_argument(
        "--floor", action="store_true", help="also time benchmarks/floor_relay.py: uvicorn alone relaying to the runner"
    )
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        from memserve.checkpoint.demo import write_demo_model

        write_demo_model(args.model, size=args.size, force=True)

    port = free_port()
    gateway = f"http://127.0.0.1:{port}"
    log = Path(f"/tmp/memserve-gateway-overhead-{os.getpid()}.log")
    admin = f"ms-bench-admin-{os.getpid()}"
    env = {**os.environ, "MEMSERVE_DATA_DIR": f"/tmp/memserve-gateway-overhead-{os.getpid()}"}
    if args.auth:
        env |= {"MEMSERVE_AUTH": "keys", "MEMSERVE_ADMIN_KEY": admin}
    admin_headers = {"Authorization": f"Bearer {admin}"}
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "memserve",
                "serve",
                "--model",
                f"m={args.model.resolve()}",
                "--port",
                str(port),
                "--keep-alive",
                "-1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=sink,
            env=env,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{gateway}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"gateway did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        row = httpx.post(f"{gateway}/api/load", json={"model": "m"}, timeout=600, headers=admin_headers).json()["model"]
        key = None
        if args.auth:
            limits = {"rpm": 10**6, "tpm": 10**9, "daily_tokens": 10**12, "monthly_tokens": 10**13}
            created = httpx.post(f"{gateway}/api/keys", json={"name": "bench", **limits}, headers=admin_headers)
            key = created.json()["secret"]
        print(
            f"model {args.model} loaded by the gateway in {row['load_seconds']} s; runner pid {row['pid']}, "
            f"socket {row['socket']}",
            flush=True,
        )
        relay, floor = None, None
        if args.floor:
            floor_port = free_port()
            floor = f"http://127.0.0.1:{floor_port}"
            script = Path(__file__).with_name("floor_relay.py")
            relay = subprocess.Popen(
                [sys.executable, str(script), "--socket", row["socket"], "--port", str(floor_port)],
                stdout=subprocess.DEVNULL,
            )
            until = time.monotonic() + 60
            while not _answers(f"{floor}/"):
                if relay.poll() is not None or time.monotonic() > until:
                    raise SystemExit("benchmarks/floor_relay.py did not start")
                time.sleep(0.1)
        try:
            result = asyncio.run(measure(gateway, row["socket"], args, key, floor))
        finally:
            if relay is not None:
                relay.terminate()
                relay.wait(timeout=30)
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    lat, tps = result["latency_seconds"], result["tokens_per_second"]
    ms = 1000.0
    print(f"\nlatency, {args.requests} sequential requests each way (max_tokens 1, not streamed):")
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        d, g = percentile(lat["direct"], q), percentile(lat["gateway"], q)
        line = f"  {label}: direct {d * ms:.2f} ms, gateway {g * ms:.2f} ms, added {(g - d) * ms:+.2f} ms"
        if "floor" in lat:
            f = percentile(lat["floor"], q)
            line += f"; the floor (uvicorn alone) {f * ms:.2f} ms, added {(f - d) * ms:+.2f} ms"
        print(line)
    d_tps, g_tps = statistics.median(tps["direct"]), statistics.median(tps["gateway"])
    ratios = [g / d for d, g in zip(tps["direct"], tps["gateway"], strict=True)]
    print(
        f"throughput, {args.streams} streams × {args.max_tokens} tokens, {args.rounds} rounds: median "
        f"direct {d_tps:.1f} tok/s, gateway {g_tps:.1f} tok/s; ratio gateway ÷ direct, median of the rounds' "
        f"ratios ×{statistics.median(ratios):.3f} (rounds ×{min(ratios):.3f}–×{max(ratios):.3f})"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
