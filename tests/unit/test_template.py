"""The shared rendering/tokenisation/truncation and the masked log-prob sum, with the tiny offline model."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spin_ray.template import IGNORE, collate, encode_pair, prompt_ids, response_ids, sequence_logps

PROMPT = [{"role": "system", "content": "Be precise."}, {"role": "user", "content": "Reverse the letters: abc"}]


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_prompt_is_the_chat_template_with_the_assistant_header(tok):
    assert prompt_ids(tok, PROMPT) == tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True,
                                                              return_dict=True)["input_ids"]
    assert tok.decode(prompt_ids(tok, PROMPT)).endswith("<|im_start|>assistant\n")
    assert response_ids(tok, "cba")[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_truncation_keeps_the_prompt_end_then_cuts_responses(tok):
    long_prompt = [{"role": "user", "content": "Reverse the letters: " + "abc " * 60}]
    full = prompt_ids(tok, long_prompt)
    enc = encode_pair(tok, long_prompt, "cba " * 40, "x", max_length=64, max_prompt_length=24)
    assert enc["prompt_ids"] == full[-24:]
    assert len(enc["prompt_ids"]) + len(enc["real_ids"]) == 64 and len(enc["generated_ids"]) <= 40
    short = encode_pair(tok, PROMPT, "cba", "abc", max_length=64, max_prompt_length=24)
    assert short["prompt_ids"] == prompt_ids(tok, PROMPT) and short["real_ids"] == response_ids(tok, "cba")


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
