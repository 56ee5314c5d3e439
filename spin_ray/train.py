"""Stage 3: the main player θ_{t+1} learns to tell the human answer from θ_t's, on Ray Train workers.

The reference log-probs come precomputed in the pairs (score.py), so each worker holds one model and runs one forward
of the 2B real + generated sequences per micro-batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from spin_ray import records
from spin_ray.config import ConfigError, SpinConfig
from spin_ray.loss import spin_loss
from spin_ray.score import autocast
from spin_ray.template import collate, encode_pair, sequence_logps

log = logging.getLogger(__name__)

COLUMNS = ["prompt_id", "prompt", "real", "generated", "ref_logp_real", "ref_logp_generated"]
STATE = "train_state_rank{}.pt"


@dataclass
class TrainResult:
    model: str
    """θ_{t+1} in HF format (`<storage>/iter_<t>/model`)."""
    metrics: dict[str, Any]
    """The last optimizer step's metrics."""
    skipped: bool
    seconds: float = 0.0


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup then linear decay to 0, as HF's `linear` schedule, except that step 0 already gets
    1/warmup of the peak (HF spends the first update at lr 0)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def plan_steps(n_rows: int, global_batch: int, num_workers: int) -> list[int]:
    """Rows per optimizer step in one epoch: full global batches, then the remainder cut to a multiple of the
    worker count (every DDP worker must take part in every step)."""
    sizes = [global_batch] * (n_rows // global_batch)
    tail = (n_rows % global_batch) // num_workers * num_workers
    return sizes + ([tail] if tail else [])


def _load_rows() -> list[dict[str, Any]]:
    import pyarrow as pa
    import ray.train


    # Every worker reads the whole (small, text-only) pairs table and takes its slice of each global batch from
    # one seeded order: resume is exact and N workers see the same batches as one.
    shard = ray.train.get_dataset_shard("train")
    return pa.concat_tables(list(shard.iter_batches(batch_size=4096, batch_format="pyarrow"))).to_pylist()


def _wrap(model: torch.nn.Module, strategy: str, device: torch.device) -> torch.nn.Module:
    import ray.train.torch

    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        model.to(device)
        for layer in model.model.layers:
            fully_shard(layer)
        return fully_shard(model)
    return ray.train.torch.prepare_model(model)


def _no_sync(model: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if sync:
        return nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
    return nullcontext()


def _save(model: torch.nn.Module, tokenizer: Any, optimizer: torch.optim.Optimizer, scheduler: Any, step: int,
          strategy: str, rank: int, out: str) -> None:
    """HF model + tokenizer (rank 0) and the optimizer state (rank 0, or every rank's shard under FSDP)."""
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        hf_model = model
    else:
        hf_model = getattr(model, "module", model)
        state = None
    if rank == 0:
        hf_model.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
    if rank == 0 or strategy == "fsdp":
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                    "rng": torch.get_rng_state()}, os.path.join(out, STATE.format(rank)))


def train_loop_per_worker(c: dict[str, Any]) -> None:
    """One Ray Train worker: SPIN updates over seeded global batches, with resumable checkpoints."""
    import ray.train
    import ray.train.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spin_ray.models import local_model

    cfg: SpinConfig = c["cfg"]
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    dtype = ("bfloat16" if device.type == "cuda" else "float32") if tc.dtype == "auto" else tc.dtype
    torch.manual_seed(cfg.seed)

    checkpoint = ray.train.get_checkpoint()
    ckpt_dir = checkpoint.to_directory() if checkpoint else None
    source = ckpt_dir or local_model(c["model"])
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    model = _wrap(model, tc.strategy, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.RMSprop(params, lr=tc.lr, weight_decay=tc.weight_decay) if tc.optimizer == "rmsprop"
                 else torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay))
    steps = plan_steps(c["n_rows"], tc.global_batch_size, world)
    total = len(steps) * tc.epochs
    warmup = math.ceil(tc.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    start = 0
    if ckpt_dir:
        state = torch.load(os.path.join(ckpt_dir, STATE.format(rank if tc.strategy == "fsdp" else 0)),
                           weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
    lines = c["metrics_lines"][:start]

    rows = _load_rows()
    lengths = dict(max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)
    order = None
    for step in range(start, total):
        epoch, k = divmod(step, len(steps))
        if order is None or k == 0:
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        begin = sum(steps[:k])
        share = steps[k] // world
        mine = order[begin + rank * share: begin + (rank + 1) * share]
        micro = [mine[i:i + tc.micro_batch_size] for i in range(0, len(mine), tc.micro_batch_size)]
        t0 = time.perf_counter()
        sums, tokens = torch.zeros(8, dtype=torch.float64), 0
        for i, idx in enumerate(micro):
            batch_rows = [rows[j] for j in idx]
            enc = [encode_pair(tokenizer, r["prompt"], r["real"], r["generated"], **lengths) for r in batch_rows]
            batch = {key: v.to(device) for key, v in collate(enc, tokenizer.pad_token_id).items()}
            ref_real = torch.tensor([r["ref_logp_real"] for r in batch_rows], device=device)
            ref_gen = torch.tensor([r["ref_logp_generated"] for r in batch_rows], device=device)
            with _no_sync(model, i == len(micro) - 1), autocast(device.type, dtype):
                logps = sequence_logps(model, batch)
                loss, m = spin_loss(logps[:len(idx)], logps[len(idx):], ref_real, ref_gen, tc.beta, tc.loss_type)
                (loss * len(idx) / len(mine)).backward()
            sums += torch.tensor([loss.item(), *m.values(), 1.0], dtype=torch.float64) * len(idx)
            tokens += int(batch["attention_mask"].sum())
        if tc.strategy == "fsdp":
            model.set_requires_gradient_sync(True)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            totals = torch.tensor([*sums.tolist(), tokens], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(totals)
            sums, tokens = totals[:-1].cpu(), int(totals[-1])
        names = ["loss", *m.keys()]
        metrics = {n: float(v) for n, v in zip(names, (sums[:-1] / sums[-1]).tolist())}
        metrics.update(step=step + 1, epoch=epoch, lr=lr, grad_norm=float(grad_norm), tokens=tokens,
                       tokens_per_s=tokens / (time.perf_counter() - t0), beta=tc.beta, iteration=cfg.iteration,
                       time=time.time())
        lines.append(json.dumps(metrics))
        done = step + 1 == total
        if rank == 0 and ((step + 1) % tc.report_every == 0 or done):
            records.write_bytes_atomic(c["metrics_uri"], ("\n".join(lines) + "\n").encode())
        if (step + 1) % tc.checkpoint_every == 0 or done:
            with tempfile.TemporaryDirectory() as tmp:
                _save(model, tokenizer, optimizer, scheduler, step + 1, tc.strategy, rank, tmp)
                has_files = rank == 0 or tc.strategy == "fsdp"
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None)
        elif (step + 1) % tc.report_every == 0:
            ray.train.report(metrics)


def _pairs_uris(cfg: SpinConfig) -> list[str]:
    """This iteration's pairs plus the window's earlier iterations, rescored under θ_t (see loop.py)."""
    here = records.iter_dir(cfg.storage, cfg.iteration)
    uris = [records.join(here, "pairs")]
    for s in range(max(0, cfg.iteration - cfg.loop.window + 1), cfg.iteration):
        uris.append(records.join(here, f"window/iter_{s}"))
    return uris


def train(cfg: SpinConfig, *, model: str | None = None, pairs: list[str] | None = None) -> TrainResult:
    """Train θ_{t+1} from θ_t (`model`, default cfg.model) on `pairs` (default: the iteration's window) and save it
    to `<storage>/iter_<t>/model`. A finished model is kept; an interrupted run continues from its last checkpoint."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from spin_ray.loop import require_resources
    from spin_ray.models import resolve_model

    here = records.iter_dir(cfg.storage, cfg.iteration)
    out = records.join(here, "model")
    if records.is_complete(out):
        log.info("iteration %d: trained model already at %s; skipping training", cfg.iteration, out)
        return TrainResult(out, records.read_json(records.join(out, records.MARKER)), skipped=True)
    model = resolve_model(model or cfg.model)
    table = records.read_pairs_table(pairs or _pairs_uris(cfg), columns=COLUMNS)
    tc = cfg.train
    if not plan_steps(table.num_rows, tc.global_batch_size, tc.num_workers):
        raise ConfigError(f"{table.num_rows} pairs give no optimizer step with train.num_workers = {tc.num_workers}")
    require_resources("Train workers", "train.num_workers", tc.num_workers,
                      {"CPU": tc.num_cpus_per_worker, "GPU": 1.0 if tc.use_gpu else 0.0})
    metrics_uri = records.join(here, "train_metrics.jsonl")
    lines = _read_lines(metrics_uri)

    t0 = time.perf_counter()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "model": model, "n_rows": table.num_rows, "metrics_uri": metrics_uri,
                           "metrics_lines": lines},
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker={"CPU": tc.num_cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        datasets={"train": _quiet_dataset(table)},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
        run_config=ray.train.RunConfig(
            name="train", storage_path=records.join(here, "ray_train"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.num_to_keep)),
    )
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    final = json.loads(_read_lines(metrics_uri)[-1])
    with result.checkpoint.as_directory() as ckpt:
        _publish_model(ckpt, out, final)
    # The published model is what later stages read; the resumable state (optimizer included) is only disk now.
    fs, path = records.filesystem(records.join(here, "ray_train"))
    fs.delete_dir(path)
    log.info("iteration %d: θ_%d saved to %s (%.1f s)", cfg.iteration, cfg.iteration + 1, out, seconds)
    return TrainResult(out, final, skipped=False, seconds=seconds)


def _quiet_dataset(table: "pa.Table") -> "ray.data.Dataset":
    """The pairs as a Dataset without progress bars: each worker reads it whole, and its bar never closes."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    old, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    try:
        return ray.data.from_arrow(table)
    finally:
        ctx.enable_progress_bars = old


def _read_lines(uri: str) -> list[str]:
    if not records.exists(uri):
        return []
    fs, path = records.filesystem(uri)
    with fs.open_input_stream(path) as f:
        return [line for line in f.read().decode().splitlines() if line.strip()]


def _publish_model(ckpt: str, out: str, metrics: dict[str, Any]) -> None:
    """Copy the HF files (not the optimizer state) to `out`, marker last."""
    import pyarrow.fs as pafs

    fs, path = records.filesystem(out)
    local = isinstance(fs, pafs.LocalFileSystem)
    work = f"{path}.tmp" if local else path
    if fs.get_file_info(work).type != pafs.FileType.NotFound:
        fs.delete_dir(work)
    fs.create_dir(work, recursive=True)
    for name in os.listdir(ckpt):
        if not name.startswith("train_state_rank"):
            pafs.copy_files(os.path.join(ckpt, name), f"{work}/{name}", destination_filesystem=fs)
    with fs.open_output_stream(f"{work}/{records.MARKER}") as f:
        f.write(json.dumps(metrics).encode())
    if local:
        if os.path.exists(path):
            shutil.rmtree(path)
        fs.move(work, path)
