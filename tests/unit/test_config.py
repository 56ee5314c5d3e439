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
    ("train.global_batch_size=10", "train.global_batch_size"),
    ("generate.num_actors=0", "generate.num_actors"),
    ("data.max_prompt_length=2048", "data.max_prompt_length"),
    ("train.loss_type=ipo", "train.loss_type"),
    ("train.optimizer=sgd", "train.optimizer"),
    ("data.on_bad_rows=ignore", "data.on_bad_rows"),
    ("generate.max_tokens=many", "generate.max_tokens"),
    ("train.use_gpu=3", "train.use_gpu"),
    ("train.betta=1", "train.betta"),
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
