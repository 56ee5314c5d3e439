"""One worker's SPIN update: the model (DDP or FSDP2), its optimizer and lr schedule, and `train_step`.

The shape torchtune and torchtitan use: `Trainer.setup()` builds, `train_step(micro_batches)` is one optimizer step
over this worker's micro-batches, `logps(micro_batches)` the same forward without gradients. It imports no Ray, so the
Ray Train workers (spin_ray.stages.train), the benchmarks and the tests call the same step; with world > 1 the caller has
initialised torch.distributed (Ray Train does).
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from spin_ray.config import ConfigError, TrainConfig, resolve_dtype
from spin_ray.models.loading import load_config, load_model
from spin_ray.training.loss import spin_loss
from spin_ray.training.template import pack_varlen, to_device, varlen_logps

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

Pair = Mapping[str, Any]
"""One pair: `prompt_ids`, `real_ids`, `generated_ids` (token ids) and, for `train_step`, the reference log-probs
`ref_logp_real`, `ref_logp_generated`."""


def lr_factor(step: int, total: int, warmup: int, decay: bool = True) -> float:
    """Linear warmup then linear decay to 0 at `total` (or, without `decay`, the peak held), as HF's `linear`
    schedule, except that step 0 already gets 1/warmup of the peak (HF spends the first update at lr 0). The trainer's
    schedule and models.builders.sft's."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup)) if decay else 1.0


# Ops whose outputs selective checkpointing keeps: the matmuls and attention (most of the recompute's FLOPs); the
# element-wise ops between them (norms, activations, rotary, residual adds) are recomputed. torchtitan's op-level
# policy is the model; it also drops every second matmul output, which trades memory back for compute.
SAVED_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
             torch.ops.aten._scaled_dot_product_flash_attention.default,
             torch.ops.aten._scaled_dot_product_efficient_attention.default,
             torch.ops.aten._scaled_dot_product_cudnn_attention.default,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default, torch.ops.aten._flash_attention_forward.default}


def _fused_varlen_ops() -> set:
    """The op of torch's varlen attention (template.varlen_attention on CUDA), where this torch has it."""
    try:
        import torch.nn.attention.varlen  # noqa: F401  (registers the torch_attn ops)

        return {torch.ops.torch_attn._varlen_attn.default}
    except (ImportError, AttributeError):
        return set()


SAVED_OPS |= _fused_varlen_ops()


def _selective_context() -> tuple[Any, Any]:
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def prepare_blocks(model: torch.nn.Module, tc: TrainConfig) -> None:
    """train.activation_checkpointing and train.compile on each decoder layer, before FSDP2 shards them.

    full: each layer keeps only its input and recomputes the rest in the backward pass; selective: each layer also
    keeps its matmul and attention outputs (SAVED_OPS) and recomputes only the cheap ops between them; none: every
    activation is kept. compile: each layer's forward goes through torch.compile with dynamic shapes (in place, so
    FSDP2 and the checkpoint wrappers see the same modules): one graph serves every micro-batch length, and the
    varlen attention is a registered op (template.varlen_attention), so dynamo traces each block whole."""
    if tc.activation_checkpointing != "none":
        kwargs = (None if tc.activation_checkpointing == "full"  # transformers' own default
                  else {"use_reentrant": False, "context_fn": _selective_context})
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    if tc.compile:
        for layer in model.model.layers:
            layer.compile(dynamic=True)


def add_lora(model: torch.nn.Module, tc: TrainConfig, dtype: str) -> None:
    """train.lora: PEFT's LoRA adapters on train.lora.target_modules, in place (A random, B zero: the model still
    computes θ_t), every other weight frozen and held in `dtype`, the compute dtype (no fp32 master copy: it is never
    updated). The adapters stay fp32, the optimizer's master copy. A no-op when train.lora is null."""
    if tc.lora is None:
        return
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    lc, head = tc.lora, model.get_output_embeddings()
    try:
        inject_adapter_in_model(LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                           target_modules=list(lc.target_modules)), model)
    except ValueError as e:  # PEFT's "Target modules ... not found in the base model"
        raise ConfigError(f"train.lora.target_modules = {lc.target_modules!r}: {e}") from None
    for name, module in model.named_modules():
        # The merged export adds (α/r)·B·A to a linear weight; the head may share its weight with the embeddings.
        if isinstance(module, LoraLayer) and (type(module.base_layer) is not torch.nn.Linear
                                              or module.base_layer is head):
            raise ConfigError(f"train.lora.target_modules = {lc.target_modules!r} matches {name}, which is not a "
                              "linear layer of the decoder (the output head and embeddings cannot be adapted); name "
                              "only projections such as q_proj, v_proj")
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(getattr(torch, dtype))


def _mesh(tc: TrainConfig, world: int, device: torch.device) -> "DeviceMesh":
    """FSDP: one shard group of all workers, or HSDP (shard within groups of train.hsdp_shard_size, replicate
    across them). DDP in reduced precision: replicate across all, shard over 1."""
    from torch.distributed.device_mesh import init_device_mesh

    shard = 1 if tc.strategy == "ddp" else tc.hsdp_shard_size or world
    if shard == world:
        return init_device_mesh(device.type, (world,))
    return init_device_mesh(device.type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))


def build_sharded(source: str, tc: TrainConfig, dtype: str, rank: int, world: int,
                   device: torch.device, load_weights: bool, trust_remote_code: bool = False) -> torch.nn.Module:
    """FSDP2 as torchtitan builds it: the model on the meta device, sharded per decoder layer, materialised empty
    on `device`, then filled from rank 0's copy of the weights by broadcast (no worker but rank 0 reads them), or,
    with `load_weights` off, left for a checkpoint's shards (checkpoint.load_state).

    Parameters stay fp32 (the optimizer's master copy); in bf16 each layer is all-gathered and computed in bf16 and
    gradients are reduced in fp32 (MixedPrecisionPolicy), instead of autocast keeping a bf16 copy of every layer.
    With train.lora only the adapters are fp32 and trained; the frozen base is sharded in the compute dtype.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(source, trust_remote_code=trust_remote_code),
                                                 dtype=torch.float32, trust_remote_code=trust_remote_code)
        add_lora(model, tc, dtype)
    prepare_blocks(model, tc)
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
        full = {}
        if rank == 0:  # with LoRA, rank 0's adapters (and the base's renamed keys) are every rank's
            weights = load_model(source, dtype=torch.float32, trust_remote_code=trust_remote_code)
            add_lora(weights, tc, dtype)
            full = weights.state_dict()
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def cast_parameters(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """Parameters in `dtype`, buffers (rotary frequencies) left in fp32: the compute copy that FSDP2's
    MixedPrecisionPolicy(param_dtype) all-gathers in `Trainer`, for a model that only computes log-probs."""
    for p in model.parameters():
        p.data = p.data.to(getattr(torch, dtype))
    return model


def frozen_model(source: str, tc: TrainConfig, device: torch.device,
                 trust_remote_code: bool = False) -> torch.nn.Module:
    """θ for `pair_logps` alone, on one device without torch.distributed: computed as a Trainer would compute it
    (train.dtype's compute copy), no optimizer, no gradients."""
    model = load_model(source, dtype=torch.float32, trust_remote_code=trust_remote_code)
    dtype = resolve_dtype(tc.dtype, device.type == "cuda")
    return cast_parameters(model, dtype).to(device).eval().requires_grad_(False)


@torch.no_grad()
def pair_logps(model: torch.nn.Module, micro_batches: Sequence[Sequence[Pair]],
               device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The summed log-probs (real, generated) of each micro-batch's pairs, float64 on the CPU: `train_step`'s
    forward (same packing, same kernels) without gradients, read back once for all micro-batches."""
    out = [torch.stack(varlen_logps(model, pack_varlen(pairs).to(device))) for pairs in micro_batches]
    if not out:
        return []
    host = torch.cat(out, dim=1).double().cpu()
    return [(c[0], c[1]) for c in host.split([o.shape[1] for o in out], dim=1)]


def grad_sync(model: torch.nn.Module, sync: bool) -> AbstractContextManager:
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


class Trainer:
    """This worker's model, optimizer and schedule, and the SPIN update over its micro-batches.

    `total_steps` sets the lr schedule (train.warmup_ratio of it warms up). Every rank calls `train_step` and `logps`
    with as many micro-batches (each forward is a collective under FSDP2).
    """

    def __init__(self, source: str, tc: TrainConfig, *, total_steps: int, rank: int = 0, world: int = 1,
                 device: torch.device = torch.device("cpu"), trust_remote_code: bool = False):
        self.source, self.tc, self.total_steps = source, tc, total_steps
        self.rank, self.world, self.device = rank, world, device
        self.trust_remote_code = trust_remote_code
        if tc.activation_checkpointing == "auto":
            raise ValueError("train.activation_checkpointing = 'auto' is chosen from the device's memory before the "
                             "Trainer is built (train.fit_device_memory)")
        self.dtype = resolve_dtype(tc.dtype, device.type == "cuda")
        # Reduced precision always goes through FSDP2's MixedPrecisionPolicy (DDP = replicate-only mesh): fp32 master
        # weights, computed in `dtype` (as frozen_model computes for the held-out evaluation).
        self.sharded = tc.strategy == "fsdp" or self.dtype != "float32"

    def setup(self, load_weights: bool = True) -> None:
        """Model, optimizer and lr scheduler. `load_weights` off: the model is left for a checkpoint's state
        (checkpoint.load_state) instead of reading θ_t."""
        tc, trust = self.tc, dict(trust_remote_code=self.trust_remote_code)
        if self.sharded:
            model = build_sharded(self.source, tc, self.dtype, self.rank, self.world, self.device,
                                  load_weights=load_weights, **trust)
        else:
            model = load_model(self.source, dtype=torch.float32, **trust)
            add_lora(model, tc, self.dtype)
            prepare_blocks(model, tc)
            model = model.to(self.device)
            if self.world > 1:
                model = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        model.train()
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = (
            torch.optim.RMSprop(self.params, lr=tc.lr, weight_decay=tc.weight_decay) if tc.optimizer == "rmsprop"
            # fused: one kernel for every parameter, and its step counts stay on the device (the unfused AdamW
            # reads each parameter's step count on the host)
            else torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay, fused=True))
        warmup = math.ceil(tc.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, warmup))

    def _pair_values(self, pairs: Sequence[Pair]) -> torch.Tensor:
        """(3, B) float64 on the device: the reference log-probs (real, generated) as stored (the loss's reward
        difference is taken at their precision) and the human answers' token counts."""
        host = torch.tensor([[p["ref_logp_real"] for p in pairs], [p["ref_logp_generated"] for p in pairs],
                             [len(p["real_ids"]) for p in pairs]], dtype=torch.float64)
        return to_device(host, self.device)

    def forward(self, pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The policy's summed log-probs (real, generated) of one micro-batch with gradients, and the tokens the
        forward computed: the flattened layout. The step's one layout decision (benchmarks time the padded layouts it
        replaced by overriding it)."""
        batch = pack_varlen(pairs).to(self.device)
        real, generated = varlen_logps(self.model, batch)
        return real, generated, batch.tokens

    def train_step(self, micro_batches: Sequence[Sequence[Pair]]) -> dict[str, float]:
        """One optimizer step over this worker's micro-batches (gradients accumulated, reduced across workers
        once); the metrics are means over every worker's pairs (loss, rewards/*, logps/*) or sums (tokens).

        The host reads the device once per step: the metrics stay device tensors, summed over micro-batches, and
        come back in one copy after the optimizer step (benchmarks/host_syncs.py counts the reads)."""
        tc = self.tc
        mine = sum(map(len, micro_batches))
        t0 = time.perf_counter()
        tokens = 0
        for i, pairs in enumerate(micro_batches):
            with grad_sync(self.model, i == len(micro_batches) - 1):
                real, generated, computed = self.forward(pairs)
                ref_real, ref_generated, real_tokens = self._pair_values(pairs)
                loss, m = spin_loss(real, generated, ref_real, ref_generated, tc.beta, tc.loss_type,
                                    sft_weight=tc.sft_weight, real_tokens=real_tokens)
                (loss * len(pairs) / mine).backward()
            # Per-pair means weighted by pairs; the last column counts the pairs.
            row = torch.stack([loss.detach().double(), *(v.double() for v in m.values()),
                               torch.ones((), dtype=torch.float64, device=loss.device)]) * len(pairs)
            sums = row if i == 0 else sums + row
            tokens += computed
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, tc.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.cat([sums, to_device(torch.tensor([tokens], dtype=torch.float64), sums.device)])
        if self.world > 1:
            torch.distributed.all_reduce(sums)
        # The step's one host sync.
        *means, tokens, grad_norm = torch.cat([sums[:-2] / sums[-2], sums[-1:], grad_norm.double().view(1)]).tolist()
        metrics = dict(zip(["loss", *m.keys()], means))
        # padding_share: kept in the metrics for comparison with padded runs; flattened micro-batches have none.
        metrics.update(lr=lr, grad_norm=grad_norm, tokens=int(tokens), padding_share=0.0,
                       tokens_per_s=tokens / (time.perf_counter() - t0))
        return metrics

    def logps(self, micro_batches: Sequence[Sequence[Pair]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The policy's summed log-probs (real, generated) of each micro-batch's pairs, float64 on the CPU: the
        forward of `train_step` without gradients. Before the first step the policy is θ_t, so these are the
        reference log-probs of iteration t (spin_ray.stages.train's reference pass)."""
        # Under DDP the wrapped module: DDP's forward would broadcast buffers, a collective for nothing here.
        model = self.model.module if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) else self.model
        was_training = model.training
        model.eval()  # no dropout in the reference (the tiny models have none; some HF configs do)
        try:
            return pair_logps(model, micro_batches, self.device)
        finally:
            model.train(was_training)
