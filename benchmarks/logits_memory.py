"""Peak memory of one training step: full-vocabulary logits at every position (before: Trainer.train_step with the former
forward swapped in) against the trainer's own Trainer.train_step (after: flattened sequences, the LM head at the
labelled positions only, in chunks), same model, same micro-batch, same AdamW step.

Model: a random Llama with SmolLM2-135M's widths (576 hidden, 9/3 heads, 1536 MLP), --layers layers and a --vocab
vocabulary (default 32000), float32 on CPU; --recompute turns on full activation checkpointing on both sides.
Micro-batch: --tokens tokens (default 8192) of pairs (before: baselines.pack_pairs rows; after: flattened), each pair a
prompt of --prompt tokens twice and two answers filling the rest of --row tokens, so answers are (row − 2·prompt)/row
of the tokens, as in SPIN pairs.

Each variant runs in a fresh spawned process, --repeats times, one after the other: peak step memory = the process's
peak RSS (ru_maxrss) after the step − its RSS just before it (model built, AdamW's state not yet allocated).
torch's CPU allocator returns large blocks to the OS, so RSS follows the tensors held. The ratio is after / before
of the medians.

    python benchmarks/logits_memory.py                    # 32k vocabulary, 8k tokens, 4 layers
    python benchmarks/logits_memory.py --recompute --out benchmarks/results/logits_memory_recompute.json
    python benchmarks/logits_memory.py --tokens 1024 --vocab 4096 --layers 1 --repeats 1 --out /tmp/m.json  # quick
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def full_logits_packed_logps(model, batch):
    """The trainer's log-probs before: the model's logits at every position, fp32 log-softmax, masked to labels."""
    import torch.nn.functional as F

    from spin_ray.training.template import IGNORE

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits[:, :-1]
    labels, segment = batch["labels"][:, 1:], batch["segment"][:, 1:]
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")
    token_logps = token_logps * (labels != IGNORE)
    return (token_logps * (segment == 1)).sum(-1), (token_logps * (segment == 2)).sum(-1)


def step_memory(variant: str, args: dict) -> dict:
    """One optimizer step of the SPIN loss in this (fresh) process: RSS before, peak RSS after, seconds. Both are
    Trainer.train_step: `after` the trainer's own, `before` with the former full-logits forward in its place."""
    import resource
    import tempfile
    import time

    import psutil
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from baselines import pack_pairs

    from spin_ray.config import TrainConfig
    from spin_ray.training.step import Trainer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args["vocab"], hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=args["layers"], num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=max(2048, args["row"]), tie_word_embeddings=True)
    model = LlamaForCausalLM(config).float()
    answer = (args["row"] - 2 * args["prompt"]) // 2
    ids = torch.randint(3, args["vocab"], (args["tokens"],)).tolist()
    pairs = [{"prompt_ids": ids[:args["prompt"]], "real_ids": ids[args["prompt"]:args["prompt"] + answer],
              "generated_ids": ids[args["prompt"] + answer:args["prompt"] + 2 * answer],
              "ref_logp_real": 0.0, "ref_logp_generated": 0.0}
             for _ in range(args["tokens"] // args["row"])]
    # train.activation_checkpointing=full (--recompute), on both sides: each layer keeps only its input.
    tc = TrainConfig(optimizer="adamw", beta=0.1, micro_batch_size=len(pairs), global_batch_size=len(pairs),
                     activation_checkpointing="full" if args["recompute"] else "none")
    source = tempfile.mkdtemp(prefix="logits-memory-")
    model.save_pretrained(source)
    del model

    class FullLogits(Trainer):
        """The former forward: pack_pairs rows, logits at every position (the rest of the step is the trainer's)."""

        def forward(self, pairs):
            batch = pack_pairs(pairs, 0)
            real, generated = full_logits_packed_logps(self.model, batch)
            return real, generated, batch["input_ids"].numel()

    trainer = (Trainer if variant == "after" else FullLogits)(source, tc, total_steps=1)
    trainer.setup()
    before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    trainer.train_step([pairs])
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rss_before_mib": before / 2**20, "peak_rss_mib": peak / 2**20, "step_mib": (peak - before) / 2**20,
            "seconds": seconds, "tokens": sum(2 * len(p["prompt_ids"]) + 2 * answer for p in pairs),
            "labelled": 2 * answer * len(pairs)}


def _entry(conn, variant: str, args: dict) -> None:
    conn.send(step_memory(variant, args))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens in the micro-batch")
    ap.add_argument("--row", type=int, default=1024, help="tokens per packed row (one pair)")
    ap.add_argument("--prompt", type=int, default=200, help="prompt tokens of each pair")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--recompute", action="store_true",
                    help="full activation checkpointing on both sides, so the logits' share of the peak shows")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "logits_memory.json"))
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(HERE))
    mp = multiprocessing.get_context("spawn")
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(args.repeats):
        for variant in runs:
            recv, send = mp.Pipe(duplex=False)
            proc = mp.Process(target=_entry, args=(send, variant, vars(args)))
            proc.start()
            send.close()
            runs[variant].append(recv.recv())
            proc.join()
            m = runs[variant][-1]
            print(f"repeat {r} {variant:<6} step {m['step_mib']:8.0f} MiB  (RSS {m['rss_before_mib']:.0f} -> peak "
                  f"{m['peak_rss_mib']:.0f} MiB)  {m['seconds']:.1f} s", flush=True)
    median = {v: statistics.median(m["step_mib"] for m in rs) for v, rs in runs.items()}
    summary = {"step_mib_median": median, "ratio_after_over_before": median["after"] / median["before"],
               "tokens": runs["after"][0]["tokens"], "labelled": runs["after"][0]["labelled"]}
    print(json.dumps(summary, indent=1))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "runs": runs, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
