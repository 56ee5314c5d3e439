"""The shared rendering/tokenisation/truncation and the masked log-prob sum, with the tiny offline model."""

import os
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
from baselines import collate, pack_pairs, packed_logps, sequence_logps  # noqa: E402

from spin_ray.training.template import IGNORE, encode_pair, prompt_ids, response_ids  # noqa: E402

PROMPT = [{"role": "system", "content": "Be precise."}, {"role": "user", "content": "Reverse the letters: abc"}]


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_prompt_is_the_chat_template_with_the_assistant_header(tok):
    assert prompt_ids(tok, PROMPT) == tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True,
                                                              return_dict=True)["input_ids"]
    assert tok.decode(prompt_ids(tok, PROMPT)).endswith("<|im_start|>assistant\n")
    assert response_ids(tok, "cba")[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_truncation_keeps_the_prompt_end_then_cuts_both_responses(tok):
    long_prompt = [{"role": "user", "content": "Reverse the letters: " + "abc " * 60}]
    full = prompt_ids(tok, long_prompt)
    real, generated = response_ids(tok, "cba " * 40), response_ids(tok, "bca " * 50)
    assert len(full) > 24 and len(real) > 40 and len(generated) > len(real)  # both answers longer than 64 − 24
    enc = encode_pair(tok, long_prompt, "cba " * 40, "bca " * 50, max_length=64, max_prompt_length=24)
    assert enc["prompt_ids"] == full[-24:]
    assert enc["real_ids"] == real[:40] and enc["generated_ids"] == generated[:40]
    # A long prompt is cut even when its answers are short: the rule must not depend on an answer the generator has
    # not sampled yet (it feeds the same prompt ids, see the next test).
    short_answers = encode_pair(tok, long_prompt, "cba", "abc", max_length=4096, max_prompt_length=24)
    assert short_answers["prompt_ids"] == full[-24:] and short_answers["real_ids"] == response_ids(tok, "cba")
    short = encode_pair(tok, PROMPT, "cba", "abc", max_length=64, max_prompt_length=24)
    assert short["prompt_ids"] == prompt_ids(tok, PROMPT) and short["real_ids"] == response_ids(tok, "cba")


def test_generator_samples_on_the_prompt_ids_the_trainer_uses(tok, tiny_model):
    import pyarrow as pa

    from spin_ray.config import GenerateConfig
    from spin_ray.stages.generate import Answer, Generator

    class Recorder:  # stands in for the engine (our own class, not vLLM): records the prompt ids it is fed
        def generate(self, prompts, seeds):
            self.prompts = prompts
            return [Answer("x", "stop", 2) for _ in prompts]

    long_prompt = [{"role": "user", "content": "Reverse the letters: " + "abc " * 60}]
    gen = Generator(tiny_model, GenerateConfig(backend="transformers", max_tokens=50), iteration=0, seed=0,
                    max_length=64, max_prompt_length=24)
    gen.engine = Recorder()
    out = gen(pa.table({"prompt_id": ["a", "b"], "prompt": [long_prompt, PROMPT], "real": ["cba", "a b c " * 40]}))
    for fed, prompt, row in zip(gen.engine.prompts, [long_prompt, PROMPT], out.to_pylist()):
        # The engine's prompt and the stored ids are the one rule's (template.encode_pair): tokenised once, here
        encoded = encode_pair(tok, prompt, row["real"], "x", max_length=64, max_prompt_length=24)
        assert fed == encoded["prompt_ids"] and {k: row[k] for k in encoded} == encoded
    assert len(out.column("real_ids")[1].as_py()) == 64 - len(gen.engine.prompts[1])  # cut to max_length


def test_collate_masks_prompt_and_padding(tok):
    pairs = [encode_pair(tok, PROMPT, "cba", "a much longer wrong answer", max_length=128, max_prompt_length=64)]
    batch = collate(pairs, tok.pad_token_id)
    n_prompt = len(pairs[0]["prompt_ids"])
    assert batch["input_ids"].shape[0] == 2  # real first, then generated
    assert (batch["labels"][:, :n_prompt] == IGNORE).all()
    assert batch["labels"][0, n_prompt:n_prompt + len(pairs[0]["real_ids"])].tolist() == pairs[0]["real_ids"]
    assert (batch["labels"][0][batch["attention_mask"][0] == 0] == IGNORE).all()


def test_logps_sum_response_tokens_only(tok, tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    pairs = [encode_pair(tok, PROMPT, "cba", "abc d", max_length=128, max_prompt_length=64)]
    batch = collate(pairs, tok.pad_token_id)
    with torch.no_grad():
        got = sequence_logps(model, batch)
        token_logps = torch.log_softmax(model(input_ids=batch["input_ids"],
                                              attention_mask=batch["attention_mask"]).logits.double(), -1)
    n_prompt = len(pairs[0]["prompt_ids"])
    for i, key in enumerate(["real_ids", "generated_ids"]):
        answer = pairs[0][key]
        expected = sum(token_logps[i, n_prompt + j - 1, t].item() for j, t in enumerate(answer))
        everything = sum(token_logps[i, j - 1, t].item() for j, t in enumerate(batch["input_ids"][i].tolist())
                         if j > 0 and batch["attention_mask"][i, j])
        assert got[i].item() == pytest.approx(expected, abs=1e-4)
        assert abs(got[i].item() - everything) > 1.0  # the prompt's own tokens are not counted


def test_packed_pairs_give_the_padded_log_probs(tok, tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    pairs = [encode_pair(tok, PROMPT, "cba", "a much longer wrong answer than the real one", max_length=128,
                         max_prompt_length=64),
             encode_pair(tok, [{"role": "user", "content": "Hi"}], "Hello there, how are you today?", "Hey",
                         max_length=128, max_prompt_length=64)]
    packed = pack_pairs(pairs, tok.pad_token_id)
    widths = [2 * len(p["prompt_ids"]) + len(p["real_ids"]) + len(p["generated_ids"]) for p in pairs]
    assert packed["input_ids"].shape == (2, max(widths)) and int((packed["segment"] > 0).sum()) == sum(widths)
    with torch.no_grad():
        real, generated = packed_logps(model, packed)
        padded = sequence_logps(model, collate(pairs, tok.pad_token_id))
    assert torch.isfinite(real).all() and torch.isfinite(generated).all()
    # Each sequence sees only itself, from position 0: the same log-probs as in a padded batch of separate rows.
    assert real.tolist() == pytest.approx(padded[:2].tolist(), abs=1e-4)
    assert generated.tolist() == pytest.approx(padded[2:].tolist(), abs=1e-4)
