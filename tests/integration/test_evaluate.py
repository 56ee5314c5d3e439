"""Held-out evaluation (evaluate.py) on real Ray and vLLM, checked against computations written independently here:
greedy answers from transformers `generate`, log-probs from a plain forward, exact match and margins by hand."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spin_ray.config import SpinConfig
from spin_ray.data.layout import RunLayout
from spin_ray.stages.evaluate import evaluate

pytestmark = pytest.mark.integration

SCORER = '''
def first_letter_a(prompt, reference, answer):
    """A fixture scorer with non-trivial values for a random model: 1 when the answer starts like the reference."""
    return float(answer[:1] == reference[:1])
'''


def config(model, storage, *extra):
    return SpinConfig.load(None, [f"model={model}", f"storage={storage}", "data.max_length=128",
                                  "data.max_prompt_length=64", "generate.max_tokens=8", "eval.rows=8",
                                  "generate.num_cpus_per_actor=0.5",
                                  "train.beta=2.0", *extra])


def logp(model, tokenizer, prompt, answer):
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    p = tokenizer(text, add_special_tokens=False).input_ids
    a = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([p + a])).logits[0].double(), -1)
    return sum(logprobs[len(p) + i - 1, t].item() for i, t in enumerate(a)), len(a)


def greedy(model, tokenizer, prompt, max_new_tokens=8):
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def changed_model(tiny_model, tmp_path_factory):
    """θ_1: the tiny model with every weight moved (a model that really changed, so margins are not 0)."""
    out = str(tmp_path_factory.mktemp("models") / "changed")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def test_evaluation_equals_an_independent_computation(tiny_model, changed_model, ray_cluster, tmp_path, monkeypatch):
    (tmp_path / "fixture_scorer.py").write_text(SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = config(tiny_model, tmp_path / "run", "eval.scorer=fixture_scorer:first_letter_a")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    models = {k: AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32).eval()
              for k, m in [(0, tiny_model), (1, changed_model)]}

    results = {0: evaluate(cfg, tiny_model, 0), 1: evaluate(cfg, changed_model, 1)}
    samples = {k: pq.read_table(RunLayout(cfg.storage).eval_samples(k)).to_pylist()
               for k in (0, 1)}
    for k, result in results.items():
        assert json.loads(open(RunLayout(cfg.storage).eval_result(k)).read()) == result
        rows = samples[k]
        assert result["rows"] == len(rows) == 8
        # Greedy answers are the model's own (transformers agrees token for token), scored by the user's function.
        # A random model emits stray bytes: vLLM holds back an incomplete UTF-8 tail that transformers decodes as U+FFFD.
        answers = [greedy(models[k], tok, r["prompt"]) for r in rows]
        assert [r["greedy"].rstrip("\ufffd") for r in rows] == [a.rstrip("\ufffd") for a in answers]
        expected = sum(a[:1] == r["real"][:1] for a, r in zip(answers, rows)) / 8
        assert result["task_score"] == pytest.approx(expected)
        # NLL per token of the human answers, from a plain forward.
        lp = [logp(models[k], tok, r["prompt"], r["real"]) for r in rows]
        assert result["nll_per_token"] == pytest.approx(-sum(x for x, _ in lp) / sum(n for _, n in lp), rel=1e-5)
    assert results[0]["reward_accuracy"] is None
    # The discriminator view: θ_1's reward ranks y above θ_0's sampled y' on this share of prompts.
    margins = []
    for r in samples[0]:
        (r1, _), (g1, _) = (logp(models[1], tok, r["prompt"], r["real"]),
                            logp(models[1], tok, r["prompt"], r["generated"]))
        (r0, _), (g0, _) = (logp(models[0], tok, r["prompt"], r["real"]),
                            logp(models[0], tok, r["prompt"], r["generated"]))
        margins.append((r1 - r0) - (g1 - g0))
    accuracy = sum(m > 0 for m in margins) / len(margins)
    assert results[1]["reward_accuracy"] == pytest.approx(accuracy)
    assert results[1]["reward_margin"] == pytest.approx(2.0 * sum(margins) / len(margins), rel=1e-4)
    assert results[1]["beta"] == 2.0 and all(m != 0 for m in margins)
    # A stored evaluation is reused as it is.
    assert evaluate(cfg, changed_model, 1) == results[1]


def test_bundled_tasks_are_scored_by_exact_match(tiny_model, ray_cluster, tmp_path):
    from spin_ray.assets.make_tasks import check_answer

    result = evaluate(config(tiny_model, tmp_path), tiny_model, 0)
    rows = pq.read_table(RunLayout(str(tmp_path)).eval_samples(0)).to_pylist()
    assert result["task_score"] == sum(check_answer(r["prompt"][-1]["content"], r["greedy"]) for r in rows) / 8
    kinds = {"Reverse": "reverse", "Sort": "sort", "Add": "add", "Count": "count"}
    by_kind = {}
    for r in rows:
        by_kind.setdefault(kinds[r["prompt"][-1]["content"].split()[0]], []).append(
            check_answer(r["prompt"][-1]["content"], r["greedy"]))
    assert result["task_score_by_kind"] == {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}
    assert 0 <= result["truncated_share"] <= 1 and result["answer_tokens"] > 0
