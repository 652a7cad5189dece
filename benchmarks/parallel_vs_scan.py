"""The linear memory update's parallel form against a per-segment loop, forward + backward, at 8, 32 and 128
segments. Not a test: it prints a markdown table and writes benchmarks/results/parallel_vs_scan.json.

    python benchmarks/parallel_vs_scan.py                     # B 2, 4 heads x 64, segments of 512 and of 64

Both compute the same thing from the same inputs sigma(Q), sigma(K), V: (B, H, S, N, D) (S segments of N tokens,
empty initial memory): A_mem of every token, each segment reading the memory of the segments before it (3), and
the memory after the last segment (4). The loss is sum(A_mem) + sum(M_S) + sum(z_S), so backward reaches every
input through both.

  parallel  what the layer runs (attention.rules.linear.Linear.prefix, update "linear"): one batched matmul for every
            segment's increment sigma(K_s)^T [V_s | 1], a prefix sum over segments for every M_{s-1}, then one
            batched retrieval sigma(Q) [M | z] for all segments.
  loop      the recurrence as written in the paper, one segment after another: retrieve with M_{s-1} (eq. 3,
            attention.reference.retrieve), then M_s = M_{s-1} + sigma(K_s)^T V_s (eq. 4, linear_update). A fair loop:
            the segments come from one unbind (indexing x[:, :, s] in a loop would make backward zero-fill a
            whole-size gradient per segment, quadratic in S), and A_mem is stacked once.
  loop-indexed  the same loop reading segment s as x[:, :, s], as per-segment ports usually write it: each index's
            backward materialises a zero-filled gradient of the whole input, so backward is quadratic in S.
  delta     (for reference) the delta rule's scan (attention.rules.delta.Delta.prefix), which cannot be parallel.

Every configuration is timed `--repeats` times, variants interleaved (parallel, loop, ..., parallel, ...), and
the median is reported; ratios are taken between medians of the same run. loop-indexed and delta get at most
`--slow-repeats` repeats (they take seconds at 128 segments).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from common import cpu_name  # benchmarks/common.py

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from attention.memory import EPS, with_ones  # noqa: E402
from attention.reference import feature_map, linear_update, retrieve  # noqa: E402
from attention.rules import build_rule  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "parallel_vs_scan.json"


def parallel(sigma_q, sigma_k, values, update="linear"):
    B, H, S, N, D = sigma_q.shape
    state = sigma_q.new_zeros(B, H, D, D + 1)  # [M | z], empty
    rule = build_rule(update, H, D)
    prev, final = rule.prefix(state, sigma_k, with_ones(values), None)  # prev: (B, H, S, D, D + 1)
    numerator, denominator = (sigma_q @ prev).split([D, 1], dim=-1)
    a_mem = numerator * denominator.clamp_min(EPS).reciprocal()  # (B, H, S, N, D)
    return a_mem, final[..., :D], final[..., D]


def loop(sigma_q, sigma_k, values):
    B, H, S, N, D = sigma_q.shape
    M, z = sigma_q.new_zeros(B, H, D, D), sigma_q.new_zeros(B, H, D)
    outputs = []
    for q_s, k_s, v_s in zip(sigma_q.unbind(2), sigma_k.unbind(2), values.unbind(2)):
        outputs.append(retrieve(q_s, M, z))  # (3) with M_{s-1}
        M, z = linear_update(M, z, k_s, v_s)  # (4)
    return torch.stack(outputs, dim=2), M, z


def loop_indexed(sigma_q, sigma_k, values):
    """The same loop reading segment s as x[:, :, s], as per-segment ports usually do."""
    B, H, S, N, D = sigma_q.shape
    M, z = sigma_q.new_zeros(B, H, D, D), sigma_q.new_zeros(B, H, D)
    outputs = []
    for s in range(S):
        outputs.append(retrieve(sigma_q[:, :, s], M, z))
        M, z = linear_update(M, z, sigma_k[:, :, s], values[:, :, s])
    return torch.stack(outputs, dim=2), M, z


VARIANTS = {"parallel": parallel, "loop": loop, "loop-indexed": loop_indexed,
            "delta": lambda q, k, v: parallel(q, k, v, "delta")}


def inputs(batch: int, heads: int, segments: int, segment_len: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, heads, segments, segment_len, dim)
    sigma_q = feature_map(torch.randn(shape, generator=g)).requires_grad_()
    sigma_k = feature_map(torch.randn(shape, generator=g)).requires_grad_()
    values = torch.randn(shape, generator=g).requires_grad_()
    return sigma_q, sigma_k, values


def forward_backward(fn, tensors) -> float:
    for t in tensors:
        t.grad = None
    start = time.perf_counter()
    a_mem, M, z = fn(*tensors)
    (a_mem.sum() + M.sum() + z.sum()).backward()
    return time.perf_counter() - start


def check_agreement(args: argparse.Namespace) -> float:
    """The two forms compute the same A_mem, memory and gradients (float64, a small case): max abs difference."""
    tensors = [t.detach().double().requires_grad_() for t in inputs(2, 2, 5, 7, 4, seed=1)]
    worst = 0.0
    outputs = {}
    for name in ("parallel", "loop"):
        for t in tensors:
            t.grad = None
        out = VARIANTS[name](*tensors)
        (out[0].sum() + out[1].sum() + out[2].sum()).backward()
        outputs[name] = [o.detach() for o in out] + [t.grad.clone() for t in tensors]
    for a, b in zip(outputs["parallel"], outputs["loop"]):
        worst = max(worst, (a - b).abs().max().item())
    if worst > 1e-10:
        raise AssertionError(f"parallel and loop disagree by {worst}")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--segment-lens", type=int, nargs="+", default=[512, 64])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--slow-repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = datetime.now(timezone.utc)
    load_before = os.getloadavg()
    difference = check_agreement(args)
    rows = []
    for N in args.segment_lens:
        for S in args.segments:
            tensors = inputs(args.batch, args.heads, S, N, args.head_dim)
            for name in args.variants:  # warm-up
                forward_backward(VARIANTS[name], tensors)
            times = {name: [] for name in args.variants}
            for repeat in range(args.repeats):
                for name in args.variants:
                    if name in ("loop-indexed", "delta") and repeat >= args.slow_repeats:
                        continue
                    times[name].append(forward_backward(VARIANTS[name], tensors))
            row = {"segment_len": N, "segments": S, "tokens": args.batch * S * N,
                   **{f"{name}_ms": 1e3 * statistics.median(t) for name, t in times.items()},
                   "times_s": times, "load_average": os.getloadavg()}
            for name in ("loop", "loop-indexed"):
                if "parallel" in times and name in times:
                    row[f"{name}_over_parallel"] = row[f"{name}_ms"] / row["parallel_ms"]
            rows.append(row)
            shown = "  ".join(f"{name} {row[f'{name}_ms']:.1f} ms" for name in args.variants)
            print(f"N={N} S={S}: {shown}", file=sys.stderr, flush=True)
    report = {
        "benchmark": "parallel_vs_scan",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "shape": {"batch": args.batch, "heads": args.heads, "head_dim": args.head_dim, "dtype": "float32"},
        "parallel_vs_loop_max_abs_difference_float64": difference,
        "results": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"torch threads {torch.get_num_threads()}; load average {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}; "
          f"B {args.batch}, {args.heads} heads x {args.head_dim}, float32, forward + backward")
    names = args.variants
    ratios = [n for n in ("loop", "loop-indexed") if n in names and "parallel" in names]
    print("| segment len | segments | tokens | " + " | ".join(f"{n} ms" for n in names) + " | "
          + " | ".join(f"{n} / parallel" for n in ratios) + " |")
    print("|---|---|---|" + "---|" * (len(names) + len(ratios)))
    for r in rows:
        print(f"| {r['segment_len']} | {r['segments']} | {r['tokens']} | "
              + " | ".join(f"{r[f'{n}_ms']:.1f}" for n in names) + " | "
              + " | ".join(f"{r[f'{n}_over_parallel']:.2f}x" for n in ratios) + " |")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
