"""Local (in-segment) causal attention kernels on CPU, forward + backward, beside this machine's square matmul rate:
how fast the attention of a training step can run with the kernels PyTorch ships. Not a test: it prints a markdown
table and writes benchmarks/results/attention_kernels.json.

    python benchmarks/attention_kernels.py                         # the cases below, 3 interleaved trials
    python benchmarks/attention_kernels.py --trials 1 --cases bench32k --output /tmp/smoke.json   # a quick check

Kernels, on q, k, v of shape (segments, H, N, D) with a causal mask inside each segment (what
attention/infini.py hands attention/backends.py for a chunk of whole segments):
    sdpa_fp32   F.scaled_dot_product_attention(is_causal=True) on float32 tensors (PyTorch's fused CPU flash kernel;
                what our `sdpa` backend runs on CPU in fp32 and, cast up, under bf16 autocast)
    sdpa_bf16   the same kernel on bfloat16 tensors (what CPU autocast would pick)
    eager_fp32  attention/backends.py eager_attention: q k^T, mask, softmax, @ v as separate ops (the reference)

Cases: `default` is the default job's segments (128 segments of 64 tokens, 4 heads of 32); `bench32k` is one CPU
chunk of benchmarks/train_throughput.py's model at 32K tokens (batch 2 x 11 segments of 512, 4 heads of 64); the
`nN_dD` sweep keeps the chunk at 11,264 tokens (segments = 11264 / N) and varies the segment length N and head dim D.

Protocol: every (case, kernel, trial) runs in a fresh subprocess on `--threads` threads: one untimed forward +
backward, then `--repeats` timed ones (wall clock, forward and backward apart); the trial's figure is their median.
Kernels are interleaved within a round, the order rotating, and each figure is the median over `--trials` rounds.
FLOPs: the causal count, 2 matmuls x 2 x segments x H x N x (N + 1) / 2 x D forward and 2.5x that backward (the
flash backward recomputes the scores and takes four more products); what a kernel executes beyond that (masked
halves of its blocks) is its own cost. The ceiling beside it: square torch.mm in float32 and in bfloat16, best over
sizes 1024-4096, before and after the trials, the higher of the two.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from common import DTYPES, cpu_name, matmul_peak

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "attention_kernels.json"
KERNELS = ("sdpa_fp32", "sdpa_bf16", "eager_fp32")
CHUNK_TOKENS = 11264  # batch 2 x 11 segments of 512: train_throughput.py's CPU chunk at 32K


def cases() -> dict[str, tuple[int, int, int, int]]:
    """name -> (segments, heads, segment length N, head dim D)."""
    table = {"default": (128, 4, 64, 32), "bench32k": (22, 4, 512, 64)}
    for d in (64, 128):
        for n in (64, 128, 256, 512, 1024, 2048):
            table[f"n{n}_d{d}"] = (CHUNK_TOKENS // n, 4, n, d)
    return table


def causal_flops(segments: int, heads: int, n: int, d: int) -> tuple[float, float]:
    """(forward, backward) FLOPs of causal attention over the segments: q.k and the weighted sum of v."""
    forward = 2 * 2 * segments * heads * (n * (n + 1) / 2) * d
    return forward, 2.5 * forward


def worker(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from attention.backends import eager_attention

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    segments, heads, n, d = cases()[args.case]
    dtype = torch.bfloat16 if args.kernel == "sdpa_bf16" else torch.float32
    if args.kernel == "eager_fp32":
        kernel = eager_attention
    else:
        def kernel(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    q, k, v = (torch.randn(segments, heads, n, d, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(segments, heads, n, d, dtype=dtype)
    forward_s, backward_s = [], []
    for step in range(args.repeats + 1):
        start = time.perf_counter()
        out = kernel(q, k, v)  # (segments, H, N, D)
        middle = time.perf_counter()
        out.backward(grad)
        end = time.perf_counter()
        q.grad = k.grad = v.grad = None
        if step:  # the first is a warm-up
            forward_s.append(middle - start)
            backward_s.append(end - middle)
    return {"case": args.case, "kernel": args.kernel, "forward_s": statistics.median(forward_s),
            "backward_s": statistics.median(backward_s), "forward_times_s": forward_s,
            "backward_times_s": backward_s}


def run_worker(args: argparse.Namespace, case: str, kernel: str) -> dict:
    command = [sys.executable, __file__, "--worker", "--case", case, "--kernel", kernel,
               "--threads", str(args.threads), "--repeats", str(args.repeats)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        return {"case": case, "kernel": kernel, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict], peaks: dict[str, float]) -> list[dict]:
    """One row per (case, kernel): medians over the trials, causal GFLOP/s, the share of the square matmul peak of
    the kernel's dtype, and the speed against sdpa_fp32 (the ratio of the medians)."""
    rows = []
    table = cases()
    for case in dict.fromkeys(r["case"] for r in runs):
        by_kernel = {}
        for kernel in KERNELS:
            trials = [r for r in runs if r["case"] == case and r["kernel"] == kernel and "forward_s" in r]
            if not trials:
                continue
            forward = statistics.median(r["forward_s"] for r in trials)
            backward = statistics.median(r["backward_s"] for r in trials)
            total = statistics.median(r["forward_s"] + r["backward_s"] for r in trials)
            flops_f, flops_b = causal_flops(*table[case])
            peak = peaks["bfloat16" if kernel == "sdpa_bf16" else "float32"]
            by_kernel[kernel] = {
                "case": case, "kernel": kernel, "shape": dict(zip(("segments", "heads", "N", "D"), table[case])),
                "trials": len(trials), "forward_ms": 1e3 * forward, "backward_ms": 1e3 * backward,
                "total_ms": 1e3 * total, "causal_gflops": (flops_f + flops_b) / total / 1e9,
                "fraction_of_matmul_peak": (flops_f + flops_b) / total / 1e9 / peak}
        for row in by_kernel.values():
            if "sdpa_fp32" in by_kernel:
                row["speed_vs_sdpa_fp32"] = by_kernel["sdpa_fp32"]["total_ms"] / row["total_ms"]
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(cases()), choices=list(cases()))
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--trials", type=int, default=3, help="interleaved rounds, each kernel in a fresh process")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward + backward passes per process")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--kernel", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.threads is None:
        args.threads = torch.get_num_threads()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    started = datetime.now(timezone.utc)
    peaks_before = {DTYPES[d]: matmul_peak(args.threads, d)["gflops"] for d in DTYPES}  # keyed float32, bfloat16
    runs = []
    for trial in range(args.trials):
        for case in args.cases:
            order = args.kernels[trial % len(args.kernels):] + args.kernels[: trial % len(args.kernels)]
            for kernel in order:
                if kernel == "eager_fp32" and case not in ("default", "bench32k"):
                    continue  # the reference, timed where the project runs it; the sweep is about SDPA's dtypes
                result = run_worker(args, case, kernel)
                result["trial"] = trial
                runs.append(result)
                shown = (f"{1e3 * (result['forward_s'] + result['backward_s']):.1f} ms" if "forward_s" in result
                         else f"failed {result['error']}")
                print(f"trial {trial} {case:<10} {kernel:<11} {shown}", file=sys.stderr, flush=True)
    peaks_after = {DTYPES[d]: matmul_peak(args.threads, d)["gflops"] for d in DTYPES}
    peaks = {dtype: max(peaks_before[dtype], peaks_after[dtype]) for dtype in peaks_before}
    rows = summarise(runs, peaks)

    print(f"square matmul peak: float32 {peaks['float32']:.0f}, bfloat16 {peaks['bfloat16']:.0f} GFLOP/s "
          f"({args.threads} threads)")
    print("| case | segments x H x N x D | kernel | forward ms | backward ms | total ms | causal GFLOP/s | "
          "of its dtype's matmul peak | vs sdpa_fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["shape"]
        print(f"| {r['case']} | {s['segments']} x {s['heads']} x {s['N']} x {s['D']} | {r['kernel']} | "
              f"{r['forward_ms']:.1f} | {r['backward_ms']:.1f} | {r['total_ms']:.1f} | {r['causal_gflops']:.1f} | "
              f"{100 * r['fraction_of_matmul_peak']:.0f}% | {r.get('speed_vs_sdpa_fp32', float('nan')):.2f}x |")
    report = {
        "benchmark": "attention_kernels", "command": " ".join(["python", *sys.argv]),
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "torch": torch.__version__},
        "threads": args.threads, "matmul_peak_gflops": peaks, "matmul_peak_before": peaks_before,
        "matmul_peak_after": peaks_after, "protocol": {"trials": args.trials, "repeats": args.repeats},
        "results": rows, "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
