import pytest

from spin_ray.config import ConfigError, SpinConfig


def test_defaults_follow_the_paper():
    cfg = SpinConfig.load()
    assert (cfg.train.beta, cfg.train.lr, cfg.train.global_batch_size, cfg.train.optimizer) == (0.1, 5e-7, 64, "rmsprop")
    assert (cfg.data.max_length, cfg.data.max_prompt_length, cfg.generate.max_tokens) == (1024, 512, 256)
    assert cfg.loop.window == 2 and cfg.data.on_bad_rows == "error"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\ntrain:\n  beta: 1\n  lr: 5e-7\ngenerate:\n  max_tokens: 16\n")
    cfg = SpinConfig.load(path, ["train.beta=2.5", "generate.num_actors=2", "data.max_rows=null"])
    assert cfg.model == "tiny" and cfg.train.beta == 2.5 and isinstance(cfg.train.beta, float)
    assert cfg.train.lr == 5e-7 and cfg.generate.max_tokens == 16 and cfg.generate.num_actors == 2
    assert cfg.data.max_rows is None


@pytest.mark.parametrize("override, field", [
    ("train.beta=0", "train.beta"),
    ("train.beta=-1", "train.beta"),
    ("generate.temperature=-0.5", "generate.temperature"),
    ("train.global_batch_size=0", "train.global_batch_size"),
    ("generate.num_actors=0", "generate.num_actors"),
    ("data.max_prompt_length=2048", "data.max_prompt_length"),
    ("train.loss_type=ipo", "train.loss_type"),
    ("train.optimizer=sgd", "train.optimizer"),
    ("data.on_bad_rows=ignore", "data.on_bad_rows"),
    ("generate.max_tokens=many", "generate.max_tokens"),
    ("train.use_gpu=3", "train.use_gpu"),
    ("train.dist_backend=' '", "train.dist_backend"),
    ("train.betta=1", "train.betta"),
    ("train.checkpoint_every=0", "train.checkpoint_every"),
    ("train.checkpoint_every_minutes=0", "train.checkpoint_every_minutes"),
    ("train.checkpoint_every_epoch=3", "train.checkpoint_every_epoch"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        SpinConfig.load(None, [override])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        SpinConfig.load(None, ["train.beta"])
    with pytest.raises(ConfigError, match="not found"):
        SpinConfig.load(tmp_path / "nope.yaml")


def test_per_iteration_beta_and_lr():
    cfg = SpinConfig.load(None, ["train.beta_per_iteration=[0.1, 0.1, 0.1, 5.0]", "train.lr_per_iteration=[5e-7, 1e-7]"])
    assert [cfg.for_iteration(t).train.beta for t in range(4)] == [0.1, 0.1, 0.1, 5.0]
    assert [cfg.for_iteration(t).train.lr for t in range(3)] == [5e-7, 1e-7, 1e-7]
    assert cfg.for_iteration(3).iteration == 3 and cfg.train.beta == 0.1


def test_per_iteration_epochs():
    cfg = SpinConfig.load(None, ["train.epochs=5", "train.epochs_per_iteration=[3, 1]"])
    assert [cfg.for_iteration(t).train.epochs for t in range(4)] == [3, 1, 1, 1] and cfg.train.epochs == 5
    assert SpinConfig.load(None, ["train.epochs=2"]).for_iteration(3).train.epochs == 2
    for bad in ("[2, 0]", "[1.5]"):
        with pytest.raises(ConfigError, match="train.epochs_per_iteration"):
            SpinConfig.load(None, [f"train.epochs_per_iteration={bad}"])


def test_fixed_point_decision():
    from spin_ray.stages.loop import at_fixed_point

    assert at_fixed_point(0.52, 0.05) and at_fixed_point(0.45, 0.05) and at_fixed_point(1.0, 0.5)
    assert not at_fixed_point(0.56, 0.05) and not at_fixed_point(0.3, 0.05)
    assert not at_fixed_point(0.5, None) and not at_fixed_point(None, 0.1)  # no ε, or θ_t not evaluated: go on


# --- input that real users have -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, match", [
    ("train:\n  beta: 1\n lr: 2\n", r"c.yaml' is not valid YAML: .* at line 3, column 2"),
    ("train: {beta: 1\n", r"c.yaml' is not valid YAML"),
    ("1: x\n", r"c.yaml': key 1 in the top level is not text \(YAML read it as int\)"),
    ("train:\n  true: 1\n", r"c.yaml': key True in train is not text \(YAML read it as bool\)"),
])
def test_yaml_file_errors_are_one_line(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        SpinConfig.load(path)
    assert "\n" not in str(err.value)


def test_non_utf8_yaml_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"model: tiny\nstorage: runs/caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c.yaml' line 2 is not UTF-8 \(byte 0xe9\)"):
        SpinConfig.load(path)


@pytest.mark.parametrize("override, match", [
    ("train.lr=[1", r"override 'train.lr=\[1': the value is not valid YAML"),
    ("train.betta=1", r"unknown config key 'train.betta'; did you mean train.beta\?"),
    ("stroage=x", r"unknown config key 'stroage'; did you mean storage\?"),
    ("train.optimizer=adamw2", r"must be one of 'rmsprop', 'adamw' \(did you mean 'adamw'\?\)"),
    ("generate.dtype=bfloat61", r"generate.dtype = 'bfloat61': must be one of .*did you mean 'bfloat16'"),
    ("train.lr=inf", r"train.lr = inf: must be a finite number"),
    ("train.lr=.nan", r"train.lr = nan: must be a finite number"),
    ("train.beta=-.inf", r"train.beta = -inf: must be a finite number"),
    ("generate.num_cpus_per_actor=-1", r"generate.num_cpus_per_actor = -1.0: must be > 0"),
    ("score.micro_batch_size=8", r"config key .score. \(the scoring actors\) is gone: .* delete the score section"),
    ("generate.num_gpus_per_actor=-1", r"generate.num_gpus_per_actor = -1.0"),
    ("ray.num_cpus=-2", r"ray.num_cpus = -2"),
    ("data.max_length=-5", r"data.max_length = -5: must be >= 2"),
    ("generate.max_model_len=16", r"generate.max_model_len = 16: must be null or >= data.max_length \(1024\)"),
    ("train.weight_decay=-0.1", r"train.weight_decay = -0.1"),
    ("eval.split=train", r"eval.split = 'train': must differ from data.split"),
    ("data.duplicates=keep", r"data.duplicates = 'keep': must be one of 'drop', 'error'"),
    ("train.micro_batch_tokens=big", r"train.micro_batch_tokens = 'big': expected int or 'auto' or null"),
    ("train.micro_batch_tokens=100", r"train.micro_batch_tokens = 100: must be null or >= 2 x data.max_length "
                                     r"\(2048\) so that any pair fits, or auto"),
    ("train.activation_checkpointing=automatic",
     r"train.activation_checkpointing = 'automatic': must be one of 'none', 'full', 'selective', 'auto'"),
])
def test_values_that_would_break_later_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        SpinConfig.load(None, [override])


def test_memory_settings_take_auto():
    """`auto` token budget and recompute: accepted, the GPU presets use them, the CPU preset keeps its own values."""
    c = SpinConfig.load(None, ["train.micro_batch_tokens=auto", "train.activation_checkpointing=auto"])
    assert (c.train.micro_batch_tokens, c.train.activation_checkpointing) == ("auto", "auto")
    for preset in ("jobs/configs/paper_zephyr7b.yaml", "jobs/configs/gpu_mid.yaml"):
        t = SpinConfig.load(preset).train
        assert (t.micro_batch_tokens, t.activation_checkpointing) == ("auto", "auto"), preset
    cpu = SpinConfig.load("jobs/configs/cpu_default.yaml").train
    assert (cpu.micro_batch_tokens, cpu.activation_checkpointing, cpu.micro_batch_size) == (None, "none", 32)


def test_non_text_key_in_an_override():
    with pytest.raises(ConfigError, match=r"config key 1 in train is not text: YAML read it as int"):
        SpinConfig.load(None, ["train={1: 2}"])


def test_input_safety_defaults():
    cfg = SpinConfig.load()
    assert cfg.trust_remote_code is False and cfg.data.duplicates == "drop"


def test_auto_dtype_is_resolved_in_one_place():
    from spin_ray.config import resolve_dtype

    assert resolve_dtype("auto", on_gpu=True) == "bfloat16" and resolve_dtype("auto", on_gpu=False) == "float32"
    assert resolve_dtype("float16", on_gpu=False) == "float16"


def test_lora_section_from_yaml_and_set(tmp_path):
    assert SpinConfig.load().train.lora is None  # full fine-tuning unless asked
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lora: null\n")
    assert SpinConfig.load(path).train.lora is None
    # --set on a null (or absent) section turns it on with the other keys' defaults.
    lora = SpinConfig.load(path, ["train.lora.r=8"]).train.lora
    assert (lora.r, lora.alpha, lora.dropout) == (8, 32.0, 0.0) and "q_proj" in lora.target_modules
    path.write_text("train:\n  lora: {r: 4, alpha: 8, dropout: 0.1, target_modules: [q_proj, v_proj]}\n")
    lora = SpinConfig.load(path, ["train.lora.alpha=16"]).train.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (4, 16.0, 0.1, ["q_proj", "v_proj"])


@pytest.mark.parametrize("override, match", [
    ("train.lora.r=0", r"train.lora.r = 0: must be >= 1"),
    ("train.lora.alpha=0", r"train.lora.alpha = 0.0: must be > 0"),
    ("train.lora.dropout=1", r"train.lora.dropout = 1.0: must be in \[0, 1\)"),
    ("train.lora.target_modules=[]", r"train.lora.target_modules = \[\]: must name at least one linear layer"),
    ("train.lora.target_modules=q_proj", r"train.lora.target_modules must be a list"),
    ("train.lora.rank=8", r"unknown config key 'train.lora.rank'; valid keys here: alpha, dropout, r, target_modules"),
    ("train.lora=8", r"train.lora must be a section"),
])
def test_bad_lora_values_name_the_field(override, match):
    with pytest.raises(ConfigError, match=match):
        SpinConfig.load(None, [override])


def test_lora_is_another_config_for_resume():
    from spin_ray.data.manifest import config_hash

    # (lora: null is left out of the hash, so runs started before train.lora existed resume without --force.)
    assert config_hash(SpinConfig.load()) != config_hash(SpinConfig.load(None, ["train.lora.r=8"]))
