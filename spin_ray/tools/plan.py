"""`spin-ray plan`: sizes a run on a stated cluster from the model's HF config, the recipe, the data and stated
hardware figures, without loading weights. What each stage asks Ray for comes from spin_ray/stages/resources.py, the same
rules the run applies.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from spin_ray.assets import ASSETS
from spin_ray.config import ConfigError, SpinConfig, TrainConfig
from spin_ray.models.builders import model_at_hand
from spin_ray.models.loading import load_tokenizer
from spin_ray.stages.resources import Request, phases, preflight, requests, resolve
from spin_ray.training.memory import AUTO_FILL, GB, Arch, fit_memory, forward_pairs, forward_tokens, train_memory
from spin_ray.training.template import encode_pair


@dataclass(frozen=True)
class Device:
    name: str
    memory_gb: float
    """Device memory in GB (1e9 bytes); host RAM per node for CPU."""
    peak_tflops: float
    """Dense bf16 tensor-core peak (fp32 FMA peak for CPU)."""
    bandwidth_tbs: float
    """Memory bandwidth, TB/s."""


# Vendor data-sheet figures (dense, no sparsity). CPU: AVX2, 2 FMA units x 8 fp32 lanes x 2 = 32 FLOP/cycle/core at
# 3.0 GHz (server boost clock), per core; `cpu_device` scales it by the core count.
DEVICES = {
    "H100": Device("H100 SXM 80GB", 80, 989, 3.35),
    "H200": Device("H200 SXM 141GB", 141, 989, 4.8),
    "A100-80GB": Device("A100 SXM 80GB", 80, 312, 2.04),
    "A100": Device("A100 SXM 40GB", 40, 312, 1.555),
    "A100-40GB": Device("A100 SXM 40GB", 40, 312, 1.555),
    "L40S": Device("L40S 48GB", 48, 362, 0.864),
    "A10G": Device("A10G 24GB", 24, 70, 0.6),
    "L4": Device("L4 24GB", 24, 121, 0.3),
}
CPU_TFLOPS_PER_CORE = 32 * 3.0e9 / 1e12
CPU_BANDWIDTH_TBS = 0.02
# Efficiencies (share of peak reached) that are not the training step's, which comes from measured_steps.json
# (train_efficiency). GPU prefill in vLLM: stated, not measured here. CPU: calibrated on this machine's SmolLM2-135M
# Ray Train run (benchmarks/results/train.json, 1 worker x 1 CPU); see docs/plan.md ("Checked against measured runs").
MFU = {"gpu_prefill": 0.40, "cpu": 0.60}
MEASURED_STEPS = ASSETS / "measured_steps.json"


def cpu_device(cores: int | None = None, memory_gb: float | None = None) -> Device:
    """This machine's CPUs (or `cores`) as a device; memory defaults to this machine's RAM."""
    cores = cores or os.cpu_count() or 1
    if memory_gb is None:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return Device(f"CPU ({cores} cores, AVX2 fp32)", memory_gb, cores * CPU_TFLOPS_PER_CORE, CPU_BANDWIDTH_TBS)


@dataclass(frozen=True)
class Measurement:
    """One measured training step (an entry of measured_steps.json)."""

    device: str
    """Its key in DEVICES."""
    date: str
    model: str
    attention: str
    activation_checkpointing: str
    compile: bool
    mfu: float
    """Model FLOPs of the real tokens (3 forwards, recompute not counted) over the device's dense bf16 peak."""
    source: str
    figure: str

    @property
    def utilisation(self) -> float:
        """Share of peak in computed FLOPs, the figure train_seconds divides by: full recompute computes a fourth
        forward (selective recomputes element-wise ops only, not counted)."""
        return self.mfu * (4 if self.activation_checkpointing == "full" else 3) / 3

    def describe(self) -> str:
        policy = self.activation_checkpointing + (" + compile" if self.compile else "")
        return (f"measured on {DEVICES[self.device].name} on {self.date} ({self.model}, {self.attention}, "
                f"activation checkpointing {policy}: {self.mfu:.1%} MFU; {self.source})")


def load_measurements(path: Path | None = None) -> list[Measurement]:
    """The measured training steps in `path`, by default those shipped with the package (MEASURED_STEPS)."""
    entries = json.loads(Path(path or MEASURED_STEPS).read_text())["measurements"]
    return [Measurement(**e) for e in entries]


@dataclass(frozen=True)
class Efficiency:
    """The share of peak the plan's training and reference time assume, and where it comes from."""

    utilisation: float
    """Of the computed FLOPs (recompute included)."""
    measurement: Measurement
    note: str
    """How the measurement applies: as measured, under another recompute policy, or from another device."""
    extrapolated: bool
    """The device itself was never measured."""


def train_efficiency(device: Device, activation_checkpointing: str, compile: bool,
                     measurements: list[Measurement] | None = None) -> Efficiency:
    """The training step's share of peak on `device`: its own measurement with the same recompute policy (and
    train.compile) where one exists, else its closest one (carried over per computed FLOP); a device never measured
    takes the measured device nearest in peak FLOPs, the same share of its own peak: an extrapolation, said so."""
    measurements = load_measurements() if measurements is None else measurements
    if not measurements:
        raise ConfigError(f"{MEASURED_STEPS}: no measured training step to take the GPU efficiency from")
    own = [m for m in measurements if DEVICES[m.device] == device]
    if own:
        pool, note = own, "as measured on this device"
    else:
        nearest = max(measurements, key=lambda m: (-abs(DEVICES[m.device].peak_tflops - device.peak_tflops), m.date))
        pool = [m for m in measurements if m.device == nearest.device]
        note = (f"no measurement on {device.name}: {DEVICES[nearest.device].name}'s share of peak applied to "
                f"{device.peak_tflops:g} TFLOP/s (scaled by peak FLOPs), an extrapolation")
    m = max(pool, key=lambda m: (m.activation_checkpointing == activation_checkpointing, m.compile == compile,
                                 m.date))
    if m.activation_checkpointing != activation_checkpointing or m.compile != compile:
        note += (f"; train.activation_checkpointing {activation_checkpointing}"
                 f"{' + compile' if compile else ''} not measured there: the closest measured policy's share of "
                 "the computed FLOPs")
    return Efficiency(m.utilisation, m, note, not own)


@dataclass(frozen=True)
class ClusterSpec:
    nodes: int
    gpus_per_node: int
    device: Device
    cpus_per_node: int

    @property
    def total(self) -> dict[str, float]:
        return {"CPU": float(self.nodes * self.cpus_per_node), "GPU": float(self.nodes * self.gpus_per_node)}

    @property
    def node(self) -> dict[str, float]:
        return {"CPU": float(self.cpus_per_node), "GPU": float(self.gpus_per_node)}


def parse_cluster(spec: str, cpus_per_node: int | None = None) -> ClusterSpec:
    """`NODESxGPUSxTYPE`, e.g. 1x8xH100, 4x8xA100-80GB, 1x0xCPU. A CPU node computes with this machine's cores and
    offers the logical CPUs a local `spin-ray` cluster starts with (at least 4, cli.init_ray) unless cpus_per_node."""
    m = re.fullmatch(r"(\d+)x(\d+)x([A-Za-z0-9-]+)", spec.strip())
    if not m or int(m.group(1)) < 1:
        raise ConfigError(f"--cluster {spec!r} must look like NODESxGPUSxTYPE, e.g. 1x8xH100, 4x8xA100-80GB or 1x0xCPU")
    nodes, gpus, kind = int(m.group(1)), int(m.group(2)), m.group(3)
    if kind.upper() == "CPU":
        if gpus:
            raise ConfigError(f"--cluster {spec!r}: a CPU node type has 0 GPUs (NODESx0xCPU)")
        cores = os.cpu_count() or 1
        return ClusterSpec(nodes, 0, cpu_device(cpus_per_node or cores), cpus_per_node or max(4, cores))
    device = next((d for k, d in DEVICES.items() if k.upper() == kind.upper()), None)
    if device is None or gpus < 1:
        raise ConfigError(f"--cluster {spec!r}: GPU type must be one of {', '.join(DEVICES)} with >= 1 GPU per node")
    # 12 vCPUs per GPU is the smallest share among the 8-GPU cloud types (p4de: 96 vCPUs for 8 A100s).
    return ClusterSpec(nodes, gpus, device, cpus_per_node or 12 * gpus)


def vllm_memory(arch: Arch, cfg: SpinConfig, device: Device) -> dict[str, float]:
    """Bytes per vLLM actor's GPU: bf16 weights split over tensor_parallel_size, the KV cache gets the rest of
    gpu_memory_utilization after 1.5 GB for activations and CUDA graphs."""
    g = cfg.generate
    weights = 2 * arch.params / g.tensor_parallel_size
    budget = g.gpu_memory_utilization * device.memory_gb * GB
    return {"weights (bf16)": weights, "activations, CUDA graphs": 1.5 * GB,
            "KV cache": max(0.0, budget - weights - 1.5 * GB)}


def kv_bytes_per_token(arch: Arch) -> int:
    return 2 * arch.layers * arch.kv_dim * 2  # K and V, bf16


def train_seconds(arch: Arch, tokens: float, context: int, workers: int, device: Device, passes: int,
                  utilisation: float) -> float:
    """`passes` forwards' FLOPs over `tokens` at `utilisation` of the device's peak: training is forward + backward
    (2x forward; 1x with a frozen base under LoRA, whose weight gradients are never computed: the adapters' are
    negligible), plus the recompute forward under full activation checkpointing (selective recomputes only
    element-wise ops: not counted); the reference pass is one forward."""
    flops = passes * arch.forward_flops_per_token(context) * tokens
    return flops / (workers * device.peak_tflops * 1e12 * utilisation)


# Prompt counts of the preset configs' data sets (rows of the split they use).
DATASET_ROWS = {"UCLA-AGI/SPIN_iter0": 49_792, "HuggingFaceH4/ultrachat_200k": 207_865}
# Mean prompt and human-answer tokens of the preset configs' hub data sets, which are not at hand offline: UltraChat
# first turns (the synthetic UltraChat-like mix of the GPU review, ~150-token prompts, ~300-token answers). Stated,
# not measured here; --prompt-tokens/--answer-tokens replace them.
DATASET_TOKENS = {"UCLA-AGI/SPIN_iter0": (150.0, 300.0), "HuggingFaceH4/ultrachat_200k": (150.0, 300.0)}
SAMPLE_ROWS = 512
"""Rows of the configured data put through the real template and truncation to size a pair."""


def vllm_max_num_seqs(dev: Device) -> int:
    """vLLM's default max_num_seqs for its offline `LLM`, which the engines keep (generate.py sets none): 1024 on
    GPUs of 70 GiB or more other than the A100, 256 elsewhere (vLLM's engine arguments, 0.32-0.33)."""
    return 1024 if dev.memory_gb * 1e9 >= 70 * 2**30 and "A100" not in dev.name else 256

# Fixed costs per iteration, stated (not measured here): engine start and bf16 weight load per generation phase;
# Train worker group start, weight load and broadcast, and θ_{t+1}'s export.
ENGINE_START_S = 90.0
TRAIN_START_S = 180.0
GOAL_HOURS = 1.5
"""The time goal the plan compares a GPU iteration with (the paper's recipe on one 8-GPU node); --goal-hours."""


@dataclass(frozen=True)
class Generation:
    """One generation phase at the full window: what a vLLM engine holds and how long its share of prompts takes."""

    memory: dict[str, float] | None
    """Bytes per vLLM actor's GPU by part (vllm_memory); None where generation runs on CPU."""
    seqs: int
    """Sequences of `context` tokens an engine's KV cache holds (generate.batch_size on CPU)."""
    context: float
    per_actor: int
    """Prompts per actor."""
    queued: int
    """Sequences an engine is handed at once: generate.batch_size x batches_in_flight."""
    max_seqs: int
    concurrency: int
    """Sequences decoded together."""
    compute_s: float
    """Prefill compute bound."""
    memory_s: float
    """Decode bound: weights and half the KV cache read per step."""

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s)


@dataclass(frozen=True)
class Plan:
    """What `spin-ray plan` finds for a config on a cluster (make_plan); `render` writes it as the printed lines."""

    cfg: SpinConfig
    """Resolved for the cluster, `auto` memory settings chosen (fit_memory)."""
    asked: TrainConfig
    """train as configured, before anything `auto` was chosen."""
    cluster: ClusterSpec
    arch: Arch
    prompts: int
    tokens: PairTokens
    requests: dict[str, Request]
    phases: dict[str, list[str]]
    """Phase name → the stages that run together in it."""
    on_gpu: bool
    capacity: float
    """Bytes per training device: a GPU's memory, or a CPU worker's share of its node's RAM."""
    train_memory: dict[str, float]
    generation: Generation
    train_device: Device
    passes: int
    """Forwards' worth of FLOPs per trained token (train_seconds)."""
    efficiency: Efficiency | None
    """The measured GPU step the training time assumes; None on CPU."""
    utilisation: float
    window_pairs: int
    window_tokens: float
    train_s: float
    reference_s: float
    fixed_s: float
    goal_hours: float
    problems: list[str]

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def seconds_per_iteration(self) -> float:
        return self.generation.seconds + self.reference_s + self.train_s + self.fixed_s

    @property
    def needs(self) -> dict[str, dict[str, float]]:
        """GPUs and CPUs each phase holds, from the same requests the run makes."""
        return {phase: {k: sum(self.requests[m].total()[k] for m in members) for k in ("GPU", "CPU")}
                for phase, members in self.phases.items()}

    @property
    def gpus_by_phase(self) -> dict[str, float]:
        """GPUs each phase holds (phase name → GPUs)."""
        return {phase: need["GPU"] for phase, need in self.needs.items()}

    @property
    def lines(self) -> list[str]:
        return render(self)


@dataclass(frozen=True)
class PairTokens:
    """Mean tokens of one pair's parts after the template and the truncation (template.encode_pair)."""

    prompt: float
    real: float
    generated: float
    """y': every answer runs to generate.max_tokens plus EOS, cut to the room the prompt leaves (an upper bound)."""
    source: str

    @property
    def pair(self) -> float:
        """Tokens the trainer computes for one pair: two sequences sharing the prompt, no padding (pack_varlen)."""
        return 2 * self.prompt + self.real + self.generated

    @property
    def sequence(self) -> float:
        return self.pair / 2


def prompt_count(cfg: SpinConfig) -> int | None:
    if cfg.data.max_rows is not None:
        return cfg.data.max_rows
    if cfg.data.path == "bundled":
        import pyarrow.parquet as pq

        split = pq.read_table(ASSETS / "tasks.parquet", columns=["split"]).column("split")
        return sum(1 for s in split.to_pylist() if cfg.data.split is None or s == cfg.data.split)
    return DATASET_ROWS.get(cfg.data.path)


def pair_tokens(cfg: SpinConfig, *, prompt_tokens: float | None = None,
                answer_tokens: float | None = None) -> PairTokens:
    """Tokens per pair: a seeded sample of the configured data through the model's tokenizer, chat template and
    truncation where both are at hand (local data; a local model folder, or a built-in one already built); else the
    stated figures of a preset data set; else the bounds (the whole prompt budget, answers filling data.max_length).
    The flags replace the mean prompt or human-answer tokens, truncated by the same rule."""
    d, g = cfg.data, cfg.generate
    sampled = _sample(cfg)
    if sampled is not None:
        prompts, reals, source = *sampled, f"a sample of {len(sampled[0])} rows of {d.path} through {cfg.model}'s " \
                                           "tokenizer, chat template and truncation"
    elif d.path in DATASET_TOKENS:
        prompts, reals = [DATASET_TOKENS[d.path][0]], [DATASET_TOKENS[d.path][1]]
        source = f"stated figures for {d.path} (not measured here: pass --prompt-tokens/--answer-tokens)"
    else:
        prompts, reals = [float(d.max_prompt_length)], [float(d.max_length)]
        source = (f"bounds: {d.path}'s rows or {cfg.model}'s tokenizer are not at hand (pass "
                  "--prompt-tokens/--answer-tokens)")
    if prompt_tokens is not None or answer_tokens is not None:
        source = "--prompt-tokens/--answer-tokens" + ("" if prompt_tokens is not None and answer_tokens is not None
                                                     else f", the rest from {source}")
    if prompt_tokens is not None:
        prompts = [float(prompt_tokens)]
    if answer_tokens is not None:
        reals = [float(answer_tokens)]
    # a sample's rows keep their own prompt and answer; a flag's mean goes with each of the other part's values
    pairs = zip(prompts, reals) if len(prompts) == len(reals) else ((p, r) for p in prompts for r in reals)
    rows = [(min(p, d.max_prompt_length), r) for p, r in pairs]
    n = len(rows)
    return PairTokens(sum(p for p, _ in rows) / n, sum(min(r, d.max_length - p) for p, r in rows) / n,
                      sum(min(g.max_tokens + 1, d.max_length - p) for p, _ in rows) / n, source)


def _sample(cfg: SpinConfig) -> tuple[list[float], list[float]] | None:
    """Truncated prompt and human-answer lengths of up to SAMPLE_ROWS seeded rows, or None where the data or the
    model's tokenizer is not at hand (a download, or a model still to be built)."""
    d = cfg.data
    model = model_at_hand(cfg.model)
    if model is None or "://" in d.path or (d.path != "bundled" and not Path(d.path).expanduser().exists()):
        return None
    from spin_ray.data.sources import load_sft

    rows = load_sft(d).rows
    rows = random.Random(cfg.seed).sample(rows, min(SAMPLE_ROWS, len(rows)))
    tokenizer = load_tokenizer(model, trust_remote_code=cfg.trust_remote_code)
    pairs = [encode_pair(tokenizer, r["prompt"], r["real"], "", max_length=d.max_length,
                         max_prompt_length=d.max_prompt_length) for r in rows]
    return [float(len(p["prompt_ids"])) for p in pairs], [float(len(p["real_ids"])) for p in pairs]


def make_plan(cfg: SpinConfig, cluster: ClusterSpec, arch: Arch, *, prompts: int | None = None,
              prompt_tokens: float | None = None, answer_tokens: float | None = None,
              goal_hours: float = GOAL_HOURS) -> Plan:
    """Stages, their devices and what runs together, memory per device and time per stage for `cfg` on `cluster`
    (`render` writes it out)."""
    problems: list[str] = []
    asked = cfg.train
    nodes = [cluster.node] * cluster.nodes
    try:
        cfg = preflight(cfg, cluster.total, nodes=nodes)
    except ConfigError as e:
        problems.append(str(e))
        cfg = resolve(cfg, cluster.total, nodes)
    dev = cluster.device
    on_gpu = cluster.gpus_per_node > 0 and cfg.train.use_gpu
    cfg = fit_memory(cfg, arch, dev.memory_gb * GB if on_gpu else None)
    prompts = prompts or prompt_count(cfg)
    if prompts is None:
        raise ConfigError(f"data.path = {cfg.data.path!r}: spin-ray plan does not know its size offline; set "
                          "data.max_rows or pass --prompts N")
    tok = pair_tokens(cfg, prompt_tokens=prompt_tokens, answer_tokens=answer_tokens)
    t = cfg.train
    reqs = requests(cfg)
    # CPU workers share their node's RAM
    capacity = dev.memory_gb * GB if on_gpu else dev.memory_gb * GB * cluster.nodes / t.num_workers
    train_mem = train_memory(arch, cfg)
    total = sum(train_mem.values())
    if total > capacity:
        problems.append(f"training needs {_gb(total)} per {'GPU' if on_gpu else 'worker'} but has {_gb(capacity)}: "
                        "use train.strategy=fsdp with more train.num_workers, train.activation_checkpointing=full, a "
                        "smaller train.micro_batch_size or data.max_length, "
                        f"{'train.lora (adapters only), ' if t.lora is None else ''}or larger devices")
    generation, gen_problems = _generation(cfg, arch, cluster, prompts, tok, reqs["generate"])
    problems += gen_problems
    window_pairs = prompts * min(cfg.loop.window, cfg.loop.iterations)
    train_dev = dev if on_gpu else dataclasses.replace(dev, peak_tflops=t.num_cpus_per_worker * CPU_TFLOPS_PER_CORE,
                                                       name="CPU")
    window_tokens = window_pairs * tok.pair
    passes = (2 if t.lora is not None else 3) + (1 if t.activation_checkpointing == "full" else 0)
    eff = train_efficiency(dev, t.activation_checkpointing, t.compile) if on_gpu else None
    mfu = eff.utilisation if eff else MFU["cpu"]
    train_s = train_seconds(arch, window_tokens * t.epochs, tok.sequence, t.num_workers, train_dev, passes, mfu)
    reference_s = train_seconds(arch, window_tokens, tok.sequence, t.num_workers, train_dev, 1, mfu)
    fixed_s = (ENGINE_START_S + TRAIN_START_S) if on_gpu else 0.0
    return Plan(cfg, asked, cluster, arch, prompts, tok, reqs, phases(cfg), on_gpu, capacity, train_mem, generation,
                train_dev, passes, eff, mfu, window_pairs, window_tokens, train_s, reference_s, fixed_s, goal_hours,
                problems)


def _generation(cfg: SpinConfig, arch: Arch, cluster: ClusterSpec, prompts: int, tok: PairTokens,
                request: Request) -> tuple[Generation, list[str]]:
    """One generation phase on `request`'s devices, and why its engines would not run."""
    g, dev, problems = cfg.generate, cluster.device, []
    context = tok.prompt + g.max_tokens
    memory = None
    if request.gpus:
        memory = vllm_memory(arch, cfg, dev)
        seqs = int(memory["KV cache"] // (kv_bytes_per_token(arch) * context))
        if g.tensor_parallel_size > cluster.gpus_per_node:
            problems.append(f"generate.tensor_parallel_size = {g.tensor_parallel_size} exceeds the "
                            f"{cluster.gpus_per_node} GPUs of a node; one engine runs on one node")
        if seqs < 1:
            problems.append(f"a vLLM engine's bf16 weights ({_gb(memory['weights (bf16)'])}) leave no KV cache for one "
                            f"{context:.0f}-token sequence in {g.gpu_memory_utilization} x "
                            f"{dev.memory_gb:g} GB: raise generate.tensor_parallel_size or "
                            "generate.gpu_memory_utilization")
    else:
        seqs = g.batch_size
    flops = (request.gpus * dev.peak_tflops if request.gpus else request.cpus * CPU_TFLOPS_PER_CORE) * 1e12
    per_actor = math.ceil(prompts / g.num_actors)
    compute_s = 2 * arch.params * context * per_actor / (flops * (MFU["gpu_prefill"] if request.gpus else MFU["cpu"]))
    # An engine holds batches_in_flight calls of batch_size prompts: vLLM decodes at most that many together.
    queued = g.batch_size * g.batches_in_flight
    max_seqs = vllm_max_num_seqs(dev) if request.gpus else queued
    concurrency = max(1, min(per_actor, seqs, max_seqs, queued))
    bandwidth = (dev.bandwidth_tbs if request.gpus else CPU_BANDWIDTH_TBS) * 1e12 * (g.tensor_parallel_size
                                                                                  if request.gpus else 1)
    step_bytes = 2 * arch.params + concurrency * context / 2 * kv_bytes_per_token(arch)
    memory_s = math.ceil(per_actor / concurrency) * g.max_tokens * step_bytes / bandwidth
    return Generation(memory, seqs, context, per_actor, queued, max_seqs, concurrency, compute_s, memory_s), problems


def render(plan: Plan) -> list[str]:
    """The lines `spin-ray plan` prints for `plan`."""
    cfg, cluster, arch, tok, gen = plan.cfg, plan.cluster, plan.arch, plan.tokens, plan.generation
    g, t, dev = cfg.generate, cfg.train, cluster.device
    out = [f"model {arch.name}: {arch.params / 1e9:.3f} B parameters ({arch.layers} layers, hidden {arch.hidden}, "
           f"{arch.heads}/{arch.kv_heads} q/kv heads, vocab {arch.vocab}{', tied' if arch.tied else ''})",
           f"cluster {cluster.nodes} node(s) x {cluster.gpus_per_node} x {dev.name}, {cluster.cpus_per_node} CPUs per "
           f"node: {dev.peak_tflops:g} TFLOP/s peak, {dev.bandwidth_tbs:g} TB/s, {dev.memory_gb:.4g} GB per device",
           f"data {plan.prompts} prompts per iteration, window {cfg.loop.window}; tokens per pair {tok.pair:.0f} = 2 x "
           f"{tok.prompt:.0f} prompt + {tok.real:.0f} human answer + {tok.generated:.0f} generated (at most "
           f"generate.max_tokens + EOS), from {tok.source}",
           "", "stages (resources per actor/worker):"]
    for name, r in plan.requests.items():
        where = f"{r.gpus:g} GPU + {r.cpus:g} CPU" if r.gpus else f"{r.cpus:g} CPU"
        out.append(f"  {name:<9} {r.count} x {r.what} [{r.field}], {where} each")
    out += _workers_note(plan.asked, t, cluster)
    out.append("at the same time (the phases take turns):")
    for phase, need in plan.needs.items():
        out.append(f"  {phase:<7} {' + '.join(plan.phases[phase]):<22} {need['GPU']:g} GPU, {need['CPU']:g} CPU "
                   f"of {cluster.total['GPU']:g} GPU, {cluster.total['CPU']:g} CPU")

    micro = (f"micro-batch {forward_pairs(cfg)} pairs x {cfg.data.max_length} tokens (bound)"
             if t.micro_batch_tokens is None else f"micro-batch {forward_tokens(cfg)} tokens")
    lora = "" if t.lora is None else (
        f"LoRA r={t.lora.r} on {', '.join(t.lora.target_modules)}: "
        f"{arch.lora_params(t.lora.r, t.lora.target_modules) / 1e6:.1f} M trained parameters, ")
    out += ["", f"memory per training {'GPU' if plan.on_gpu else 'worker (host RAM)'} ({lora}{t.strategy}"
                f"{f', HSDP shards of {t.hsdp_shard_size}' if t.hsdp_shard_size else ''}, {t.num_workers} worker(s), "
                f"{micro}, activation checkpointing {t.activation_checkpointing}):"]
    total = sum(plan.train_memory.values())
    out += _memory_note(plan.asked, cfg, plan.on_gpu, plan.capacity, total <= plan.capacity)
    out += [f"  {k:<26} {_gb(v):>10}" for k, v in plan.train_memory.items()]
    out.append(f"  {'total':<26} {_gb(total):>10} of {_gb(plan.capacity)}")
    if gen.memory is not None:
        out += ["", f"memory per vLLM actor ({g.tensor_parallel_size} GPU, gpu_memory_utilization "
                    f"{g.gpu_memory_utilization}):"]
        out += [f"  {k:<26} {_gb(val):>10}" for k, val in gen.memory.items()]
        out.append(f"  KV cache holds {gen.seqs} sequences of {gen.context:.0f} tokens ({kv_bytes_per_token(arch)} "
                   "B/token)")

    mfu, iteration_s, eff = plan.utilisation, plan.seconds_per_iteration, plan.efficiency
    flops = arch.forward_flops_per_token(tok.sequence)
    out += ["", "time per iteration (at the full window):",
            f"  generate  {_dur(gen.seconds):>9}  {plan.prompts} x {g.max_tokens} new tokens on {g.num_actors} "
            f"actor(s); max(prefill compute {_dur(gen.compute_s)}, weight+KV reads {_dur(gen.memory_s)} at "
            f"{gen.concurrency} sequences/step)",
            f"  reference {_dur(plan.reference_s):>9}  θ_t's log-probs of {plan.window_pairs} pairs: "
            f"{plan.window_tokens / 1e6:.1f} M tokens x 1 forward x {flops / 1e9:.3g} GFLOP/token on "
            f"{t.num_workers} worker(s) at {mfu:.0%} MFU",
            f"  train     {_dur(plan.train_s):>9}  {plan.window_pairs} pairs x {tok.pair:.0f} tokens x {t.epochs} "
            f"epochs = {plan.window_tokens * t.epochs / 1e6:.1f} M tokens x {plan.passes} forwards ({_passes(t)}) x "
            f"{flops / 1e9:.3g} GFLOP/token on {t.num_workers} worker(s) x {plan.train_device.peak_tflops:g} TFLOP/s "
            f"at {mfu:.0%} MFU"]
    if plan.on_gpu:
        out.append(f"  fixed     {_dur(plan.fixed_s):>9}  engine start and weight load {ENGINE_START_S:.0f} s, Train "
                   f"workers' start, weight broadcast and export {TRAIN_START_S:.0f} s (stated)")
    out.append(f"  iteration {_dur(iteration_s):>9}; {cfg.loop.iterations} iterations "
               f"{_dur(iteration_s * cfg.loop.iterations)}")
    if gen.memory is not None and gen.queued < min(gen.per_actor, gen.seqs, gen.max_seqs):
        out.append(f"  generate.batch_size {g.batch_size} x batches_in_flight {g.batches_in_flight} keeps at most "
                   f"{gen.queued} sequences decoding per engine where vLLM would run {min(gen.seqs, gen.max_seqs)} "
                   f"({dev.name}: max_num_seqs {gen.max_seqs}, KV cache {gen.seqs}); a generate.batch_size of "
                   f"{math.ceil(2 * gen.max_seqs / g.batches_in_flight)} keeps it full")
    if eff is not None:
        out += _goal(plan.goal_hours, iteration_s, plan.train_s + plan.reference_s, eff)
    trainer = (f"training and its reference pass (the same forward) at {mfu:.0%} of peak in computed FLOPs, from "
               f"the step {eff.measurement.describe()}, {eff.note}" if eff else
               f"training at {MFU['cpu']:.0%} of AVX2 fp32 peak on CPU (calibrated on a measured CPU run)")
    out += ["", "assumptions: " + "; ".join([
        trainer, f"{MFU['gpu_prefill']:.0%} vLLM prefill (stated)" if gen.memory is not None
        else f"generation at {MFU['cpu']:.0%} of AVX2 fp32 peak on CPU",
        f"vLLM: bf16 weights, {gen.concurrency} sequences decoded together per engine (vLLM's max_num_seqs, what its "
        "KV cache holds and generate.batch_size x batches_in_flight bound it), decode bandwidth-bound (all weights "
        "and half the KV read per step), every answer runs to generate.max_tokens",
        "training and the reference pass compute real tokens only (pack_varlen: no padding); memory is bounded "
        "with a worker's largest forward full (train.micro_batch_tokens, else train.micro_batch_size pairs at "
        "data.max_length)",
        "checkpoints, held-out evaluation and Ray overheads excluded"])]
    out.append("")
    out.append("fits" if plan.fits else "does NOT fit:\n  - " + "\n  - ".join(plan.problems))
    return out


def _passes(t: TrainConfig) -> str:
    parts = ["forward", "backward (2 forwards)" if t.lora is None else "backward (1: frozen base)"]
    return " + ".join(parts + (["recompute"] if t.activation_checkpointing == "full" else []))


def _workers_note(asked: TrainConfig, t: TrainConfig, cluster: ClusterSpec) -> list[str]:
    """What `train.num_workers: auto` chose, and where the global batch is too small to feed every GPU."""
    gpus = int(cluster.total["GPU"]) if t.use_gpu else 0
    per_worker = t.global_batch_size // t.num_workers
    lines = []
    if asked.num_workers == "auto":
        chose = f"  train.num_workers auto = {t.num_workers}"
        if gpus and t.num_workers < gpus:
            chose += (f": train.global_batch_size {t.global_batch_size} feeds at most {t.num_workers} of the "
                      f"{gpus} GPUs (each worker trains the same number of pairs per step), {gpus - t.num_workers} "
                      "idle while training")
        elif gpus:
            chose += f": every GPU, {per_worker} pair(s) each per optimizer step"
        else:
            chose += ": one worker on a CPU cluster"
        if asked.hsdp_shard_size == "auto" and t.hsdp_shard_size:
            chose += f"; HSDP: shards of {t.hsdp_shard_size} (a node's GPUs), replicated across nodes"
        lines.append(chose)
    if gpus and per_worker < t.micro_batch_size:
        lines.append(f"  the global batch is small for {t.num_workers} GPUs: {t.global_batch_size} pairs per step = "
                     f"{per_worker} per GPU, below train.micro_batch_size {t.micro_batch_size}, so each forward holds "
                     f"{per_worker} pair(s) (~{per_worker * 2} sequences) and the measured MFU may not be reached; "
                     "kept (a larger train.global_batch_size departs from the paper's recipe, fewer "
                     "train.num_workers leave GPUs idle)")
    return lines


def _memory_note(asked: TrainConfig, cfg: SpinConfig, on_gpu: bool, capacity: float, fits: bool) -> list[str]:
    """What `auto` chose for train.activation_checkpointing and train.micro_batch_tokens (fit_memory), and why."""
    t = cfg.train
    chose = [f"train.{k} auto = {getattr(t, k)}" for k in ("activation_checkpointing", "micro_batch_tokens")
             if getattr(asked, k) == "auto"]
    if not chose:
        return []
    share = 2 * (t.global_batch_size // t.num_workers) * cfg.data.max_length
    if not on_gpu:
        why = "fixed on CPU, not sized from host RAM: no recompute, train.micro_batch_size pairs at data.max_length"
    elif fits:
        why = (f"the fastest recompute (none, else full) and the largest token budget (at most a worker's share of "
               f"a step at data.max_length, {share}) that fit {AUTO_FILL:.0%} of {capacity / GB:.1f} GB, by the "
               "memory below; each Train worker applies the same rule to the memory its device reports")
    else:
        why = (f"nothing fits {capacity / GB:.1f} GB, not even full recompute at the smallest budget "
               "(2 x data.max_length)")
    return [f"  {', '.join(chose)}: {why}"]


def _goal(goal_hours: float, iteration_s: float, trainer_s: float, eff: Efficiency) -> list[str]:
    """The iteration against the time goal; where it misses, the term that does and the MFU that would meet it."""
    goal_s = goal_hours * 3600
    if iteration_s <= goal_s:
        return [f"  goal      {goal_hours:g} h per iteration (--goal-hours): met, {_dur(iteration_s)}"]
    rest = iteration_s - trainer_s
    need = eff.utilisation * trainer_s / (goal_s - rest) if goal_s > rest else math.inf
    needs = (f"{need:.0%} MFU on them (peers report 40-57% for FSDP 7B); measure with benchmarks/gpu.py" if need <= 1
             else "more than their peak: more or larger GPUs")
    m = eff.measurement
    source = f"extrapolated from {DEVICES[m.device].name}" if eff.extrapolated else "measured on this device"
    return [f"  goal      {goal_hours:g} h per iteration (--goal-hours): NOT met, {_dur(iteration_s)}; the Train "
            f"workers' training and reference pass take {_dur(trainer_s)} of it at {eff.utilisation:.0%} MFU, "
            f"{source} ({m.date}, {m.attention.split(' (')[0]}); the goal needs {needs}"]


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def _dur(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
