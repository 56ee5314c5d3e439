"""Stage 3: the main player θ_{t+1} learns to tell the human answer from θ_t's, on Ray Train workers.

The reference log-probs and the token ids come precomputed in the pairs (score.py), so each worker holds one model,
never tokenises, and runs one forward per micro-batch of B pairs grouped by length, each pair packed in one row.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from spin_ray import records
from spin_ray.config import ConfigError, SpinConfig, TrainConfig
from spin_ray.generate import resolve_dtype
from spin_ray.loss import spin_loss
from spin_ray.plan import preflight
from spin_ray.score import IDS, LOGPS, rescore_window
from spin_ray.template import pack_pairs, packed_logps

if TYPE_CHECKING:
    import pyarrow as pa
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger(__name__)

COLUMNS = [*IDS, *LOGPS]
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


def worker_shares(step_rows: Sequence[int], lengths: Sequence[int], world: int) -> list[list[int]]:
    """One optimizer step's rows dealt to the workers in order of length, so every worker gets as many pairs and
    about as many tokens (no straggler); the step's set of pairs, hence its mean loss, is the random global batch."""
    ranked = sorted(step_rows, key=lambda i: lengths[i])
    return [ranked[r::world] for r in range(world)]


def micro_batches(rows: Sequence[int], lengths: Sequence[int], *, max_pairs: int | None,
                  max_tokens: int | None) -> list[list[int]]:
    """A worker's share split into length-grouped micro-batches.

    `lengths[i]` is pair i's packed row (both sequences side by side, template.pack_pairs); a micro-batch of B pairs
    is B rows padded to the longest, so it costs B·max(length) tokens, which `max_tokens` bounds; `max_pairs` bounds B.
    """
    out: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in sorted(rows, key=lambda i: lengths[i]):
        wider = max(width, lengths[i])
        full = (max_pairs is not None and len(current) >= max_pairs) or (
            max_tokens is not None and (len(current) + 1) * wider > max_tokens)
        if current and full:
            out.append(current)
            current, wider = [], lengths[i]
        current.append(i)
        width = wider
    return out + ([current] if current else [])


def even_micro_batches(shares: list[list[int]], lengths: Sequence[int], *, max_pairs: int | None,
                       max_tokens: int | None) -> list[list[list[int]]]:
    """Every worker's micro-batches, the larger ones split until all workers run the same number: each FSDP2
    forward all-gathers across workers, so one worker with an extra micro-batch would wait forever."""
    plans = [micro_batches(share, lengths, max_pairs=max_pairs, max_tokens=max_tokens) for share in shares]
    n = max(map(len, plans))
    for plan in plans:
        while len(plan) < n:  # each share has as many pairs as the largest plan's micro-batches, so this ends
            j = max(range(len(plan)), key=lambda k: len(plan[k]))
            half = len(plan[j]) // 2
            plan[j:j + 1] = [plan[j][:half], plan[j][half:]]
    return plans


class PairArrays:
    """The token ids and reference log-probs a worker trains on, as flat numpy arrays (no Python row dicts)."""

    def __init__(self, table: "pa.Table"):
        self.ids = {}
        for key in IDS:
            column = table.column(key).combine_chunks()
            self.ids[key] = (column.values.to_numpy(), column.offsets.to_numpy())
        self.ref = {key: table.column(key).to_numpy() for key in LOGPS}
        size = {key: np.diff(offsets) for key, (_, offsets) in self.ids.items()}
        self.lengths = (2 * size["prompt_ids"] + size["real_ids"] + size["generated_ids"]).tolist()  # packed rows

    def __len__(self) -> int:
        return len(self.lengths)

    def pair(self, i: int) -> dict[str, list[int]]:
        return {key: values[offsets[i]:offsets[i + 1]].tolist() for key, (values, offsets) in self.ids.items()}


def _load_pairs() -> PairArrays:
    import pyarrow as pa
    import ray.train

    # Every worker reads the (token ids only) pairs table and takes its share of each global batch from one seeded
    # order: resume is exact and N workers see the same batches as one.
    shard = ray.train.get_dataset_shard("train")
    return PairArrays(pa.concat_tables(list(shard.iter_batches(batch_size=4096, batch_format="pyarrow"))))


def _mesh(tc: TrainConfig, world: int, device: torch.device) -> "DeviceMesh":
    """FSDP: one shard group of all workers, or HSDP (shard within groups of train.hsdp_shard_size, replicate
    across them). DDP in reduced precision: replicate across all, shard over 1."""
    from torch.distributed.device_mesh import init_device_mesh

    shard = 1 if tc.strategy == "ddp" else tc.hsdp_shard_size or world
    if shard == world:
        return init_device_mesh(device.type, (world,))
    return init_device_mesh(device.type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))


def _build_sharded(source: str, tc: TrainConfig, dtype: str, rank: int, world: int,
                   device: torch.device) -> torch.nn.Module:
    """FSDP2 as torchtitan builds it: the model on the meta device, sharded per decoder layer, materialised empty
    on `device`, then filled from rank 0's copy of the weights by broadcast (no worker but rank 0 reads them).

    Parameters stay fp32 (the optimizer's master copy); in bf16 each layer is all-gathered and computed in bf16 and
    gradients are reduced in fp32 (MixedPrecisionPolicy), instead of autocast keeping a bf16 copy of every layer.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    policy = (MixedPrecisionPolicy() if dtype == "float32" else
              MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32))
    mesh = _mesh(tc, world, device)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.to_empty(device=device)
    for module in model.modules():  # non-persistent buffers (rotary frequencies) are in no state dict
        if "RotaryEmbedding" in type(module).__name__:
            model._init_weights(module)
    full = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict() if rank == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def _grad_sync(model: torch.nn.Module, sync: bool) -> AbstractContextManager:
    """Reduce gradients only in the last micro-batch's backward. FSDP2's flag persists, so it is set for every
    micro-batch (on again for the last one); DDP's no_sync is a context around the others."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
        return nullcontext()
    if not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return nullcontext()


def _save(model: torch.nn.Module, tokenizer: Any, optimizer: torch.optim.Optimizer, scheduler: Any, step: int,
          sharded: bool, rank: int, out: str) -> None:
    """HF model + tokenizer (rank 0) and the optimizer state (rank 0, or every rank's shard under FSDP2)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        hf_model = model
    else:
        hf_model = getattr(model, "module", model)
        state = None
    if rank == 0:
        hf_model.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
    if rank == 0 or sharded:
        torch.save({"optimizer": _plain_tensors(optimizer.state_dict()), "scheduler": scheduler.state_dict(),
                    "step": step, "rng": torch.get_rng_state()}, os.path.join(out, STATE.format(rank)))


def _plain_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state with each DTensor (an FSDP2 shard) as its local tensor: the file then holds only plain
    tensors and numbers, which `torch.load(weights_only=True)` reads without unpickling code from storage."""
    return {**state, "state": {i: {k: v.to_local() if hasattr(v, "to_local") else v for k, v in s.items()}
                               for i, s in state["state"].items()}}


def _load_state(path: str, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> dict[str, Any]:
    """Read a `_save`d state (weights_only: a shared bucket must not be a way to run code on the workers) and give
    the optimizer its shards back as DTensors laid out like their parameters."""
    from torch.distributed.tensor import DTensor

    state = torch.load(path, weights_only=True)
    for i, s in state["optimizer"]["state"].items():
        p = params[i]
        if isinstance(p, DTensor):
            s.update({k: DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                      for k, v in s.items() if torch.is_tensor(v) and v.dim() > 0})
    optimizer.load_state_dict(state["optimizer"])
    return state


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
    dtype = resolve_dtype(tc.dtype, device.type == "cuda")
    # Reduced precision always goes through FSDP2's MixedPrecisionPolicy (DDP = replicate-only mesh), so the
    # trainer computes exactly as the scorer (score.cast_parameters) and step 0's loss is ln 2.
    sharded = tc.strategy == "fsdp" or dtype != "float32"
    torch.manual_seed(cfg.seed)

    checkpoint = ray.train.get_checkpoint()
    ckpt_dir = checkpoint.to_directory() if checkpoint else None
    source = ckpt_dir or local_model(c["model"])
    tokenizer = AutoTokenizer.from_pretrained(source)
    if sharded:
        model = _build_sharded(source, tc, dtype, rank, world, device)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        if tc.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        model = ray.train.torch.prepare_model(model)
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
        state = _load_state(os.path.join(ckpt_dir, STATE.format(rank if sharded else 0)), optimizer, params)
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
    # From the file, not from the driver's start: after a worker failure inside this fit, the group restarts from
    # the checkpoint with the lines written since (rank 0 writes them at every checkpoint).
    lines = records.read_lines(c["metrics_uri"])[:start]

    pairs = _load_pairs()
    budget = dict(max_pairs=None if tc.micro_batch_tokens else tc.micro_batch_size, max_tokens=tc.micro_batch_tokens)
    order = None
    for step in range(start, total):
        epoch, k = divmod(step, len(steps))
        if order is None or k == 0:
            order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        begin = sum(steps[:k])
        shares = worker_shares(order[begin:begin + steps[k]], pairs.lengths, world)
        micro = even_micro_batches(shares, pairs.lengths, **budget)[rank]
        mine = sum(len(idx) for idx in micro)
        t0 = time.perf_counter()
        sums, tokens, padded = torch.zeros(8, dtype=torch.float64), 0, 0
        for i, idx in enumerate(micro):
            batch = {key: v.to(device) for key, v in pack_pairs([pairs.pair(j) for j in idx],
                                                                tokenizer.pad_token_id).items()}
            ref_real = torch.tensor(pairs.ref["ref_logp_real"][idx], device=device)
            ref_gen = torch.tensor(pairs.ref["ref_logp_generated"][idx], device=device)
            with _grad_sync(model, i == len(micro) - 1):
                real, generated = packed_logps(model, batch)
                loss, m = spin_loss(real, generated, ref_real, ref_gen, tc.beta, tc.loss_type)
                (loss * len(idx) / mine).backward()
            sums += torch.tensor([loss.item(), *m.values(), 1.0], dtype=torch.float64) * len(idx)
            tokens += int((batch["segment"] > 0).sum())
            padded += batch["segment"].numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            totals = torch.tensor([*sums.tolist(), tokens, padded], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(totals)
            sums, tokens, padded = totals[:-2].cpu(), int(totals[-2]), int(totals[-1])
        names = ["loss", *m.keys()]
        metrics = {n: float(v) for n, v in zip(names, (sums[:-1] / sums[-1]).tolist())}
        # `pairs`: the rows of the training table this step used, so that each pair's use is countable after restarts.
        metrics.update(pairs=order[begin:begin + steps[k]])
        metrics.update(step=step + 1, total_steps=total, epoch=epoch, lr=lr, grad_norm=float(grad_norm), tokens=tokens,
                       padding_share=1 - tokens / padded, tokens_per_s=tokens / (time.perf_counter() - t0),
                       beta=tc.beta, iteration=cfg.iteration, time=time.time())
        lines.append(json.dumps(metrics))
        done = step + 1 == total
        if rank == 0 and ((step + 1) % tc.report_every == 0 or (step + 1) % tc.checkpoint_every == 0 or done):
            records.write_bytes_atomic(c["metrics_uri"], ("\n".join(lines) + "\n").encode())
        if (step + 1) % tc.checkpoint_every == 0 or done:
            with tempfile.TemporaryDirectory() as tmp:
                _save(model, tokenizer, optimizer, scheduler, step + 1, sharded, rank, tmp)
                has_files = rank == 0 or sharded
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None)
        elif (step + 1) % tc.report_every == 0:
            ray.train.report(metrics)


def pairs_uris(cfg: SpinConfig, model: str) -> list[str]:
    """Iteration t's pairs plus the window's earlier iterations' pairs rescored under θ_t (`model`): rescored here
    when missing, so `spin-ray generate` then `spin-ray train` at iteration t compose for any t."""
    own = records.join(records.iter_dir(cfg.storage, cfg.iteration), "pairs")
    if not records.is_complete(own):
        raise ConfigError(
            f"no finished pairs for iteration {cfg.iteration} at {own}: run `spin-ray generate --set "
            f"iteration={cfg.iteration}` with the same storage and model (θ_{cfg.iteration}) first")
    return [own, *rescore_window(cfg, model)]


def train(cfg: SpinConfig, *, model: str | None = None, pairs: list[str] | None = None) -> TrainResult:
    """Train θ_{t+1} from θ_t (`model`, default cfg.model) on `pairs` (default: the iteration's window) and save it
    to `<storage>/iter_<t>/model`. A finished model is kept; an interrupted run continues from its last checkpoint.

    β and the peak lr are iteration t's (`train.beta_per_iteration` / `lr_per_iteration`, see
    SpinConfig.for_iteration), whichever entry point calls this.
    """
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from spin_ray.models import resolve_model

    # Refused before any actor starts (plan.py decides what each stage asks for); the window is rescored here.
    cfg = preflight(cfg.for_iteration(cfg.iteration), stages=("window", "train"))
    here = records.iter_dir(cfg.storage, cfg.iteration)
    out = records.join(here, "model")
    if records.is_complete(out):
        log.info("iteration %d: trained model already at %s; skipping training", cfg.iteration, out)
        return TrainResult(out, records.read_json(records.join(out, records.MARKER)), skipped=True)
    model = resolve_model(model or cfg.model)
    table = records.read_pairs_table(pairs or pairs_uris(cfg, model), columns=COLUMNS)
    tc = cfg.train
    if not plan_steps(table.num_rows, tc.global_batch_size, tc.num_workers):
        raise ConfigError(f"{table.num_rows} pairs give no optimizer step with train.num_workers = {tc.num_workers}")
    metrics_uri = records.join(here, "train_metrics.jsonl")

    t0 = time.perf_counter()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "model": model, "n_rows": table.num_rows, "metrics_uri": metrics_uri},
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker={"CPU": tc.num_cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        datasets={"train": _quiet_dataset(table)},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
        run_config=ray.train.RunConfig(
            name="train", storage_path=records.join(here, "ray_train"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures)),
    )
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    lines = records.read_lines(metrics_uri)
    final = {k: v for k, v in json.loads(lines[-1]).items() if k != "pairs"}
    # Every pair should be used `epochs` times whatever restarts happened; plan_steps may drop a remainder that does
    # not divide among the workers. Either way the count is in the final metrics, never silent.
    uses = np.bincount([i for line in lines for i in json.loads(line).get("pairs", [])], minlength=table.num_rows)
    final["pairs_not_used_epochs_times"] = int((uses != tc.epochs).sum())
    if final["pairs_not_used_epochs_times"]:
        log.warning("iteration %d: %d of %d pairs were not used train.epochs = %d times", cfg.iteration,
                    final["pairs_not_used_epochs_times"], table.num_rows, tc.epochs)
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
