"""Training tokens/s of spin_ray's Ray Train loop vs a plain single-process torch loop on the same model and batches.

Pairs: synthesized from the bundled prompts (real/generated answers filled to --response-tokens tokens, so sequences
have a realistic length rather than the tasks' 2-token answers), with reference log-probs precomputed by
spin_ray.training.step.pair_logps (the trainer's own forward, timed: the work the Ray run's reference pass does once); or an existing pairs folder
(--pairs, e.g. from `spin-ray generate`).

Plain loop: one spawned process running spin_ray's own step (spin_ray.training.step.Trainer.train_step) over
spin_ray.training.batching's batches (plan_steps, epoch_plan, even_micro_batches): the same seeded batch order, micro/global
batch, AdamW, lr schedule and grad clipping as the Ray Train workers. Two variants:
  precomputed  reference log-probs read from the pairs, as spin_ray does (one model);
  ref-model    a second copy of the model (Trainer.logps, no grad) scores every micro-batch (as uclaml/SPIN did).
Ray Train: spin_ray.stages.train.train(cfg, pairs=[folder]) with 1 and 2 workers of 1 CPU each (and 1 worker of 2 CPUs).

Threads: Ray sets OMP_NUM_THREADS=num_cpus in a worker that asks for CPUs, so a 1-CPU Train worker runs torch on one
thread. The plain loop therefore runs with OMP_NUM_THREADS=1 (like-for-like with a 1-CPU worker) and with the default
(torch takes both cores; like-for-like with a 2-CPU worker).

Throughput, both sides alike: tokens (train_step's real tokens of the flattened micro-batches) of steps 2..N / (end
time of step N - end time of step 1), from `<storage>/iter_0/train_metrics.jsonl` for Ray Train and from the same
stamps in the plain loop, so start-up and the first step are excluded. fit() wall (train() call, start-up and final
save included) is reported beside it. Peak RSS: psutil samples the plain process and every RayTrainWorker process every 0.25 s.
Runs are sequential, never two at once. The plain process and Ray's workers both run at niceness 0
(RAY_worker_niceness=0; Ray's default of 15 starved them behind other users' jobs on the shared machine), so that other
users' load hits both sides alike; "others' CPU" says how much of the cores other processes took per run.

    python benchmarks/train.py                          # SmolLM2-135M, 48 pairs, micro 4, global 8, 1 epoch
    python benchmarks/train.py --model tiny --pairs-count 128
"""

import os

# Before ray/vllm are imported; the spawned plain-loop processes read them too.
os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
                  RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                  RAY_worker_niceness="0")


def plain_loop(model_path: str, rows: list[dict], *, micro: int, global_batch: int, epochs: int, lr: float,
               beta: float, warmup_ratio: float, max_grad_norm: float, seed: int, ref_model: bool) -> dict:
    """spin_ray's own step (Trainer.train_step) over spin_ray.training.batching's batches, single process, no Ray; `ref_model`:
    a second Trainer's no-grad `logps` give the reference on every micro-batch instead of the stored column."""
    import resource
    import time

    import pyarrow as pa
    import torch

    from spin_ray.config import TrainConfig
    from spin_ray.training.batching import epoch_plan, even_micro_batches, plan_steps
    from spin_ray.stages.train import packed_lengths
    from spin_ray.training.step import Trainer

    t_start = time.time()
    torch.manual_seed(seed)
    tc = TrainConfig(micro_batch_size=micro, global_batch_size=global_batch, epochs=epochs, lr=lr, beta=beta,
                     warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm, optimizer="adamw")
    steps = plan_steps(len(rows), global_batch, 1)
    total = len(steps) * epochs
    trainer = Trainer(model_path, tc, total_steps=total)
    trainer.setup()
    ref = None
    if ref_model:
        ref = Trainer(model_path, tc, total_steps=total)
        ref.setup()
    lengths = packed_lengths(pa.Table.from_pylist(rows)).tolist()
    records = []
    for step in range(total):
        epoch, k = divmod(step, len(steps))
        if k == 0:
            _, plan = epoch_plan(lengths, steps, seed, epoch, 1)
        batches = [[rows[j] for j in idx] for idx in even_micro_batches(plan[k], lengths, max_pairs=micro,
                                                                         max_tokens=None)[0]]
        ref_s = 0.0
        if ref is not None:
            r0 = time.perf_counter()
            batches = [[{**p, "ref_logp_real": float(r), "ref_logp_generated": float(g)}
                        for p, r, g in zip(pairs, *logps)] for pairs, logps in zip(batches, ref.logps(batches))]
            ref_s = time.perf_counter() - r0
        t0 = time.perf_counter()
        metrics = trainer.train_step(batches)
        records.append({"step": step + 1, "tokens": metrics["tokens"], "seconds": time.perf_counter() - t0 + ref_s,
                        "time": time.time(), "loss": metrics["loss"], "ref_forward_s": ref_s})
    return {"steps": records, "start_s": records[0]["time"] - records[0]["seconds"] - t_start,
            "torch_threads": torch.get_num_threads(),
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _plain_entry(conn, nice: int, args, kwargs) -> None:
    os.nice(nice)  # the Ray workers' niceness (RAY_worker_niceness): others' load then hits both sides alike
    conn.send(plain_loop(*args, **kwargs))


def steady(steps: list[dict]) -> dict:
    """Tokens of steps 2..N over the time from the end of step 1 to the end of step N."""
    if len(steps) < 2:
        raise SystemExit("need at least 2 optimizer steps: raise --pairs-count or lower --global-batch")
    tokens = sum(s["tokens"] for s in steps[1:])
    seconds = steps[-1]["time"] - steps[0]["time"]
    return {"steps": len(steps), "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
            "s_per_step": seconds / (len(steps) - 1), "first_loss": steps[0]["loss"],
            "losses": [s["loss"] for s in steps]}


if __name__ == "__main__":
    import argparse
    import gc
    import json
    import multiprocessing
    import sys
    import tempfile
    import time

    import psutil
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import (RssSampler, loadavg, machine, pid_in, print_table, read_pairs_table, start_ray,
                         synthetic_pairs, write_json)

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help='"smollm2-135m", "tiny" or an HF folder')
    ap.add_argument("--pairs", help="an existing pairs folder (with _SUCCESS.json); default: synthesize")
    ap.add_argument("--pairs-count", type=int, default=48, help="pairs to synthesize")
    ap.add_argument("--response-tokens", type=int, default=32, help="tokens of each synthesized answer")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-prompt-length", type=int, default=128)
    ap.add_argument("--workers", default="1,2,1x2",
                    help="Ray Train variants: N (N workers of 1 CPU) or NxC (N workers of C CPUs), comma-separated")
    ap.add_argument("--plain-threads", default="1,default",
                    help="plain-loop OMP_NUM_THREADS settings (an int, or 'default' to leave it unset)")
    ap.add_argument("--ref-threads", default="1", help="thread settings at which the ref-model variant also runs")
    ap.add_argument("--baseline-nice", type=int, default=0,
                    help="niceness of the plain-loop process (= RAY_worker_niceness, set to 0 for the Ray workers)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--verbose", action="store_true", help="show the workers' logs")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train.json"))
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from spin_ray.data import records
    from spin_ray.config import SpinConfig
    from spin_ray.models.builders import resolve_model
    from spin_ray.config import TrainConfig
    from spin_ray.data.schemas import IDS, LOGPS
    from spin_ray.training.template import encode_pair
    from spin_ray.training.step import frozen_model, pair_logps

    load_start = loadavg()
    print(f"load average at start: {load_start}")
    model = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model)
    work = tempfile.mkdtemp(prefix="spin-bench-train-")
    score_s = None
    if args.pairs:
        pairs_dir = records.absolute(args.pairs)
    else:
        rows = [{**r, "iteration": 0, "finish_reason": "length", "generated_tokens": args.response_tokens}
                for r in synthetic_pairs(tok, args.pairs_count, args.response_tokens)]
        # The plain loop's precomputed reference: θ_0's log-probs by the trainer's own forward (what Ray Train's
        # reference pass computes at the start of its run).
        ref_model = frozen_model(model, TrainConfig(), torch.device("cpu"))
        t0 = time.perf_counter()
        encoded = [encode_pair(tok, r["prompt"], r["real"], r["generated"], max_length=args.max_length,
                               max_prompt_length=args.max_prompt_length) for r in rows]
        logps = pair_logps(ref_model, [encoded[i:i + 8] for i in range(0, len(encoded), 8)], torch.device("cpu"))
        score_s = time.perf_counter() - t0
        for r, e in zip(rows, encoded):
            r.update({key: e[key] for key in IDS})
        del ref_model
        gc.collect()
        refs = [(a, b) for real, gen in logps for a, b in zip(real.tolist(), gen.tolist())]
        for r, (a, b) in zip(rows, refs):
            r["ref_logp_real"], r["ref_logp_generated"] = a, b
        pairs_dir = os.path.join(work, "pairs")
        os.makedirs(pairs_dir)
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(pairs_dir, "part-0.parquet"))
        with open(os.path.join(pairs_dir, records.MARKER), "w") as f:
            json.dump({"rows": len(rows)}, f)
    # the ids the trainer reads, and the synthesized pairs' reference
    rows = read_pairs_table([pairs_dir], columns=list(IDS) + (list(LOGPS) if score_s else [])).to_pylist()
    if score_s is None:  # an existing pairs folder: θ_0's log-probs as the reference, as above
        ref_model = frozen_model(model, TrainConfig(), torch.device("cpu"))
        logps = pair_logps(ref_model, [rows[i:i + 8] for i in range(0, len(rows), 8)], torch.device("cpu"))
        del ref_model
        refs = [(a, b) for real, gen in logps for a, b in zip(real.tolist(), gen.tolist())]
        for r, (a, b) in zip(rows, refs):
            r.update(zip(LOGPS, (a, b)))
    lens = [len(r["prompt_ids"]) + (len(r["real_ids"]) + len(r["generated_ids"])) / 2 for r in rows]
    print(f"{len(rows)} pairs, mean {sum(lens) / len(lens):.0f} tokens per sequence, model {model}"
          + (f"; reference log-probs precomputed in {score_s:.1f} s" if score_s else ""))

    common = dict(micro=args.micro_batch, global_batch=args.global_batch, epochs=args.epochs, lr=args.lr, beta=0.1,
                  warmup_ratio=0.1, max_grad_norm=1.0, seed=args.seed)  # beta .. max_grad_norm: TrainConfig's

    # --- plain loops, each in its own spawned process
    mp = multiprocessing.get_context("spawn")
    plain = []
    for threads in args.plain_threads.split(","):
        for ref in ([False, True] if threads in args.ref_threads.split(",") else [False]):
            saved = os.environ.pop("OMP_NUM_THREADS", None)
            if threads != "default":
                os.environ["OMP_NUM_THREADS"] = threads
            recv, send = mp.Pipe(duplex=False)
            proc = mp.Process(target=_plain_entry,
                              args=(send, args.baseline_nice, (model, rows), {**common, "ref_model": ref}))
            load0 = loadavg()
            t0 = time.perf_counter()
            proc.start()
            send.close()  # ours closed, so a dead child reads as EOF
            os.environ.pop("OMP_NUM_THREADS", None)
            if saved is not None:
                os.environ["OMP_NUM_THREADS"] = saved
            with RssSampler(pid_in({proc.pid}, "plain")) as rss:
                try:
                    res = recv.recv()
                except EOFError:  # the child died (its traceback is above): fail rather than wait on a dead pipe
                    proc.join()
                    raise SystemExit(f"{proc.name} exited with code {proc.exitcode} before sending its results")
            proc.join()
            wall = time.perf_counter() - t0
            r = {"name": f"plain, OMP_NUM_THREADS={threads}, {'ref-model' if ref else 'precomputed'}",
                 "threads": res["torch_threads"], "ref_model": ref, "wall_s": wall, **steady(res["steps"]),
                 "ref_forward_s_per_step": sum(s["ref_forward_s"] for s in res["steps"][1:]) / (len(res["steps"]) - 1),
                 "peak_rss_mib": max(v["max_rss_mib"] for v in rss.peaks.values()),
                 "ru_maxrss_mib": res["ru_maxrss_mib"], "load_avg": [load0, loadavg()],
                 "others_cpu_share": rss.other_cpu_share}
            plain.append(r)
            print(f"{r['name']}: {r['tok_s']:.1f} tok/s, {r['s_per_step']:.2f} s/step, peak RSS "
                  f"{r['peak_rss_mib']:.0f} MiB")

    # --- Ray Train
    import ray
    import ray.data

    from spin_ray.stages.train import train

    def train_workers(p: psutil.Process) -> str | None:
        cmd = " ".join(p.cmdline())
        return cmd.split()[0] if "RayTrainWorker" in cmd else None

    start_ray(num_cpus=4, log_to_driver=args.verbose)
    ray.data.DataContext.get_current().enable_progress_bars = False

    @ray.remote
    class Probe:
        def threads(self) -> int:
            import torch
            return torch.get_num_threads()

    def worker_threads(cpus: int) -> int:
        """torch's threads in a fresh actor process asking for `cpus` CPUs, as a Train worker: Ray sets
        OMP_NUM_THREADS from the request (a task would reuse a pooled process whose torch is already set up)."""
        probe = Probe.options(num_cpus=cpus).remote()
        threads = ray.get(probe.threads.remote())
        ray.kill(probe)
        return threads

    raytrain = []
    for spec in args.workers.split(","):
        n, _, c = spec.partition("x")
        n, c = int(n), int(c or 1)
        storage = os.path.join(work, f"ray_{n}x{c}")
        cfg = SpinConfig.load(None, [f"model={model}", f"storage={storage}", f"seed={args.seed}",
                                     f"data.max_length={args.max_length}",
                                     f"data.max_prompt_length={args.max_prompt_length}",
                                     f"train.num_workers={n}", f"train.num_cpus_per_worker={c}",
                                     f"train.micro_batch_size={args.micro_batch}",
                                     f"train.global_batch_size={args.global_batch}", f"train.epochs={args.epochs}",
                                     f"train.lr={args.lr}", "train.optimizer=adamw",
                                     # preflight wants room for a prompt beside the (unused) answer length
                                     f"generate.max_tokens={args.max_length // 2}"])
        load0 = loadavg()
        with RssSampler(train_workers) as rss:
            t0, unix0 = time.perf_counter(), time.time()
            result = train(cfg, pairs=[pairs_dir])
            wall, unix1 = time.perf_counter() - t0, time.time()
        with open(os.path.join(storage, "iter_0", "train_metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        if "time" not in lines[0]:  # older trainer: fall back to the steps' own durations (misses between-step time)
            clock = 0.0
            for m in lines:
                clock += m["tokens"] / m["tokens_per_s"]
                m["time"] = clock
        first_start = lines[0]["time"] - lines[0]["tokens"] / lines[0]["tokens_per_s"]
        r = {"name": f"Ray Train, {n} worker(s) x {c} CPU", "workers": n, "cpus_per_worker": c, "wall_s": wall,
             "train_seconds": result.seconds, **steady(lines),
             # where fit() time goes: start-up until step 1 begins, and checkpoint + publish after the last step
             "until_first_step_s": first_start - unix0, "after_last_step_s": unix1 - lines[-1]["time"],
             "worker_tokens_per_s_mean": sum(m["tokens_per_s"] for m in lines[1:]) / (len(lines) - 1),
             "per_worker": sorted(rss.peaks.values(), key=lambda v: v["pid"]),
             "load_avg": [load0, loadavg()], "others_cpu_share": rss.other_cpu_share}
        r["peak_rss_mib"] = max((w["max_rss_mib"] for w in r["per_worker"]), default=None)
        r["threads"] = worker_threads(c)
        raytrain.append(r)
        print(f"{r['name']}: {r['tok_s']:.1f} tok/s, fit() {wall:.1f} s")
    ray.shutdown()
    load_end = loadavg()

    def baseline(threads: str) -> dict | None:
        return next((p for p in plain if p["name"] == f"plain, OMP_NUM_THREADS={threads}, precomputed"), None)

    base1, base_default = baseline("1"), baseline("default")
    print(f"\n== SPIN training, {len(rows)} pairs, micro {args.micro_batch}, global {args.global_batch}, "
          f"{args.epochs} epoch(s), max_length {args.max_length}, {os.path.basename(model)}, {os.cpu_count()} CPU "
          f"cores, no GPU; every run alone, one after another ==")
    heads = ["run", "threads", "steps", "tok/s (steps 2..N)", "s/step", "wall s", "peak RSS/proc MiB", "step-1 loss",
             "others' CPU"]
    ratio_heads, ratio_of = [], []
    for label, b in (("vs plain omp=1", base1), ("vs plain default", base_default)):
        if b:
            ratio_heads.append(label)
            ratio_of.append(b)
    print_table(heads + ratio_heads,
                [[r["name"], r["threads"], r["steps"], r["tok_s"], r["s_per_step"], r["wall_s"], r["peak_rss_mib"],
                  r["first_loss"], f"{r['others_cpu_share']:.0%}",
                  *[r["tok_s"] / b["tok_s"] for b in ratio_of]] for r in plain + raytrain])
    print("\nratios: tokens/s over the ratio column's plain loop (precomputed reference), same run. wall s: the "
          "process / train() call, start-up and (Ray Train) final checkpoint + model publish included.")

    refs = [p for p in plain if p["ref_model"]]
    if refs:
        print("\nprecomputed reference log-probs vs an in-memory reference model (plain loop):")
        rows_out = []
        for rr in refs:
            pre = next(p for p in plain if not p["ref_model"] and p["threads"] == rr["threads"])
            rows_out.append([rr["name"].split(", ")[1], pre["s_per_step"], rr["s_per_step"],
                             rr["ref_forward_s_per_step"], rr["s_per_step"] / pre["s_per_step"],
                             pre["peak_rss_mib"], rr["peak_rss_mib"], rr["peak_rss_mib"] - pre["peak_rss_mib"]])
        print_table(["threads", "s/step precomputed", "s/step ref-model", "ref forward s/step", "time x",
                     "peak RSS precomputed MiB", "peak RSS ref-model MiB", "extra MiB"], rows_out)
        if score_s:
            print(f"(precomputing all {len(rows)} pairs' reference log-probs took {score_s:.1f} s, once, in the driver "
                  "with default threads)")

    print("\nRay Train wall time, where it goes (s):")
    print_table(["run", "train() wall", "until step 1 starts", "step 1", "steps 2..N", "after last step"],
                [[r["name"], r["wall_s"], r["until_first_step_s"], r["wall_s"] - r["until_first_step_s"] - r["seconds"]
                  - r["after_last_step_s"], r["seconds"], r["after_last_step_s"]] for r in raytrain])
    print("\nper Ray Train worker:")
    print_table(["run", "pid", "title", "seen from s", "to s", "peak RSS MiB"],
                [[r["name"], w["pid"], w["label"], w["first_seen_s"], w["last_seen_s"], w["max_rss_mib"]]
                 for r in raytrain for w in r["per_worker"]])
    for r in raytrain:  # same batches, same seed: the per-step losses should agree with the plain loop's
        b = base1 if r["cpus_per_worker"] == 1 else base_default
        if b and len(b["losses"]) == len(r["losses"]):
            r["max_loss_diff_vs_plain"] = max(abs(x - y) for x, y in zip(b["losses"], r["losses"]))
            print(f"{r['name']}: max |loss - plain loss| over steps = {r['max_loss_diff_vs_plain']:.2e}")
    print(f"\nload average (1, 5, 15 min): start {load_start}, end {load_end}. others' CPU: share of the "
          f"{os.cpu_count()} cores that processes outside this benchmark used during the run")
    one = next((r for r in raytrain if r["workers"] == 1 and r["cpus_per_worker"] == 1), None)
    if one and base1:
        print(f"goal, 1 Ray Train worker keeps >= 0.9 of the plain loop: {one['tok_s'] / base1['tok_s']:.2f} "
              f"(1 CPU worker vs plain OMP_NUM_THREADS=1)"
              + (f", {one['tok_s'] / base_default['tok_s']:.2f} vs plain default threads" if base_default else ""))

    write_json(args.out, {
        "benchmark": "train", "args": vars(args), "model_path": model, "machine": machine(),
        "pairs": {"path": pairs_dir, "rows": len(rows), "mean_tokens_per_sequence": sum(lens) / len(lens),
                  "precompute_ref_logps_s": score_s},
        "load_avg": {"start": load_start, "end": load_end}, "plain": plain, "ray_train": raytrain,
        "method": "tok/s = tokens of steps 2..N / (end of step N - end of step 1); Ray Train from train_metrics.jsonl"})
