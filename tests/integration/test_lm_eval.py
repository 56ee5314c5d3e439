"""EleutherAI's lm-eval (the real package) on spin_ray's models: the bundled tasks through a real `spin-ray serve`
(local-completions and local-chat-completions) against spin_ray.evaluate on the same prompts, and eval.lm_eval in a
two-iteration run."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest

from spin_ray.stages.harness import BUNDLED

pytestmark = pytest.mark.integration

ROWS = 24  # held-out prompts: spin_ray's eval.rows and lm-eval's limit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str, model: str) -> bool:
    body = json.dumps({"model": model, "prompt": "hi", "max_tokens": 1}).encode()
    req = urllib.request.Request(f"{url}/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status == 200
    except (OSError, ValueError):  # not listening yet, or Serve's proxy answering 503 meanwhile
        return False


@pytest.fixture(scope="module")
def sft_model() -> str:
    from spin_ray.models.builders import resolve_model

    return resolve_model("tasks-sft")  # the embedded default's θ_0: answers some held-out prompts right


@pytest.fixture(scope="module")
def served(sft_model, tmp_path_factory):
    """`spin-ray serve` of the model folder, on a cluster of its own (no Ray settings), as a user would start it."""
    port, log = _free_port(), tmp_path_factory.mktemp("serve_log") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "spin_ray.cli", "serve", sft_model, "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    while not _ready(url, "tasks-sft"):
        assert proc.poll() is None, f"spin-ray serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
        time.sleep(2)  # pytest's timeout ends a server that never comes up
    yield url
    proc.terminate()
    proc.wait(timeout=120)


@pytest.fixture(scope="module")
def spin_ray_eval(sft_model, ray_cluster, tmp_path_factory):
    """spin_ray.evaluate of θ_0 on the first ROWS held-out prompts, its generation settings as the task's. Prompts
    whole, as lm-eval sends them: the model's tokenizer has a token per character, so the embedded default's
    data.max_prompt_length = 64 would cut the system turn off the prompts that have one."""
    from spin_ray.config import SpinConfig
    from spin_ray.data.layout import RunLayout
    from spin_ray.stages.evaluate import evaluate

    storage = tmp_path_factory.mktemp("evaluated")
    cfg = SpinConfig.load(None, [f"model={sft_model}", f"storage={storage}", "data.max_length=192",
                                 "data.max_prompt_length=160", "generate.max_tokens=16", "generate.batch_size=8",
                                 "generate.num_cpus_per_actor=0.5", f"eval.rows={ROWS}"])
    result = evaluate(cfg, sft_model, 0)
    samples = pq.read_table(RunLayout(str(storage)).eval_samples(0)).to_pylist()
    return result, {s["prompt_id"]: s for s in samples}


def _lm_eval(model: str, url: str, tasks: list[str], **model_args):
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = {"model": "tasks-sft", "base_url": url, **model_args}
    return lm_eval.simple_evaluate(model=model, model_args=args, tasks=tasks, limit=ROWS, apply_chat_template=True,
                                   task_manager=TaskManager(include_path=str(BUNDLED), include_defaults=False))


def test_bundled_tasks_through_serve_equal_spin_ray_evaluate(served, spin_ray_eval, sft_model):
    import torch

    from spin_ray.config import TrainConfig
    from spin_ray.models.loading import load_tokenizer
    from spin_ray.training.step import frozen_model, pair_logps

    result, samples = spin_ray_eval
    res = _lm_eval("local-completions", f"{served}/completions", ["spin_tasks_gen", "spin_tasks_ll"],
                   tokenizer=sft_model, tokenizer_backend="huggingface", batch_size=4)
    # The same prompts: lm-eval's --limit N takes spin_ray's eval.rows = N.
    gen, ll = res["samples"]["spin_tasks_gen"], res["samples"]["spin_tasks_ll"]
    assert {s["doc"]["prompt_id"] for s in gen} == {s["doc"]["prompt_id"] for s in ll} == set(samples)
    # Generation: each greedy answer is spin_ray's, and so is the exact match.
    assert {s["doc"]["prompt_id"]: s["filtered_resps"][0].strip() for s in gen} == \
        {pid: s["greedy"] for pid, s in samples.items()}
    assert 0 < result["task_score"] < 1  # the comparison means something: some right, some wrong
    assert res["results"]["spin_tasks_gen"]["exact_match,none"] == pytest.approx(result["task_score"], abs=1e-12)
    # Log-likelihood: each item's log-prob is the trainer's forward (step.pair_logps, fp32) on the same tokens.
    # lm-eval moves the context's trailing whitespace (the template's "\n" after the assistant header) into the
    # continuation, so it scores that token too: the trainer's log-prob of the answer + EOS (eval_samples' logp_real)
    # plus that of the "\n".
    tok = load_tokenizer(sft_model)
    model = frozen_model(sft_model, TrainConfig(), torch.device("cpu"))
    for s in ll:
        context, continuation = s["arguments"][0]
        prompt = tok(context.rstrip(), add_special_tokens=False)["input_ids"]
        scored = tok(context + continuation, add_special_tokens=False)["input_ids"][len(prompt):]
        pairs = [{"prompt_ids": prompt, "real_ids": scored, "generated_ids": scored},
                 {"prompt_ids": prompt + scored[:1], "real_ids": scored[1:], "generated_ids": scored[1:]}]
        ((real, _),) = pair_logps(model, [pairs], torch.device("cpu"))
        trainers, answer = real.tolist()  # the "\n" + answer + EOS; the answer + EOS after the "\n"
        assert s["filtered_resps"][0][0] == pytest.approx(trainers, abs=1e-4)
        assert answer == pytest.approx(samples[s["doc"]["prompt_id"]]["logp_real"], abs=1e-4)
    # The chat API renders the same chat turns on the server: the same score.
    chat = _lm_eval("local-chat-completions", f"{served}/chat/completions", ["spin_tasks_gen"], num_concurrent=4)
    assert chat["results"]["spin_tasks_gen"]["exact_match,none"] == pytest.approx(result["task_score"], abs=1e-12)


TINY = ["data.max_rows=16", "data.max_length=128", "data.max_prompt_length=64", "generate.max_tokens=8",
        "generate.batch_size=8", "generate.num_cpus_per_actor=0.5", "train.global_batch_size=8",
        "train.micro_batch_size=4", "train.epochs=1", "loop.iterations=2", "eval.rows=8",
        "eval.lm_eval.tasks=[spin_tasks_gen, spin_tasks_ll]", "eval.lm_eval.limit=4", "tracking.backend=tensorboard"]


def _run(*sets: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a cluster of its own, as a user's run
    return subprocess.run([sys.executable, "-m", "spin_ray.cli", "run", *sum((["--set", s] for s in sets), [])],
                          capture_output=True, text=True, env=env, timeout=1200)


def test_lm_eval_scores_every_iterate_once(tiny_model, tmp_path):
    from conftest import tensorboard_scalars

    from spin_ray.data.layout import RunLayout

    sets = [f"model={tiny_model}", f"storage={tmp_path}", *TINY]
    out = _run(*sets)
    assert out.returncode == 0, out.stderr[-3000:]
    evals = [RunLayout(str(tmp_path)).evaluation(k) for k in range(3)]
    for e in evals:  # θ_0, θ_1, θ_2
        assert set(e["lm_eval"]) == {"spin_tasks_gen", "spin_tasks_ll"}
        assert e["lm_eval"]["spin_tasks_gen"]["settings"] == {"num_fewshot": None, "limit": 4, "chat_template": True,
                                                              "version": 1}
        assert 0 <= e["lm_eval"]["spin_tasks_gen"]["scores"]["spin_tasks_gen"]["exact_match"] <= 1
        assert e["lm_eval"]["spin_tasks_ll"]["scores"]["spin_tasks_ll"]["perplexity"] > 1
    # Three different models: their answers' likelihoods differ.
    assert len({e["lm_eval"]["spin_tasks_ll"]["scores"]["spin_tasks_ll"]["perplexity"] for e in evals}) == 3
    report = (tmp_path / "report.md").read_text()  # written by spin-ray run
    table = report[report.index("lm-eval ("):]
    assert "spin_tasks_gen exact_match" in table and all(f"| θ_{k} |" in table for k in range(3))
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert [k for k, _ in scalars["eval/lm_eval/spin_tasks_gen/exact_match"]] == [0, 1, 2]

    # The rerun of the finished run scores nothing again: every eval.json is as it was.
    before = [(tmp_path / d / "eval.json").read_text() for d in ("base", "iter_0", "iter_1")]
    again = _run(*sets)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [(tmp_path / d / "eval.json").read_text() for d in ("base", "iter_0", "iter_1")] == before


def test_unknown_task_is_refused_before_ray_starts(tiny_model, tmp_path):
    out = _run(f"model={tiny_model}", f"storage={tmp_path / 'run'}", "eval.lm_eval.tasks=[spin_tasks_gen, arc_chalenge]")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "eval.lm_eval.tasks: 'arc_chalenge'" in out.stderr
    assert "arc_challenge" in out.stderr  # the closest names lm-eval knows
    assert "Ray" not in out.stdout and not (tmp_path / "run").exists()


def test_task_whose_data_is_unreachable_is_refused_before_any_engine(tiny_model, tmp_path):
    # A real leaderboard task, its data on the HF hub, which this machine cannot reach (offline mode says so at once).
    out = _run(f"model={tiny_model}", f"storage={tmp_path}", *TINY[:-3], "eval.lm_eval.tasks=[arc_challenge]")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "'arc_challenge'" in out.stderr and "ai2_arc" in out.stderr  # the task, and what it tried to download
    assert not (tmp_path / "iter_0").exists()  # no pairs: no engine started
