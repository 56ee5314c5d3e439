"""The OpenAI-compatible front deployment (FastAPI): API key, body size, JSON and fields, the prompt rendered and
counted with training's chat template, then the chosen model's engine deployment; every refusal a 4xx JSON error."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException

from spin_ray.models.loading import load_tokenizer, local_model
from spin_ray.tools.serve.api import (MAX_CHOICES, ApiError, ChatRequest, CompletionRequest, Prompt, answer, chunk,
                                      event, merged, usage)

log = logging.getLogger(__name__)


api = FastAPI(title="spin-ray serve", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException) -> JSONResponse:  # 404/405 in the same JSON shape
    return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)


# serve.ingress serializes the class as it decorates it: everything the class uses is defined or imported above this
# line, so it is importable from this module.
@serve.ingress(api)
class Ingress:
    """OpenAI-compatible front: auth, limits and validation, then the chosen model's engine deployment."""

    def __init__(self, handles: dict[str, Any], paths: dict[str, str], limits: dict[str, Any],
                 trust_remote_code: bool = False):
        self.handles, self.limits = handles, limits
        self.tokenizers = {name: load_tokenizer(local_model(p), trust_remote_code=trust_remote_code)
                           for name, p in paths.items()}
        self.context: dict[str, int] = {}
        self.created = int(time.time())

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        return await self._guard(request, self._models)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Any:
        return await self._guard(request, lambda: self._generate(request, ChatRequest, chat=True))

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._guard(request, lambda: self._generate(request, CompletionRequest, chat=False))

    async def _guard(self, request: Request, handler: Callable) -> Any:
        """Auth first, then the handler; every failure is a JSON error, never a traceback."""
        try:
            self._authorize(request)
            return await handler()
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
        except Exception:
            log.exception("request failed")
            return JSONResponse(ApiError(500, "internal error; see the server's log", type="server_error").body(),
                                status_code=500)

    def _authorize(self, request: Request) -> None:
        key = self.limits["api_key"]
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())):
            raise ApiError(401, "missing or wrong API key; send `Authorization: Bearer <key>`",
                           type="authentication_error", code="invalid_api_key")

    async def _models(self) -> JSONResponse:
        data = [{"id": n, "object": "model", "created": self.created, "owned_by": "spin-ray"} for n in self.handles]
        return JSONResponse({"object": "list", "data": data})

    async def _body(self, request: Request) -> dict[str, Any]:
        limit = self.limits["max_body_bytes"]
        too_big = ApiError(413, f"request body is larger than this server's limit of {limit} bytes",
                           code="body_too_large")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise too_big if length.isdigit() else ApiError(400, "bad Content-Length header")
        parts, size = [], 0
        async for part in request.stream():  # counted as it arrives: a missing or lying length is no way round
            size += len(part)
            if size > limit:
                raise too_big
            parts.append(part)
        try:
            body = json.loads(b"".join(parts))
        except ValueError as e:
            raise ApiError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    async def _generate(self, request: Request, schema: type, *, chat: bool) -> Any:
        body = await self._body(request)
        try:
            req = schema.model_validate(body)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ApiError(400, f"{where}: {err['msg']}", param=where) from None
        if req.model not in self.handles:
            raise ApiError(404, f"model {req.model!r} is not served here; choose one of {sorted(self.handles)} "
                           "(GET /v1/models)", param="model", code="model_not_found")
        if chat and req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if not chat and req.max_tokens == 0 and not req.echo:
            raise ApiError(400, "max_tokens = 0 generates nothing; it is for echo: true (the prompt's log-probs "
                           "alone); ask for at least 1 token", param="max_tokens")
        prompts = await asyncio.to_thread(self._tokenize, req, chat)
        if len(prompts) * req.n > MAX_CHOICES:
            raise ApiError(400, f"{len(prompts)} prompts x n = {req.n} asks for {len(prompts) * req.n} answers, "
                           f"more than this server's limit of {MAX_CHOICES} per request; send fewer at once",
                           param="n")
        sampling = await self._sampling(req, [len(ids) for ids, _ in prompts], chat)
        handle = self.handles[req.model].options(stream=True)
        # One engine request per answer; a seed gives answer j seed + j, as vLLM's own n does.
        streams = [handle.generate.remote(ids, {**sampling, "seed": None if req.seed is None else req.seed + j},
                                          req.stream) for ids, _ in prompts for j in range(req.n)]
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if req.stream:
            return StreamingResponse(self._sse(streams, rid, req, chat, prompts), media_type="text/event-stream")
        finals: list[dict[str, Any]] = [{}] * len(streams)
        async for i, item in merged(streams):
            finals[i] = item
        choices, tokens = [], 0
        for i, item in enumerate(finals):
            text, logprobs, n = answer(self.tokenizers[req.model], req, chat, prompts[i // req.n], item, True)
            tokens += n
            finish = "length" if not chat and req.max_tokens == 0 else item["finish_reason"]
            choices.append({"index": i, **({"message": {"role": "assistant", "content": text}} if chat
                                           else {"text": text}), "logprobs": logprobs, "finish_reason": finish})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": req.model, "choices": choices,
                             "usage": usage(prompts, tokens)})

    def _tokenize(self, req: Any, chat: bool) -> list[Prompt]:
        from spin_ray.training.template import prompt_ids  # deferred (torch, transformers), as in the replicas

        tok = self.tokenizers[req.model]
        if chat:
            messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                         else "".join(p.text for p in m.content)} for m in req.messages]
            try:
                return [(prompt_ids(tok, messages), None)]  # the chat template training used
            except (TemplateError, ValueError) as e:  # e.g. a template that wants alternating user/assistant turns
                raise ApiError(400, f"messages: the model's chat template refused them: {e}",
                               param="messages") from None
        given = req.prompt
        if isinstance(given, str) or isinstance(given[0], int):
            given = [given]
        prompts = []
        for p in given:
            if isinstance(p, str):
                prompts.append((tok(p)["input_ids"], p))
                continue
            if max(p) >= len(tok):
                raise ApiError(400, f"prompt: token id {max(p)} is outside this model's vocabulary of {len(tok)} "
                               "tokens; send ids of the served model's tokenizer", param="prompt")
            prompts.append((p, None))
        return prompts

    async def _sampling(self, req: Any, prompt_tokens: list[int], chat: bool) -> dict[str, Any]:
        if req.model not in self.context:
            self.context[req.model] = (await self.handles[req.model].info.remote())["max_model_len"]
        context, cap, longest = self.context[req.model], self.limits["max_tokens"], max(prompt_tokens)
        if longest > self.limits["max_prompt_tokens"]:
            raise ApiError(400, f"the prompt has {longest} tokens, more than this server's limit of "
                           f"{self.limits['max_prompt_tokens']}", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        asked = (req.max_completion_tokens or req.max_tokens) if chat else req.max_tokens
        if asked is not None and asked > cap:
            raise ApiError(400, f"max_tokens = {asked} is more than this server's limit of {cap}",
                           param="max_tokens")
        # max_tokens 0 (echo): the engine makes one token to compute the prompt's log-probs; it is not returned.
        max_tokens = max(asked, 1) if asked is not None else min(cap, context - longest)
        if longest + max_tokens > context:
            raise ApiError(400, f"the prompt's {longest} tokens + max_tokens {max_tokens} exceed the "
                           f"model's context of {context} tokens; shorten the prompt or lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        if chat:
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
            prompt_logprobs = None
        else:
            logprobs = req.logprobs
            prompt_logprobs = req.logprobs if req.echo else None
        return {"max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed,
                "stop": stop, "presence_penalty": req.presence_penalty,
                "frequency_penalty": req.frequency_penalty, "logprobs": logprobs, "prompt_logprobs": prompt_logprobs}

    async def _sse(self, streams: list[Any], rid: str, req: Any, chat: bool,
                   prompts: list[Prompt]) -> AsyncIterator[str]:
        created, tok = int(time.time()), self.tokenizers[req.model]
        tokens = [0] * len(streams)
        seen = [False] * len(streams)
        try:
            if chat:
                yield event(chunk(rid, req.model, created, chat, [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None} for i in range(len(streams))]))
            async for i, item in merged(streams):
                text, logprobs, tokens[i] = answer(tok, req, chat, prompts[i // req.n], item, not seen[i])
                seen[i] = True
                finish = item["finish_reason"]
                if finish and not chat and req.max_tokens == 0:
                    finish = "length"
                if text or finish or (logprobs and (logprobs.get("content") or logprobs.get("tokens"))):
                    body = {"delta": {"content": text}} if chat else {"text": text}
                    yield event(chunk(rid, req.model, created, chat, [
                        {"index": i, **body, "logprobs": logprobs, "finish_reason": finish}]))
            if req.stream_options is not None and req.stream_options.include_usage:
                yield event({**chunk(rid, req.model, created, chat, []), "usage": usage(prompts, sum(tokens))})
        except Exception:  # headers are sent: report in the stream, as OpenAI does
            log.exception("stream failed")
            yield event(ApiError(500, "generation failed; see the server's log", type="server_error").body())
        yield "data: [DONE]\n\n"
