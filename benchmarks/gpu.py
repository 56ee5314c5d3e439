"""The GPU path on one GPU: the trainer's FSDP2 bf16 step, its reference pass, padding before/after, against `spin-ray plan`.

Run where a GPU is lent (benchmarks/README: the device tool); nothing here needs Ray or vLLM, so it runs on a bare
CUDA machine with torch + transformers. On CPU it runs as a smoke test of itself (gloo, the tiny architecture).

Model: a standard architecture with random weights (only speed and memory are measured), by default SmolLM2-1.7B's
shipped config (the gpu_mid preset's model), saved as safetensors and loaded through spin_ray.models like any θ_t.
Data: the long-tailed length mix of benchmarks/padding.py (log-normal prompts and answers, data.max_length's rule).

0. kernel   the attention ops' test at the op (benchmarks/attention_check.py: fused and per-sequence kernels against
            fp32, bounded by naive bf16, with negative controls), then template.VARLEN (torch's fused varlen flash
            attention on CUDA) against VARLEN_SDPA (one SDPA call per sequence) on one micro-batch: seconds
1. reference  Trainer.logps over every pair before the first step (spin_ray.stages.train's reference pass: the policy is
            θ_t), length-grouped micro-batches of micro_batch_size pairs: tokens/s and MFU (one forward's FLOPs)
2. ln 2     the trainer's first step on those reference log-probs: loss − ln 2 (the same forward, so 0 up to rounding)
3. train    spin_ray.training.step.Trainer (FSDP2 meta init, MixedPrecisionPolicy bf16/fp32, weights broadcast from
            rank 0) and its train_step, with the trainer's micro-batching; variants of how a step's pairs are cut
            into forwards:
              before   random micro_batch_size pairs per forward, 2B sequences padded to the longest (the old rule,
                       Trainer.train_step with only its forward swapped: padding.layout_trainer)
              packed   pairs packed in padded rows with a block mask (the rule before flattening; the same way),
                       length-grouped, micro_batch_size rows
              varlen   spin_ray.train today: Trainer.train_step on flattened micro-batches (no padding, no mask),
                       length-grouped, micro_batch_size pairs
              budget   the same under train.micro_batch_tokens = 2 × micro_batch_size × max_length
            each run --repeats times, interleaved; real tokens/s, MFU (model FLOPs of real tokens, plan's formula,
            over the device's dense bf16 peak), peak allocated memory
4. plan     train_memory (spin_ray.training.memory) and train_seconds (spin_ray.tools.plan) for the same config, next
            to the measurements

    python benchmarks/gpu.py --out DIR                  # on a GPU
    SPIN_GPU_TRACE=1 python benchmarks/gpu.py ...       # also print GPU memory after every optimizer step
    python benchmarks/gpu.py --arch spin_ray/assets/arch/tiny-llama.json --steps 3 --repeats 1 \
        --pairs-per-step 8 --max-length 256 --max-prompt-length 128 --out /tmp/g      # CPU smoke test (20 s)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(arch_file: str, layers: int | None, device: torch.device) -> tuple[str, dict]:
    """A random-weights model of the shipped architecture, saved as bf16 safetensors (no tokenizer: none is used)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    facts = json.load(open(arch_file))
    facts = {k: v for k, v in facts.items() if not k.startswith("_")}
    if layers:
        facts["num_hidden_layers"] = layers
    config = AutoConfig.for_model(**facts)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out = tempfile.mkdtemp(prefix="spin-gpu-bench-")
    model.save_pretrained(out, safe_serialization=True)
    del model
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out, facts


def gpu_gb() -> str:
    return f"{torch.cuda.memory_allocated() / 1e9:.1f} GB allocated" if torch.cuda.is_available() else "cpu"


TRACE = os.environ.get("SPIN_GPU_TRACE") == "1"


def trace(what: str) -> None:
    if TRACE and torch.cuda.is_available():
        print(f"  [{what}] {gpu_gb()}, peak {torch.cuda.max_memory_allocated() / 1e9:.1f} GB", flush=True)


def run_steps(trainer, pairs, plan, device, layout: str, ref=None) -> dict:
    """`plan`'s steps through the trainer's own Trainer.train_step in `layout` (`varlen`, the trainer's, or a padded
    one: padding.layout_trainer); step 1 is warm-up, 2..N are timed. Reference log-probs: the reference pass's
    (`ref`), else 0 (speed does not depend on them)."""
    from padding import forward_tokens

    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    stamps, real, first_loss, seq_lens = [], [], None, []
    trainer.layout = layout
    try:
        for step in plan:
            batches = [[{**pairs[i], "ref_logp_real": ref[0][i] if ref else 0.0,
                         "ref_logp_generated": ref[1][i] if ref else 0.0} for i in idx] for idx in step]
            metrics = trainer.train_step(batches)
            first_loss = metrics["loss"] if first_loss is None else first_loss
            trace("step")
            seq_lens += [len(p["prompt_ids"]) + len(p[k]) for b in batches for p in b
                         for k in ("real_ids", "generated_ids")]
            sync(device)
            stamps.append(time.perf_counter())
            real.append(sum(forward_tokens(pairs, idx, layout)[0] for idx in step))
    finally:
        trainer.layout = "varlen"  # the other sections time the trainer's own layout
    seconds = stamps[-1] - stamps[0]
    out = {"real_tok_s": sum(real[1:]) / seconds if seconds else None, "timed_tokens": sum(real[1:]),
           "timed_seconds": seconds, "first_loss": first_loss,
           "mean_seq_len": statistics.mean(seq_lens), "forwards_per_step": sum(map(len, plan)) / len(plan)}
    if device.type == "cuda":
        out.update(peak_allocated_gb=torch.cuda.max_memory_allocated() / 1e9,
                   peak_reserved_gb=torch.cuda.max_memory_reserved() / 1e9)
    return out


def sdpa_probe(trainer, pairs: list, idx: list[int], device: torch.device) -> dict:
    """The trainer's own step (Trainer.train_step) on one micro-batch under each SDPA backend that the varlen layout
    can use (causal per sequence, no mask): which one the default picks, by time and peak memory."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch = [[{**pairs[i], "ref_logp_real": 0.0, "ref_logp_generated": 0.0} for i in idx]]  # speed: refs moot
    out = {}
    for name, backend in (("default", None), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)):
        try:
            times = []
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for _ in range(3):
                sync(device)
                t0 = time.perf_counter()
                with sdpa_kernel([backend]) if backend else nullcontext():
                    trainer.train_step(batch)
                sync(device)
                times.append(time.perf_counter() - t0)
            out[name] = {"seconds": statistics.median(times), "peak_allocated_gb":
                         torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None}
        except RuntimeError as e:
            out[name] = f"unavailable: {str(e)[:300]}"
            trainer.optimizer.zero_grad(set_to_none=True)
    return out


def kernel_check(trainer, pairs: list, idx: list[int], device: torch.device) -> dict:
    """The attention ops' own test (benchmarks/attention_check.py: output and dq, dk, dv of every kernel against fp32,
    bounded by naive bf16's error, negative controls), then the time of one micro-batch's forward + backward under
    template.VARLEN (the fused kernel on CUDA) and VARLEN_SDPA (one SDPA call per sequence), same bf16 model. The
    trainer keeps VARLEN: a model the fused kernel cannot serve falls back by itself, and says so in the log."""
    from attention_check import run

    from spin_ray.training.template import VARLEN, VARLEN_SDPA, pack_varlen, varlen_logps

    t0 = time.perf_counter()
    op_test = run(device)
    op_test["seconds"] = time.perf_counter() - t0
    batch = pack_varlen([pairs[i] for i in idx]).to(device)
    seconds = {}
    for impl in (VARLEN_SDPA, VARLEN, VARLEN_SDPA, VARLEN):  # the second round is timed
        trainer.model.set_attn_implementation(impl)
        trainer.optimizer.zero_grad(set_to_none=True)
        sync(device)
        t0 = time.perf_counter()
        real, generated = varlen_logps(trainer.model, batch)
        (real.sum() + generated.sum()).backward()
        sync(device)
        seconds[impl] = time.perf_counter() - t0
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.model.set_attn_implementation(VARLEN)
    return {"op_test": op_test, "tokens": batch.tokens, "sequences": len(batch.bounds) - 1,
            "fwd_bwd_s": {"fused": seconds[VARLEN], "per_sequence_sdpa": seconds[VARLEN_SDPA]}}


def reference(trainer, pairs: list, plan: list[list[int]], arch, peak, device: torch.device,
              results: dict) -> tuple[list, list]:
    """spin_ray.stages.train's reference pass on one worker: Trainer.logps over `plan`'s micro-batches (every pair once),
    before any step, so the policy is θ_t: tokens/s and MFU."""
    trainer.logps([[pairs[i] for i in plan[0]]])  # warm-up
    sync(device)
    t0 = time.perf_counter()
    out = trainer.logps([[pairs[i] for i in idx] for idx in plan])
    sync(device)
    seconds = time.perf_counter() - t0
    real, generated = [0.0] * len(pairs), [0.0] * len(pairs)
    for idx, (r, g) in zip(plan, out):
        for i, a, b in zip(idx, r.tolist(), g.tolist()):
            real[i], generated[i] = a, b
    seqs = [len(p["prompt_ids"]) + len(p[k]) for p in pairs for k in ("real_ids", "generated_ids")]
    tokens = sum(seqs)
    flops = arch.forward_flops_per_token(statistics.mean(seqs)) * tokens
    results["reference"] = {"pairs": len(pairs), "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
                            "mfu": flops / seconds / (peak.peak_tflops * 1e12) if peak else None}
    print(f"reference pass: {tokens / seconds:.0f} tok/s over {len(pairs)} pairs, MFU "
          f"{results['reference']['mfu'] or 0:.1%}", flush=True)
    return real, generated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default=os.path.join(os.path.dirname(HERE), "spin_ray", "assets", "arch",
                                                   "SmolLM2-1.7B-Instruct.json"))
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (CPU smoke test)")
    ap.add_argument("--pairs-per-step", type=int, default=64, help="global batch (one worker)")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per variant run (the first not timed)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--max-prompt-length", type=int, default=512)
    ap.add_argument("--variants", nargs="+", default=["before", "packed", "varlen", "budget"])
    ap.add_argument("--no-reference", action="store_true", help="skip 1-2")
    ap.add_argument("--sdpa-probe", action=argparse.BooleanOptionalAction, default=True,
                    help="time each SDPA backend on the widest micro-batch (the math one needs ~2x the memory)")
    ap.add_argument("--activation-checkpointing", choices=["none", "full", "selective"], default="none",
                    help="train.activation_checkpointing")
    ap.add_argument("--compile", action="store_true", help="train.compile: torch.compile each decoder layer")
    ap.add_argument("--attention", choices=["varlen", "per-sequence"], default="varlen",
                    help="the trainer's attention: template.VARLEN (fused on CUDA) or VARLEN_SDPA (one SDPA call "
                         "per sequence)")
    ap.add_argument("--kernel-check", action=argparse.BooleanOptionalAction, default=True,
                    help="compare the fused varlen kernel with per-sequence SDPA")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results: dict = {"args": vars(args)}

    def save() -> None:
        with open(os.path.join(args.out, "gpu.json"), "w") as f:
            json.dump(results, f, indent=2)

    import importlib

    from padding import long_tailed_pairs, plans
    from spin_ray.tools import plan as planner
    from spin_ray.training.memory import Arch, train_memory
    from spin_ray.config import SpinConfig

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    results["env"] = {"device": name, "torch": torch.__version__,
                      "transformers": importlib.import_module("transformers").__version__}
    for pkg in ("vllm", "ray"):
        try:
            results["env"][pkg] = importlib.import_module(pkg).__version__
        except ImportError as e:
            results["env"][pkg] = f"not importable: {e}"
    print(json.dumps(results["env"]), flush=True)

    t0 = time.perf_counter()
    source, facts = build_model(args.arch, args.layers, device)
    arch = Arch.from_hf(facts, os.path.basename(args.arch))
    results["model"] = {"arch": os.path.basename(args.arch), "params": arch.params, "layers": arch.layers,
                        "build_s": time.perf_counter() - t0}
    print(f"model: {arch.params / 1e9:.2f}B params, {arch.layers} layers ({time.perf_counter() - t0:.0f}s), "
          f"{gpu_gb()}", flush=True)

    n = args.steps * args.pairs_per_step
    pairs = long_tailed_pairs(n, arch.vocab, args.max_length, args.max_prompt_length, seed=0)

    # The trainer's FSDP2 bf16 model, built as train_loop_per_worker builds it.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    from padding import layout_trainer

    from spin_ray.training.batching import even_micro_batches, worker_shares
    cfg = SpinConfig.load(os.path.join(os.path.dirname(HERE), "jobs", "configs", "gpu_mid.yaml"), [
        "train.num_workers=1", "train.strategy=fsdp", f"train.micro_batch_size={args.micro_batch}",
        "train.micro_batch_tokens=null",  # each variant lays out its own micro-batches from --micro-batch
        f"train.global_batch_size={args.pairs_per_step}", f"data.max_length={args.max_length}",
        f"data.max_prompt_length={args.max_prompt_length}", "train.dtype=bfloat16",
        f"train.activation_checkpointing={args.activation_checkpointing}", f"train.compile={args.compile}"])
    t0 = time.perf_counter()
    # Every run of every variant is steps of one schedule: lr hardly moves (only speed and memory are measured).
    trainer = layout_trainer(source, cfg.train, total_steps=100 * args.steps * args.repeats, device=device)
    trainer.setup()
    if args.attention == "per-sequence":
        from spin_ray.training.template import VARLEN_SDPA

        trainer.model.set_attn_implementation(VARLEN_SDPA)  # varlen_logps keeps it
    results["fsdp_build_s"] = time.perf_counter() - t0
    results["fsdp_built_allocated_gb"] = torch.cuda.memory_allocated() / 1e9 if cuda else None
    print(f"FSDP2 model built: {gpu_gb()}", flush=True)

    budget = 2 * args.micro_batch * args.max_length
    variants = plans(pairs, steps=args.steps, global_batch=args.pairs_per_step, micro=args.micro_batch,
                     budget=budget, seed=0)
    packed_rows = [2 * len(p["prompt_ids"]) + len(p["real_ids"]) + len(p["generated_ids"]) for p in pairs]
    order = [i for step in variants["before"][0] for mb in step for i in mb]
    steps = [order[k * args.pairs_per_step:(k + 1) * args.pairs_per_step] for k in range(args.steps)]
    grouped = [even_micro_batches(worker_shares(s, packed_rows, 1), packed_rows, max_pairs=args.micro_batch,
                                  max_tokens=None)[0] for s in steps]
    chosen = {"before": variants["before"], "packed": (grouped, "pack_pairs"), "varlen": (grouped, "varlen"),
              "budget": variants["varlen"]}

    chosen = {v: chosen[v] for v in args.variants}
    if args.kernel_check and args.attention == "varlen":  # on CPU both are per-sequence SDPA: a smoke test of it
        results["kernel_check"] = kernel_check(trainer, pairs, grouped[0][0], device)
        print("kernel check:", json.dumps(results["kernel_check"]), flush=True)
        save()
    peak = planner.DEVICES.get(next((k for k in ("H200", "H100", "A100") if k in name), ""), None)
    if not args.no_reference:
        # 1. The reference pass, then 2. step 0 on its log-probs: the same forward, so the loss is ln 2.
        every = even_micro_batches(worker_shares(range(len(pairs)), packed_rows, 1), packed_rows,
                                   max_pairs=args.micro_batch, max_tokens=None)[0]
        ref = reference(trainer, pairs, every, arch, peak, device, results)
        save()
        first = run_steps(trainer, pairs, grouped[:1], device, "varlen", ref=ref)
        results["ln2_check"] = {"first_loss": first["first_loss"], "minus_ln2": first["first_loss"] - math.log(2)}
        print(f"step-0 loss − ln 2 = {first['first_loss'] - math.log(2):+.2e}", flush=True)
        save()

    widest = max((mb for step in grouped for mb in step), key=lambda mb: max(packed_rows[i] for i in mb))
    if args.sdpa_probe:
        results["sdpa"] = sdpa_probe(trainer, pairs, widest, device)
        print("sdpa:", json.dumps(results["sdpa"]), flush=True)
        save()
    run_steps(trainer, pairs, grouped, device, "varlen")  # warm-up: allocator and kernels settle

    runs: dict[str, list[dict]] = {v: [] for v in chosen}
    for r in range(args.repeats):
        for variant, (plan, layout) in chosen.items():
            try:
                out = run_steps(trainer, pairs, plan, device, layout)
            except torch.OutOfMemoryError as e:  # a padded baseline may not fit where varlen does: keep the rest
                trainer.optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                runs[variant].append({"oom": str(e)[:300]})
                print(f"repeat {r} {variant:<7} out of memory", flush=True)
                continue
            flops = 3 * arch.forward_flops_per_token(out["mean_seq_len"]) * out["timed_tokens"]
            out["mfu"] = flops / out["timed_seconds"] / (peak.peak_tflops * 1e12) if peak else None
            runs[variant].append(out)
            print(f"repeat {r} {variant:<7} {out['real_tok_s']:>9.0f} real tok/s  MFU "
                  f"{out['mfu'] or 0:.1%}  peak {out.get('peak_allocated_gb', 0):.1f} GB", flush=True)
        results["train"] = runs
        save()

    summary = {}
    fit = {v: [x for x in rs if "oom" not in x] for v, rs in runs.items()}
    for variant, rs in fit.items():
        if not rs:
            summary[variant] = "out of memory"
            continue
        tps = sorted(x["real_tok_s"] for x in rs)
        summary[variant] = {"real_tok_s_median": statistics.median(tps), "min": tps[0], "max": tps[-1],
                            "mfu_median": statistics.median(x["mfu"] or 0 for x in rs),
                            "peak_allocated_gb": max(x.get("peak_allocated_gb", 0) for x in rs),
                            "vs_before": statistics.median(tps) / statistics.median(
                                x["real_tok_s"] for x in fit["before"]) if fit.get("before") else None}
    results["summary"] = summary

    # 4. What spin-ray plan says for this config on this device.
    mem = train_memory(arch, cfg)
    b = (fit.get("varlen") or next((rs for rs in fit.values() if rs), [None]))[-1]
    eff = planner.train_efficiency(peak, args.activation_checkpointing, args.compile) if peak else None
    results["plan"] = {} if b is None else {
        "train_memory_gb": {k: v / 1e9 for k, v in mem.items()}, "train_memory_total_gb": sum(mem.values()) / 1e9,
        "train_seconds_for_timed_tokens": planner.train_seconds(
            arch, b["timed_tokens"], int(b["mean_seq_len"]), 1, peak,
            4 if args.activation_checkpointing == "full" else 3, eff.utilisation) if eff else None,
        "measured_seconds": b["timed_seconds"], "plan_utilisation": eff.utilisation if eff else None,
        "plan_measurement": eff.measurement.source if eff else None}
    save()
    print(json.dumps({"summary": summary, "plan": results["plan"]}, indent=1), flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
