"""The one place that decides what each stage asks Ray for and checks a config against a cluster before any actor
starts (used at run time; `spin_ray/tools/plan.py` sizes a run without weights for `spin-ray plan`).

Stages and what runs at the same time (loop.py):
  pairs   generation actors (or the warm EnginePool), fed by Ray Data
  train   Ray Train workers: θ_t's reference log-probs of the window's pairs, then training; warm engines
          (generate.keep_warm) keep their devices meanwhile
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Mapping

from spin_ray.config import ConfigError, SpinConfig

Resources = Mapping[str, float]
PHASES = ("pairs", "train")


@dataclass(frozen=True)
class Request:
    """`count` units of {CPU: cpus, GPU: gpus} for one stage; `field` is the config key that sets the count."""

    what: str
    field: str
    count: int
    cpus: float
    gpus: float
    cpus_field: str
    gpus_field: str
    """The config keys that set one unit's CPUs and GPUs (named when one unit fits no node)."""

    def total(self) -> dict[str, float]:
        return {"CPU": self.count * self.cpus, "GPU": self.count * self.gpus}


def cluster_capacity() -> dict[str, float]:
    """What the connected cluster has or can autoscale to, per resource: the live total, raised to the autoscaler's
    node types at their max_workers where the cluster reports them (KubeRay). Ray's cluster launcher (cluster.yaml)
    runs an autoscaler that does not report them: there CPU and GPU count as unbounded, so a cluster that starts
    with no GPU node is not refused (GPU configs set train.use_gpu or resources: gpu to ask for GPUs there)."""
    import ray
    from ray._private.state import state  # Ray Train's worker group reads the same autoscaler config

    live = {k: float(v) for k, v in ray.cluster_resources().items()}
    try:
        reachable = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # no cluster config stored: a plain `ray start` or ray.init, or the cluster launcher
        reachable = {}
    if not reachable and _autoscaler_running():
        reachable = {"CPU": math.inf, "GPU": math.inf}
    return {k: max(live.get(k, 0.0), float(reachable.get(k, 0.0))) for k in set(live) | set(reachable)}


def _autoscaler_running() -> bool:
    """Whether the monitor runs an autoscaler with node types of its own. Without an autoscaling config it runs a
    read-only one (for `ray status`) whose node types are the nodes themselves, named node_<node id>."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = json.loads(raw).get("autoscaler_report") if raw else None
    if not report:
        return False
    types = {*(report.get("active_nodes") or {}), *(report.get("idle_nodes") or {})}
    return any(not re.fullmatch(r"node_[0-9a-f]+", t) for t in types)


def uses_gpu(cfg: SpinConfig, cluster: Resources | None = None) -> bool:
    """`resources`: gpu/cpu as stated; auto = GPU when train.use_gpu is set or the cluster has GPUs or reports GPU
    nodes it can add."""
    if cfg.resources != "auto":
        return cfg.resources == "gpu"
    if cfg.train.use_gpu:
        return True
    # Unbounded means "unknown" (a launcher's autoscaler that reports no node types): it keeps preflight from
    # refusing, but is no reason to ask for GPUs that may never come; GPU configs say train.use_gpu or resources: gpu.
    return 0 < (cluster if cluster is not None else cluster_capacity()).get("GPU", 0) < math.inf


def actor_gpus(requested: float | None, on_gpu: float) -> float:
    """GPUs for one actor when a stage config is used on its own (no SpinConfig): as configured, else `on_gpu` when
    the cluster has or can get GPUs. `resolve` fills the configured value from `resources` before any stage runs."""
    if requested is not None:
        return requested
    return on_gpu if cluster_capacity().get("GPU", 0) > 0 else 0.0


def resolve(cfg: SpinConfig, cluster: Resources | None = None, nodes: list[Resources] | None = None) -> SpinConfig:
    """`cfg` with every resource request made explicit: generate.num_gpus_per_actor and train.use_gpu from
    `resources`, generate.num_actors, train.num_workers and train.hsdp_shard_size from their `auto` rules
    (`auto_actors`, `auto_workers`, `auto_shard_size`). The stages read these fields only, so what they ask for is decided here. `cluster`: the
    total resources (default: the connected cluster's); `nodes`: each node's, where known."""
    if cluster is None:
        cluster, nodes = cluster_capacity(), fixed_nodes() if nodes is None else nodes
    gpu = uses_gpu(cfg, cluster)
    g, t = cfg.generate, cfg.train
    workers = auto_workers(t.global_batch_size, _gpus(cluster) if gpu else 0) if t.num_workers == "auto" \
        else t.num_workers
    per_node = max((n.get("GPU", 0.0) for n in nodes), default=0.0) if nodes and gpu else 0.0
    shard = auto_shard_size(t.strategy, workers, int(per_node)) if t.hsdp_shard_size == "auto" else t.hsdp_shard_size
    actors = auto_actors(g.tensor_parallel_size, _gpus(cluster) if gpu else 0) if g.num_actors == "auto" \
        else g.num_actors
    return dataclasses.replace(
        cfg,
        generate=dataclasses.replace(g, num_actors=actors, num_gpus_per_actor=g.num_gpus_per_actor if g.num_gpus_per_actor is not None
                                     else float(g.tensor_parallel_size) if gpu else 0.0),
        train=dataclasses.replace(t, use_gpu=gpu, num_workers=workers, hsdp_shard_size=shard))


def _gpus(cluster: Resources) -> int:
    """The cluster's GPUs; where they are unbounded (an autoscaler that reports no node types) the live ones (none
    up: preflight refuses `auto` for a stage that trains; generation and evaluation do not use the count)."""
    gpus = cluster.get("GPU", 0.0)
    if gpus == math.inf:
        import ray

        gpus = ray.cluster_resources().get("GPU", 0.0)
    return int(gpus)


def auto_actors(tensor_parallel_size: int, gpus: int) -> int:
    """`generate.num_actors: auto`: one engine per tensor_parallel_size GPUs, every GPU used; 1 on a CPU cluster,
    where engines would share the same cores."""
    return max(1, gpus // tensor_parallel_size)


def auto_workers(global_batch: int, gpus: int) -> int:
    """`train.num_workers: auto`: one worker per GPU, as many as divide the global batch (each worker trains as many
    pairs per step); 1 on a CPU cluster, where the workers would share the same cores."""
    return max(n for n in range(1, max(1, gpus) + 1) if global_batch % n == 0)


def auto_shard_size(strategy: str, workers: int, gpus_per_node: int) -> int | None:
    """`train.hsdp_shard_size: auto`: under fsdp with workers on several nodes, shard within a node (NVLink) and
    replicate across nodes (HSDP: only gradients cross the slower network); else None, one shard group. Where node
    sizes are not known (an autoscaler that adds nodes) also None."""
    if strategy != "fsdp" or not gpus_per_node or workers <= gpus_per_node:
        return None
    return math.gcd(workers, gpus_per_node)


def requests(cfg: SpinConfig) -> dict[str, Request]:
    """What each stage asks for; `cfg` must be resolved (see `resolve`)."""
    g, t = cfg.generate, cfg.train
    return {
        "generate": Request("generation actors", "generate.num_actors", g.num_actors, g.num_cpus_per_actor,
                            g.num_gpus_per_actor or 0.0, "generate.num_cpus_per_actor",
                            "generate.num_gpus_per_actor (default: generate.tensor_parallel_size)"),
        "train": Request("Train workers", "train.num_workers", t.num_workers, t.num_cpus_per_worker,
                         1.0 if t.use_gpu else 0.0, "train.num_cpus_per_worker", "train.use_gpu (1 GPU per worker)"),
    }


def phases(cfg: SpinConfig, warm_engines: bool = True) -> dict[str, list[str]]:
    """The stages holding resources at the same time, per phase of an iteration; `warm_engines`: whether warm
    generation engines (generate.keep_warm) can be up meanwhile (not for a stage command that starts none)."""
    warm = ["generate"] if cfg.generate.keep_warm and warm_engines else []
    return {"pairs": ["generate"], "train": ["train", *warm]}


def preflight(cfg: SpinConfig, cluster: Resources | None = None, *, stages: tuple[str, ...] = PHASES,
              nodes: list[Resources] | None = None, warm_engines: bool = True) -> SpinConfig:
    """Refuse, naming the fields, a config that would start and then hang or break; return it resolved.

    `cluster` is the total resources (default: what the connected cluster has or can autoscale to); `stages` the
    phases this entry point runs, `warm_engines` whether warm engines can be up meanwhile; `nodes` each node's
    resources (default: the connected cluster's, when no autoscaler can add nodes of other sizes), as one actor or
    worker must fit on one node. Nothing here starts an actor.
    """
    cfg.validate()  # configs built in code skip SpinConfig.load; the global batch rule is there
    if cfg.generate.max_tokens >= cfg.data.max_length:
        raise ConfigError(
            f"generate.max_tokens = {cfg.generate.max_tokens} leaves no room for the prompt in data.max_length = "
            f"{cfg.data.max_length} (prompt + answer); lower generate.max_tokens or raise data.max_length")
    if cluster is None:
        capacity, nodes = cluster_capacity(), fixed_nodes() if nodes is None else nodes
    else:
        capacity = dict(cluster)
    if "train" in stages and cfg.train.num_workers == "auto" and capacity.get("GPU") == math.inf \
            and uses_gpu(cfg, capacity) and not _gpus(capacity):
        raise ConfigError("train.num_workers = 'auto': no GPU node is up and the cluster's autoscaler does not report "
                          "how many GPUs it can add; set train.num_workers (e.g. --set train.num_workers=8 for one "
                          "8-GPU node)")
    cfg = resolve(cfg, capacity, nodes)
    cfg.validate()  # the rules that need a worker count `auto` left open (global batch, HSDP shard size)
    reqs = requests(cfg)
    held = phases(cfg, warm_engines)
    for r in {name: reqs[name] for phase in stages for name in held[phase]}.values():
        if nodes:
            _fits_a_node(r, nodes)
    for phase in stages:
        members = [reqs[name] for name in held[phase]]
        for r in members:
            _fits([r], capacity, "")
        if len(members) > 1:
            _fits(members, capacity, TOGETHER[phase])
    return cfg


TOGETHER = {"train": "warm engines (generate.keep_warm = true) keep their resources while training runs"}


def fixed_nodes() -> list[dict[str, float]] | None:
    """Each live node's resources, or None where an autoscaler may add nodes whose sizes are not known here."""
    import ray
    from ray._private.state import state

    try:
        reachable = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # no cluster config stored: a plain `ray start` or ray.init, or the cluster launcher
        reachable = {}
    if reachable or _autoscaler_running():
        return None
    return [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]


def _fits_a_node(r: Request, nodes: list[Resources]) -> None:
    """One actor or worker gets all its resources from one node: Ray would wait for such a node forever."""
    if any(n.get("CPU", 0.0) >= r.cpus - 1e-9 and n.get("GPU", 0.0) >= r.gpus - 1e-9 for n in nodes):
        return
    largest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)))
    asks = " and ".join(f"{v:g} {k} ({f})" for k, v, f in (("GPU", r.gpus, r.gpus_field),
                                                            ("CPU", r.cpus, r.cpus_field)) if v)
    raise ConfigError(f"each of the {r.what} ({r.field}) needs {asks} on one node, but no node of the cluster has "
                      f"that (the largest: {largest.get('GPU', 0.0):g} GPU, {largest.get('CPU', 0.0):g} CPU); lower "
                      "the per-unit request, or add a larger node type")


def _fits(members: list[Request], capacity: Resources, why: str) -> None:
    for resource in ("GPU", "CPU"):
        need = sum(r.total()[resource] for r in members)
        have = capacity.get(resource, 0.0)
        if need <= have + 1e-9:
            continue
        asking = [r for r in members if r.total()[resource]]
        each = {r.field: f"{getattr(r, resource.lower() + 's'):g} {resource} each for {r.what}" for r in asking}
        if len(asking) == 1:
            r = asking[0]
            needs = f"{r.field} = {r.count} needs {need:g} {resource} ({each[r.field]})"
        else:
            needs = (" + ".join(f"{r.field} = {r.count} ({each[r.field]})" for r in asking) +
                     f" need {need:g} {resource} together")
        fix = ("set generate.keep_warm=false, or make room for both" if "keep_warm" in why else
               "lower " + " or ".join(r.field for r in asking) + " (or the per-actor request), or add nodes")
        raise ConfigError(f"{needs}{' (' + why + ')' if why else ''}, but the cluster has at most {have:g}; {fix}")
