"""θ_t's reference log-probs: the trainer's reference pass against a direct transformers forward, and against training.

The reference pass is `Trainer.logps` before the first step (spin_ray.train runs it on every Train worker): flattened
micro-batches (template.pack_varlen), the LM head only at labelled positions. Baseline, in the same process on the
same pairs, micro-batch size and threads: a direct transformers forward of padded micro-batches (2B sequences, full
vocabulary log_softmax, gather). Also one `Trainer.train_step` per global batch over the same pairs: the reference's
share of an epoch of training. No Ray here: the Train worker's overhead is benchmarks/train.py's.

Figures (medians over interleaved repeats): real tokens/s of each, reference / direct, reference seconds / training
seconds for the same pairs, max |log-prob difference| between the two forwards.

    python benchmarks/reference.py                     # tasks-sft, 256 pairs
    python benchmarks/reference.py --model smollm2-135m --pairs 64
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def direct_logps(model, pairs: list[dict], micro: int, pad_id: int) -> list[tuple[float, float]]:
    """log π(real|x), log π(generated|x) per pair by plain padded forwards, full-vocabulary logits."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), micro):
            chunk = pairs[start:start + micro]
            seqs = [p["prompt_ids"] + p[k] for p in chunk for k in ("real_ids", "generated_ids")]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            sums = []
            for row, (p, key) in enumerate((p, k) for p in chunk for k in ("real_ids", "generated_ids")):
                n = len(p["prompt_ids"])
                targets = torch.tensor(p[key])
                sums.append(logprobs[row, n - 1:n - 1 + len(targets)].gather(-1, targets[:, None]).sum().item())
            out += list(zip(sums[0::2], sums[1::2]))
    return out


def main() -> None:
    import argparse

    import torch
    from transformers import AutoTokenizer

    from _common import loadavg, machine, synthetic_pairs, write_json
    from spin_ray.config import TrainConfig
    from spin_ray.models.loading import load_model
    from spin_ray.models.builders import resolve_model
    from spin_ray.training.template import encode_pair
    from spin_ray.training.batching import even_micro_batches, worker_shares
    from spin_ray.training.step import Trainer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tasks-sft", help='"tasks-sft", "tiny", "smollm2-135m" or an HF folder')
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--response-tokens", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=32, help="pairs per forward (train.micro_batch_size)")
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--max-prompt-length", type=int, default=64)
    ap.add_argument("--threads", default="1,2", help="torch threads, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "reference.json"))
    args = ap.parse_args()

    source = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(source)
    pairs = [encode_pair(tok, r["prompt"], r["real"], r["generated"], max_length=args.max_length,
                         max_prompt_length=args.max_prompt_length)
             for r in synthetic_pairs(tok, args.pairs, args.response_tokens)]
    lengths = [2 * len(p["prompt_ids"]) + len(p["real_ids"]) + len(p["generated_ids"]) for p in pairs]
    tokens = sum(lengths)  # as processed: each pair's prompt twice, both answers
    # The reference pass's micro-batches on one worker, as spin_ray.stages.train.reference_pass forms them.
    plan = even_micro_batches(worker_shares(range(len(pairs)), lengths, 1), lengths, max_pairs=args.micro_batch,
                              max_tokens=None)[0]
    steps = [list(range(s, min(s + args.global_batch, len(pairs)))) for s in range(0, len(pairs), args.global_batch)]
    tc = TrainConfig(optimizer="adamw", lr=1e-5, micro_batch_size=args.micro_batch,
                     global_batch_size=args.global_batch)
    trainer = Trainer(source, tc, total_steps=10 ** 6)
    trainer.setup()
    direct_model = load_model(source, dtype=torch.float32).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def reference() -> list[tuple[float, float]]:
        out = [None] * len(pairs)
        for idx, (r, g) in zip(plan, trainer.logps([[pairs[i] for i in idx] for idx in plan])):
            for i, a, b in zip(idx, r.tolist(), g.tolist()):
                out[i] = (a, b)
        return out

    def training() -> None:
        for step in steps:
            micro = even_micro_batches(worker_shares(step, lengths, 1), lengths, max_pairs=args.micro_batch,
                                       max_tokens=None)[0]
            trainer.train_step([[{**pairs[i], "ref_logp_real": 0.0, "ref_logp_generated": 0.0} for i in idx]
                                for idx in micro])

    variants = {"reference": reference, "direct": lambda: direct_logps(direct_model, pairs, args.micro_batch, pad),
                "train": training}
    # Before any training step: the policy is θ_t, as in the reference pass.
    diff = max(abs(a - b) for x, y in zip(reference(), variants["direct"]()) for a, b in zip(x, y))
    runs: dict[str, dict[str, float]] = {}
    for threads in args.threads.split(","):
        torch.set_num_threads(int(threads))
        for fn in variants.values():  # warm-up: allocator and kernels settle
            fn()
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):  # interleaved, so a burst of load lands on every variant
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        runs[threads] = {name: statistics.median(t) for name, t in times.items()}
        r = runs[threads]
        r.update(reference_tok_s=tokens / r["reference"], direct_tok_s=tokens / r["direct"],
                 reference_over_direct_speed=r["direct"] / r["reference"],
                 reference_over_train_seconds=r["reference"] / r["train"], max_abs_logp_diff=diff)
        print(f"threads {threads}: reference {r['reference_tok_s']:.0f} tok/s, direct {r['direct_tok_s']:.0f} "
              f"tok/s ({r['reference_over_direct_speed']:.2f}x), reference / train seconds "
              f"{r['reference_over_train_seconds']:.2f}, max |Δ logp| {diff:.1e}", flush=True)
    write_json(args.out, {"benchmark": "reference", "args": vars(args), "machine": machine(),
                          "load_avg_end": loadavg(), "tokens": tokens, "forwards": len(plan), "runs": runs})


if __name__ == "__main__":
    main()
