"""Training throughput and peak memory, side by side: our infini-linear, infini-delta, `local` and `full` attention,
and the peer implementation `infini-transformer-pytorch` (PyPI, the `bench` extra), on one model shape, at 8K and
32K tokens, with back-propagation through time over the whole sequence. Not a test: it prints a markdown table
and writes benchmarks/results/train_throughput.json (with --dtype bf16: train_throughput_bf16.json beside it).

    pip install -e ".[bench]"                    # the peer package
    python benchmarks/train_throughput.py        # dim 256, 4 layers, 4 heads x 64, segment 512, batch 2, fp32
    python benchmarks/train_throughput.py --dtype bf16                  # the same in bf16 mixed precision
    python benchmarks/train_throughput.py --lengths 1024 --trials 1 --output /tmp/smoke.json   # a quick check
    python benchmarks/train_throughput.py --lengths 1024 --trials 1 --dtype bf16 --output /tmp/smoke_bf16.json
    python benchmarks/train_throughput.py --pool a.json b.json     # no measurement: two runs' rounds pooled

What one measurement is. A training step = forward over (batch, T) tokens, mean next-token cross-entropy,
backward, gradients set to None (no optimizer: the same for every variant, and negligible at this size). Ours:
`model(tokens)` on the whole sequence, memory never detached (full BPTT). The peer: its own training wrapper,
`InfiniTransformerWrapper(model, segment_length=N, detach_mems_every_num_segments=S + 1)(seq, backward=True)`,
which runs its segments one after another and, with that setting, never detaches its memories either (one
backward at the end). Same shape for the peer: dim, depth, heads, dim_head, segment length, vocabulary, and an MLP
hidden width equal to ours (its ff_mult is chosen so); its own choices stay (GELU-gated MLP with biases, full
softmax inside a segment, RMSNorm by F.normalize).

Precision (`--dtype`). fp32: everything float32, no autocast. bf16: mixed precision exactly as train.py trains
(training/parallel.py Runtime.autocast): parameters, gradients and the loss stay float32, our forward runs under
`torch.autocast("cpu", dtype=torch.bfloat16)` (the memory path keeps M and z float32), the cross-entropy takes
float32 logits and the backward runs outside autocast. The peer gets the same autocast around its wrapper call;
that call runs its backward itself (`backward=True` calls `.backward()` inside), so the peer's backward is inside
the autocast context too. Autocast only affects the forward ops it dispatches (the backward of each op runs in the
dtypes its forward used), so the two are compared at the same precision.

Protocol (the machine is shared, its load varies). Every (variant, length, trial) runs in a fresh subprocess: build
the model, one warm-up step, then `--steps` timed steps (wall clock); the trial's figure is their median. Variants
are interleaved within a round (the order rotates every round) and each figure is the median over `--trials`
rounds, so slow phases of the machine hit every variant alike; ratios are taken between medians of the same run;
each row also has the median of per-round ratios (`speed_vs_peer_paired_median`: the variants of one round run back
to back, so pairing them cancels most of the machine's drift), and `--pool` pools the rounds of several result
files into those medians. A configuration whose warm-up step alone takes longer than `--long-step` seconds (`full`
at 32K) is timed on that first step only, and says so (`timed_first_step`).

Memory. `peak_rss_mib` is the subprocess's high-water resident set (getrusage ru_maxrss): interpreter, torch,
model, gradients, every activation saved for backward and every temporary, under glibc's malloc with
training.parallel.retain_heap()'s settings (train.py's default on CPU, trainer.retain_heap) for every variant, the
peer included (`--malloc default`: glibc's defaults);
`base_rss_mib` is the resident set just before the first step, so peak - base is what training steps added.
`minor_faults_per_step` counts fresh pages touched per timed step: on CPU, a tensor glibc does not serve from its
heap (under its defaults: every one above its mmap threshold) is fresh pages, and that cost is part of the step time;
with the heap kept it is ~0 once the heap has grown to the step's high-water mark (after the warm-up step).

FLOPs. Model FLOPs per token (what the model needs, not what a kernel happens to execute; the same count for
the peer, which has the same shape):
    6 * P_matmul                                    every weight matmul, forward (2) + backward (4)
  + 3 * 4 * n_layers * H * D * c                    attention scores q.k and the weighted sum of v, causal: a token
                                                    attends c = (w + 1) / 2 keys on average, w = the window
                                                    (N for infini/local; T for full)
  + 3 * 2 * n_layers * (H + Hkv) * D * (D + 1)      infini: retrieval sigma(Q)[M | z] and update sigma(K)^T[V | 1]
  + 3 * 2 * n_layers * Hkv * D * (D + 1)            infini-delta: the update's retrieval sigma(K)[M | z]
with P_matmul = n_layers * (dim * (H + 2 Hkv) * D + H * D * dim + 3 * dim * ffn_dim) + dim * vocab (the embedding
is a lookup). Achieved FLOP/s = model FLOPs per token * tokens/s; the ceiling is this machine's matmul rate in
the `--dtype` (float32 or bfloat16 tensors), measured in the same run (square torch.mm at several sizes, best of
repeats, same thread count, before and after the trials; the higher of the two is used). Beside it, the rate of
this model's own weight matmuls at each length (`weight_matmul_rate`: the forward and both backward products of
every weight at the rows our model runs them, batch * its CPU chunk of whole segments; before and after the trials,
the higher used): with a 256-wide inner dimension they may run below the square peak. Printed: the time the step's
weight matmuls alone take at that rate, beside the time a whole step would have to take to reach 60% of the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from common import DTYPES, autocast, cpu_name, matmul_peak, rss_mib  # benchmarks/common.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = {"fp32": ROOT / "benchmarks" / "results" / "train_throughput.json",
           "bf16": ROOT / "benchmarks" / "results" / "train_throughput_bf16.json"}  # default --output per --dtype
VARIANTS = ("infini-linear", "infini-delta", "local", "full", "peer")
PRECISION = {"fp32": "float32 throughout, no autocast",
             "bf16": "float32 parameters, forward under torch.autocast(cpu, bfloat16), backward outside it "
                     "(the peer's wrapper runs its backward inside the autocast call)"}
OURS = {"infini-linear": ("infini", "linear"), "infini-delta": ("infini", "delta"), "local": ("local", "linear"),
        "full": ("full", "linear")}


def ffn_dim_of(dim: int) -> int:
    """Our default SwiGLU width (models.config): 8/3 dim rounded up to a multiple of 64."""
    return 64 * -(-8 * dim // (3 * 64))


def layer_weight_shapes(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(in, out) of every weight matmul of one block: q|k|v stacked, o, the SwiGLU's w1, w3 and w2."""
    H = Hkv = args.heads
    D, dim, ffn = args.head_dim, args.dim, ffn_dim_of(args.dim)
    return [(dim, (H + 2 * Hkv) * D), (H * D, dim), (dim, ffn), (dim, ffn), (ffn, dim)]


def model_flops_per_token(variant: str, args: argparse.Namespace, length: int) -> dict:
    """Model FLOPs per token of a training step; see the module docstring for the formula."""
    H = Hkv = args.heads
    D, layers, N = args.head_dim, args.layers, args.segment_len
    p_matmul = layers * sum(K * M for K, M in layer_weight_shapes(args)) + args.dim * args.vocab
    window = length if variant == "full" else N
    visible = (window + 1) / 2
    attention = 3 * 4 * layers * H * D * visible
    memory = 0.0
    if variant in ("infini-linear", "infini-delta", "peer"):
        memory = 3 * 2 * layers * (H + Hkv) * D * (D + 1)
        if variant == "infini-delta":
            memory += 3 * 2 * layers * Hkv * D * (D + 1)
    total = 6 * p_matmul + attention + memory
    return {"matmul_params": p_matmul, "weights": 6 * p_matmul, "attention": attention, "memory": memory,
            "total": total}


def weight_matmul_rate(args: argparse.Namespace, length: int, repeats: int = 3) -> dict:
    """GFLOP/s of this model's own weight matmuls in a step over `length` tokens, in the --dtype, at the shapes our
    model runs them: on CPU a long input goes through the stack in chunks of whole segments (models/streaming.py
    cpu_chunk_len), so each block's matmuls have batch * chunk rows, length / chunk times per step; the logits have
    batch * length rows once. For each weight W (K, N) (layer_weight_shapes, and the logits): the forward X W and the
    two backward products dY W^T and X^T dY, the best of `repeats`. The FLOPs are the model count's weight term
    (6 * P_matmul per token), so this is the rate the weight matmuls reach at these shapes (a narrow K = dim inner
    dimension)."""
    import torch

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from models import ModelConfig
    from models.streaming import cpu_chunk_len

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, DTYPES[args.dtype])
    config = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                         segment_len=args.segment_len)
    chunk = cpu_chunk_len(config, torch.zeros(args.batch, length, dtype=torch.long), 4) or length  # float32 params
    seconds = flops = 0.0
    for shapes, rows, times in ((layer_weight_shapes(args), args.batch * chunk, args.layers * length / chunk),
                                ([(args.dim, args.vocab)], args.batch * length, 1)):
        for K, N in shapes:
            x, w, dy = (torch.randn(*shape, dtype=dtype) for shape in ((rows, K), (K, N), (rows, N)))
            products = ((x, w), (dy, w.t()), (x.t(), dy))
            best = float("inf")
            for _ in range(repeats + 1):  # the first is a warm-up
                start = time.perf_counter()
                for a, b in products:
                    torch.mm(a, b)
                best = min(best, time.perf_counter() - start)
            seconds += times * best
            flops += times * 6 * rows * K * N
    return {"gflops": flops / seconds / 1e9, "chunk_tokens": chunk}


def peer_ff_mult(dim: int, ffn: int) -> float:
    """The peer's FeedForward hidden width is int(mult * dim * 2 / 3): the mult that gives ours."""
    mult = ffn * 3 / (2 * dim)
    for candidate in (mult, mult + 1e-9, mult + 1e-6):
        if int(candidate * dim * 2 / 3) == ffn:
            return candidate
    raise ValueError(f"no ff_mult gives the peer an MLP width of {ffn} at dim {dim}")


def worker(args: argparse.Namespace) -> dict:
    """One (variant, length) in this process: warm-up step, timed steps, memory."""
    import torch
    import torch.nn.functional as F

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    torch.set_num_threads(args.threads)
    if args.malloc == "tuned":  # applied to every variant, the peer included
        from training.parallel import retain_heap

        if not retain_heap():
            raise RuntimeError("--malloc tuned needs glibc's mallopt")
    torch.manual_seed(0)
    B, T, N = args.batch, args.length, args.segment_len
    sequence = torch.randint(0, args.vocab, (B, T + 1), generator=torch.Generator().manual_seed(1))
    extra = {}
    if args.variant == "peer":
        from importlib.metadata import version

        from infini_transformer_pytorch import InfiniTransformer, InfiniTransformerWrapper

        model = InfiniTransformer(num_tokens=args.vocab, dim=args.dim, depth=args.layers, dim_head=args.head_dim,
                                  heads=args.heads, ff_mult=peer_ff_mult(args.dim, ffn_dim_of(args.dim)))
        segments = -(-T // N)
        wrapper = InfiniTransformerWrapper(model, segment_length=N, detach_mems_every_num_segments=segments + 1)
        extra["peer_version"] = version("infini-transformer-pytorch")

        def step() -> None:
            with autocast(args.dtype):  # the wrapper runs its backward inside this call, so inside autocast
                wrapper(sequence, backward=True)
            model.zero_grad(set_to_none=True)
    else:
        from models import ModelConfig, Transformer

        attention, update = OURS[args.variant]
        config = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                             segment_len=N, attention=attention, memory_update=update,
                             attention_backend=args.backend)
        model = Transformer(config)
        if config.head_dim != args.head_dim:
            raise ValueError(f"dim / heads = {config.head_dim}, not --head-dim {args.head_dim}")
        tokens, targets = sequence[:, :-1], sequence[:, 1:]

        def step() -> None:
            with autocast(args.dtype):  # as train.py: forward under autocast, loss on float32 logits, backward outside
                logits = model(tokens).logits  # (B, T, V)
            F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()
            model.zero_grad(set_to_none=True)

    model.train()
    parameters = sum(p.numel() for p in model.parameters())
    base = rss_mib()
    start = time.perf_counter()
    step()
    warmup = time.perf_counter() - start
    times, cpu_times, faults = [], [], []
    timed_first_step = warmup > args.long_step
    if timed_first_step:
        times = [warmup]
    else:
        for _ in range(args.steps):
            usage = resource.getrusage(resource.RUSAGE_SELF)
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - usage.ru_minflt)
    step_s = statistics.median(times)
    return {
        "variant": args.variant, "length": T, "batch": B, "dtype": args.dtype, "parameters": parameters,
        "parameter_dtypes": sorted({str(p.dtype) for p in model.parameters()}), "threads": args.threads,
        "step_s": step_s, "step_times_s": times, "cpu_s": statistics.median(cpu_times) if cpu_times else None,
        "warmup_s": warmup, "timed_first_step": timed_first_step, "tokens_per_s": B * T / step_s,
        "base_rss_mib": base, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "minor_faults_per_step": statistics.median(faults) if faults else None, **extra,
    }


def run_worker(args: argparse.Namespace, variant: str, length: int) -> dict:
    command = [sys.executable, __file__, "--worker", "--variant", variant, "--length", str(length)]
    for name in ("batch", "dim", "layers", "heads", "head_dim", "segment_len", "vocab", "threads", "steps",
                 "long_step", "backend", "malloc", "dtype"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        return {"variant": variant, "length": length, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict], args: argparse.Namespace, peak_gflops: float) -> list[dict]:
    rows = []
    for length in args.lengths:
        for variant in args.variants:
            trials = [r for r in runs if r["variant"] == variant and r["length"] == length and "error" not in r]
            if not trials:
                errors = [r["error"] for r in runs if r["variant"] == variant and r["length"] == length]
                rows.append({"variant": variant, "length": length, "error": errors[:1]})
                continue
            step_s = statistics.median(r["step_s"] for r in trials)
            tokens_per_s = args.batch * length / step_s
            flops = model_flops_per_token(variant, args, length)
            achieved = flops["total"] * tokens_per_s / 1e9
            rows.append({
                "variant": variant, "length": length, "trials": len(trials), "step_s": step_s,
                "step_s_trials": [r["step_s"] for r in trials], "tokens_per_s": tokens_per_s,
                "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in trials),
                "base_rss_mib": statistics.median(r["base_rss_mib"] for r in trials),
                "minor_faults_per_step": trials[0]["minor_faults_per_step"] and statistics.median(
                    r["minor_faults_per_step"] for r in trials),
                "timed_first_step": any(r["timed_first_step"] for r in trials),
                "parameters": trials[0]["parameters"], "model_flops_per_token": flops,
                "achieved_gflops": achieved, "fraction_of_matmul_peak": achieved / peak_gflops,
            })
    for length in args.lengths:  # ratios between medians of the same run, and the median of per-round ratios
        by_variant = {r["variant"]: r for r in rows if r["length"] == length and "error" not in r}
        for row in by_variant.values():
            for reference in ("peer", "full", "local"):
                if reference in by_variant and row["variant"] != reference:
                    row[f"speed_vs_{reference}"] = row["tokens_per_s"] / by_variant[reference]["tokens_per_s"]
                    ratios = paired(runs, row["variant"], reference, length)
                    if ratios:
                        row[f"speed_vs_{reference}_paired_median"] = statistics.median(ratios)
    return rows


def paired(runs: list[dict], variant: str, reference: str, length: int) -> list[float]:
    """reference step / variant step within each round that has both (a round's variants run back to back, so a
    slow phase of the machine hits both): the per-round speed of `variant` relative to `reference`. Rounds are
    (source, trial) pairs: `source` tells apart the runs pooled by --pool."""
    steps = {(r.get("source", 0), r["trial"], r["variant"]): r["step_s"] for r in runs
             if r["length"] == length and "step_s" in r}
    return [steps[(source, trial, reference)] / steps[(source, trial, variant)]
            for (source, trial, name) in sorted(steps) if name == variant and (source, trial, reference) in steps]


def pool(paths: list[Path]) -> dict:
    """Several result files of one dtype and shape, their rounds pooled: per length and variant the median of the
    per-round ratios against the peer and against `local` (and their range)."""
    reports = [json.loads(path.read_text()) for path in paths]
    if len({json.dumps(r["shape"], sort_keys=True) for r in reports}) != 1:  # the shape includes the dtype
        raise SystemExit(f"--pool needs result files of one dtype and shape; got {[r['shape'] for r in reports]}")
    runs = [run | {"source": i} for i, report in enumerate(reports) for run in report["runs"]]
    rows = []
    for length in sorted({r["length"] for r in runs}):
        for variant in sorted({r["variant"] for r in runs if r["length"] == length}):
            row = {"length": length, "variant": variant}
            for reference, name in (("peer", "speed_vs_peer"), ("local", "speed_vs_local")):
                ratios = paired(runs, variant, reference, length) if variant != reference else []
                if ratios:
                    row[name] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                                 "rounds": len(ratios)}
            rows.append(row)
    return {"benchmark": "train_throughput (pooled rounds)", "dtype": reports[0]["shape"]["dtype"],
            "sources": [{"path": str(path), "started_utc": r["started_utc"], "command": r["command"]}
                        for path, r in zip(paths, reports)], "results": rows}


def markdown(rows: list[dict], dtype: str) -> str:
    lines = ["| tokens | variant | step s | tokens/s | vs peer | vs full | peak RSS MiB | GFLOP/token | "
             f"achieved GFLOP/s | of {dtype} matmul peak |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['length']} | {r['variant']} | failed: {r['error']} | | | | | | | |")
            continue
        flag = " (1st step)" if r["timed_first_step"] else ""
        vs_peer = f"{r['speed_vs_peer']:.2f}x" if "speed_vs_peer" in r else "-"
        vs_full = f"{r['speed_vs_full']:.2f}x" if "speed_vs_full" in r else "-"
        lines.append(
            f"| {r['length']} | {r['variant']} | {r['step_s']:.2f}{flag} | {r['tokens_per_s']:.0f} | {vs_peer} | "
            f"{vs_full} | {r['peak_rss_mib']:.0f} | {r['model_flops_per_token']['total'] / 1e9:.4f} | "
            f"{r['achieved_gflops']:.1f} | {100 * r['fraction_of_matmul_peak']:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--trials", type=int, default=3, help="interleaved rounds; figures are medians over them")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per trial, after one warm-up step")
    parser.add_argument("--long-step", type=float, default=60.0,
                        help="a warm-up step longer than this (seconds) is the trial's only timed step")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--segment-len", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--backend", default="auto", help="our local attention backend (auto = sdpa on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--malloc", default="tuned", choices=["default", "tuned"],
                        help="glibc settings for every variant: default, or training.parallel.retain_heap()'s")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                        help="fp32, or bf16 mixed precision as train.py trains (autocast, float32 parameters)")
    parser.add_argument("--output", type=Path, default=None,
                        help="default: benchmarks/results/train_throughput.json (fp32), train_throughput_bf16.json "
                             "(bf16)")
    parser.add_argument("--pool", type=Path, nargs="+", default=None, metavar="RESULT_JSON",
                        help="measure nothing: pool the rounds of earlier result files (one dtype and shape) and "
                             "print the median per-round ratios against the peer and `local` (JSON to --output)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dim != args.heads * args.head_dim:
        parser.error("--dim must equal --heads * --head-dim (our head_dim is dim / heads)")
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    if args.pool:
        pooled = pool(args.pool)
        print(f"{pooled['dtype']}, rounds of {len(args.pool)} runs pooled; per-round ratios: median (min-max, rounds)")
        print("| tokens | variant | vs peer | vs local |\n|---|---|---|---|")
        for row in pooled["results"]:
            cells = [f"{row[k]['median']:.2f}x ({row[k]['min']:.2f}-{row[k]['max']:.2f}, {row[k]['rounds']})"
                     if k in row else "-" for k in ("speed_vs_peer", "speed_vs_local")]
            print(f"| {row['length']} | {row['variant']} | {cells[0]} | {cells[1]} |")
        if args.output:
            args.output.write_text(json.dumps(pooled, indent=2) + "\n")
        return
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.output is None:
        args.output = RESULTS[args.dtype]

    started = datetime.now(timezone.utc)
    load_before = os.getloadavg()
    peak_before = matmul_peak(args.threads, args.dtype)
    weights_before = {length: weight_matmul_rate(args, length) for length in args.lengths}
    runs = []
    for trial in range(args.trials):
        for length in args.lengths:
            order = args.variants[trial % len(args.variants):] + args.variants[: trial % len(args.variants)]
            for variant in order:
                result = run_worker(args, variant, length)
                result.update(trial=trial, load_average=os.getloadavg())
                runs.append(result)
                shown = f"{result['step_s']:.2f} s/step" if "step_s" in result else f"failed {result['error']}"
                print(f"trial {trial} {length:>7} {variant:<14} {shown}  load {os.getloadavg()[0]:.2f}",
                      file=sys.stderr, flush=True)
    peak_after = matmul_peak(args.threads, args.dtype)
    peak = max(peak_before["gflops"], peak_after["gflops"])
    weights_after = {length: weight_matmul_rate(args, length) for length in args.lengths}
    weight_rates = {length: max(weights_before[length]["gflops"], weights_after[length]["gflops"])
                    for length in args.lengths}
    rows = summarise(runs, args, peak)
    weight_lines = []
    for length, rate in weight_rates.items():
        tokens = args.batch * length
        flops = model_flops_per_token("infini-linear", args, length)
        weights_s = flops["weights"] * tokens / rate / 1e9  # the step's weight matmuls alone, at their measured rate
        needed_s = flops["total"] * tokens / (0.6 * peak) / 1e9  # a whole step at 60% of the peak
        weight_lines.append(f"weight matmuls at {length} tokens: {rate:.1f} GFLOP/s ({100 * rate / peak:.0f}% of the "
                            f"peak), {weights_s:.2f} s per step; 60% of the peak needs the whole step in "
                            f"{needed_s:.2f} s")
        for row in rows:
            if row["length"] == length and "error" not in row:
                row["weight_matmul_gflops"] = rate
                row["weight_matmul_s"] = weights_s  # of this row's step_s
                row["step_s_at_60pct_of_peak"] = needed_s
    import torch

    report = {
        "benchmark": "train_throughput",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "torch_threads": args.threads,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "matmul_peak_gflops": peak, "matmul_peak_dtype": DTYPES[args.dtype], "matmul_peak_before": peak_before,
        "matmul_peak_after": peak_after,
        "weight_matmul_rate_before": weights_before, "weight_matmul_rate_after": weights_after,
        "shape": {k: getattr(args, k) for k in ("batch", "dim", "layers", "heads", "head_dim", "segment_len",
                                                "vocab")} | {"ffn_dim": ffn_dim_of(args.dim),
                                                             "dtype": DTYPES[args.dtype]},
        "precision": PRECISION[args.dtype],
        "protocol": {"trials": args.trials, "steps": args.steps, "long_step_s": args.long_step,
                     "allocator": {"default": "glibc default", "tuned": "glibc, retain_heap(): no block mapped "
                                   "on its own, heap never trimmed"}[args.malloc]},
        "results": rows, "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.dtype} ({PRECISION[args.dtype]}); {args.dtype} matmul peak {peak:.1f} GFLOP/s ({args.threads} "
          f"threads); load average {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    print(markdown(rows, args.dtype))
    print("\n".join(weight_lines))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
