"""Host syncs of one Trainer.train_step: every point where the host waits for the device to produce a value.

Counted on CPU, where no sync costs anything but every one is still visible: the Python reads of a tensor's value
(`Tensor.item`, `tolist`, `__int__`, `__float__`, `__bool__`, `__index__`, `nonzero`), plus the aten ops that read
values inside C++ (`_local_scalar_dense`, `nonzero`, `masked_select`, `masked_scatter`, boolean indexing, ...), which
a Python wrapper cannot see. On CUDA each of these blocks the host until the GPU catches up.

    python benchmarks/host_syncs.py                     # tiny model, 4 micro-batches of long-tailed pairs
    python benchmarks/host_syncs.py --micro-batches 8 --out benchmarks/results/host_syncs.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))
READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero")
SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
            "aten.masked_scatter.default", "aten.masked_scatter_.default", "aten.is_nonzero.default",
            "aten.equal.default", "aten.unique2.default", "aten._unique2.default", "aten.unique_consecutive.default",
            "aten.repeat_interleave.Tensor"}


class HostSyncs(TorchDispatchMode):
    """Counts host syncs inside its `with` block, by where they come from (`counts`; `total` is their sum).

    A Python read counts once, not again for the aten op it runs underneath."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self._inside_read = 0
        self._saved: dict[str, Callable] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _wrap(self, name: str) -> Callable:
        original = getattr(torch.Tensor, name)

        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not self._inside_read:
                self.counts[f"Tensor.{name}"] += 1
            self._inside_read += 1
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self._inside_read -= 1

        self._saved[name] = original
        return read

    def __enter__(self) -> "HostSyncs":
        for name in READS:
            setattr(torch.Tensor, name, self._wrap(name))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func)
        boolean_index = name == "aten.index.Tensor" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if not self._inside_read and (name in SYNC_OPS or boolean_index):
            self.counts[name + (" (bool)" if boolean_index else "")] += 1
        return func(*args, **(kwargs or {}))


def count_step(micro_batches: int = 4, pairs_per_micro_batch: int = 4, seed: int = 0) -> dict:
    """One Trainer.train_step of the tiny model over `micro_batches` micro-batches of long-tailed pairs (warm: a step
    runs first, so lazy one-off work is not counted): its host syncs by source."""
    sys.path.insert(0, HERE)
    from padding import long_tailed_pairs

    from spin_ray.models.builders import build_tiny_model
    from spin_ray.config import TrainConfig
    from spin_ray.training.step import Trainer

    source = build_tiny_model(os.path.join(tempfile.gettempdir(), "spin-host-syncs-tiny"))
    torch.manual_seed(seed)
    trainer = Trainer(source, TrainConfig(optimizer="adamw", lr=1e-4), total_steps=4)
    trainer.setup()
    vocab = trainer.model.config.vocab_size
    pairs = long_tailed_pairs(micro_batches * pairs_per_micro_batch, vocab, 512, 256, seed)
    pairs = [{**p, "ref_logp_real": -1.0, "ref_logp_generated": -2.0} for p in pairs]
    step = [pairs[i:i + pairs_per_micro_batch] for i in range(0, len(pairs), pairs_per_micro_batch)]
    trainer.train_step(step)
    with HostSyncs() as syncs:
        metrics = trainer.train_step(step)
    return {"micro_batches": micro_batches, "host_syncs": syncs.total, "by_source": dict(syncs.counts),
            "loss": metrics["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--out", default=None, help="write the counts as JSON here")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(HERE))
    result = count_step(args.micro_batches)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
