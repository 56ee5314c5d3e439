"""The prepare stage at scale: driver memory and time of `spin-ray prepare` on synthetic chat data, against the old
in-driver read (`data.load_sft`) as the baseline.

Data: chat jsonl (`messages`: one user turn of 20–200 words, one assistant answer of 50–400 words, words drawn from a
seeded vocabulary) in --files files; 2% of the rows repeat a row of another file (dropped as duplicates), 0.1% are
bad (a number as the answer, in every file including the last), skipped with data.on_bad_rows=skip. Rows written
must equal the distinct good rows.

Each size runs `spin-ray prepare` as a subprocess (its own local Ray cluster, the CLI as a user runs it); the peak
RSS is that of the CLI process alone (psutil polling of its pid every 0.2 s: the driver, not Ray's workers, which
hold the rows now), the time is the prepare stage's own (the CLI's `seconds`, Ray start-up excluded) and the whole
command's wall. The baseline loads the smallest size with `load_sft` in a subprocess of its own, measured alike.

    python benchmarks/data_scale.py                              # 100k and 1M rows, baseline at 100k
    python benchmarks/data_scale.py --sizes 100000 --files 4     # quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import loadavg, machine, print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DUPLICATES, BAD = 0.02, 0.001


def write_data(folder: Path, rows: int, files: int, seed: int = 0) -> dict[str, int]:
    """`rows` lines over `files` jsonl files; returns how many are distinct good rows, repeats and bad rows."""
    rng = random.Random(seed)
    vocab = [f"w{rng.randrange(50_000)}" for _ in range(5_000)]
    text = [rng.choice(vocab) for _ in range(1_000_000)]  # slices of one long text: fast, varied enough

    def words(lo: int, hi: int) -> str:
        n = rng.randint(lo, hi)
        start = rng.randrange(len(text) - n)
        return " ".join(text[start:start + n])

    per_file = -(-rows // files)
    kept: list[str] = []  # good lines written so far (the first 10k), to repeat later
    counts = {"rows": 0, "bad": 0, "distinct_good": 0, "duplicates": 0}
    written = 0
    folder.mkdir(parents=True)
    for f in range(files):
        with open(folder / f"part-{f:03d}.jsonl", "w") as out:
            for i in range(written, min(rows, written + per_file)):
                # Spread evenly by index, so every file has some of each kind.
                r = (i * 7919) % 1000
                if BAD * 1000 <= r < (BAD + DUPLICATES) * 1000 and kept:
                    line, kind = kept[rng.randrange(len(kept))], "duplicates"
                elif r < BAD * 1000:
                    line, kind = json.dumps({"messages": [{"role": "user", "content": words(20, 200)},
                                                          {"role": "assistant", "content": 7}]}), "bad"
                else:  # unique by its leading index
                    line = json.dumps({"messages": [{"role": "user", "content": f"{i}: {words(20, 200)}"},
                                                    {"role": "assistant", "content": words(50, 400)}]})
                    kind = "distinct_good"
                    if len(kept) < 10_000:
                        kept.append(line)
                out.write(line + "\n")
                counts[kind] += 1
                counts["rows"] += 1
        written = min(rows, written + per_file)
    return counts


def measure(args: list[str], env: dict[str, str]) -> dict:
    """Run `args`; the peak RSS of that process alone (not its children) and its wall time."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    me, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, me.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{args[:4]} failed ({proc.returncode}): {err[-2000:]}")
    return {"peak_rss_mib": round(peak / 2**20, 1), "wall_s": round(time.perf_counter() - start, 1), "stdout": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,1000000", help="rows per run, comma-separated")
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--workdir", default="/tmp", help="where the data and the prompts go (removed after each size)")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_scale.json"))
    a = p.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "local", "HF_HUB_OFFLINE": "1"}
    sizes = [int(s) for s in a.sizes.split(",")]
    results = {"machine": machine(), "loadavg_before": loadavg(), "files": a.files, "runs": []}
    table = []
    for i, size in enumerate(sizes):
        work = Path(tempfile.mkdtemp(prefix="spin-data-scale-", dir=a.workdir))
        try:
            t = time.perf_counter()
            counts = write_data(work / "data", size, a.files)
            data_mib = sum(f.stat().st_size for f in (work / "data").iterdir()) / 2**20
            print(f"{size} rows: {data_mib:.0f} MiB of jsonl written in {time.perf_counter() - t:.0f} s {counts}",
                  flush=True)
            run = measure([sys.executable, "-m", "spin_ray.cli", "prepare", "--json",
                           "--set", f"storage={work / 'store'}", "--set", f"data.path={work / 'data'}",
                           "--set", "data.max_rows=null", "--set", "data.on_bad_rows=skip",
                           "--set", "eval.enabled=false"], env)
            out = _result(run)
            assert out["rows"] == counts["distinct_good"], (out, counts)
            assert out["duplicates"] == counts["duplicates"] and sum(out["bad_rows"].values()) == counts["bad"]
            row = {"path": "prepare (Ray Data)", "rows": size, "data_mib": round(data_mib), **counts,
                   "written": out["rows"], "driver_peak_rss_mib": run["peak_rss_mib"], "prepare_s": out["seconds"],
                   "command_wall_s": run["wall_s"], "prepare_s_per_100k": round(out["seconds"] * 1e5 / size, 1)}
            results["runs"].append(row)
            table.append([row["path"], size, row["data_mib"], row["written"], row["driver_peak_rss_mib"],
                          row["prepare_s_per_100k"], row["command_wall_s"]])
            print(row, flush=True)
            if i == 0 and not a.no_baseline:
                code = ("import sys, time; from spin_ray.config import DataConfig; from spin_ray.data.sources import load_sft; "
                        "t = time.perf_counter(); d = load_sft(DataConfig(path=sys.argv[1], max_rows=None, "
                        "on_bad_rows='skip')); print(len(d.rows), round(time.perf_counter() - t, 2))")
                base = measure([sys.executable, "-c", code, str(work / "data")], env)
                n, seconds = base.pop("stdout").split()[-2:]
                assert int(n) == counts["distinct_good"]
                row = {"path": "load_sft (driver)", "rows": size, "data_mib": round(data_mib), "written": int(n),
                       "driver_peak_rss_mib": base["peak_rss_mib"], "prepare_s": float(seconds),
                       "command_wall_s": base["wall_s"], "prepare_s_per_100k": round(float(seconds) * 1e5 / size, 1)}
                results["runs"].append(row)
                table.append([row["path"], size, row["data_mib"], row["written"], row["driver_peak_rss_mib"],
                              row["prepare_s_per_100k"], row["command_wall_s"]])
                print(row, flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    results["loadavg_after"] = loadavg()
    print()
    print_table(["path", "rows", "jsonl MiB", "written", "driver peak RSS MiB", "s per 100k rows", "command wall s"],
                table)
    write_json(a.out, results)


def _result(run: dict) -> dict:
    """The object `spin-ray prepare --json` prints, alone on stdout."""
    return json.loads(run.pop("stdout"))


if __name__ == "__main__":
    main()
