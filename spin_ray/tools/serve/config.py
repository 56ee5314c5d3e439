"""What `spin-ray serve` serves: its options (`ServeConfig`, checked before Ray starts) and the models a run's storage
holds, by served name (`resolve`)."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spin_ray.config import DTYPES, ConfigError
from spin_ray.data.layout import RunLayout
from spin_ray.models.builders import resolve_model
from spin_ray.models.loading import check_model


@dataclass
class ServeConfig:
    target: str
    """A run's storage (serve `base` and its `iter_<t>` models) or one HF model folder."""
    iterations: list[str] | None = None
    """Names to serve from a run: "base" and iteration numbers; None serves `base` and every finished iteration."""
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    """Required as `Authorization: Bearer KEY` when set; binding beyond loopback requires one."""
    replicas: int = 1
    """Replicas of each model's engine (and of the ingress)."""
    num_cpus: float | None = None
    """CPUs per engine replica; None: 1, or an even share of the cluster's CPUs where they are fewer."""
    num_gpus: float | None = None
    """GPUs per engine replica; None: 1 when the cluster has GPUs, else 0."""
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    """Largest `max_tokens` a request may ask for (and the default when it asks for none)."""
    max_model_len: int | None = None
    """Context length of each engine; None: the model's own, at most 4096."""
    dtype: str = "auto"
    trust_remote_code: bool = False
    """Let a model's own Python code (config.json auto_map) run in the replicas; off unless asked."""
    models: dict[str, str] = field(default_factory=dict)
    """Filled by `resolve`: served name → local model folder."""

    def validate(self) -> None:
        for name in ("port", "replicas", "max_body_bytes", "max_prompt_tokens", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} = {getattr(self, name)} must be at least 1")
        if self.port > 65535:
            raise ConfigError(f"--port = {self.port} must be at most 65535")
        if (self.num_cpus is not None and self.num_cpus < 0) or (self.num_gpus is not None and self.num_gpus < 0):
            raise ConfigError("--num-cpus and --num-gpus must not be negative")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"--max-model-len = {self.max_model_len} must be at least 2")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key is empty; pass a non-empty key or leave the option out")
        if not is_loopback(self.host) and self.api_key is None:
            raise ConfigError(
                f"--host {self.host} accepts connections from other machines, so it needs --api-key KEY (clients "
                "send `Authorization: Bearer KEY`); or serve on loopback with --host 127.0.0.1 (the default)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve(cfg: ServeConfig) -> dict[str, str]:
    """Served name → local model folder, from a run's storage or one model folder (ConfigError naming the fix)."""
    target = Path(cfg.target).expanduser()
    if (target / "config.json").is_file():
        if cfg.iterations is not None:
            raise ConfigError(f"{target} is one model folder, so --iterations does not apply; pass a run's storage "
                              "to pick iterations, or leave --iterations out")
        check_model(str(target.resolve()), cfg.trust_remote_code)
        return {target.resolve().name: str(target.resolve())}
    layout = RunLayout(str(target))
    manifest = Path(layout.manifest)
    if not manifest.is_file():
        raise ConfigError(f"{target} is neither an HF model folder (config.json) nor a run's storage "
                          "(manifest.json); pass `storage` of a `spin-ray run`, or a model folder")
    try:
        state = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{manifest} cannot be read as JSON ({e}); is the run's storage intact?") from e
    done = [t for t in layout.iterations() if layout.done(layout.model(t))]
    best = (state.get("selected") or {}) if (state.get("selected") or {}).get("rule") == "best" else {}
    wanted = cfg.iterations if cfg.iterations is not None else ["base", *map(str, done), *(["best"] if best else [])]
    models = {}
    for name in wanted:
        if name == "base":
            models["base"] = _base_model(state, manifest)
        elif name == "best" and best:  # loop.select = best: the iterate the run kept, beside the others
            models["best"] = _base_model(state, manifest) if best["theta"] == 0 else str(
                Path(layout.model(best["theta"] - 1)).resolve())
        elif name.isdigit() and int(name) in done:
            models[f"iter_{int(name)}"] = str(Path(layout.model(int(name))).resolve())
        else:
            raise ConfigError(f"--iterations names {name!r}, but {target} has finished models for iterations "
                              f"{done or 'none'} (iter_<t>/model holds θ_(t+1)); use those numbers, `base`, or `best` (runs with loop.select = best)")
    for path in models.values():
        check_model(path, cfg.trust_remote_code)
    return models


def _base_model(state: dict[str, Any], manifest: Path) -> str:
    """θ_0: the run's `model` as the loop resolves it (a stage's `model` is θ_{t+1} once it is done)."""
    spec = state.get("model")
    if not spec:
        raise ConfigError(f"{manifest} names no starting model; leave `base` out of --iterations")
    try:
        path = resolve_model(spec)
    except ConfigError as e:
        raise ConfigError(f"the run's base model ({spec!r}, from {manifest}) is not usable: {e}") from e
    if "://" not in path and not (Path(path) / "config.json").is_file():
        raise ConfigError(f"the run's base model {spec!r} (from {manifest}) is not a local model folder; "
                          "leave `base` out of --iterations, or serve that model folder on its own")
    return path
