"""Memory of a Train worker from the model's HF config and the resolved recipe, no weights: the architecture facts
(`Arch`, `load_arch`), bytes per device by part (`train_memory`) and the rule that picks `auto`
train.activation_checkpointing and train.micro_batch_tokens (`fit_memory`). The Train workers apply it with their
device's memory (stages/train.py); `spin-ray plan` (tools/plan.py) prints it for a stated cluster.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from spin_ray.assets import ASSETS
from spin_ray.config import ConfigError, SpinConfig, resolve_dtype
from spin_ray.training.template import CHUNK_TOKENS

ARCH_DIR = ASSETS / "arch"
GB = 1e9
OVERHEAD_GB = 2.0
"""Per GPU process: CUDA context, NCCL and cuBLAS workspaces."""


@dataclass(frozen=True)
class Arch:
    """The architecture facts of a decoder-only (Llama/Mistral/Qwen-style, gated MLP) model's HF config."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_hf(cls, config: dict, name: str) -> Arch:
        try:
            heads = config["num_attention_heads"]
            return cls(name, config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], heads,
                       config.get("num_key_value_heads") or heads,
                       config.get("head_dim") or config["hidden_size"] // heads, config["vocab_size"],
                       bool(config.get("tie_word_embeddings", False)))
        except KeyError as e:
            raise ConfigError(f"model config for {name!r} lacks {e.args[0]!r}; spin-ray plan reads decoder-only HF "
                              "configs (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, "
                              "vocab_size)") from None

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        q = self.heads * self.head_dim
        # q and o projections, k and v, gate/up/down, two RMSNorm weights
        return 2 * self.hidden * q + 2 * self.hidden * self.kv_dim + 3 * self.hidden * self.intermediate + \
            2 * self.hidden

    @property
    def params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * self.layer_params + self.hidden

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each decoder layer's linear projections, by their Llama-style module names."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
                "up_proj": (h, i), "down_proj": (i, h)}

    def lora_params(self, r: int, targets: list[str]) -> int:
        """Adapter weights of rank `r` on the named projections of every layer: r·(in + out) each (A and B)."""
        shapes = self.linear_shapes()
        unknown = sorted(set(targets) - set(shapes))
        if unknown:
            raise ConfigError(f"train.lora.target_modules: spin-ray plan knows the sizes of {', '.join(shapes)}, "
                              f"not {', '.join(unknown)}")
        return self.layers * sum(r * sum(shapes[t]) for t in set(targets))

    def forward_flops_per_token(self, context: int) -> float:
        """2 FLOPs per weight of every matmul (the LM head too, tied or not) plus causal attention over `context`
        tokens (QKᵀ and AV, each 2·q_dim per attended token, half the context on average)."""
        matmul = self.layers * (self.layer_params - 2 * self.hidden) + self.vocab * self.hidden
        return 2 * matmul + 2 * self.layers * self.heads * self.head_dim * context


# Model names the configs use → shipped HF config.json facts (this machine is offline).
ARCH_FILES = {
    "alignment-handbook/zephyr-7b-sft-full": "zephyr-7b-sft-full.json",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": "SmolLM2-1.7B-Instruct.json",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "SmolLM2-135M-Instruct.json",
    "smollm2-135m": "SmolLM2-135M-Instruct.json",
    "tiny": "tiny-llama.json",
    "tasks-sft": "tasks-sft.json",
}


def load_arch(model: str, model_config: str | None = None) -> Arch:
    """Architecture of `model` from `model_config` (a config.json or a folder holding one), a local model folder,
    or the facts shipped for the preset configs' models."""
    source = model_config or model
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return Arch.from_hf(json.loads(path.read_text()), source)
    if model_config is not None:
        raise ConfigError(f"--model-config {model_config!r}: no config.json there; pass a model's config.json or "
                          "the folder holding it")
    if model in ARCH_FILES:
        return Arch.from_hf(json.loads((ARCH_DIR / ARCH_FILES[model]).read_text()), model)
    raise ConfigError(f"model = {model!r}: spin-ray plan has no architecture facts for it offline; pass its HF "
                      f"config.json with --model-config (shipped: {', '.join(sorted(ARCH_FILES))})")



def train_memory(arch: Arch, cfg: SpinConfig) -> dict[str, float]:
    """Bytes per training device of `cfg` (resolved: resources.resolve and fit_memory), by part (worst case: a
    worker's largest forward, `forward_tokens`, full).

    fp32 master parameters, gradients and optimizer state (RMSprop 1 state, AdamW 2), sharded over the workers under
    fsdp (over a shard group of train.hsdp_shard_size under HSDP). In reduced precision (train.dtype; bf16 by
    default on GPU) both strategies run through FSDP2's MixedPrecisionPolicy (ddp as a replicate-only mesh,
    training/step.py): a layer is gathered in bf16 when it is used (two in flight with prefetch) and gradients are
    reduced in fp32 in place, with no bucket copy. Only fp32 DDP with more than one worker (Ray Train wraps no single
    worker) keeps DDP's fp32 gradient buckets.
    The optimizer step's foreach kernels hold one more fp32 buffer the size of the (local) parameters (AdamW's and
    RMSprop's sqrt of the second moment): a 7B AdamW step on one H200 peaked at 144.9 GB, 5 x 29 GB
    (benchmarks/results/gpu). Activations and logits are freed by then, so the sum is an upper bound.
    Activations per token per layer: 16·hidden + 4·kv_dim + 8·intermediate bytes in bf16 (RMSNorm inputs in fp32,
    q/k/v, attention output, gate/up/act outputs; SDPA keeps no seq² matrix), twice that in fp32; with gradient
    checkpointing only each layer's input is kept, plus one layer's activations during recompute; with selective
    checkpointing each layer's input and the outputs it keeps (step.SAVED_OPS: q, k, v, attention, o, gate, up,
    down), 5·hidden + 2·kv_dim + 2·intermediate values, plus one layer's recompute. Logits: bf16, their
    fp32 copy and cross-entropy's fp32 log-softmax, 10 bytes per token per vocab entry (8 in fp32), for at most
    CHUNK_TOKENS positions at once (template.head_logps: only labelled positions, chunk by chunk).
    With train.lora the frozen base is held in the compute dtype, sharded under fsdp, with no gradients or optimizer
    state; those, the fp32 master copy and the step's buffer are the adapters' only. Each adapter also keeps its A
    output (r values per token) and, under dropout, its dropped input.
    """
    t, p = cfg.train, arch.params
    if "auto" in (t.micro_batch_tokens, t.activation_checkpointing):
        raise ValueError("train_memory takes a config whose `auto` memory settings are chosen: fit_memory")
    trained = p if t.lora is None else arch.lora_params(t.lora.r, t.lora.target_modules)
    dtype = resolve_dtype(t.dtype, t.use_gpu)
    reduced = dtype != "float32"
    width = 2 if reduced else 4  # bytes per activation value
    fsdp = t.strategy == "fsdp"
    shards = (t.hsdp_shard_size or t.num_workers) if fsdp else 1  # HSDP: sharded within a group, replicated across
    states = 2 if t.optimizer == "adamw" else 1
    tokens = forward_tokens(cfg)
    adapters = 0
    if t.lora is not None:
        shapes = arch.linear_shapes()
        adapters = width * sum(t.lora.r + (shapes[m][0] if t.lora.dropout else 0) for m in set(t.lora.target_modules))
    per_layer = (16 * arch.hidden + 4 * arch.kv_dim + 8 * arch.intermediate) * width // 2 + adapters
    kept = {"none": arch.layers * per_layer,
            "selective": arch.layers * (width * (5 * arch.hidden + 2 * arch.kv_dim + 2 * arch.intermediate)
                                        + adapters) + per_layer,
            "full": arch.layers * arch.hidden * width + per_layer}[t.activation_checkpointing]
    acts = tokens * kept
    ddp_buckets = not fsdp and not reduced and t.num_workers > 1
    frozen = {} if t.lora is None else {f"frozen base ({dtype})": width * p / shards}  # the adapters are extra
    return {
        **frozen,
        "parameters (fp32)" if t.lora is None else "adapters (fp32)": 4 * trained / shards,
        "gradients (fp32)": 4 * trained / shards + (4 * trained if ddp_buckets else 0),
        f"optimizer ({t.optimizer}, fp32)": 4 * states * trained / shards,
        "optimizer step (foreach)": 4 * trained / shards,
        "weights in use": 2 * 2 * arch.layer_params if reduced else 4 * 2 * arch.layer_params if fsdp else 0,
        "activations": acts,
        "logits": (10 if reduced else 8) * min(tokens, CHUNK_TOKENS) * arch.vocab,
        "runtime overhead": OVERHEAD_GB * GB if t.use_gpu else 0,
    }


def forward_tokens(cfg: SpinConfig) -> int:
    """Tokens in one worker's largest forward (`cfg` resolved): train.micro_batch_tokens, else train.micro_batch_size
    pairs (`forward_pairs`) at data.max_length; never more than the worker's share of a step at data.max_length."""
    t, length = cfg.train, cfg.data.max_length
    if t.micro_batch_tokens is None:
        return 2 * forward_pairs(cfg) * length
    return min(t.micro_batch_tokens, 2 * (t.global_batch_size // t.num_workers) * length)


RECOMPUTE = ("none", "full")
"""What `auto` tries for train.activation_checkpointing, the faster first: by the measured steps (measured_steps.json)
full recompute ran at 12.9% MFU on the H100 and selective at 8.8%, and selective keeps more memory than full, so
`auto` never picks it (it stays available when stated)."""
AUTO_FILL = 0.85
"""The share of a device `auto` fills by train_memory: PyTorch's caching allocator reserved 7% (H100, 36.7 of 34.3 GB
allocated, benchmarks/results/gpu/h100-per-sequence-sdpa/compile.json) to 15% (H200, 97.5 of 85.2 GB,
benchmarks/results/gpu/h200-smollm2-1.7b.json) more than the peak allocated."""


def fit_memory(cfg: SpinConfig, arch: Arch, capacity: float | None) -> SpinConfig:
    """`cfg` (resolved: resources.resolve) with `auto` train.activation_checkpointing and train.micro_batch_tokens
    chosen for `capacity` bytes per Train worker by train_memory: the rule spin-ray plan prints and the Train workers
    apply with their device's memory (train.fit_device_memory).

    The fastest recompute policy (RECOMPUTE) under which a forward of the smallest budget, 2 x data.max_length (any
    pair fits), fits in AUTO_FILL of `capacity`; under it the largest budget that fits, up to the worker's share of a
    step. Where none fits:
    full recompute at the smallest budget (spin-ray plan reports the shortfall). `capacity` None, a CPU worker, whose
    host RAM the node's other processes share: no recompute and micro_batch_size pairs at data.max_length, fixed.
    """
    t = cfg.train
    if "auto" not in (t.micro_batch_tokens, t.activation_checkpointing):
        return cfg

    def sized(policy: str, tokens: int | None) -> SpinConfig:
        return dataclasses.replace(cfg, train=dataclasses.replace(t, activation_checkpointing=policy,
                                                                  micro_batch_tokens=tokens))

    def fits(policy: str, tokens: int | None) -> bool:
        return sum(train_memory(arch, sized(policy, tokens)).values()) <= AUTO_FILL * capacity

    policies = RECOMPUTE if t.activation_checkpointing == "auto" else (t.activation_checkpointing,)
    if capacity is None:
        return sized(policies[0], 2 * forward_pairs(cfg) * cfg.data.max_length if t.micro_batch_tokens == "auto"
                     else t.micro_batch_tokens)
    if t.micro_batch_tokens != "auto":
        return sized(next((p for p in policies if fits(p, t.micro_batch_tokens)), policies[-1]), t.micro_batch_tokens)
    smallest = 2 * cfg.data.max_length
    policy = next((p for p in policies if fits(p, smallest)), None)
    if policy is None:
        return sized(policies[-1], smallest)
    low, high = smallest, 2 * (t.global_batch_size // t.num_workers) * cfg.data.max_length + 1
    while high - low > 1:  # fits(policy, low) holds; memory grows with the budget: bisect to the last that fits
        mid = (low + high) // 2
        low, high = (mid, high) if fits(policy, mid) else (low, mid)
    return sized(policy, low)


def forward_pairs(cfg: SpinConfig) -> int:
    """Pairs in one worker's largest forward: train.micro_batch_size caps it, a worker's share of the global batch
    too (`cfg` resolved)."""
    return min(cfg.train.micro_batch_size, cfg.train.global_batch_size // cfg.train.num_workers)
