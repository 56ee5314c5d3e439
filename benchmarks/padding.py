"""Padding-free batching: real tokens/s and padding share of the trainer's micro-batches, before and after, same run.

before          the old rule: each worker's pairs in random order, micro_batch_size pairs per forward, padded to the
                longest of the 2B sequences (baselines.collate)
grouped         length grouping (spin_ray.training.batching.worker_shares + even_micro_batches) at the same micro_batch_size, still
                2B padded sequences: what grouping alone buys
packed          the rule before flattening: each pair packed in one row (baselines.pack_pairs: both sequences side by
                side, own positions, block-diagonal causal mask), rows length-grouped, as many per forward as fit
                train.micro_batch_tokens with at most baselines.MAX_PADDING of a forward's tokens padding
varlen          spin_ray.train today: Trainer.train_step on flattened micro-batches (template.pack_varlen: whole
                sequences one after another, per-sequence attention, no padding, no mask), as many pairs per forward
                as fit train.micro_batch_tokens

One process, no Ray: the same model, seeded global batches and sequences for every variant, run one after another;
only how a step's pairs are cut into forwards differs (the loss is the same mean either way). Every variant runs
the trainer's own step (spin_ray.training.step.Trainer.train_step) on the same model and optimizer; the padded ones
override only its forward (`layout_trainer`). Reference log-probs are 0 (speed does not depend on them). Real tokens/s = real tokens of
steps 2..N / their wall time; padding share = 1 − real / processed tokens; "max tok/fwd" = the largest forward
(padding included), a proxy for peak activation memory.

Data (token ids, as the scorer stores them; the content does not matter for speed):
  bundled       the bundled tasks' prompts and answers (tokenised by the tiny model's ChatML tokenizer), y' = another
                row's answer: short, fairly uniform lengths
  long-tailed   prompt and answer lengths drawn from log-normal distributions (median prompt 60, answers 90 tokens,
                σ = 1), capped by data.max_length's rule: what chat data with free-length answers looks like

Model: a random Llama with SmolLM2-135M's widths (576 hidden, 9/3 heads, 1536 MLP, 49152 vocab) and --layers layers
(random weights: only speed is measured), float32 on CPU.

    python benchmarks/padding.py                 # 8 layers, global batch 64, micro 8, 4 steps per variant
    python benchmarks/padding.py --layers 30     # the full SmolLM2-135M depth
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from typing import Callable


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bundled_pairs(max_length: int, max_prompt_length: int) -> list[dict[str, list[int]]]:
    import tempfile

    from transformers import AutoTokenizer

    from spin_ray.config import DataConfig
    from spin_ray.data.sources import load_sft
    from spin_ray.models.builders import build_tiny_model
    from spin_ray.training.template import encode_pair

    tok = AutoTokenizer.from_pretrained(build_tiny_model(tempfile.mkdtemp(prefix="spin-bench-pad-") + "/tiny"))
    rows = load_sft(DataConfig(path="bundled", split=None)).rows
    return [encode_pair(tok, r["prompt"], r["real"], rows[(i * 7) % len(rows)]["real"], max_length=max_length,
                        max_prompt_length=max_prompt_length) for i, r in enumerate(rows)]


def long_tailed_pairs(n: int, vocab: int, max_length: int, max_prompt_length: int,
                      seed: int) -> list[dict[str, list[int]]]:
    from spin_ray.training.template import truncate_prompt

    rng = random.Random(seed)

    def draw(median: float) -> list[int]:
        return [rng.randrange(vocab) for _ in range(max(1, int(rng.lognormvariate(math.log(median), 1.0))))]

    out = []
    for _ in range(n):
        p = truncate_prompt(draw(60), max_prompt_length)
        room = max_length - len(p)
        out.append({"prompt_ids": p, "real_ids": draw(90)[:room], "generated_ids": draw(90)[:room]})
    return out


def layout_trainer(*args, **kwargs):
    """A Trainer whose micro-batch layout is switchable (`.layout`): `varlen` is the trainer's own; `collate` (the 2B
    sequences padded to the longest) and `pack_pairs` (each pair in one row, both sequences side by side with a
    block-diagonal causal mask, rows padded to the longest) are the padded layouts it replaced. Only
    Trainer.forward differs: every layout's step is Trainer.train_step (loss, accumulation, clipping, optimizer)."""
    from baselines import collate, pack_pairs, packed_logps, sequence_logps
    from spin_ray.training.step import Trainer

    class LayoutTrainer(Trainer):
        layout = "varlen"

        def forward(self, pairs):
            if self.layout == "varlen":
                return super().forward(pairs)
            if self.layout == "pack_pairs":
                batch = {k: v.to(self.device) for k, v in pack_pairs(pairs, 0).items()}
                real, generated = packed_logps(self.model, batch)
            else:
                batch = {k: v.to(self.device) for k, v in collate(pairs, 0).items()}
                logps = sequence_logps(self.model, batch)
                real, generated = logps[:len(pairs)], logps[len(pairs):]
            return real, generated, batch["input_ids"].numel()

    return LayoutTrainer(*args, **kwargs)


def forward_tokens(pairs: list[dict[str, list[int]]], idx: list[int], layout: str) -> tuple[int, int]:
    """(real, processed) tokens of one micro-batch in `layout`, from the lengths alone."""
    if layout == "collate":
        rows = [len(pairs[i]["prompt_ids"]) + len(pairs[i][key]) for key in ("real_ids", "generated_ids") for i in idx]
    else:
        rows = [2 * len(pairs[i]["prompt_ids"]) + len(pairs[i]["real_ids"]) + len(pairs[i]["generated_ids"])
                for i in idx]
    return sum(rows), sum(rows) if layout == "varlen" else len(rows) * max(rows)


def run_variant(trainer, pairs: list[dict[str, list[int]]], plan: list[list[list[int]]], layout: str) -> dict:
    """Every step of `plan` (micro-batches of pair indices) through Trainer.train_step in `layout` (layout_trainer)."""
    trainer.layout = layout
    stamps, real_per_step, processed_per_step = [], [], []
    for step in plan:
        batches = [[{**pairs[i], "ref_logp_real": 0.0, "ref_logp_generated": 0.0} for i in idx] for idx in step]
        processed_per_step.append(trainer.train_step(batches)["tokens"])
        stamps.append(time.perf_counter())
        real_per_step.append(sum(forward_tokens(pairs, idx, layout)[0] for idx in step))
    seconds = stamps[-1] - stamps[0]
    return {"real_tok_s": sum(real_per_step[1:]) / seconds,
            "padding_share": 1 - sum(real_per_step) / sum(processed_per_step),
            "max_tokens_per_forward": max(forward_tokens(pairs, idx, layout)[1] for step in plan for idx in step),
            "forwards_per_step": sum(map(len, plan)) / len(plan), "seconds": seconds}


def plans(pairs: list[dict[str, list[int]]], *, steps: int, global_batch: int, micro: int, budget: int,
          seed: int) -> dict[str, tuple[list[list[list[int]]], str]]:
    """Each variant's micro-batches for the same seeded global batches (one worker), and its layout."""
    import torch

    from baselines import even_padded_micro_batches
    from spin_ray.training.batching import even_micro_batches, worker_shares

    padded = [len(p["prompt_ids"]) + max(len(p["real_ids"]), len(p["generated_ids"])) for p in pairs]
    packed = [2 * len(p["prompt_ids"]) + len(p["real_ids"]) + len(p["generated_ids"]) for p in pairs]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [order[k * global_batch:(k + 1) * global_batch] for k in range(steps)]
    grouped = [even_micro_batches(worker_shares(b, padded, 1), padded, max_pairs=micro, max_tokens=None)[0]
               for b in batches]

    def budgeted(cut: Callable[..., list[list[list[int]]]]) -> list[list[list[int]]]:
        return [cut(worker_shares(b, packed, 1), packed, max_pairs=None, max_tokens=budget)[0] for b in batches]

    return {"before": ([[b[i:i + micro] for i in range(0, len(b), micro)] for b in batches], "collate"),
            "grouped": (grouped, "collate"), "packed": (budgeted(even_padded_micro_batches), "pack_pairs"),
            "varlen": (budgeted(even_micro_batches), "varlen")}


def planned_padding(pairs: list[dict[str, list[int]]], plan: list[list[list[int]]], layout: str) -> float:
    """Padding share of a plan from the lengths alone (no forward: exact, and free of the machine's load)."""
    real, processed = map(sum, zip(*(forward_tokens(pairs, idx, layout) for step in plan for idx in step)))
    return 1 - real / processed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=49152, help="vocabulary (the logits dominate a small model's cost)")
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=None,
                    help="train.micro_batch_tokens for the packed and varlen variants (default 2 x micro-batch x "
                         "max_length: the old rule's largest forward, so peak activation memory does not grow)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per variant (the first is not timed)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--max-prompt-length", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=["before", "grouped", "packed", "varlen"],
                    help="which variants to time (the trainer's own is varlen)")
    ap.add_argument("--plan-only", action="store_true",
                    help="padding shares from the plans alone (exact, seconds): no model, no timed steps")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "padding.json"))
    args = ap.parse_args()

    import sys
    import tempfile

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import RssSampler

    from spin_ray.config import TrainConfig

    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    trainer = None
    if not args.plan_only:
        source = tempfile.mkdtemp(prefix="spin-bench-pad-model-")
        LlamaForCausalLM(config).save_pretrained(source)
        trainer = layout_trainer(source, TrainConfig(optimizer="adamw", lr=1e-6, warmup_ratio=0.0),
                                 total_steps=8 * args.steps)  # 2 data sets x 4 variants
        trainer.setup()
    budget = args.tokens or 2 * args.micro_batch * args.max_length
    n = args.steps * args.global_batch
    data = {
        "bundled": bundled_pairs(args.max_length, args.max_prompt_length),
        "long-tailed": long_tailed_pairs(n, args.vocab, args.max_length, args.max_prompt_length, args.seed),
    }
    results = {"config": {**vars(args), "budget": budget, "torch_threads": torch.get_num_threads()}, "runs": {}}
    print(f"random Llama, {args.layers} layers, SmolLM2-135M widths; global batch {args.global_batch}, micro "
          f"{args.micro_batch} pairs, budget {budget} tokens, {args.steps} steps (steps 2..N timed)\n")
    print(f"{'data':<12} {'variant':<13} {'real tok/s':>10} {'padding':>8} {'fwd/step':>8} {'max tok/fwd':>11} "
          f"{'vs before':>9}")
    with RssSampler(lambda p: None) as sampler:  # others' CPU only: this one process is the benchmark
        for name, pairs in data.items():
            while len(pairs) < n:  # the bundled set is small: cycle it (same lengths, as many steps as the other)
                pairs = pairs + pairs
            runs = {}
            for variant, (plan, layout) in plans(pairs, steps=args.steps, global_batch=args.global_batch,
                                                 micro=args.micro_batch, budget=budget, seed=args.seed).items():
                if args.plan_only or variant not in args.variants:
                    continue
                runs[variant] = r = run_variant(trainer, pairs, plan, layout)
                ratio = r["real_tok_s"] / runs["before"]["real_tok_s"] if "before" in runs else float("nan")
                print(f"{name:<12} {variant:<13} {r['real_tok_s']:>10.0f} {r['padding_share']:>8.1%} "
                      f"{r['forwards_per_step']:>8.1f} {r['max_tokens_per_forward']:>11} {ratio:>8.2f}x", flush=True)
            if runs:
                results["runs"][name] = runs
            # The padding share at other budgets, planned only: how the cap holds where a large budget hurt.
            results.setdefault("planned_padding", {})[name] = {
                str(tokens): {variant: planned_padding(pairs, plan, layout) for variant, (plan, layout) in plans(
                    pairs, steps=args.steps, global_batch=args.global_batch, micro=args.micro_batch, budget=tokens,
                    seed=args.seed).items()}
                for tokens in sorted({budget, 2 * args.max_length, 4 * budget})}
    results["others_cpu_share"] = sampler.other_cpu_share
    print(f"others' CPU during the run: {sampler.other_cpu_share:.0%}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
