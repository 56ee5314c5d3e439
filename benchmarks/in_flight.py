"""Output tokens/s of one vLLM engine (spin_ray.stages.generate.VllmEngine) fed calls of --batch-size prompts one at a time
(generate.batches_in_flight 1, the baseline) against 2 and 4 calls in flight from as many threads, and against the
whole shard in one call (no call boundary at all), in the same process, repeated --repeats times in rotation.

Same prompts (bundled tasks through the chat template), per-prompt seeds, temperature 1.0, so answers differ in
length and each call's last answers decode on a part-empty engine unless another call's are queued behind them. The
answers are checked equal across the settings (per-prompt seeds). On a GPU the engine's step time barely grows with
the number of sequences, which is where the tail matters; on this CPU it grows with them, so expect less here.

    python benchmarks/in_flight.py                          # SmolLM2-135M, 256 prompts, calls of 32, 64 tokens
    python benchmarks/in_flight.py --model tasks-sft --prompts 512 --max-tokens 16 --out benchmarks/results/in_flight.json
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import threading
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def feed(engine, calls: list[tuple[list[list[int]], list[int]]], depth: int) -> tuple[list, float]:
    """Answer every call with `depth` threads pulling calls from one queue; (answers in call order, seconds)."""
    todo: queue.Queue = queue.Queue()
    for k, call in enumerate(calls):
        todo.put((k, call))
    answers: list = [None] * len(calls)

    def worker() -> None:
        while True:
            try:
                k, (prompts, seeds) = todo.get_nowait()
            except queue.Empty:
                return
            answers[k] = engine.generate(prompts, seeds)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(depth)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [a for call in answers for a in call], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()

    from spin_ray.config import DataConfig, GenerateConfig
    from spin_ray.data.sources import load_sft
    from spin_ray.stages.generate import VllmEngine, sample_seed
    from spin_ray.models.loading import load_tokenizer, local_model
    from spin_ray.models.builders import resolve_model
    from spin_ray.training.template import prompt_ids

    model = local_model(resolve_model(args.model))
    tokenizer = load_tokenizer(model)
    rows = load_sft(DataConfig(path="bundled")).rows
    rows = [rows[i % len(rows)] for i in range(args.prompts)]
    prompts = [prompt_ids(tokenizer, r["prompt"]) for r in rows]
    seeds = [sample_seed(0, f"{r['prompt_id']}:{i}", 0) for i, r in enumerate(rows)]
    engine = VllmEngine(model, GenerateConfig(max_tokens=args.max_tokens, temperature=1.0), on_gpu=False,
                        max_model_len=max(map(len, prompts)) + args.max_tokens)
    b = args.batch_size
    calls = [(prompts[i:i + b], seeds[i:i + b]) for i in range(0, len(prompts), b)]
    settings = {"1 in flight (baseline)": (calls, 1), "2 in flight": (calls, 2), "4 in flight": (calls, 4),
                "whole shard, one call": ([(prompts, seeds)], 1)}
    feed(engine, calls[:2], 1)  # warm-up: first-call costs out of every setting
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    reference, tokens = None, 0
    for _ in range(args.repeats):
        for name, (cs, depth) in settings.items():
            engine.peak_requests = 0
            answers, s = feed(engine, cs, depth)
            seconds[name].append(s)
            if reference is None:
                reference, tokens = answers, sum(a.num_tokens for a in answers)
            assert answers == reference, f"{name}: answers differ from the first setting's"
    base = min(seconds["1 in flight (baseline)"])
    result = {"model": args.model, "prompts": args.prompts, "batch_size": b, "max_tokens": args.max_tokens,
              "output_tokens": tokens, "cpus": os.cpu_count(), "repeats": args.repeats,
              "settings": {name: {"seconds": s, "tokens_per_s_best": tokens / min(s),
                                  "speedup_vs_baseline_best": base / min(s)} for name, s in seconds.items()}}
    for name, r in result["settings"].items():
        print(f"{name:>24}: {r['tokens_per_s_best']:8.0f} tok/s (best of {args.repeats}), x{r['speedup_vs_baseline_best']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
