"""Stage 2: the main player θ_{t+1} learns to tell the human answer from θ_t's, on Ray Train workers.

The token ids come with the pairs (generate.py tokenises once), so the workers never tokenise. Before the first step
the policy is θ_t, the reference of iteration t: the workers' first pass, without gradients, computes the reference
log-probs of every pair in the window with the training step's own forward (same packing, kernels and precision, so
step 0's loss is ln 2), and stores them in `iter_<t>/reference/` so that a restart does not redo them. Each worker
holds one model and runs one forward per micro-batch of pairs grouped by length, their sequences flattened into one
row without padding (template.pack_varlen).
Here: which pairs each worker takes at each step, the reference pass, and the Ray glue around
spin_ray.training.step.Trainer (the step) and spin_ray.training.checkpoint (the state on disk).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from spin_ray.config import ConfigError, SpinConfig, TrainConfig
from spin_ray.data import records
from spin_ray.data.layout import RunLayout
from spin_ray.data.schemas import IDS, LOGPS, TOKENS
from spin_ray.failures import stage
from spin_ray.logs import QUIET_ENV, output_to_file, quiet_ray_data
from spin_ray.models.builders import resolve_model
from spin_ray.models.loading import check_model, load_tokenizer, local_model
from spin_ray.stages.resources import preflight
from spin_ray.training.batching import epoch_plan, even_micro_batches, plan_steps, worker_shares
from spin_ray.training.checkpoint import STATE, export_hf, load_state, model_dtype, save_state
from spin_ray.training.memory import fit_memory, load_arch
from spin_ray.training.step import Trainer

log = logging.getLogger(__name__)

KEYS = ["iteration", "prompt_id"]
"""A pair of the window: the iteration that generated it and its prompt."""
@dataclass
class TrainResult:
    model: str
    """θ_{t+1} in HF format (`<storage>/iter_<t>/model`)."""
    metrics: dict[str, Any]
    """The last optimizer step's metrics."""
    skipped: bool
    seconds: float = 0.0
    """The whole training stage, reference pass included."""
    reference_seconds: float = 0.0
    """The reference pass (θ_t's log-probs of the window's pairs), as recorded with them when it ran."""

    @property
    def checkpoint(self) -> "ray.train.Checkpoint":
        """θ_{t+1} as a Ray Train Checkpoint (an HF folder), for the next step of a pipeline."""
        import ray.train

        fs, path = records.filesystem(self.model)
        return ray.train.Checkpoint(path, filesystem=fs)


def packed_lengths(table: pa.Table) -> np.ndarray:
    """Each pair's tokens in a micro-batch (prompt twice, both answers), from the list offsets alone."""
    import pyarrow.compute as pc

    size = {key: pc.list_value_length(table.column(key)).to_numpy() for key in IDS}
    return 2 * size["prompt_ids"] + size["real_ids"] + size["generated_ids"]


class PairArrays:
    """The token ids of some rows of the pairs table, as flat numpy arrays (no Python row dicts), addressed by their
    row number in the whole table."""

    def __init__(self, table: pa.Table, rows: Sequence[int] | None = None):
        # Sorted: `table` row k is whole-table row rows[k]; None: `table` is the whole table.
        self.rows = np.arange(table.num_rows) if rows is None else np.asarray(rows)
        self.lengths = packed_lengths(table).tolist()  # of the rows held, in their order
        self.ids = {}
        for key in IDS:
            column = table.column(key).combine_chunks()
            self.ids[key] = (column.values.to_numpy(), column.offsets.to_numpy())

    def __len__(self) -> int:
        return len(self.rows)

    def local(self, rows: Sequence[int]) -> np.ndarray:
        return np.searchsorted(self.rows, rows)

    def pair(self, row: int) -> dict[str, list[int]]:
        i = int(self.local([row])[0])
        return {key: values[offsets[i]:offsets[i + 1]].tolist() for key, (values, offsets) in self.ids.items()}

    def micro_batch(self, rows: Sequence[int], ref: np.ndarray | None = None) -> list[dict[str, Any]]:
        """The pairs of `rows` as Trainer.train_step (with `ref`, the whole table's reference log-probs, one row
        per pair) or Trainer.logps (without) takes them."""
        if ref is None:
            return [self.pair(row) for row in rows]
        return [{**self.pair(row), LOGPS[0]: float(ref[row, 0]), LOGPS[1]: float(ref[row, 1])} for row in rows]


@dataclass
class PairsIndex:
    """The training table without its token ids: the window's pairs folder by folder, each in prompt-id order, every
    row located in its parquet file. The driver builds it from the small columns (index_pairs); each worker reads
    only its own rows' ids from storage (load_share)."""

    files: list[str]
    file: np.ndarray
    """Per row: its file in `files`."""
    at: np.ndarray
    """Per row: its row number in that file."""
    lengths: np.ndarray
    """Per row: the pair's tokens in a micro-batch (packed_lengths)."""


def index_pairs(uris: list[str]) -> tuple[PairsIndex, pa.Table]:
    """The window's pairs folders as one PairsIndex, and their KEYS in the same order. Lengths come from the pairs'
    `pair_tokens` column; pairs written before it existed are measured here, one record batch at a time."""
    import pyarrow.parquet as pq

    files: list[str] = []
    folders = []
    for uri in uris:
        parts = []
        for file in records.pairs_files(uri, [*KEYS, *IDS]):
            fs, path = records.filesystem(file)
            with fs.open_input_file(path) as handle:
                pf = pq.ParquetFile(handle)
                stored = TOKENS in pf.schema_arrow.names
                at = 0
                for batch in pf.iter_batches(columns=[*KEYS, TOKENS] if stored else [*KEYS, *IDS], batch_size=65536):
                    t = pa.Table.from_batches([batch])
                    tokens = t.column(TOKENS).to_numpy() if stored else packed_lengths(t)
                    parts.append(t.select(KEYS).append_column(TOKENS, pa.array(tokens, pa.int64()))
                                 .append_column("file", pa.array(np.full(t.num_rows, len(files)), pa.int32()))
                                 .append_column("at", pa.array(np.arange(at, at + t.num_rows))))
                    at += t.num_rows
            files.append(file)
        if parts:
            folders.append(pa.concat_tables(parts).sort_by("prompt_id"))
    if not folders:  # no pairs at all: train() refuses, with the count
        folders = [pa.table({"iteration": pa.array([], pa.int32()), "prompt_id": pa.array([], pa.string()),
                             TOKENS: pa.array([], pa.int64()), "file": pa.array([], pa.int32()),
                             "at": pa.array([], pa.int64())})]
    table = pa.concat_tables(folders)
    index = PairsIndex(files, table.column("file").to_numpy(), table.column("at").to_numpy(),
                       table.column(TOKENS).to_numpy())
    return index, table.select(KEYS)


def load_share(index: PairsIndex, rows: Sequence[int]) -> PairArrays:
    """The token ids of `rows` (whole-table row numbers), read from their parquet files by the worker that trains on
    them: only the row groups holding them, so a worker holds its own rows and one row group at a time."""
    import pyarrow.parquet as pq

    rows = np.asarray(sorted(rows), dtype=np.int64)
    parts, held = [], []
    for f in np.unique(index.file[rows]):
        mine = rows[index.file[rows] == f]
        fs, path = records.filesystem(index.files[f])
        with fs.open_input_file(path) as handle:
            pf = pq.ParquetFile(handle)
            starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
            group = np.searchsorted(starts, index.at[mine], side="right") - 1
            for g in np.unique(group):
                parts.append(pf.read_row_group(int(g), columns=list(IDS)).take(index.at[mine[group == g]] - starts[g]))
                held.append(mine[group == g])
    order = np.argsort(np.concatenate(held), kind="stable")
    return PairArrays(pa.concat_tables(parts).take(order), rows)


def reference_pass(trainer: Trainer, index: PairsIndex, lengths: Sequence[int], budget: dict[str, Any], rank: int,
                   world: int) -> np.ndarray:
    """θ_t's log-probs (real, generated) of every row, one row per pair: each worker takes a length-balanced share
    (worker_shares) in the training step's micro-batches, then every worker gets every result."""
    shares = worker_shares(range(len(lengths)), lengths, world)
    # Equal shares (a short one topped up with rows that are computed twice and dropped), so that every worker runs
    # as many forwards: under FSDP2 each forward is a collective.
    size = max(map(len, shares))
    padded = [share + shares[0][:size - len(share)] for share in shares]
    plan = even_micro_batches(padded, lengths, **budget)[rank]
    pairs = load_share(index, sorted(set(padded[rank])))
    mine = set(shares[rank])
    rows, values = [], []
    for idx in plan:
        (real, generated), = trainer.logps([pairs.micro_batch(idx)])
        for row, r, g in zip(idx, real.tolist(), generated.tolist()):
            if row in mine:
                rows.append(row)
                values.append((r, g))
    gathered = [(rows, values)]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, (rows, values))
    ref = np.full((len(lengths), 2), np.nan)
    for rows, values in gathered:
        ref[rows] = values
    return ref


def read_reference(uri: str, keys: pa.Table) -> np.ndarray | None:
    """The stored reference log-probs when they are those of these pairs (`keys`, in order); None when there are none
    yet, or when the pairs changed since (they were regenerated): then they are computed again."""
    if not RunLayout.done(uri):
        return None
    table = records.read_table(uri)
    if table.select(KEYS) != keys.select(KEYS):
        log.warning("the reference log-probs at %s are not those of this iteration's pairs; recomputing them", uri)
        return None
    return np.stack([table.column(key).to_numpy() for key in LOGPS], axis=1)


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


def final_metrics(lines: list[str], n_rows: int, epochs: int) -> dict[str, Any]:
    """The last step's metrics and how many pairs were not used `epochs` times. Every pair should be, whatever restarts
    happened; plan_steps may drop a remainder that does not divide among the workers. Either way it is counted."""
    final = {k: v for k, v in json.loads(lines[-1]).items() if k != "pairs"}
    uses = np.bincount([i for line in lines for i in json.loads(line).get("pairs", [])], minlength=n_rows)
    final["pairs_not_used_epochs_times"] = int((uses != epochs).sum())
    return final


def fit_device_memory(cfg: SpinConfig, source: str, device: torch.device, rank: int, world: int) -> SpinConfig:
    """`auto` train.activation_checkpointing and train.micro_batch_tokens by spin-ray plan's rule (memory.fit_memory)
    for this worker's device: on CUDA the smallest total memory of the workers' devices (every worker must run as
    many forwards, each a collective under FSDP2, under one recompute policy); on CPU the fixed choice."""
    tc = cfg.train
    if "auto" not in (tc.micro_batch_tokens, tc.activation_checkpointing):
        return cfg
    capacity = None
    if device.type == "cuda":
        memory = torch.tensor([torch.cuda.get_device_properties(device).total_memory], device=device)
        if world > 1:
            torch.distributed.all_reduce(memory, op=torch.distributed.ReduceOp.MIN)
        capacity = float(memory.item())
    sized = fit_memory(cfg, load_arch(source), capacity)
    if rank == 0:
        where = f"{capacity / 1e9:.1f} GB per device" if capacity else "CPU: fixed, not sized from host RAM"
        log.info("train.activation_checkpointing = %s, train.micro_batch_tokens = %s (auto: %s)",
                 sized.train.activation_checkpointing, sized.train.micro_batch_tokens, where)
    return sized


def train_loop_per_worker(c: dict[str, Any]) -> None:
    """One Ray Train worker: SPIN updates over seeded global batches, with resumable checkpoints."""
    import ray.train
    import ray.train.torch

    cfg: SpinConfig = c["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    output_to_file(RunLayout(cfg.storage).logs / f"train-iter{cfg.iteration}-rank{rank}.log")
    # Ray names a CUDA device wherever it assigned a GPU; a logical GPU without CUDA (a CPU test cluster) computes on CPU.
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(cfg.seed)

    checkpoint = ray.train.get_checkpoint()
    source = local_model(c["model"])
    cfg = fit_device_memory(cfg, source, device, rank, world)
    tc = cfg.train
    trust = dict(trust_remote_code=cfg.trust_remote_code)
    tokenizer = load_tokenizer(source, **trust)
    steps = plan_steps(c["n_rows"], tc.global_batch_size, world)
    total = len(steps) * tc.epochs
    trainer = Trainer(source, tc, total_steps=total, rank=rank, world=world, device=device, **trust)
    lengths = c["lengths"]
    index = ray.get(c["pairs"])
    # The trainer's micro-batches are flattened whole sequences (template.pack_varlen): a budget counts real tokens.
    budget = dict(max_pairs=None if tc.micro_batch_tokens else tc.micro_batch_size, max_tokens=tc.micro_batch_tokens)
    # Rank 0 alone reads storage; every rank follows its answer (the pass below is collective).
    found = [read_reference(c["reference"], ray.get(c["keys"])) if rank == 0 else None]
    if world > 1:
        torch.distributed.broadcast_object_list(found, src=0)
    ref = found[0]
    # The reference pass needs θ_t itself, also when a checkpoint (a later state) is loaded after it.
    trainer.setup(load_weights=checkpoint is None or ref is None)
    if ref is None:
        t0 = time.perf_counter()
        ref = reference_pass(trainer, index, lengths, budget, rank, world)
        if rank == 0:
            keys = ray.get(c["keys"])
            table = keys.append_column(LOGPS[0], pa.array(ref[:, 0])).append_column(LOGPS[1], pa.array(ref[:, 1]))
            done = {"rows": len(ref), "seconds": time.perf_counter() - t0, "workers": world}
            records.write_table(c["reference"], table, done)
            c["progress"].add.remote({"reference": done, "time": time.time()})
    start = 0
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:  # local storage: the folder itself; a URI: one download per node
            start = load_state(os.path.join(ckpt_dir, STATE), trainer.model, trainer.optimizer, trainer.scheduler,
                               rank)
    # From the file, not from the driver's start: after a worker failure inside this fit, the group restarts from
    # the checkpoint with the lines written since (rank 0 writes them at every checkpoint).
    lines = records.read_lines(c["metrics_uri"])[:start]

    order = None
    last_checkpoint = time.monotonic()
    for step in range(start, total):
        epoch, k = divmod(step, len(steps))
        if order is None or k == 0:
            # Every worker derives the epoch's seeded plan from the row lengths alone, then fetches only the rows of
            # its own shares: N workers see the same global batches as one, and a resumed epoch the same batches.
            order, plan = epoch_plan(lengths, steps, cfg.seed, epoch, world)
            pairs = load_share(index, sorted({i for shares in plan for i in shares[rank]}))
        begin = sum(steps[:k])
        micro = even_micro_batches(plan[k], lengths, **budget)[rank]
        metrics = trainer.train_step([pairs.micro_batch(idx, ref) for idx in micro])
        done = step + 1 == total
        # Rank 0's clock decides for all: every rank must checkpoint (a collective) after the same step.
        save = torch.tensor([rank == 0 and checkpoint_due(tc, step, len(steps), total,
                                                          (time.monotonic() - last_checkpoint) / 60)], device=device)
        if world > 1:
            torch.distributed.broadcast(save, src=0)
        save = bool(save.item())
        # `pairs`: the rows of the training table this step used, so that each pair's use is countable after restarts.
        metrics.update(pairs=order[begin:begin + steps[k]], step=step + 1, total_steps=total, epoch=epoch,
                       beta=tc.beta, iteration=cfg.iteration, time=time.time())
        lines.append(json.dumps(metrics))
        if rank == 0:
            c["progress"].add.remote(metrics)  # to the driver's log now; the file below at report_every
        if rank == 0 and ((step + 1) % tc.report_every == 0 or save or done):
            records.write_bytes_atomic(c["metrics_uri"], ("\n".join(lines) + "\n").encode())
        if save:
            tmp = tempfile.mkdtemp(prefix="spin_ckpt_")
            save_state(trainer.model, trainer.optimizer, trainer.scheduler, step + 1, rank, tmp)
            # ASYNC: Ray uploads the shards on a thread of its own (then deletes `tmp`) while training goes on.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
            last_checkpoint = time.monotonic()
        elif (step + 1) % tc.report_every == 0 or done:
            ray.train.report(metrics)
    # Also when a restarted group finds every step done (killed while exporting): the export is redone.
    export_hf(trainer.model, tokenizer, model_dtype(source, **trust), rank, c["out"],
              final_metrics(lines, len(lengths), tc.epochs), lora_base=source if tc.lora else None, **trust)


def window_iterations(cfg: SpinConfig) -> range:
    """The earlier iterations whose pairs iteration t also trains on (loop.window)."""
    return range(max(0, cfg.iteration - cfg.loop.window + 1), cfg.iteration)


def pairs_uris(cfg: SpinConfig) -> list[str]:
    """Iteration t's pairs and those of the window's earlier iterations.

    uclaml/SPIN trains iteration t on its own and the previous iteration's pairs with θ_t as the reference for both
    (paper §5.1; its configs/config_iter{1,2,3}.yaml use a window of two iterations); the older y' stay as θ_{s}
    sampled them, and the reference pass scores them under θ_t."""
    layout = RunLayout(cfg.storage)
    here = layout.pairs(cfg.iteration)
    if not layout.done(here):
        raise ConfigError(
            f"no finished pairs for iteration {cfg.iteration} at {here}: run `spin-ray generate --set "
            f"iteration={cfg.iteration}` with the same storage and model (θ_{cfg.iteration}) first")
    out = [here]
    for s in window_iterations(cfg):
        uri = layout.pairs(s)
        if not layout.done(uri):
            raise ConfigError(
                f"iteration {cfg.iteration} trains on its own pairs and those of the loop.window = {cfg.loop.window} "
                f"- 1 iterations before it, but iteration {s}'s pairs at {uri} are not finished: run "
                f"`spin-ray generate --set iteration={s} --set model=<θ_{s}>` with the same storage first, or lower "
                f"loop.window")
        out.append(uri)
    return out


@quiet_ray_data
def train(cfg: SpinConfig, *, model: str | None = None,
          pairs: str | list[str] | "ray.data.Dataset" | None = None) -> TrainResult:
    """Train θ_{t+1} from θ_t (`model`, default cfg.model) on `pairs` and save it to `<storage>/iter_<t>/model`
    (`.checkpoint` is it as a Ray Train Checkpoint). `pairs`: the iteration's window (None), pairs folders, or a Ray
    Dataset of pairs (make_pairs' records, filtered or transformed upstream), written to `iter_<t>/pairs_given` as it
    streams. A finished model is kept; an interrupted run continues from its last checkpoint.

    β and the peak lr are iteration t's (`train.beta_per_iteration` / `lr_per_iteration`, see
    SpinConfig.for_iteration), whichever entry point calls this.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    # Refused before any actor starts (resources.py decides what each stage asks for). Warm engines are the loop's, which
    # checks them with training (loop.run's preflight); this starts none.
    cfg = preflight(cfg.for_iteration(cfg.iteration), stages=("train",), warm_engines=False)
    layout = RunLayout(cfg.storage)
    out = layout.model(cfg.iteration)
    if layout.done(out):
        log.info("iteration %d: trained model already at %s; skipping training", cfg.iteration, out)
        # Left if the driver died between the export and its cleanup.
        _drop_resumable_state(layout.checkpoints(cfg.iteration))
        return TrainResult(out, records.marker(out), skipped=True)
    model = resolve_model(model or cfg.model)
    check_model(model, cfg.trust_remote_code)
    index, keys = index_pairs(_pairs_folders(cfg, pairs))
    n_rows = len(index.lengths)
    tc = cfg.train
    if not plan_steps(n_rows, tc.global_batch_size, tc.num_workers):
        raise ConfigError(f"{n_rows} pairs give no optimizer step with train.num_workers = {tc.num_workers}")
    metrics_uri = layout.train_metrics(cfg.iteration)
    log.info("iteration %d: training θ_%d on %d pairs with %d worker(s)", cfg.iteration, cfg.iteration + 1,
             n_rows, tc.num_workers)

    t0 = time.perf_counter()
    progress = ray.remote(num_cpus=0)(Progress).remote()
    # The workers get the row lengths (to plan the batches) and where each row is stored: each reads only the rows it
    # trains on (load_share). The token ids never pass through this process.
    config = {"cfg": cfg, "model": model, "n_rows": n_rows, "metrics_uri": metrics_uri, "out": out,
              "lengths": index.lengths.tolist(), "pairs": ray.put(index), "keys": ray.put(keys),
              "reference": layout.reference(cfg.iteration), "progress": progress}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker={"CPU": tc.num_cpus_per_worker}),
        torch_config=TorchConfig(backend=tc.dist_backend if tc.dist_backend != "auto"
                                 else "nccl" if tc.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name="train", storage_path=layout.checkpoints(cfg.iteration),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            # The worker group's start and stop lines are the log file's, not the caller's terminal's.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": QUIET_ENV}),
    )
    with stage("training"), _health_check_interval(), _logging_progress(progress, cfg.iteration):
        trainer.fit()
    seconds = time.perf_counter() - t0
    # Rank 0 exported θ_{t+1} to `out` with its marker (the final metrics); the resumable state is only disk now.
    final = records.marker(out)
    if final["pairs_not_used_epochs_times"]:
        log.warning("iteration %d: %d of %d pairs were not used train.epochs = %d times", cfg.iteration,
                    final["pairs_not_used_epochs_times"], n_rows, tc.epochs)
    _drop_resumable_state(layout.checkpoints(cfg.iteration))
    reference = records.marker(config["reference"])
    log.info("iteration %d: θ_%d saved to %s (%.1f s, of which %.1f s for θ_%d's reference log-probs of %d pairs)",
             cfg.iteration, cfg.iteration + 1, out, seconds, reference["seconds"], cfg.iteration, reference["rows"])
    return TrainResult(out, final, skipped=False, seconds=seconds, reference_seconds=reference["seconds"])


class Progress:
    """Rank 0's training events (each step's metrics, the end of the reference pass), held for the driver, which
    logs them as they come: the metrics file is written only every train.report_every steps."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def add(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def since(self, k: int) -> list[dict[str, Any]]:
        return self.events[k:]


@contextlib.contextmanager
def _logging_progress(progress: Any, t: int, every_s: float = 0.5) -> Iterator[None]:
    """Log rank 0's events through the `spin_ray` logger while training runs, each stamped with its own time; the
    last ones before returning, so that every step's line comes before the "saved" line."""
    import ray

    seen, last_step, stop = 0, 0, threading.Event()

    def drain() -> None:
        nonlocal seen, last_step
        for event in ray.get(progress.since.remote(seen)):
            seen += 1
            if "reference" in event:
                r = event["reference"]
                _log_at(event["time"], "iteration %d: θ_%d's reference log-probs of %d pairs in %.1f s", t, t,
                        r["rows"], r["seconds"])
            elif event["step"] > last_step:  # a restarted worker group redoes the steps after its checkpoint
                last_step = event["step"]
                _log_at(event["time"], "iteration %d: train step %d/%d loss %.4f reward acc %.3f margin %.3f "
                        "(%.0f tokens/s)", t, event["step"], event["total_steps"], event["loss"],
                        event["rewards/accuracies"], event["rewards/margins"], event.get("tokens_per_s", 0))

    def watch() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(ray.exceptions.RayError):  # the group is restarting; the next poll catches up
                drain()

    thread = threading.Thread(target=watch, name="train-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(ray.exceptions.RayError):
            drain()
        ray.kill(progress)


def _log_at(when: float, message: str, *args: Any) -> None:
    """An INFO line of this module's logger dated `when` (the event's time, not the time it reached the driver)."""
    if log.isEnabledFor(logging.INFO):
        record = log.makeRecord(log.name, logging.INFO, __file__, 0, message, args, None)
        record.created, record.msecs = when, (when % 1) * 1000
        log.handle(record)


def _pairs_folders(cfg: SpinConfig, pairs: str | list[str] | "ray.data.Dataset" | None) -> list[str]:
    """The pairs folders to train on; a Dataset is checked for the columns training reads, then written."""
    import ray.data

    if pairs is None:
        return pairs_uris(cfg)
    if isinstance(pairs, str):
        return [pairs]
    if not isinstance(pairs, ray.data.Dataset):
        return list(pairs)
    missing = [c for c in (*KEYS, *IDS) if c not in pairs.schema().names]
    if missing:
        raise ConfigError(f"the pairs Dataset given to train has no column {', '.join(missing)}: train on "
                          "make_pairs' records (PairsResult.dataset()), filtered or transformed, keeping its columns")
    dest = RunLayout(cfg.storage).pairs_given(cfg.iteration)
    rows = records.write_dataset(pairs, dest)
    log.info("iteration %d: %d given pairs written to %s", cfg.iteration, rows, dest)
    return [dest]


@contextlib.contextmanager
def _health_check_interval() -> Iterator[None]:
    """Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s) and each
    report() waits for that poll, which dominates small steps. The controller reads it from the driver's environment
    when fit() creates it, so it is set for that moment only, unless the caller set it."""
    key = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    if key in os.environ:
        yield
        return
    os.environ[key] = "0.5"
    try:
        yield
    finally:
        os.environ.pop(key, None)


def _drop_resumable_state(checkpoints: str) -> None:
    import pyarrow.fs as pafs

    fs, path = records.filesystem(checkpoints)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
