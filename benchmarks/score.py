"""Pairs/s of spin_ray's scoring stage (Ray Data -> pool of Scorer actors) vs a direct transformers forward.

Same pairs (bundled prompts; real and generated answers filled to --response-tokens tokens of other rows' text, as
benchmarks/train.py does), same model, dtype (float32) and micro-batch size on both sides.

Baseline, "direct": a spawned process (niceness 0, as the Ray workers here: RAY_worker_niceness=0) loads the tokenizer
and model, tokenises every pair (template.encode_pair: the chat template and truncation rule every stage shares) and
runs a plain no-grad forward per micro-batch in the pairs' own order: `model(input_ids, attention_mask).logits`,
log_softmax, gather, sum over the answer tokens. Run with OMP_NUM_THREADS=1 (like for like with a 1-CPU actor) and
with the default (both cores).

Pipeline: spin_ray.score.score on `ray.data.from_arrow(blocks of --batch-size)` (no token-id columns: the scorer
tokenises, as after generation), materialized, with the --actors variants. Steady = pairs / (first batch start -> last
batch end), stamped inside the actor by a benchmark-only subclass of Scorer (model load excluded); e2e = the wall time
of materialize() (actor start and model load included). Direct steady = tokenise + forward; direct e2e adds the
import and model load.

    python benchmarks/score.py                       # tasks-sft, 512 pairs
    python benchmarks/score.py --model smollm2-135m --pairs 128
"""

import os

os.environ.update(HF_HUB_OFFLINE="1", RAY_worker_niceness="0", TOKENIZERS_PARALLELISM="false")


def direct_run(model: str, rows: list[dict], micro: int, max_length: int, max_prompt_length: int) -> dict:
    import resource
    import time

    t0 = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spin_ray.template import collate, encode_pair
    t1 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    t2 = time.perf_counter()
    enc = [encode_pair(tok, r["prompt"], r["real"], r["generated"], max_length=max_length,
                       max_prompt_length=max_prompt_length) for r in rows]
    t3 = time.perf_counter()
    out, tokens = [], 0
    with torch.no_grad():
        for i in range(0, len(enc), micro):
            b = collate(enc[i:i + micro], tok.pad_token_id)
            logits = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            labels = b["labels"][:, 1:]
            lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            out += (lp * (labels >= 0)).sum(-1)[:len(enc[i:i + micro])].tolist()  # the real answers' (first B)
            tokens += int(b["attention_mask"].sum())
    t4 = time.perf_counter()
    return {"import_s": t1 - t0, "load_s": t2 - t1, "tokenize_s": t3 - t2, "forward_s": t4 - t3, "tokens": tokens,
            "torch_threads": torch.get_num_threads(), "logps": out,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _direct_entry(conn, nice: int, *args) -> None:
    os.nice(nice)  # the Ray workers' niceness: others' load then hits both sides alike
    conn.send(direct_run(*args))


if __name__ == "__main__":
    import argparse
    import multiprocessing
    import sys
    import time

    import pyarrow as pa

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import (RssSampler, cmdline_containing, loadavg, machine, pid_in, print_table, start_ray,
                         synthetic_pairs, write_json)

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tasks-sft", help='"tasks-sft", "tiny", "smollm2-135m" or an HF folder')
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--response-tokens", type=int, default=16, help="tokens of each synthesized answer")
    ap.add_argument("--batch-size", type=int, default=128, help="ScoreConfig.batch_size (pairs per actor call)")
    ap.add_argument("--micro-batch", type=int, default=64, help="ScoreConfig.micro_batch_size")
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--max-prompt-length", type=int, default=64)
    ap.add_argument("--actors", default="1,2,1x2", help="N (N actors of 1 CPU) or NxC, comma-separated")
    ap.add_argument("--direct-threads", default="1,default")
    ap.add_argument("--baseline-nice", type=int, default=0, help="niceness of the direct process")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "score.json"))
    args = ap.parse_args()

    import ray
    import ray.data
    from transformers import AutoTokenizer

    import spin_ray.score as sc
    from spin_ray.config import ScoreConfig
    from spin_ray.models import resolve_model

    model = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model)
    rows = synthetic_pairs(tok, args.pairs, args.response_tokens)
    lengths = dict(max_length=args.max_length, max_prompt_length=args.max_prompt_length)

    mp = multiprocessing.get_context("spawn")
    direct, ref_logps = {}, None
    for threads in args.direct_threads.split(","):
        saved = os.environ.pop("OMP_NUM_THREADS", None)
        if threads != "default":
            os.environ["OMP_NUM_THREADS"] = threads
        recv, send = mp.Pipe(duplex=False)
        proc = mp.Process(target=_direct_entry, args=(send, args.baseline_nice, model, rows, args.micro_batch,
                                                       args.max_length, args.max_prompt_length))
        proc.start()
        send.close()
        os.environ.pop("OMP_NUM_THREADS", None)
        if saved is not None:
            os.environ["OMP_NUM_THREADS"] = saved
        with RssSampler(pid_in({proc.pid}, "direct")) as rss:
            try:
                d = recv.recv()
            except EOFError:
                proc.join()
                raise SystemExit(f"direct scoring process exited with code {proc.exitcode}")
        proc.join()
        ref_logps = ref_logps or d.pop("logps")
        d.pop("logps", None)
        d.update(omp_num_threads=threads, others_cpu_share=rss.other_cpu_share,
                 peak_rss_mib=max(v["max_rss_mib"] for v in rss.peaks.values()))
        d["steady_s"] = d["tokenize_s"] + d["forward_s"]
        d["e2e_s"] = d["import_s"] + d["load_s"] + d["steady_s"]
        d["pairs_s"], d["e2e_pairs_s"] = args.pairs / d["steady_s"], args.pairs / d["e2e_s"]
        d["tokenize_share"] = d["tokenize_s"] / d["steady_s"]
        direct[threads] = d
        print(f"direct, OMP_NUM_THREADS={threads}: tokenize {d['tokenize_s']:.2f} s, forward {d['forward_s']:.2f} s "
              f"-> {d['pairs_s']:.1f} pairs/s", flush=True)

    class TimedScorer(sc.Scorer):
        """spin_ray's Scorer, plus per-batch wall-clock stamps (benchmark only)."""

        def __call__(self, batch: pa.Table) -> pa.Table:
            import torch

            t0 = time.time()
            out = super().__call__(batch)
            n = out.num_rows
            return (out.append_column("_t0", pa.array([t0] * n, pa.float64()))
                    .append_column("_t1", pa.array([time.time()] * n, pa.float64()))
                    .append_column("_pid", pa.array([os.getpid()] * n, pa.int64()))
                    .append_column("_threads", pa.array([torch.get_num_threads()] * n, pa.int64())))

    start_ray(num_cpus=4, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    table = pa.Table.from_pylist(rows)
    blocks = [table.slice(i, args.batch_size) for i in range(0, table.num_rows, args.batch_size)]
    pipeline = []
    for spec in args.actors.split(","):
        n_actors, _, cpus = spec.partition("x")
        n_actors, cpus = int(n_actors), int(cpus or 1)
        cfg = ScoreConfig(num_actors=n_actors, num_cpus_per_actor=cpus, batch_size=args.batch_size,
                          micro_batch_size=args.micro_batch)
        original, sc.Scorer = sc.Scorer, TimedScorer
        try:
            ds = sc.score(ray.data.from_arrow(blocks), model, cfg, **lengths)
        finally:
            sc.Scorer = original
        time.sleep(2)  # the previous pool's actors end asynchronously
        with RssSampler(cmdline_containing("MapBatches(TimedScorer)")) as rss:
            t0 = time.time()
            out = pa.concat_tables(ray.get(ds.materialize().to_arrow_refs()))
            t_end = time.time()
        t_first, t_last = min(out.column("_t0").to_pylist()), max(out.column("_t1").to_pylist())
        got = dict(zip(out.column("prompt_id").to_pylist(), out.column("ref_logp_real").to_pylist()))
        diff = max(abs(got[r["prompt_id"]] - ref_logps[i]) for i, r in enumerate(rows))
        r = {"name": f"spin_ray scorer, {n_actors} actor(s) x {cpus} CPU", "actors": n_actors, "cpus_per_actor": cpus,
             "e2e_s": t_end - t0, "steady_s": t_last - t_first, "pairs_s": args.pairs / (t_last - t_first),
             "e2e_pairs_s": args.pairs / (t_end - t0), "until_first_batch_s": t_first - t0,
             "torch_threads": max(out.column("_threads").to_pylist()),
             "actors_used": len(set(out.column("_pid").to_pylist())),
             "peak_rss_mib": max((v["max_rss_mib"] for v in rss.peaks.values()), default=None),
             "max_abs_logp_diff_vs_direct": diff, "others_cpu_share": rss.other_cpu_share}
        r["ratios"] = {f"direct_omp_{k}": {"steady": r["pairs_s"] / d["pairs_s"],
                                           "e2e": r["e2e_pairs_s"] / d["e2e_pairs_s"]} for k, d in direct.items()}
        pipeline.append(r)
        print(f"{r['name']}: e2e {r['e2e_s']:.1f} s, steady {r['pairs_s']:.1f} pairs/s", flush=True)
        del ds, out
    ray.shutdown()

    print_table(["run", "threads", "steady pairs/s", "e2e s", "peak RSS MiB", "others' CPU"],
                [[f"direct, OMP_NUM_THREADS={k}", d["torch_threads"], d["pairs_s"], d["e2e_s"], d["peak_rss_mib"],
                  f"{d['others_cpu_share']:.0%}"] for k, d in direct.items()]
                + [[r["name"], r["torch_threads"], r["pairs_s"], r["e2e_s"], r["peak_rss_mib"],
                    f"{r['others_cpu_share']:.0%}"] for r in pipeline])
    write_json(args.out, {"benchmark": "score", "args": vars(args), "model_path": model, "machine": machine(),
                          "load_avg_end": loadavg(), "direct": direct, "pipeline": pipeline,
                          "logp_check": "log π(real | x) per pair, scorer vs direct"})
