"""What training's driver holds of the pairs: `train.index_pairs` (keys, lengths, where each row is) against the old
path, the whole training table read into the driver (`_common.read_pairs_table` with the token ids, then
`packed_lengths`), as the baseline.

Data: a synthetic pairs folder like generation writes (prompt ids, iteration, token ids with lognormal lengths:
prompt ~150, human answer ~300, generated ~230 tokens, the UltraChat-like mix of the GPU review; `pair_tokens`) in
--files parquet files. Each side runs in a subprocess of its own, one at a time; peak RSS is that process's
(psutil, every 0.1 s) minus its RSS after imports, time is the call's. A worker's share is also read back, in a
process of its own (`train.load_share`, every 8th row) to time what moved to the workers.

    python benchmarks/pairs_driver.py                       # 20k and 80k pairs
    python benchmarks/pairs_driver.py --sizes 5000          # quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import loadavg, machine, print_table, write_json  # noqa: E402

MEASURE = """
import json, sys, time, resource
import numpy as np
from spin_ray.stages.train import index_pairs, load_share, packed_lengths
folder, side, here = sys.argv[1:4]
sys.path.insert(0, here)
from _common import read_pairs_table
print("ready", flush=True)
sys.stdin.readline()
t = time.perf_counter()
if side in ("index", "share"):
    index, keys = index_pairs([folder])
    n = len(index.lengths)
else:
    table = read_pairs_table([folder], columns=["iteration", "prompt_id", "prompt_ids", "real_ids", "generated_ids"])
    lengths = packed_lengths(table).tolist()
    n = table.num_rows
seconds = time.perf_counter() - t
share_s = None
if side == "share":  # a worker's read, after the index (its memory is the worker's, not the driver's)
    t = time.perf_counter()
    share = load_share(index, np.arange(0, n, 8))
    share_s = time.perf_counter() - t
print(json.dumps({"rows": n, "seconds": seconds, "share_seconds": share_s}), flush=True)
"""


def write_pairs(folder: Path, rows: int, files: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    per_file = -(-rows // files)
    for f in range(files):
        n = min(per_file, rows - f * per_file)
        if n <= 0:
            break
        cols = {}
        for key, mean in (("prompt_ids", 150), ("real_ids", 300), ("generated_ids", 230)):
            lengths = np.clip(rng.lognormal(np.log(mean), 0.6, n).astype(int), 1, 1024)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            values = rng.integers(0, 32000, offsets[-1], dtype=np.int32)
            cols[key] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        tokens = (2 * np.diff(cols["prompt_ids"].offsets.to_numpy()) + np.diff(cols["real_ids"].offsets.to_numpy())
                  + np.diff(cols["generated_ids"].offsets.to_numpy()))
        table = pa.table({"prompt_id": pa.array([f"{rng.integers(1 << 62):016x}" for _ in range(n)]),
                          "iteration": pa.array(np.zeros(n, np.int32)), **cols,
                          "pair_tokens": pa.array(tokens.astype(np.int32))})
        pq.write_table(table, folder / f"part-{f:03d}.parquet")
    (folder / "_SUCCESS.json").write_text(json.dumps({"rows": rows}))


def measure(folder: Path, side: str) -> dict:
    proc = subprocess.Popen([sys.executable, "-c", MEASURE, str(folder), side,
                             os.path.dirname(os.path.abspath(__file__))], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    p = psutil.Process(proc.pid)
    base = peak = p.memory_info().rss
    proc.stdin.write("go\n")
    proc.stdin.flush()
    while proc.poll() is None:
        try:
            peak = max(peak, p.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    out = json.loads(proc.stdout.read().strip().splitlines()[-1])
    return {**out, "peak_rss_above_imports_mib": (peak - base) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="20000,80000")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "pairs_driver.json"))
    args = ap.parse_args()
    rows, results = [], []
    for size in map(int, args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "pairs"
            write_pairs(folder, size, args.files)
            mib = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
            share = measure(folder, "share")["share_seconds"]
            for side in ("table", "index"):
                r = measure(folder, side)
                results.append({"rows": size, "side": side, "parquet_mib": mib, **r,
                                "share_seconds": share if side == "index" else None})
                rows.append([size, side, f"{mib:.0f}", f"{r['peak_rss_above_imports_mib']:.0f}", f"{r['seconds']:.2f}",
                             f"{share:.2f}" if side == "index" else ""])
    print_table(["pairs", "driver path", "parquet MiB", "peak RSS above imports MiB", "s",
                 "a worker's 1/8 share s"], rows)
    write_json(args.out, {"machine": machine(), "loadavg": loadavg(), "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
