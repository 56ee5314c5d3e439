"""Bounded load on `spin-ray serve` over loopback with the `openai` client: errors, latency percentiles, tokens/s.

Baseline in the same run: the same request mix sent one at a time (concurrency 1), so the concurrent figures read as a
ratio against it. The mix alternates the served models and streaming/non-streaming chat and completions.

    python benchmarks/serve_load.py                       # starts `spin-ray serve` on two tiny models (hand-built run)
    python benchmarks/serve_load.py --url http://127.0.0.1:8000/v1 --api-key KEY   # an already running server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


async def one(client, i: int, models: list[str], max_tokens: int) -> dict:
    model, stream, chat = models[i % len(models)], i % 2 == 0, i % 4 < 2
    prompt = f"Request {i}: reverse the letters of 'hello{i}'"
    start = time.perf_counter()
    first = None
    try:
        if chat:
            kwargs = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                          temperature=1.0, seed=i)
            call = client.chat.completions.create
        else:
            kwargs = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=1.0, seed=i)
            call = client.completions.create
        if stream:
            tokens = 0
            async for chunk in await call(**kwargs, stream=True, stream_options={"include_usage": True}):
                if first is None and chunk.choices:
                    first = time.perf_counter() - start
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
        else:
            tokens = (await call(**kwargs)).usage.completion_tokens
        return {"ok": True, "latency": time.perf_counter() - start, "ttft": first, "tokens": tokens}
    except Exception as e:  # counted, not raised: the benchmark reports errors
        return {"ok": False, "latency": time.perf_counter() - start, "error": f"{type(e).__name__}: {e}"[:200]}


async def load(url: str, key: str, models: list[str], requests: int, concurrency: int, max_tokens: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=300)
    gate = asyncio.Semaphore(concurrency)

    async def limited(i: int) -> dict:
        async with gate:
            return await one(client, i, models, max_tokens)

    start = time.perf_counter()
    results = await asyncio.gather(*(limited(i) for i in range(requests)))
    wall = time.perf_counter() - start
    await client.close()
    ok = [r for r in results if r["ok"]]
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {"requests": requests, "concurrency": concurrency, "errors": requests - len(ok),
            "error_examples": sorted({r["error"] for r in results if not r["ok"]})[:3], "wall_s": round(wall, 2),
            "p50_s": round(percentile(lat, 50), 3) if lat else None,
            "p99_s": round(percentile(lat, 99), 3) if lat else None,
            "ttft_p50_s": round(percentile(ttft, 50), 3) if ttft else None,
            "output_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "requests_per_s": round(len(ok) / wall, 2)}


def start_server(port: int, key: str, workdir: Path) -> tuple[subprocess.Popen, Path]:
    """`spin-ray serve` on a hand-built run layout: base = tiny model (seed 0), iter_0 = tiny model (seed 1)."""
    from spin_ray.models.builders import build_tiny_model

    run = workdir / "run"
    base = build_tiny_model(workdir / "base", seed=0)
    build_tiny_model(run / "iter_0" / "model", seed=1)
    (run / "iter_0" / "model" / "_SUCCESS.json").write_text("{}")
    (run / "manifest.json").write_text(json.dumps({"model": base, "stages": {}}))
    log = workdir / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "spin_ray.cli", "serve", str(run), "--port", str(port),
                                 "--api-key", key, "--max-tokens", "64"],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": "local"})
    return proc, log


def wait_ready(url: str, key: str, proc: subprocess.Popen | None, log: Path | None) -> list[str]:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"spin-ray serve exited:\n{log.read_text()[-3000:]}")
        try:
            models = [m.id for m in client.models.list().data]
            for m in models:  # engines are up once each answers
                client.completions.create(model=m, prompt="hi", max_tokens=1)
            return models
        except Exception:
            time.sleep(2)
    raise SystemExit("the server did not become ready in 300 s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server's base URL (default: start one on two tiny models)")
    p.add_argument("--api-key", default="bench-key")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--baseline-requests", type=int, default=20, help="sequential requests for the baseline")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    args = p.parse_args()
    proc = log = None
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        url = args.url
        if url is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            proc, log = start_server(port, args.api_key, Path(tmp))
            url = f"http://127.0.0.1:{port}/v1"
        try:
            t0 = time.perf_counter()
            models = wait_ready(url, args.api_key, proc, log)
            ready_s = time.perf_counter() - t0
            baseline = asyncio.run(load(url, args.api_key, models, args.baseline_requests, 1, args.max_tokens))
            loaded = asyncio.run(load(url, args.api_key, models, args.requests, args.concurrency, args.max_tokens))
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGINT)  # the clean shutdown path
                proc.wait(timeout=120)
    result = {"models": models, "max_tokens": args.max_tokens, "ready_s": round(ready_s, 1) if proc else None,
              "baseline": baseline, "loaded": loaded,
              "throughput_ratio": round(loaded["tokens_per_s"] / baseline["tokens_per_s"], 2)
              if baseline["tokens_per_s"] else None,
              "server_exit_code": proc.returncode if proc else None, "cpus": os.cpu_count()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
