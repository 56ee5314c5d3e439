"""One full SPIN iteration of the embedded default, split by stage, and how each stage's time grows with the prompts.

`spin_ray.stages.loop.run` with spin_ray/assets/cpu_default.yaml (model tasks-sft, warm engines, 2-CPU Train worker) and
loop.iterations=2, loop.window=2, so that iteration 1 has every stage: engines (θ_1 reloaded into the warm engines),
evaluation of θ_1 and θ_2, generation + write of its pairs, training, whose first pass is θ_1's reference log-probs
of both iterations' pairs. Iteration 0's `engines` is their start instead of a reload, and its reference pass
covers its own pairs only. Per stage, from IterationResult.seconds: `engines` (`handoff` in results before
2026-12-07), `eval` (before + after), `generate` (the pairs stage's wall), `reference` (the reference pass, as the
workers timed it), `train` (the rest of the fit).

Growth: data.max_rows = N, 2N, 4N prompts (--prompts N); seconds per prompt for generate, reference and train at each size,
and the ratio of 4N's to N's (flat = 1.0; a fixed start-up cost makes it fall below 1). Evaluation uses a fixed
--eval-rows and is left out of the growth ratio. Peak RSS per actor and Train worker (psutil, every 0.25 s) and
others' CPU for each run. One Ray cluster of our own for every run (its own temp dir); a fresh storage per run.

    python benchmarks/iteration.py --prompts 64 --repeats 3
"""

import os

os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
                  RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                  RAY_worker_niceness="0")

STAGES = ("engines", "eval", "generate", "reference", "train")


def split(seconds: dict) -> dict:
    """IterationResult.seconds as the stages of one iteration; the fit's wall is the reference pass + the rest."""
    out = {"engines": seconds.get("engines", 0.0), "eval": seconds["eval"], "generate": seconds["pairs"],
           "reference": seconds["reference"], "train": seconds["train"] - seconds["reference"]}
    out["total"] = sum(out.values())
    out["busy_generate"] = seconds.get("generate", 0.0)
    return out


if __name__ == "__main__":
    import argparse
    import logging
    import sys
    import tempfile
    import time

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import RssSampler, cmdline_containing, loadavg, machine, start_ray, write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=64, help="N: runs with N, 2N and 4N prompts")
    ap.add_argument("--scales", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eval-rows", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "iteration.json"))
    args = ap.parse_args()

    import ray

    from spin_ray.config import SpinConfig
    from spin_ray.stages.loop import run

    logging.basicConfig(level=logging.WARNING)
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "spin_ray", "assets", "cpu_default.yaml")
    start_ray(num_cpus=4, log_to_driver=False,
              runtime_env={"env_vars": {k: os.environ[k] for k in ("VLLM_ENABLE_V1_MULTIPROCESSING",
                                                                  "VLLM_CPU_KVCACHE_SPACE",
                                                                  "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
                                                                  "TOKENIZERS_PARALLELISM")}})
    runs = []
    for rep in range(args.repeats):
        for scale in map(int, args.scales.split(",")):
            n = args.prompts * scale
            storage = tempfile.mkdtemp(prefix="spin-bench-iter-")
            cfg = SpinConfig.load(default, [f"storage={storage}", f"data.max_rows={n}", "loop.iterations=2",
                                            "loop.window=2", f"eval.rows={args.eval_rows}"])
            labels = cmdline_containing("Generator", "RayTrainWorker", "MapWorker", "_score_rows")
            with RssSampler(labels) as rss:
                t0 = time.perf_counter()
                results = run(cfg)
                wall = time.perf_counter() - t0
            peaks: dict[str, float] = {}
            for v in rss.peaks.values():  # per kind of process: the largest one
                kind = v["label"].split()[0]
                peaks[kind] = max(peaks.get(kind, 0.0), v["max_rss_mib"])
            r = {"repeat": rep, "prompts": n, "wall_s": wall, "others_cpu_share": rss.other_cpu_share,
                 "iterations": [split(x.seconds) for x in results], "peak_rss_mib": peaks,
                 "rows": [x.pairs.rows for x in results]}
            runs.append(r)
            it = r["iterations"][-1]
            print(f"rep {rep} prompts {n}: wall {wall:.1f} s; iteration 1: "
                  + ", ".join(f"{k} {it[k]:.1f}" for k in (*STAGES, "total")), flush=True)
    ray.shutdown()
    write_json(args.out, {"benchmark": "iteration", "args": vars(args), "machine": machine(),
                          "load_avg_end": loadavg(), "runs": runs})
