"""One model's engine replica (the body of each model's Serve deployment): token ids and checked sampling fields in,
text deltas and log-probs out."""

from __future__ import annotations

from typing import Any, AsyncIterator

from spin_ray.models.loading import local_model
from spin_ray.stages.engine import AsyncEngine


def _entry(logprobs: dict[int, Any], chosen: int, k: int) -> list[Any]:
    """One position's vLLM log-probs as [chosen token's, [[id, log-prob] of the k most likely, by rank]]."""
    top = sorted(((i, lp) for i, lp in logprobs.items() if lp.rank <= k), key=lambda x: x[1].rank)
    return [logprobs[chosen].logprob, [[i, lp.logprob] for i, lp in top]]


class ModelServer:
    """One model's engine replica. Takes token ids and checked sampling fields; yields text deltas."""

    def __init__(self, model: str, dtype: str, max_model_len: int | None, trust_remote_code: bool = False):
        import torch  # deferred (torch): the replica needs it, not the process that builds the app

        self.engine = AsyncEngine(local_model(model), dtype=dtype, max_model_len=max_model_len,
                                  on_gpu=torch.cuda.is_available(), trust_remote_code=trust_remote_code)

    def info(self) -> dict[str, int]:
        return {"max_model_len": self.engine.max_model_len}

    async def generate(self, ids: list[int], sampling: dict[str, Any], stream: bool) -> AsyncIterator[dict[str, Any]]:
        """Dicts of the text (a delta when `stream`, else the whole answer once), its token ids and, where asked
        (`logprobs`, `prompt_logprobs` in `sampling`), their log-probs as [chosen, [[id, log-prob], ...top-k]]; the
        prompt's come with the first dict, one per prompt token (None for the first, which has no context)."""
        from vllm import SamplingParams  # deferred (vLLM), as torch
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(**sampling, output_kind=RequestOutputKind.DELTA if stream
                                else RequestOutputKind.FINAL_ONLY)
        tokens, first = 0, True
        async for out in self.engine.generate(ids, params):
            o = out.outputs[0]
            tokens += len(o.token_ids)
            item = {"text": o.text, "token_ids": list(o.token_ids),
                    "finish_reason": o.finish_reason if out.finished else None,
                    "prompt_tokens": len(ids), "completion_tokens": tokens}
            if params.logprobs is not None:
                item["logprobs"] = [_entry(d, t, params.logprobs) for d, t in zip(o.logprobs or [], o.token_ids)]
            if first and params.prompt_logprobs is not None:
                item["prompt_logprobs"] = [None if d is None else _entry(d, t, params.prompt_logprobs)
                                           for d, t in zip(out.prompt_logprobs, ids)]
            first = False
            yield item

    def check_health(self) -> None:
        self.engine.check()

    def __del__(self) -> None:
        if hasattr(self, "engine"):
            self.engine.shutdown()
