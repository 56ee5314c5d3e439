"""Every stage loads θ through spin_ray.models.loading.load_*: safetensors only, a model's own Python code only
with trust_remote_code. Real transformers on a tiny model folder; the vLLM side is checked in
tests/integration/test_generate.py."""

from __future__ import annotations

import ast
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import spin_ray
from spin_ray.config import ConfigError, GenerateConfig, TrainConfig
from spin_ray.models.builders import build_tiny_model
from spin_ray.models.loading import load_config, load_model, load_tokenizer
from spin_ray.stages.generate import TransformersEngine
from spin_ray.training.step import Trainer

# Imported by transformers only when remote code is allowed: it leaves a file behind to prove it ran.
CUSTOM_CODE = '''
import os
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

Path(os.environ["SPIN_RAY_TEST_SENTINEL"]).write_text("ran")


class MineConfig(LlamaConfig):
    model_type = "mine"


class MyModel(LlamaForCausalLM):
    config_class = MineConfig
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(build_tiny_model(tmp_path_factory.mktemp("cache") / "tiny-llama", seed=0))


def test_pickle_only_weights_are_not_loaded(tiny: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    state = load_model(str(model), dtype=torch.float32).state_dict()
    (model / "model.safetensors").unlink()
    torch.save(state, model / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        load_model(str(model), dtype=torch.float32)


def test_remote_code_runs_only_when_trusted(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    (model / "modeling_mine.py").write_text(CUSTOM_CODE)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="mine", auto_map={"AutoConfig": "modeling_mine.MineConfig",
                                               "AutoModelForCausalLM": "modeling_mine.MyModel"})
    (model / "config.json").write_text(json.dumps(config))
    sentinel = tmp_path / "ran"
    monkeypatch.setenv("SPIN_RAY_TEST_SENTINEL", str(sentinel))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))

    with pytest.raises(ValueError, match="trust_remote_code"):
        load_config(str(model))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(str(model), dtype=torch.float32)
    assert not sentinel.exists()

    loaded = load_model(str(model), dtype=torch.float32, trust_remote_code=True)
    assert sentinel.read_text() == "ran" and type(loaded).__name__ == "MyModel"
    assert load_tokenizer(str(model), trust_remote_code=True).pad_token is not None


def test_no_stage_loads_weights_around_the_loaders() -> None:
    """A stage that called from_pretrained itself would skip both rules (only models/loading.py may; models/builders.py only to
    convert the GGUF shipped in a pip package), and each vLLM engine must be told both."""
    root = Path(spin_ray.__file__).parent
    offenders, engines = [], 0
    for path in root.rglob("*.py"):
        name = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained" and not (
                    name == "models/loading.py" or name == "models/builders.py" and
                    "gguf_file" in {k.arg for k in node.keywords}):
                offenders.append(f"{name}:{node.lineno} from_pretrained")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("LLM", "EngineArgs"):
                engines += 1
                keywords = {k.arg: k.value for k in node.keywords}
                if getattr(keywords.get("load_format"), "value", None) != "safetensors" or \
                        "trust_remote_code" not in keywords:
                    offenders.append(f"{name}:{node.lineno} {node.func.id} without load_format/trust_remote_code")
    assert offenders == [] and engines == 1  # stages/engine.Engine: generation's and serve's one construction site


def test_a_stage_names_the_fix_before_loading(tiny: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"holds only pickle weights \(pytorch_model.bin\).*save_pretrained"):
        load_tokenizer(str(model))


def test_a_model_without_a_pad_token_is_accepted_trains_and_generates(tiny: Path, tmp_path: Path) -> None:
    """Nothing pads in training or scoring (template.pack_varlen); the transformers generation fallback pads prompts
    of different lengths with EOS."""
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "config.json"):
        if (model / name).is_file():
            facts = {k: v for k, v in json.loads((model / name).read_text()).items()
                     if k not in ("pad_token", "pad_token_id")}
            (model / name).write_text(json.dumps(facts))
    tokenizer = load_tokenizer(str(model))
    assert tokenizer.pad_token is None

    trainer = Trainer(str(model), TrainConfig(optimizer="adamw", lr=1e-3), total_steps=1)
    trainer.setup()
    pairs = [{"prompt_ids": [5, 6, 7], "real_ids": [8, 9, 2], "generated_ids": [10, 2]},
             {"prompt_ids": [5], "real_ids": [12, 2], "generated_ids": [15, 16, 17, 2]}]
    (real, generated), = trainer.logps([pairs])
    metrics = trainer.train_step([[{**p, "ref_logp_real": float(r), "ref_logp_generated": float(g)}
                                   for p, r, g in zip(pairs, real, generated)]])
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6) and metrics["grad_norm"] > 0

    engine = TransformersEngine(str(model), GenerateConfig(max_tokens=4), on_gpu=False, tokenizer=tokenizer)
    answers = engine.generate([[5, 6, 7, 8], [5]], seeds=[0, 1])
    assert len(answers) == 2 and all(a.num_tokens <= 4 for a in answers)
