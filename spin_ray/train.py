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
from spin_ray.config import ConfigError, SpinConfig, TrainConfig, resolve_dtype
from spin_ray.loss import spin_loss
from spin_ray.plan import preflight
from spin_ray.score import IDS, LOGPS, rescore_window
from spin_ray.template import pack_pairs, packed_logps

if TYPE_CHECKING:
    import pyarrow as pa
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger(__name__)

COLUMNS = [*IDS, *LOGPS]
STATE = "state"
"""The torch.distributed.checkpoint folder inside each Ray Train checkpoint."""
# Padding share a token-budget micro-batch may reach by default: a forward costs about its padded tokens, so a few
# more, narrower forwards cost less than the padding they avoid.
MAX_PADDING = 0.1


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
    Under a token budget a micro-batch also ends before its padding would pass MAX_PADDING of its tokens: a large
    budget would otherwise take a whole long-tailed share in one forward, padded to its longest row.
    """
    out: list[list[int]] = []
    current: list[int] = []
    width = real = 0
    for i in sorted(rows, key=lambda i: lengths[i]):
        wider = max(width, lengths[i])
        cost = (len(current) + 1) * wider
        full = (max_pairs is not None and len(current) >= max_pairs) or (max_tokens is not None and (
            cost > max_tokens or cost - real - lengths[i] > MAX_PADDING * cost))
        if current and full:
            out.append(current)
            current, wider, real = [], lengths[i], 0
        current.append(i)
        width, real = wider, real + lengths[i]
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


def packed_lengths(table: "pa.Table") -> np.ndarray:
    """Each pair's packed row length (prompt twice, both answers: template.pack_pairs), from the list offsets alone."""
    import pyarrow.compute as pc

    size = {key: pc.list_value_length(table.column(key)).to_numpy() for key in IDS}
    return 2 * size["prompt_ids"] + size["real_ids"] + size["generated_ids"]


def epoch_plan(lengths: Sequence[int], steps: Sequence[int], seed: int, epoch: int,
               world: int) -> tuple[list[int], list[list[list[int]]]]:
    """One epoch's seeded order of the rows and, per optimizer step, each worker's share of its global batch."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    bounds = np.cumsum([0, *steps]).tolist()
    return order, [worker_shares(order[a:b], lengths, world) for a, b in zip(bounds, bounds[1:])]


class PairArrays:
    """The token ids and reference log-probs of some rows of the pairs table, as flat numpy arrays (no Python row
    dicts), addressed by their row number in the whole table."""

    def __init__(self, table: "pa.Table", rows: Sequence[int] | None = None):
        # Sorted: `table` row k is whole-table row rows[k]; None: `table` is the whole table.
        self.rows = np.arange(table.num_rows) if rows is None else np.asarray(rows)
        self.lengths = packed_lengths(table).tolist()  # of the rows held, in their order
        self.ids = {}
        for key in IDS:
            column = table.column(key).combine_chunks()
            self.ids[key] = (column.values.to_numpy(), column.offsets.to_numpy())
        self.ref = {key: table.column(key).to_numpy() for key in LOGPS}

    def __len__(self) -> int:
        return len(self.rows)

    def local(self, rows: Sequence[int]) -> np.ndarray:
        return np.searchsorted(self.rows, rows)

    def pair(self, row: int) -> dict[str, list[int]]:
        i = int(self.local([row])[0])
        return {key: values[offsets[i]:offsets[i + 1]].tolist() for key, (values, offsets) in self.ids.items()}


def _take_rows(table: "pa.Table", rows: list[int]) -> "pa.Table":
    return table.take(rows)


def _load_share(table_ref: Any, rows: list[int]) -> PairArrays:
    """This worker's rows of the pairs table in the object store, cut out by a task placed where the table is (Ray
    prefers the node holding a task's large arguments), so only those rows travel to the worker. num_cpus=0: the
    Train workers may hold every CPU."""
    import ray

    rows = sorted(rows)
    return PairArrays(ray.get(ray.remote(num_cpus=0)(_take_rows).remote(table_ref, rows)), rows)


def checkpoint_due(tc: TrainConfig, step: int, steps_per_epoch: int, total: int, minutes: float) -> bool:
    """Whether the resumable state is saved after optimizer step `step` (from 0), `minutes` after the last save: every
    train.checkpoint_every steps, train.checkpoint_every_minutes, at the end of each epoch with
    train.checkpoint_every_epoch; never after the last step (the exported model is the result, and a 7B AdamW state
    is ~84 GB to write for nothing)."""
    if step + 1 == total:
        return False
    return ((tc.checkpoint_every is not None and (step + 1) % tc.checkpoint_every == 0)
            or (tc.checkpoint_every_minutes is not None and minutes >= tc.checkpoint_every_minutes)
            or (tc.checkpoint_every_epoch and (step + 1) % steps_per_epoch == 0))


def _mesh(tc: TrainConfig, world: int, device: torch.device) -> "DeviceMesh":
    """FSDP: one shard group of all workers, or HSDP (shard within groups of train.hsdp_shard_size, replicate
    across them). DDP in reduced precision: replicate across all, shard over 1."""
    from torch.distributed.device_mesh import init_device_mesh

    shard = 1 if tc.strategy == "ddp" else tc.hsdp_shard_size or world
    if shard == world:
        return init_device_mesh(device.type, (world,))
    return init_device_mesh(device.type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))


def _build_sharded(source: str, tc: TrainConfig, dtype: str, rank: int, world: int,
                   device: torch.device, load_weights: bool, trust_remote_code: bool = False) -> torch.nn.Module:
    """FSDP2 as torchtitan builds it: the model on the meta device, sharded per decoder layer, materialised empty
    on `device`, then filled from rank 0's copy of the weights by broadcast (no worker but rank 0 reads them), or,
    with `load_weights` off, left for a checkpoint's shards (`_load_state`).

    Parameters stay fp32 (the optimizer's master copy); in bf16 each layer is all-gathered and computed in bf16 and
    gradients are reduced in fp32 (MixedPrecisionPolicy), instead of autocast keeping a bf16 copy of every layer.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    from spin_ray.models import load_config, load_model

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(source, trust_remote_code=trust_remote_code),
                                                 dtype=torch.float32, trust_remote_code=trust_remote_code)
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
    if load_weights:
        full = load_model(source, dtype=torch.float32, trust_remote_code=trust_remote_code).state_dict() \
            if rank == 0 else {}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def _grad_sync(model: torch.nn.Module, sync: bool) -> AbstractContextManager:
    """Gradient accumulation: reduce across workers once per step, in the last micro-batch's backward.

    FSDP2 reduce-scatters every micro-batch into the sharded gradients and all-reduces across replicas (HSDP, and bf16
    DDP's replicate-only mesh) only in the last one. Turning reduce-scatter off instead
    (set_requires_gradient_sync(False)) keeps an unsharded fp32 gradient of every parameter on every worker until
    the last micro-batch: 29 GB per GPU at 7B whatever the worker count, where the shard is 29/N GB.
    DDP's no_sync is a context around the other micro-batches."""
    if hasattr(model, "set_requires_all_reduce"):
        model.set_requires_all_reduce(sync)  # a flag that persists: set for every micro-batch, on for the last
        return nullcontext()
    if not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return nullcontext()


def _save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int, rank: int,
          out: str) -> None:
    """The resumable state as torch.distributed.checkpoint shards: every rank writes its own file (its FSDP2 shards;
    under DDP, DCP spreads the replicated tensors over the ranks), rank 0 the `.metadata` index. Nothing is gathered."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state, "scheduler": scheduler.state_dict(), "step": step,
              f"rng_rank{rank}": torch.get_rng_state()}, checkpoint_id=os.path.join(out, STATE))


def _load_state(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                rank: int) -> int:
    """Read a `_save`d state into the model, optimizer, scheduler and RNG, each rank only its shards; returns the
    step. DCP's own reader unpickles `.metadata` with pickle.load and every non-tensor entry with
    torch.load(weights_only=False): a shared bucket must not be a way to run code on the workers, so both go through
    allowlists here (`_safe_reader`, `_safe_planner`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)  # the layout to fill (optimizer state initialised)
    state = {"model": model_state, "optim": optim_state, "scheduler": scheduler.state_dict(), "step": 0,
             f"rng_rank{rank}": torch.get_rng_state()}
    dcp.load(state, storage_reader=_safe_reader(path), planner=_safe_planner())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state[f"rng_rank{rank}"])
    return int(state["step"])


def _safe_reader(path: str) -> Any:
    """A DCP FileSystemReader whose `.metadata` (DCP's index: dataclasses of sizes, dtypes and file offsets) is
    unpickled with only those classes allowed."""
    import pickle

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    allowed = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "PurePosixPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if ((module, name) in allowed or module == "torch.distributed.checkpoint.metadata"
                    or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"{path}/.metadata refers to {module}.{name}, which a checkpoint index "
                                         "never holds: refusing to load it")

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = Unpickler(f).load()
            if not isinstance(metadata, Metadata):
                raise pickle.UnpicklingError(f"{path}/.metadata is not a torch.distributed.checkpoint index")
            metadata.storage_meta = metadata.storage_meta or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _safe_planner() -> Any:
    """DCP's DefaultLoadPlanner, reading the non-tensor entries (step, scheduler, optimizer hyper-parameters) with
    torch.load(weights_only=True) instead of weights_only=False."""
    import io

    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.planner import ReadItem

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            fqn = read_item.dest_index.fqn
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return SafePlanner()


def model_dtype(source: str, trust_remote_code: bool = False) -> torch.dtype:
    """θ_t's own dtype (config.json's `dtype`, formerly `torch_dtype`), in which θ_{t+1} is exported; fp32 if unset."""
    from spin_ray.models import load_config

    config = load_config(source, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def final_metrics(lines: list[str], n_rows: int, epochs: int) -> dict[str, Any]:
    """The last step's metrics and how many pairs were not used `epochs` times. Every pair should be, whatever restarts
    happened; plan_steps may drop a remainder that does not divide among the workers. Either way it is counted."""
    final = {k: v for k, v in json.loads(lines[-1]).items() if k != "pairs"}
    uses = np.bincount([i for line in lines for i in json.loads(line).get("pairs", [])], minlength=n_rows)
    final["pairs_not_used_epochs_times"] = int((uses != epochs).sum())
    return final


def _export(model: torch.nn.Module, tokenizer: Any, dtype: torch.dtype, rank: int, out: str,
            marker: dict[str, Any]) -> None:
    """θ_{t+1} as an HF folder in θ_t's dtype, written by rank 0 straight to `out`: each parameter is gathered whole
    one at a time (every rank takes part under FSDP2) and only rank 0 keeps it, on the CPU and already cast, so no
    rank ever holds an fp32 copy of the whole model. A local `out` appears by rename; on a URI the marker is last."""
    import pyarrow.fs as pafs
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = {}
    for name, tensor in get_model_state_dict(model).items():
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        if rank == 0:
            state[name] = full.detach().to("cpu", dtype)
    if rank != 0:
        return
    hf_model = getattr(model, "module", model)
    fs, path = records.filesystem(out)
    local = isinstance(fs, pafs.LocalFileSystem)
    with tempfile.TemporaryDirectory() as tmp:
        work = f"{path}.tmp" if local else tmp
        if local and os.path.exists(work):
            shutil.rmtree(work)
        hf_model.save_pretrained(work, state_dict=state, safe_serialization=True)
        hf_model.config.dtype = dtype  # save_pretrained wrote the fp32 master parameters' dtype
        hf_model.config.save_pretrained(work)
        tokenizer.save_pretrained(work)
        if local:
            with open(os.path.join(work, records.MARKER), "w") as f:
                json.dump(marker, f)
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(work, path)
            return
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
        pafs.copy_files(tmp, path, destination_filesystem=fs)
        with fs.open_output_stream(f"{path}/{records.MARKER}") as f:
            f.write(json.dumps(marker).encode())


def train_loop_per_worker(c: dict[str, Any]) -> None:
    """One Ray Train worker: SPIN updates over seeded global batches, with resumable checkpoints."""
    import ray.train
    import ray.train.torch

    from spin_ray.models import load_model, load_tokenizer, local_model

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
    source = local_model(c["model"])
    trust = dict(trust_remote_code=cfg.trust_remote_code)
    tokenizer = load_tokenizer(source, **trust)
    if sharded:
        model = _build_sharded(source, tc, dtype, rank, world, device, load_weights=checkpoint is None, **trust)
    else:
        model = load_model(source, dtype=torch.float32, **trust)
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
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:  # local storage: the folder itself; a URI: one download per node
            start = _load_state(os.path.join(ckpt_dir, STATE), model, optimizer, scheduler, rank)
    # From the file, not from the driver's start: after a worker failure inside this fit, the group restarts from
    # the checkpoint with the lines written since (rank 0 writes them at every checkpoint).
    lines = records.read_lines(c["metrics_uri"])[:start]

    lengths = c["lengths"]
    budget = dict(max_pairs=None if tc.micro_batch_tokens else tc.micro_batch_size, max_tokens=tc.micro_batch_tokens)
    order = None
    last_checkpoint = time.monotonic()
    for step in range(start, total):
        epoch, k = divmod(step, len(steps))
        if order is None or k == 0:
            # Every worker derives the epoch's seeded plan from the row lengths alone, then fetches only the rows of
            # its own shares: N workers see the same global batches as one, and a resumed epoch the same batches.
            order, plan = epoch_plan(lengths, steps, cfg.seed, epoch, world)
            pairs = _load_share(c["pairs"], sorted({i for shares in plan for i in shares[rank]}))
        begin = sum(steps[:k])
        micro = even_micro_batches(plan[k], lengths, **budget)[rank]
        mine = sum(len(idx) for idx in micro)
        t0 = time.perf_counter()
        sums, tokens, padded = torch.zeros(8, dtype=torch.float64), 0, 0
        for i, idx in enumerate(micro):
            batch = {key: v.to(device) for key, v in pack_pairs([pairs.pair(j) for j in idx],
                                                                tokenizer.pad_token_id).items()}
            here = pairs.local(idx)
            ref_real = torch.tensor(pairs.ref["ref_logp_real"][here], device=device)
            ref_gen = torch.tensor(pairs.ref["ref_logp_generated"][here], device=device)
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
        done = step + 1 == total
        # Rank 0's clock decides for all, through the metrics' all-reduce: every rank must checkpoint (a collective)
        # after the same step.
        save = rank == 0 and checkpoint_due(tc, step, len(steps), total, (time.monotonic() - last_checkpoint) / 60)
        if world > 1:
            totals = torch.tensor([*sums.tolist(), tokens, padded, save], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(totals)
            sums, tokens, padded, save = totals[:-3].cpu(), int(totals[-3]), int(totals[-2]), bool(totals[-1])
        names = ["loss", *m.keys()]
        metrics = {n: float(v) for n, v in zip(names, (sums[:-1] / sums[-1]).tolist())}
        # `pairs`: the rows of the training table this step used, so that each pair's use is countable after restarts.
        metrics.update(pairs=order[begin:begin + steps[k]])
        metrics.update(step=step + 1, total_steps=total, epoch=epoch, lr=lr, grad_norm=float(grad_norm), tokens=tokens,
                       padding_share=1 - tokens / padded, tokens_per_s=tokens / (time.perf_counter() - t0),
                       beta=tc.beta, iteration=cfg.iteration, time=time.time())
        lines.append(json.dumps(metrics))
        if rank == 0 and ((step + 1) % tc.report_every == 0 or save or done):
            records.write_bytes_atomic(c["metrics_uri"], ("\n".join(lines) + "\n").encode())
        if save:
            tmp = tempfile.mkdtemp(prefix="spin_ckpt_")
            _save(model, optimizer, scheduler, step + 1, rank, tmp)
            # ASYNC: Ray uploads the shards on a thread of its own (then deletes `tmp`) while training goes on.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
            last_checkpoint = time.monotonic()
        elif (step + 1) % tc.report_every == 0 or done:
            ray.train.report(metrics)
    # Also when a restarted group finds every step done (killed while exporting): the export is redone.
    _export(model, tokenizer, model_dtype(source, **trust), rank, c["out"],
            final_metrics(lines, len(lengths), tc.epochs))


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
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from spin_ray.models import check_model, resolve_model

    # Refused before any actor starts (plan.py decides what each stage asks for); the window is rescored here.
    cfg = preflight(cfg.for_iteration(cfg.iteration), stages=("window", "train"))
    here = records.iter_dir(cfg.storage, cfg.iteration)
    out = records.join(here, "model")
    if records.is_complete(out):
        log.info("iteration %d: trained model already at %s; skipping training", cfg.iteration, out)
        _drop_resumable_state(here)  # left if the driver died between the export and its cleanup
        return TrainResult(out, records.read_json(records.join(out, records.MARKER)), skipped=True)
    model = resolve_model(model or cfg.model)
    check_model(model, cfg.trust_remote_code)
    table = records.read_pairs_table(pairs or pairs_uris(cfg, model), columns=COLUMNS)
    tc = cfg.train
    if not plan_steps(table.num_rows, tc.global_batch_size, tc.num_workers):
        raise ConfigError(f"{table.num_rows} pairs give no optimizer step with train.num_workers = {tc.num_workers}")
    metrics_uri = records.join(here, "train_metrics.jsonl")

    t0 = time.perf_counter()
    # The workers get the row lengths (to plan the batches) and the table in the object store, from which each
    # fetches only the rows it trains on (_load_share).
    config = {"cfg": cfg, "model": model, "n_rows": table.num_rows, "metrics_uri": metrics_uri, "out": out,
              "lengths": packed_lengths(table).tolist(), "pairs": ray.put(table)}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker={"CPU": tc.num_cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name="train", storage_path=records.join(here, "ray_train"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures)),
    )
    trainer.fit()
    seconds = time.perf_counter() - t0
    # Rank 0 exported θ_{t+1} to `out` with its marker (the final metrics); the resumable state is only disk now.
    final = records.read_json(records.join(out, records.MARKER))
    if final["pairs_not_used_epochs_times"]:
        log.warning("iteration %d: %d of %d pairs were not used train.epochs = %d times", cfg.iteration,
                    final["pairs_not_used_epochs_times"], table.num_rows, tc.epochs)
    _drop_resumable_state(here)
    log.info("iteration %d: θ_%d saved to %s (%.1f s)", cfg.iteration, cfg.iteration + 1, out, seconds)
    return TrainResult(out, final, skipped=False, seconds=seconds)


def _drop_resumable_state(here: str) -> None:
    import pyarrow.fs as pafs

    fs, path = records.filesystem(records.join(here, "ray_train"))
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
