"""The OpenAI-compatible API without Ray: the request schemas (unknown fields refused), refusals as OpenAI-style
errors, and the rendering of engine output into responses and server-sent events."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, AsyncIterator, Literal

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """A refusal the client can fix: status + OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # Unknown fields are refused, so a typo never passes silently; no "0.5" for 0.5.
    model_config = ConfigDict(extra="forbid", strict=True)


class _Part(_Strict):
    type: Literal["text"]
    text: str


class _Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[_Part]
    name: str | None = None


class _StreamOptions(_Strict):
    include_usage: bool = False


MAX_LOGPROBS = 20
"""Most alternatives per position a request may ask for (`logprobs`, `top_logprobs`): OpenAI's cap, and vLLM's
default `max_logprobs`."""
MAX_CHOICES = 128
"""Most answers one request may ask for (prompts x n); each is one engine request."""


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: _StreamOptions | None = None
    user: str | None = None


class ChatRequest(_Sampling):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


_TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    # Text, texts, token ids (what lm-eval's local-completions sends), or lists of token ids: one prompt each.
    prompt: (Annotated[str, Field(min_length=1)] | Annotated[list[str], Field(min_length=1)] | _TokenIds
             | Annotated[list[_TokenIds], Field(min_length=1)])
    max_tokens: int | None = Field(None, ge=0)
    """0 only with `echo`: the prompt's log-probs, nothing generated (a log-likelihood request)."""
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


Prompt = tuple[list[int], str | None]
"""A prompt's token ids and its text where the request sent text."""


def _piece(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token])


def _completion_logprobs(tokenizer: Any, ids: list[int], entries: list[Any]) -> dict[str, Any]:
    """The completions API's `logprobs` of `ids` (ModelServer entries: None for a prompt's first token)."""
    tokens = [_piece(tokenizer, i) for i in ids]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [None if e is None else e[0] for e in entries],
            "top_logprobs": [None if e is None else {_piece(tokenizer, i): lp for i, lp in e[1]} for e in entries],
            "text_offset": offsets}


def _chat_logprobs(tokenizer: Any, ids: list[int], entries: list[Any]) -> dict[str, Any]:
    """The chat API's `logprobs` of `ids`."""
    def one(token: int, logprob: float) -> dict[str, Any]:
        text = _piece(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**one(i, e[0]), "top_logprobs": [one(j, lp) for j, lp in e[1]]}
                        for i, e in zip(ids, entries)]}


def answer(tokenizer: Any, req: Any, chat: bool, prompt: Prompt, item: dict[str, Any],
            first: bool) -> tuple[str, dict[str, Any] | None, int]:
    """(text, logprobs, completion tokens so far) of one ModelServer dict for the client: the prompt echoed in
    front of an answer's first dict with `echo`, the one token made for `max_tokens: 0` dropped."""
    text, ids, entries = item["text"], item["token_ids"], item.get("logprobs")
    tokens = item["completion_tokens"]
    if not chat and req.max_tokens == 0:
        text, ids, entries, tokens = "", [], [] if entries is not None else None, 0
    if not chat and req.echo and first:
        prompt_ids, prompt_text = prompt
        text = (prompt_text if prompt_text is not None else tokenizer.decode(prompt_ids)) + text
        if entries is not None:
            ids, entries = prompt_ids + ids, item["prompt_logprobs"] + entries
    if chat:
        return text, _chat_logprobs(tokenizer, ids, entries) if req.logprobs else None, tokens
    return text, _completion_logprobs(tokenizer, ids, entries) if req.logprobs is not None else None, tokens


def usage(prompts: list[Prompt], completion_tokens: int) -> dict[str, int]:
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk(rid: str, model: str, created: int, chat: bool, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": choices}


def event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


_END = object()


async def merged(streams: list[Any]) -> AsyncIterator[tuple[int, Any]]:
    """(index, item) from several async iterators as their items arrive. The first failure is raised, and leaving
    early cancels the rest (their engine requests are aborted)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: Any) -> None:
        try:
            async for item in stream:
                queue.put_nowait((i, item))
            queue.put_nowait((i, _END))
        except Exception as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is _END:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
