"""Per-worker memory of FSDP2 vs DDP training on CPU (gloo): whether sharding holds at most 0.6 of DDP's per-worker memory.

Each run starts `--workers` processes (torch.multiprocessing, gloo), builds the model the way spin_ray's Train workers
do (`strategy=fsdp`: spin_ray.training.step.build_sharded, meta-device init, fully_shard per decoder layer, rank-0 broadcast;
`strategy=ddp`: the whole fp32 model in every worker, wrapped in DistributedDataParallel as ray.train.torch's
prepare_model does; both through spin_ray.training.step.Trainer, the workers' own setup), takes one Trainer.train_step on
random token pairs, and then counts, per rank, the bytes of the tensors it
holds: parameters (an FSDP2 parameter's local shard), gradients, optimizer state (the local shards of AdamW's or
RMSprop's buffers). Peak RSS (getrusage) and RSS growth from just before the model is built are reported beside them;
they include the activations, DDP's gradient buckets and the allocator's slack, so they are looser than the tensor
count. Every configuration runs `--repeats` times, each in fresh processes; the JSON keeps every run.

The model is a Llama with random weights built here from `--hidden/--layers/--vocab` (nothing is downloaded), or any
local HF folder given as `--model`.

    python benchmarks/fsdp_memory.py                   # Llama 512 x 8 layers, vocab 32000 (~57M params), AdamW
    python benchmarks/fsdp_memory.py --optimizer rmsprop --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402


def local_bytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def worker(rank: int, world: int, port: int, strategy: str, model_path: str, optimizer_name: str,
           out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from spin_ray.config import TrainConfig
    from spin_ray.training.step import Trainer

    before = psutil.Process().memory_info().rss
    # The Train workers' own setup and step: DDP (the whole fp32 model per worker) or FSDP2 (trainer.build_sharded).
    trainer = Trainer(model_path, TrainConfig(strategy=strategy, num_workers=world, optimizer=optimizer_name, lr=1e-4),
                      total_steps=1, rank=rank, world=world)
    trainer.setup()
    params = trainer.params
    vocab = (trainer.model.module if hasattr(trainer.model, "module") else trainer.model).config.vocab_size
    ids = torch.randint(3, vocab, (256,), generator=torch.Generator().manual_seed(rank)).tolist()
    pairs = [{"prompt_ids": ids[k:k + 32], "real_ids": ids[k + 32:k + 64], "generated_ids": ids[k + 64:k + 96],
              "ref_logp_real": 0.0, "ref_logp_generated": 0.0} for k in (0, 128)]
    t0 = time.perf_counter()
    trainer.train_step([pairs])
    step_s = time.perf_counter() - t0
    optimizer = trainer.optimizer
    held = {
        "params": sum(local_bytes(p) for p in params),
        # train_step frees the gradients after the optimizer step; between backward and that step each parameter
        # (shard) holds one of its own size and dtype.
        "grads": sum(local_bytes(p) for p in params),
        "optimizer": sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)),
    }
    held["total"] = sum(held.values())
    result = {"rank": rank, "bytes": held, "rss_growth_bytes": psutil.Process().memory_info().rss - before,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "step_s": step_s,
              "full_params": sum(p.numel() for p in params) if strategy == "ddp" else
              sum(p.shape.numel() for p in params)}
    with open(os.path.join(out_dir, f"{strategy}_{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def run(strategy: str, world: int, model_path: str, optimizer: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(world, port, strategy, model_path, optimizer, out), nprocs=world, join=True)
        return [json.load(open(os.path.join(out, f"{strategy}_{r}.json"))) for r in range(world)]


def build_model(path: str, hidden: int, layers: int, vocab: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=vocab,
                         max_position_embeddings=1024, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a local HF model folder (default: a random Llama built from the sizes below)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--optimizer", choices=["adamw", "rmsprop"], default="adamw")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "fsdp_memory.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_model(os.path.join(tmp, "model"), args.hidden, args.layers, args.vocab)
        runs = {"ddp": [], "fsdp": []}
        for rep in range(args.repeats):
            for strategy in runs:  # interleaved, so that others' load on the machine hits both alike
                ranks = run(strategy, args.workers, model, args.optimizer)
                runs[strategy].append(ranks)
                print(f"repeat {rep + 1} {strategy}: " + ", ".join(
                    f"rank {r['rank']} {r['bytes']['total'] / 2**20:.1f} MiB held, peak RSS "
                    f"{r['peak_rss_bytes'] / 2**20:.0f} MiB" for r in ranks), flush=True)

    def per_rank_max(strategy: str, key: str) -> list[float]:
        """Each repeat's largest rank (the one that has to fit)."""
        get = {"held": lambda r: r["bytes"]["total"], "rss_growth": lambda r: r["rss_growth_bytes"],
               "peak_rss": lambda r: r["peak_rss_bytes"]}[key]
        return [max(get(r) for r in ranks) for ranks in runs[strategy]]

    summary = {}
    for key in ("held", "rss_growth", "peak_rss"):
        ddp, fsdp = per_rank_max("ddp", key), per_rank_max("fsdp", key)
        ratios = [f / d for f, d in zip(fsdp, ddp)]
        summary[key] = {"ddp_mib": [round(v / 2**20, 1) for v in ddp], "fsdp_mib": [round(v / 2**20, 1) for v in fsdp],
                        "ratio_fsdp_over_ddp": [round(r, 3) for r in ratios],
                        "ratio_median": round(statistics.median(ratios), 3)}
    parts = {k: round(runs["fsdp"][0][0]["bytes"][k] / runs["ddp"][0][0]["bytes"][k], 3)
             for k in ("params", "grads", "optimizer")}
    summary["held_ratio_by_part_rank0"] = parts
    summary["target"] = "held ratio <= 0.6"
    summary["meets_target"] = max(summary["held"]["ratio_fsdp_over_ddp"]) <= 0.6
    print(json.dumps(summary, indent=1))
    write_json(args.out, {"model": args.model or {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab},
                          "params": runs["ddp"][0][0]["full_params"], "workers": args.workers,
                          "optimizer": args.optimizer, "repeats": args.repeats, "summary": summary, "runs": runs})


if __name__ == "__main__":
    main()
