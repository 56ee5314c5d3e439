"""Output tokens/s of spin_ray's generation stage (Ray Data -> pool of vLLM actors) vs vLLM's `LLM.generate` direct.

Same prompts (bundled tasks, cycled to --prompts rows with unique prompt ids, rendered by spin_ray.training.template.prompt_ids),
same engine settings (float32, enforce_eager, the pipeline's max_model_len; see direct_run on chunked prefill) and the
same per-prompt SamplingParams (temperature 1.0, top_p 1.0, max_tokens, seed = spin_ray.stages.generate.sample_seed). Every
run is sequential, never two at once: the direct engine and the actors would otherwise share the same 2 cores.

Baselines, "direct": a spawned process (its own memory and thread binding) imports vLLM, builds `vllm.LLM` and calls
`generate` once on all prompts, then (first --direct-threads entry only) once per --batch-size chunk, the calls the
pipeline's actors get: that separates what batching costs from what Ray costs (prefix cache reset in between). One
such process per --direct-threads entry: vLLM's CPU worker binds one OpenMP thread per allowed core unless
OMP_NUM_THREADS is set, and Ray sets OMP_NUM_THREADS=num_cpus in a 1-CPU actor, so "direct, OMP_NUM_THREADS=1" is the
like-for-like baseline and "direct, default" (2 threads here) what a plain `LLM(...)` gets on this machine.

Pipeline: spin_ray.stages.generate.generate on `ray.data.from_arrow(blocks of --batch-size)`, materialized, with 1 and 2
actors of 1 CPU (GenerateConfig.num_cpus_per_actor=1, the default) and 1 actor of 2 CPUs; measured two ways:
  (a) end-to-end: wall time of `materialize()`, actor start, vLLM import and engine start included;
  (b) steady state: spin_ray.stages.generate.Generator is swapped, for the benchmark only, for a subclass that stamps each
      batch with the wall-clock start/end of its `__call__` (and the actor's pid, __init__ time and torch threads).
      Steady tokens/s = all output tokens / (last batch end - first batch start): engine start-up is excluded, what
      Ray Data costs between batches (scheduling, object transfer, an idle actor) stays in.
The direct baseline for (a) is import vllm + LLM(...) + the single generate call; for (b) the generate call alone.

Peak RSS: a psutil thread samples, every 0.25 s, the direct process and every process whose command line names the
actor class (Ray titles actor processes `ray::MapWorker(MapBatches(<class>))`). The direct process and Ray's workers
both run at niceness 0 (RAY_worker_niceness=0: at Ray's default 15 they starved behind other users' jobs), so other
users' load on a shared machine hits both sides alike; "others' CPU" says how much of the cores processes outside the
benchmark took during each run.

Warm pool (--pool): the embedded default's path (GenerateConfig.keep_warm): spin_ray.stages.generate.EnginePool starts the
engines once (timed), `reload` swaps weights in (timed), then two generations run on the same warm engines through
PooledGenerator stages; steady as above, and a whole materialize() (Ray Data included, no engine start) against the
direct engine's generate call.

For context, the full `spin_ray.stages.loop.make_pairs` (generate + tokenise + parquet write) on the same prompts is timed too.

    python benchmarks/generate.py                      # SmolLM2-135M, 256 prompts x 48 tokens, 4 batches
    python benchmarks/generate.py --model tiny --prompts 64 --max-tokens 16
"""

import os

# Before ray/vllm are imported; the spawned direct processes read them too.
os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
                  RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                  RAY_worker_niceness="0")


def direct_run(model: str, prompts: list[list[int]], seeds: list[int], max_tokens: int, max_model_len: int,
               gpu_memory_utilization: float, batch_size: int | None) -> dict:
    """vLLM in this one process: start-up, one generate call over all prompts, then (batch_size) one call per batch."""
    import resource
    import time

    t0 = time.perf_counter()
    import torch
    from vllm import LLM, SamplingParams
    t1 = time.perf_counter()
    # vLLM-CPU 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prefill is chunked, which
    # one call with all prompts (> 4096 prompt tokens) triggers; whole-prompt scheduling with the same 4096-token step
    # budget avoids it and matches what the pipeline's smaller batches get anyway.
    llm = LLM(model=model, dtype="float32", max_model_len=max_model_len, enforce_eager=True,
              gpu_memory_utilization=gpu_memory_utilization, enable_chunked_prefill=False, max_num_batched_tokens=4096)
    t2 = time.perf_counter()
    params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, top_p=1.0, seed=s) for s in seeds]
    inputs = [{"prompt_token_ids": p} for p in prompts]
    outs = llm.generate(inputs, params, use_tqdm=False)
    t3 = time.perf_counter()
    llm.reset_prefix_cache()  # the per-batch pass must prefill again, as the pipeline does
    batched = []
    for i in range(0, len(inputs), batch_size or len(inputs)):
        if batch_size:
            batched += llm.generate(inputs[i:i + batch_size], params[i:i + batch_size], use_tqdm=False)
    t4 = time.perf_counter()
    return {"import_s": t1 - t0, "start_s": t2 - t1, "generate_s": t3 - t2,
            "per_batch_s": (t4 - t3) if batch_size else None,
            "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
            "per_batch_tokens": sum(len(o.outputs[0].token_ids) for o in batched) if batch_size else None,
            "torch_threads": torch.get_num_threads(), "texts": [o.outputs[0].text.strip() for o in outs],
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _direct_entry(conn, nice: int, *args) -> None:
    os.nice(nice)  # the Ray workers' niceness (RAY_worker_niceness): others' load then hits both sides alike
    conn.send(direct_run(*args))


if __name__ == "__main__":
    import argparse
    import dataclasses
    import multiprocessing
    import sys
    import tempfile
    import time

    import psutil
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import (RssSampler, cmdline_containing, loadavg, machine, pid_in, print_table, start_ray,
                         write_json)

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help='"smollm2-135m", "tiny" or an HF folder')
    ap.add_argument("--prompts", type=int, default=256, help="rows (the bundled tasks, cycled)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=64, help="GenerateConfig.batch_size (prompts per actor call)")
    ap.add_argument("--max-length", type=int, default=1024, help="data.max_length (= the engine's max_model_len)")
    ap.add_argument("--max-prompt-length", type=int, default=512)
    ap.add_argument("--actors", default="1,2,1x2",
                    help="pipeline variants: N (N actors of 1 CPU) or NxC (N actors of C CPUs), comma-separated")
    ap.add_argument("--pool", default="1",
                    help="warm-engine variants (EnginePool, keep_warm): engine counts, comma-separated; '' for none")
    ap.add_argument("--direct-threads", default="1,default",
                    help="direct baselines: OMP_NUM_THREADS for each (an int, or 'default' to leave it unset)")
    ap.add_argument("--baseline-nice", type=int, default=0,
                    help="niceness of the direct process (= RAY_worker_niceness, set to 0 for the Ray workers here)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--skip-pairs", action="store_true", help="skip the make_pairs context run")
    ap.add_argument("--verbose", action="store_true", help="show the actors' logs")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "generate.json"))
    args = ap.parse_args()

    import ray
    import ray.data
    from transformers import AutoTokenizer

    import spin_ray.stages.generate as gen
    from spin_ray.config import DataConfig, GenerateConfig, SpinConfig
    from spin_ray.data.sources import load_sft
    from spin_ray.data.schemas import PROMPT_SCHEMA
    from spin_ray.stages.loop import make_pairs
    from spin_ray.models.builders import resolve_model
    from spin_ray.training.template import prompt_ids, truncate_prompt

    load_start = loadavg()
    print(f"load average at start: {load_start}")
    model = resolve_model(args.model)
    gcfg = GenerateConfig(max_tokens=args.max_tokens, batch_size=args.batch_size, temperature=1.0, top_p=1.0,
                          num_cpus_per_actor=1)
    max_model_len = gcfg.max_model_len or args.max_length  # as Generator does

    # Prompts: the bundled rows cycled to N, each repeat with its own id (and so its own sampling seed).
    base = load_sft(DataConfig(path="bundled")).rows
    rows = [dict(base[i % len(base)], prompt_id=f"{base[i % len(base)]['prompt_id']}-{i // len(base)}")
            for i in range(args.prompts)]
    table = pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA)
    tok = AutoTokenizer.from_pretrained(model)
    ids, seeds = [], []
    for r in rows:  # Generator's rendering and the one truncation rule
        ids.append(truncate_prompt(prompt_ids(tok, r["prompt"]), args.max_prompt_length))
        seeds.append(gen.sample_seed(args.seed, r["prompt_id"], 0))
    print(f"{len(rows)} prompts, mean {sum(map(len, ids)) / len(ids):.1f} prompt tokens, max_tokens {args.max_tokens}, "
          f"model {model}")

    # --- baselines: vLLM direct, each in its own spawned process, alone on the machine
    mp = multiprocessing.get_context("spawn")
    direct, direct_texts = {}, None
    for k, threads in enumerate(args.direct_threads.split(",")):
        saved = os.environ.pop("OMP_NUM_THREADS", None)
        if threads != "default":
            os.environ["OMP_NUM_THREADS"] = threads
        recv, send = mp.Pipe(duplex=False)
        load0 = loadavg()
        proc = mp.Process(target=_direct_entry,
                          args=(send, args.baseline_nice, model, ids, seeds, args.max_tokens, max_model_len,
                                gcfg.gpu_memory_utilization, None if k else args.batch_size))
        proc.start()
        send.close()  # ours closed, so a dead child reads as EOF
        os.environ.pop("OMP_NUM_THREADS", None)
        if saved is not None:
            os.environ["OMP_NUM_THREADS"] = saved
        with RssSampler(pid_in({proc.pid}, "direct")) as rss:
            try:
                d = recv.recv()
            except EOFError:  # the child died (its traceback is above): fail rather than wait on a dead pipe
                proc.join()
                raise SystemExit(f"{proc.name} exited with code {proc.exitcode} before sending its results")
        proc.join()
        d.update(omp_num_threads=threads, load_avg=[load0, loadavg()], others_cpu_share=rss.other_cpu_share)
        d["peak_rss_mib"] = max(v["max_rss_mib"] for v in rss.peaks.values())
        texts = d.pop("texts")
        direct_texts = direct_texts or dict(zip((r["prompt_id"] for r in rows), texts))
        d["e2e_s"] = d["import_s"] + d["start_s"] + d["generate_s"]
        d["tok_s"], d["e2e_tok_s"] = d["tokens"] / d["generate_s"], d["tokens"] / d["e2e_s"]
        d["per_batch_tok_s"] = d["per_batch_tokens"] / d["per_batch_s"] if d["per_batch_s"] else None
        direct[threads] = d
        print(f"direct, OMP_NUM_THREADS={threads}: import {d['import_s']:.1f} s, engine start {d['start_s']:.1f} s, "
              f"generate {d['generate_s']:.1f} s -> {d['tok_s']:.1f} tok/s")

    # --- the pipeline
    class TimedGenerator(gen.Generator):
        """spin_ray's Generator, plus per-batch wall-clock stamps (benchmark only)."""

        def __init__(self, *args, **kw):
            t0 = time.time()
            super().__init__(*args, **kw)
            self._init = (t0, time.time())

        def __call__(self, batch: pa.Table) -> pa.Table:
            import torch

            t0 = time.time()
            out = super().__call__(batch)
            t1, n = time.time(), out.num_rows
            for name, v in (("_t0", t0), ("_t1", t1), ("_init_t0", self._init[0]), ("_init_t1", self._init[1])):
                out = out.append_column(name, pa.array([v] * n, pa.float64()))
            return (out.append_column("_pid", pa.array([os.getpid()] * n, pa.int64()))
                    .append_column("_threads", pa.array([torch.get_num_threads()] * n, pa.int64())))

    def map_workers() -> set[int]:
        return {p.pid for p in psutil.Process().children(recursive=True) if "MapWorker" in " ".join(_safe_cmdline(p))}

    def _safe_cmdline(p) -> list[str]:
        try:
            return p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return []

    def wait_actors_gone(timeout: float = 60) -> None:
        """Ray Data ends a finished pool's actors asynchronously; the next run must not share the cores with them."""
        deadline = time.time() + timeout
        while map_workers() and time.time() < deadline:
            time.sleep(0.5)

    start_ray(num_cpus=4, log_to_driver=args.verbose)
    ray.data.DataContext.get_current().enable_progress_bars = False
    lengths = dict(max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    blocks = [table.slice(i, args.batch_size) for i in range(0, table.num_rows, args.batch_size)]

    pipeline = []
    for spec in args.actors.split(","):
        n_actors, _, cpus = spec.partition("x")
        n_actors, cpus = int(n_actors), int(cpus or 1)
        cfg = dataclasses.replace(gcfg, num_actors=n_actors, num_cpus_per_actor=cpus)
        original, gen.Generator = gen.Generator, TimedGenerator
        try:  # generate() looks Generator up when it builds the plan; restore it before the plan is pickled
            ds = gen.generate(ray.data.from_arrow(blocks), model, cfg, iteration=0, seed=args.seed, **lengths)
        finally:
            gen.Generator = original
        wait_actors_gone()
        load0 = loadavg()
        with RssSampler(cmdline_containing("MapBatches(TimedGenerator)")) as rss:
            t0 = time.time()
            out = pa.concat_tables(ray.get(ds.materialize().to_arrow_refs()))
            t_end = time.time()
        tokens = sum(out.column("generated_tokens").to_pylist())
        t_first, t_last = min(out.column("_t0").to_pylist()), max(out.column("_t1").to_pylist())
        actors = []
        for pid in sorted(set(out.column("_pid").to_pylist()) | set(rss.peaks)):
            mine = out.filter(pc.equal(out.column("_pid"), pid))
            calls = set(zip(mine.column("_t0").to_pylist(), mine.column("_t1").to_pylist()))
            busy = sum(b - a for a, b in calls)
            n_tokens = sum(mine.column("generated_tokens").to_pylist())
            a = {"pid": pid, "batches": len(calls), "tokens": n_tokens, "busy_s": busy,
                 "busy_tok_s": n_tokens / busy if busy else None,
                 "init_s": None, "torch_threads": None, "peak_rss_mib": rss.peaks.get(pid, {}).get("max_rss_mib")}
            if mine.num_rows:
                a["init_s"] = mine.column("_init_t1")[0].as_py() - mine.column("_init_t0")[0].as_py()
                a["torch_threads"] = mine.column("_threads")[0].as_py()
            actors.append(a)
        texts = dict(zip(out.column("prompt_id").to_pylist(), out.column("generated").to_pylist()))
        r = {"actors": n_actors, "cpus_per_actor": cpus, "name": f"pipeline, {n_actors} actor(s) x {cpus} CPU",
             "rows": out.num_rows, "tokens": tokens, "e2e_s": t_end - t0,
             "e2e_tok_s": tokens / (t_end - t0), "until_first_batch_s": t_first - t0, "steady_s": t_last - t_first,
             "steady_tok_s": tokens / (t_last - t_first), "after_last_batch_s": t_end - t_last,
             "same_answer_as_direct": sum(texts[k] == v for k, v in direct_texts.items()) / len(direct_texts),
             "per_actor": actors, "load_avg": [load0, loadavg()], "others_cpu_share": rss.other_cpu_share}
        r["ratios"] = {f"direct_omp_{k}": {"steady": r["steady_tok_s"] / d["tok_s"],
                                           "e2e": r["e2e_tok_s"] / d["e2e_tok_s"]} for k, d in direct.items()}
        pipeline.append(r)
        print(f"{r['name']}: e2e {r['e2e_s']:.1f} s, steady {r['steady_tok_s']:.1f} tok/s")
        del ds, out

    # The warm-engine path (GenerateConfig.keep_warm, the embedded default): engines started once (EnginePool), a
    # weight reload between iterations, and each iteration's batches forwarded to them by PooledGenerator stages.
    warm = []
    for spec in filter(None, args.pool.split(",")):
        n_engines = int(spec)
        cfg = dataclasses.replace(gcfg, num_actors=n_engines, num_cpus_per_actor=1, keep_warm=True)
        wait_actors_gone()
        with RssSampler(cmdline_containing("TimedGenerator")) as rss:
            original, gen.Generator = gen.Generator, TimedGenerator
            try:  # EnginePool looks Generator up when it makes its actor class
                t0 = time.time()
                pool = gen.EnginePool(model, cfg, iteration=0, seed=args.seed, **lengths)
                start_s = time.time() - t0
            finally:
                gen.Generator = original
            t0 = time.time()
            pool.reload(model, 0)  # what each later iteration pays instead of a new engine
            reload_s = time.time() - t0
            e2e, steady = [], []
            for _ in range(2):  # two iterations' worth of generation on the same warm engines
                ds = gen.generate(ray.data.from_arrow(blocks), model, cfg, iteration=0, seed=args.seed, pool=pool,
                                  **lengths)
                t0 = time.time()
                out = pa.concat_tables(ray.get(ds.materialize().to_arrow_refs()))
                t_end = time.time()
                tokens = sum(out.column("generated_tokens").to_pylist())
                t_first, t_last = min(out.column("_t0").to_pylist()), max(out.column("_t1").to_pylist())
                e2e.append(tokens / (t_end - t0))
                steady.append(tokens / (t_last - t_first))
            pool.shutdown()
        texts = dict(zip(out.column("prompt_id").to_pylist(), out.column("generated").to_pylist()))
        r = {"name": f"warm pool, {n_engines} engine(s) x 1 CPU", "engines": n_engines, "tokens": tokens,
             "pool_start_s": start_s, "reload_s": reload_s, "e2e_tok_s": max(e2e), "steady_tok_s": max(steady),
             "e2e_tok_s_runs": e2e, "steady_tok_s_runs": steady, "torch_threads": out.column("_threads")[0].as_py(),
             "same_answer_as_direct": sum(texts[k] == v for k, v in direct_texts.items()) / len(direct_texts),
             "peak_rss_mib": max((v["max_rss_mib"] for v in rss.peaks.values()), default=None),
             "others_cpu_share": rss.other_cpu_share}
        r["ratios"] = {f"direct_omp_{k}": {"steady": r["steady_tok_s"] / d["tok_s"],
                                           "e2e_warm": r["e2e_tok_s"] / d["tok_s"]} for k, d in direct.items()}
        warm.append(r)
        print(f"{r['name']}: start {start_s:.1f} s, reload {reload_s:.3f} s, warm e2e {r['e2e_tok_s']:.1f} tok/s, "
              f"steady {r['steady_tok_s']:.1f} tok/s", flush=True)
        del ds, out, pool

    pairs = None
    if not args.skip_pairs:
        wait_actors_gone()
        with tempfile.TemporaryDirectory() as storage:
            cfg = SpinConfig.load(None, [f"model={model}", f"storage={storage}", f"seed={args.seed}",
                                         f"data.max_length={args.max_length}",
                                         f"data.max_prompt_length={args.max_prompt_length}",
                                         f"generate.max_tokens={args.max_tokens}",
                                         f"generate.batch_size={args.batch_size}", "generate.num_actors=1",
                                         "generate.num_cpus_per_actor=1"])
            with RssSampler(cmdline_containing("MapBatches(Generator)")) as rss:
                t0 = time.perf_counter()
                res = make_pairs(cfg, table)
                wall = time.perf_counter() - t0
            written = pads.dataset(res.path, format="parquet").to_table(columns=["generated_tokens"])
            tokens = sum(written.column(0).to_pylist())
        pairs = {"rows": res.rows, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
                 "others_cpu_share": rss.other_cpu_share,
                 "peak_rss_mib": {f"{v['label'].split()[0]} (pid {v['pid']})": v["max_rss_mib"]
                                  for v in rss.peaks.values()}}
        print(f"make_pairs: {wall:.1f} s")
    ray.shutdown()
    load_end = loadavg()

    print(f"\n== generation, {args.prompts} prompts x max {args.max_tokens} tokens, {os.path.basename(model)}, "
          f"{os.cpu_count()} CPU cores, no GPU; every run alone, one after another ==")
    table_rows = []

    def load(r: dict) -> str:
        return f"{r['others_cpu_share']:.0%}"

    for k, d in direct.items():
        table_rows.append([f"vLLM direct, OMP_NUM_THREADS={k}, 1 call", d["torch_threads"], d["tokens"], d["e2e_s"],
                           d["e2e_tok_s"], d["generate_s"], d["tok_s"], d["peak_rss_mib"], load(d)])
        if d["per_batch_s"]:
            table_rows.append([f"vLLM direct, OMP_NUM_THREADS={k}, per batch", d["torch_threads"],
                               d["per_batch_tokens"], None, None, d["per_batch_s"], d["per_batch_tok_s"], None, None])
    for r in pipeline:
        table_rows.append([r["name"], max(a["torch_threads"] or 0 for a in r["per_actor"]),
                           r["tokens"], r["e2e_s"], r["e2e_tok_s"], r["steady_s"], r["steady_tok_s"],
                           max((a["peak_rss_mib"] or 0) for a in r["per_actor"]), load(r)])
    print_table(["run", "threads", "tokens", "e2e s", "e2e tok/s", "steady s", "steady tok/s", "peak RSS/proc MiB",
                 "others' CPU"], table_rows)
    print("\nratios, pipeline / direct (1 call), same run; e2e includes import + engine start on both sides, "
          "steady excludes them:")
    print_table(["run", *[f"steady vs omp={k}" for k in direct], *[f"e2e vs omp={k}" for k in direct]],
                [[r["name"], *[v["steady"] for v in r["ratios"].values()],
                  *[v["e2e"] for v in r["ratios"].values()]] for r in pipeline])
    print("\nper actor:")
    print_table(["run", "pid", "threads", "init s", "batches", "tokens", "busy s", "busy tok/s", "peak RSS MiB"],
                [[r["name"], a["pid"], a["torch_threads"], a["init_s"], a["batches"], a["tokens"],
                  a["busy_s"], a["busy_tok_s"], a["peak_rss_mib"]] for r in pipeline for a in r["per_actor"]])
    print("\npipeline phases (materialize() -> first batch starts -> last batch ends -> materialize() returns):")
    print_table(["run", "until first batch s", "steady s", "after last batch s", "same answer as direct"],
                [[r["name"], r["until_first_batch_s"], r["steady_s"], r["after_last_batch_s"],
                  f"{r['same_answer_as_direct']:.0%}"] for r in pipeline])
    if pairs:
        print(f"\nmake_pairs (generate + tokenise + parquet write; 1 generation actor): "
              f"{pairs['wall_s']:.1f} s "
              f"for {pairs['rows']} rows = {pairs['tok_s']:.1f} generated tok/s end to end (others' CPU "
              f"{pairs['others_cpu_share']:.0%})")
        for k, v in pairs["peak_rss_mib"].items():
            print(f"  peak RSS {v:6.0f} MiB  {k}")
    print(f"\nload average (1, 5, 15 min): start {load_start}, end {load_end}. others' CPU: share of the "
          f"{os.cpu_count()} cores that processes outside this benchmark used during the run")
    one = next((r for r in pipeline if r["actors"] == 1 and r["cpus_per_actor"] == 1), None)
    if one:
        verdict = ", ".join(f"{v['steady']:.2f} of direct omp={k[len('direct_omp_'):]}"
                            for k, v in one["ratios"].items())
        print(f"goal, 1 actor keeps >= 0.9 of direct vLLM (steady state): {verdict}")

    write_json(args.out, {
        "benchmark": "generate", "args": vars(args), "model_path": model, "machine": machine(),
        "load_avg": {"start": load_start, "end": load_end},
        "direct": direct, "pipeline": pipeline, "warm_pool": warm, "make_pairs": pairs,
        "method": "steady = tokens / (last batch end - first batch start), stamped inside the actor; e2e = "
                  "materialize() wall incl. actor + engine start; direct e2e = import vllm + LLM() + 1 generate call"})
