"""What per-request sampling seeds cost in vLLM, against one seed per batch, and what they buy.

spin_ray seeds every prompt's answer (spin_ray.stages.generate.sample_seed: seed, prompt id, iteration), so a rerun or a batch
redone on another engine samples the same answer whatever the batching. vLLM samples a seeded request with its own
torch.Generator, one request at a time, while unseeded requests share one batched draw from the engine's RNG.

One vLLM engine in this process with the pipeline's CPU settings (spin_ray.stages.engine.vllm_device_args), the same
prompts (bundled tasks, cycled to --prompts rows, rendered by spin_ray.training.template.prompt_ids), temperature 1.0:
  seeded    SamplingParams(seed=sample_seed(...)) per request, the pipeline's call;
  unseeded  SamplingParams(seed=None): the engine's RNG, i.e. one seed per batch.
Each variant runs --repeats times, interleaved; figures are medians of output tokens/s (prefix cache off, as in the
pipeline on CPU). Reproducibility: the seeded answers of one call over all prompts against calls of --batch-size
prompts (must be identical), and the same for unseeded answers from an engine re-seeded before each pass.

    python benchmarks/seeds.py                           # tasks-sft, 256 prompts x 32 tokens
    python benchmarks/seeds.py --model smollm2-135m --prompts 128
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1",
                  TOKENIZERS_PARALLELISM="false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    import argparse

    from _common import loadavg, machine, print_table, write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tasks-sft", help='"tasks-sft", "smollm2-135m", "tiny" or an HF folder')
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32, help="prompts per call in the reproducibility check")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "seeds.json"))
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    from spin_ray.config import DataConfig
    from spin_ray.data.sources import load_sft
    from spin_ray.stages.engine import vllm_device_args
    from spin_ray.stages.generate import sample_seed
    from spin_ray.models.loading import load_tokenizer
    from spin_ray.models.builders import resolve_model
    from spin_ray.training.template import prompt_ids, truncate_prompt

    model = resolve_model(args.model)
    tok = load_tokenizer(model)
    rows = load_sft(DataConfig(path="bundled")).rows
    prompts, ids = [], []
    for i in range(args.prompts):
        row = rows[i % len(rows)]
        prompts.append({"prompt_token_ids": truncate_prompt(prompt_ids(tok, row["prompt"]), args.max_length // 2)})
        ids.append(f"{row['prompt_id']}-{i}")
    llm = LLM(model=model, dtype="float32", max_model_len=args.max_length, load_format="safetensors", seed=args.seed,
              enable_prefix_caching=False, **vllm_device_args(False, args.max_length))

    def params(seeded: bool) -> list:
        return [SamplingParams(max_tokens=args.max_tokens, temperature=1.0, top_p=1.0,
                               seed=sample_seed(args.seed, pid, 0) if seeded else None) for pid in ids]

    def run(seeded: bool, batch: int | None = None) -> tuple[float, int, list[str]]:
        p, outs = params(seeded), []
        start = time.perf_counter()
        for i in range(0, len(prompts), batch or len(prompts)):
            outs += llm.generate(prompts[i:i + (batch or len(prompts))], p[i:i + (batch or len(prompts))],
                                 use_tqdm=False)
        return (time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs),
                [o.outputs[0].text for o in outs])

    def reseed() -> None:
        import torch

        torch.manual_seed(args.seed)  # vLLM's CPU sampler draws unseeded requests from torch's default generator

    run(True, 8)  # warm-up: first-call allocations out of the timings
    rates: dict[str, list[float]] = {"seeded": [], "unseeded": []}
    for _ in range(args.repeats):
        for name in rates:
            reseed()
            seconds, tokens, _ = run(name == "seeded")
            rates[name].append(tokens / seconds)

    seeded_all, seeded_batched = run(True)[2], run(True, args.batch_size)[2]
    reseed()
    unseeded_all = run(False)[2]
    reseed()
    unseeded_batched = run(False, args.batch_size)[2]
    reseed()
    unseeded_again = run(False)[2]
    same = lambda a, b: sum(x == y for x, y in zip(a, b))  # noqa: E731

    seeded, unseeded = statistics.median(rates["seeded"]), statistics.median(rates["unseeded"])
    result = {
        "machine": machine(), "loadavg": loadavg(), "args": vars(args), "model": model,
        "tokens_per_s": {"seeded": seeded, "unseeded": unseeded}, "repeats": rates,
        "seeded_over_unseeded": seeded / unseeded,
        "same_answers_one_call_vs_batches": {"seeded": same(seeded_all, seeded_batched),
                                             "unseeded": same(unseeded_all, unseeded_batched),
                                             "unseeded_same_batching_rerun": same(unseeded_all, unseeded_again),
                                             "of": len(prompts)},
    }
    print_table(["sampling", "tok/s (median)", "answers equal, 1 call vs batches of %d" % args.batch_size],
                [["per-request seed", f"{seeded:,.0f}", f"{same(seeded_all, seeded_batched)}/{len(prompts)}"],
                 ["one seed per batch", f"{unseeded:,.0f}", f"{same(unseeded_all, unseeded_batched)}/{len(prompts)}"]])
    print(f"per-request seeds run at {seeded / unseeded:.2f}x the tokens/s of one seed per batch; unseeded, the same "
          f"batching re-seeded gives {same(unseeded_all, unseeded_again)}/{len(prompts)} equal answers")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
