"""The trainer's state on disk: resumable torch.distributed.checkpoint (DCP) shards, read through allowlists, and the
HF export of θ_{t+1} in θ_t's dtype.

Nothing here imports Ray: the Train workers call it through spin_ray.train, and tests call it in one process.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import torch

from spin_ray.data import records
from spin_ray.models.loading import load_config, load_model

STATE = "state"
"""The torch.distributed.checkpoint folder inside each Ray Train checkpoint."""


def save_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int, rank: int,
          out: str) -> None:
    """The resumable state as torch.distributed.checkpoint shards: every rank writes its own file (its FSDP2 shards;
    under DDP, DCP spreads the replicated tensors over the ranks), rank 0 the `.metadata` index. Nothing is gathered."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state, "scheduler": scheduler.state_dict(), "step": step,
              f"rng_rank{rank}": torch.get_rng_state()}, checkpoint_id=os.path.join(out, STATE))


def load_state(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                rank: int) -> int:
    """Read a `save_state`d state into the model, optimizer, scheduler and RNG, each rank only its shards; returns the
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
    config = load_config(source, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _gathered(model: torch.nn.Module, rank: int, dtype: torch.dtype, only: str = "") -> dict[str, torch.Tensor]:
    """The model's state entries whose name holds `only`, each gathered whole one at a time (every rank takes part
    under FSDP2) and kept by rank 0 alone, on the CPU in `dtype`; {} on the other ranks."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = {}
    for name, tensor in get_model_state_dict(model).items():
        if only not in name:
            continue
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        if rank == 0:
            state[name] = full.detach().to("cpu", dtype)
    return state


def merge_lora(model: torch.nn.Module, base: str, dtype: torch.dtype, rank: int,
               trust_remote_code: bool = False) -> torch.nn.Module | None:
    """θ_{t+1} of a LoRA run as a plain HF model (rank 0; None elsewhere): θ_t read from `base` in `dtype`, each
    adapted weight W replaced by W + (α/r)·B·A computed in fp32, then cast to `dtype`. Every rank takes part in
    gathering the adapters, the only trained weights; the frozen ones are θ_t's, read from `base` exactly (the workers
    hold them in the compute dtype, which may be coarser than θ_t's own)."""
    from peft.tuners.lora import LoraLayer

    trained = getattr(model, "module", model)  # DDP's wrapper; the state dict's names are the inner model's
    scales = {name: m.scaling["default"] for name, m in trained.named_modules() if isinstance(m, LoraLayer)}
    adapters = _gathered(model, rank, torch.float32, only=".lora_")
    if rank != 0:
        return None
    merged = load_model(base, dtype=dtype, trust_remote_code=trust_remote_code)
    weights = dict(merged.named_parameters())
    with torch.no_grad():
        for name, scale in scales.items():
            a, b = adapters[f"{name}.lora_A.default.weight"], adapters[f"{name}.lora_B.default.weight"]
            w = weights[f"{name}.weight"]
            w.copy_(w.float() + scale * (b @ a))
    return merged


def export_hf(model: torch.nn.Module, tokenizer: Any, dtype: torch.dtype, rank: int, out: str,
            marker: dict[str, Any], lora_base: str | None = None, trust_remote_code: bool = False) -> None:
    """θ_{t+1} as an HF folder in θ_t's dtype, written by rank 0 straight to `out`: each parameter is gathered whole
    one at a time (every rank takes part under FSDP2) and only rank 0 keeps it, on the CPU and already cast, so no
    rank ever holds an fp32 copy of the whole model. With train.lora, `lora_base` is θ_t's folder and the export is
    merged (merge_lora): no adapter files, so every later stage loads θ_{t+1} itself. A local `out` appears by rename;
    on a URI the marker is last."""
    import pyarrow.fs as pafs

    if lora_base is None:
        state = _gathered(model, rank, dtype)
        hf_model = getattr(model, "module", model)
    else:
        state, hf_model = None, merge_lora(model, lora_base, dtype, rank, trust_remote_code)
    if rank != 0:
        return
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
