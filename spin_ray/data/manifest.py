"""`<storage>/manifest.json`: the run's config and inputs, and each stage's status, so a rerun resumes safely.

Whether a stage is finished is decided by its output alone (layout.RunLayout.done); the manifest adds what the markers
cannot: which config and data produced them (a rerun with another config is refused unless forced) and timings.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Iterable

from spin_ray.config import ConfigError, SpinConfig
from spin_ray.data import records
from spin_ray.data.layout import RunLayout

# Keys that change how fast a run goes, not what it computes.
NOT_HASHED = ("ray", "tracking", "loop.iterations", "loop.select", "generate.num_actors", "generate.batch_size",
              "generate.batches_in_flight", "generate.keep_warm",
              "train.report_every", "train.checkpoint_every",
              "train.checkpoint_every_minutes", "train.checkpoint_every_epoch", "train.num_to_keep", "iteration")


def config_hash(cfg: SpinConfig) -> str:
    tree = cfg.to_dict()
    for dotted in NOT_HASHED:
        *parents, leaf = dotted.split(".")
        node = tree
        for p in parents:
            node = node[p]
        node.pop(leaf, None)
    if tree["train"]["lora"] is None:  # full fine-tuning hashes as before train.lora existed
        del tree["train"]["lora"]
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def block_digest(prompt_ids: Iterable[str]) -> int:
    """One block's share of the fingerprint: the sum of its prompt ids' 64-bit hashes (order-free)."""
    return sum(int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little") for p in prompt_ids) % 2**64


def fingerprint(block_digests: Iterable[int], rows: int) -> str:
    """The data's identity, from per-block digests (prepare.py): their sum does not depend on how the rows fell into
    blocks, and prompt ids are content hashes, so this changes when any prompt does."""
    return hashlib.sha256(f"{sum(block_digests) % 2**64}:{rows}".encode()).hexdigest()[:16]


class Manifest:
    def __init__(self, storage: str):
        self.uri = RunLayout(storage).manifest
        self.state: dict[str, Any] = records.read_json(self.uri) if records.exists(self.uri) else {}

    def check(self, cfg: SpinConfig, data: str, *, force: bool = False) -> None:
        """Refuse to continue a run made with another config or other data, unless `force`."""
        new = {"config_hash": config_hash(cfg), "data": data, "model": cfg.model}
        old = {k: self.state.get(k) for k in new}
        if self.state and old != new and not force:
            changed = [k for k in new if old[k] != new[k]]
            raise ConfigError(
                f"{records.absolute(cfg.storage)} holds a run made with another {' and '.join(changed)} "
                f"({', '.join(f'{k}: {old[k]} -> {new[k]}' for k in changed)}). Use a new `storage`, or pass --force to "
                "continue it with this config (finished stages are kept; delete an iter_<t> folder to redo it)")
        self.state.update(new, config=cfg.to_dict())
        self.state.setdefault("stages", {})
        self._write()

    def stage(self, name: str, status: str, **info: Any) -> None:
        self.state["stages"][name] = {"status": status, "time": time.time(), **info}
        self._write()

    def select(self, theta: int, model: str, rule: str, by: str | None, value: float | None) -> None:
        """The iterate the run keeps: θ_`theta` at `model`, chosen by `rule` (`by`: the held-out measure, its value)."""
        self.state["selected"] = {"theta": theta, "model": model, "rule": rule, "by": by, "value": value}
        self._write()

    def _write(self) -> None:
        records.write_json_atomic(self.uri, self.state)
