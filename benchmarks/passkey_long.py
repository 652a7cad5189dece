"""Passkey retrieval at 32K, 128K and 1M tokens with a tiny random Infini-attention model on CPU: time and peak
memory per length. Not a test: it prints a table and writes benchmarks/results/passkey_long.json.

    python benchmarks/passkey_long.py                          # 32K, 128K, 1M; start / middle / end; 1 trial
    python benchmarks/passkey_long.py --lengths 32768 1048576 --chunk-size 8192 --threads 2

What it shows: the prompt is streamed through the model `chunk_size` tokens at a time carrying the state
(compressive memory + the keys/values of the unfinished segment), so peak memory is set by the chunk, not by the
prompt length. Each length runs in a fresh subprocess, and its peak resident set size is that process's own
high-water mark (getrusage ru_maxrss = VmHWM), which counts everything: the Python interpreter, torch, the
model, the prompt tokens and every activation. `baseline` is the resident size just before the evaluation
starts (interpreter + torch + model); `peak - baseline` is what the evaluation itself added.

The peak of one process varies by tens of MiB from run to run, more than the prompt itself weighs (a 1M-token
prompt is an 8 MiB list plus an 8 MiB tensor): glibc raises its mmap threshold dynamically, after which freed
buffers (the prompt's construction, the activations of each chunk) may stay in the heap instead of going back to
the OS, and how much stays depends on the order of events. So each length runs `--repeats` times (medians, and
min-max) and the whole grid runs twice: with glibc's default allocator (what a user gets) and with
MALLOC_MMAP_THRESHOLD_ pinned (`--mmap-threshold`, default 131072) so that large buffers always go back to the OS,
which shows what the program itself needs.

The model is random (the accuracy column is expected to be ~0): this measures the machinery, not retrieval.
Timings on a shared machine vary with its load (recorded in the JSON); memory does not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import peak_rss_mib, rss_mib  # benchmarks/common.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "passkey_long.json"
DEFAULT_LENGTHS = [32768, 131072, 1048576]


def length_label(n: int) -> str:
    return f"{n // 2**20}M" if n % 2**20 == 0 else f"{n // 2**10}K" if n % 2**10 == 0 else str(n)


def worker(args: argparse.Namespace) -> None:
    """One length in this (fresh) process; prints one JSON line."""
    import torch

    from data.tokenizer import ByteTokenizer
    from evaluation.passkey import evaluate_passkey
    from models import ModelConfig, Transformer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                         segment_len=args.segment_len, attention="infini", memory_update=args.memory_update,
                         attention_backend="sdpa")
    model = Transformer(config).eval()
    baseline = rss_mib()
    start = time.perf_counter()
    results = evaluate_passkey(model, ByteTokenizer(), [args.length], args.depths, args.trials, seed=0,
                               chunk_size=args.chunk_size, max_new_tokens=args.max_new_tokens)
    seconds = time.perf_counter() - start
    prompts = len(results.trials)
    print(json.dumps({
        "length": args.length,
        "prompts": prompts,
        "seconds": seconds,
        "seconds_per_prompt": seconds / prompts,
        "prefill_tokens_per_second": args.length * prompts / seconds,
        "baseline_rss_mib": baseline,
        "peak_rss_mib": peak_rss_mib(),
        "exact": results.mean("exact"),
    }))


def measure(length: int, worker_args: list[str], env: dict[str, str], repeats: int) -> dict:
    """`repeats` fresh worker processes for one length; medians and min-max of their results."""
    runs = []
    for _ in range(repeats):  # each in a fresh process: its own high-water mark
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--length", str(length), *worker_args]
        completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
        if completed.returncode != 0:
            sys.exit(f"length {length} failed:\n{completed.stderr}")
        runs.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    peaks = sorted(r["peak_rss_mib"] for r in runs)
    seconds = statistics.median(r["seconds"] for r in runs)
    prompts = runs[0]["prompts"]
    return {
        "length": length,
        "prompts": prompts,
        "seconds_median": seconds,
        "seconds_per_prompt_median": seconds / prompts,
        "prefill_tokens_per_second_median": length * prompts / seconds,
        "baseline_rss_mib_median": statistics.median(r["baseline_rss_mib"] for r in runs),
        "peak_rss_mib_median": statistics.median(peaks),
        "peak_rss_mib_min": peaks[0],
        "peak_rss_mib_max": peaks[-1],
        "exact": statistics.mean(r["exact"] for r in runs),
        "runs": runs,
    }


def print_table(title: str, rows: list[dict]) -> None:
    first = rows[0]
    print(f"\n{title}\n")
    print(f"| length | prompts | time (s) | s / prompt | prefill tok/s | baseline RSS (MiB) | peak RSS (MiB) "
          f"| peak RSS min-max (MiB) | peak - baseline (MiB) | peak / peak at {length_label(first['length'])} |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {length_label(row['length'])} | {row['prompts']} | {row['seconds_median']:.1f} "
              f"| {row['seconds_per_prompt_median']:.1f} | {row['prefill_tokens_per_second_median']:,.0f} "
              f"| {row['baseline_rss_mib_median']:.0f} | {row['peak_rss_mib_median']:.0f} "
              f"| {row['peak_rss_mib_min']:.0f}-{row['peak_rss_mib_max']:.0f} "
              f"| {row['peak_rss_mib_median'] - row['baseline_rss_mib_median']:.0f} "
              f"| {row['peak_median_vs_first']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS)
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--segment-len", type=int, default=1024)
    parser.add_argument("--memory-update", default="linear", choices=("linear", "delta"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: robust on a shared machine, where 2 threads waited on each other "
                             "and ran 6x slower than 1; use 2 on an idle 2-core machine)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per length (medians reported)")
    parser.add_argument("--mmap-threshold", type=int, default=131072,
                        help="MALLOC_MMAP_THRESHOLD_ of the second pass (0: only the glibc default pass)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    worker_args = ["--depths", *map(str, args.depths), "--trials", str(args.trials), "--chunk-size",
                   str(args.chunk_size), "--max-new-tokens", str(args.max_new_tokens), "--dim", str(args.dim),
                   "--layers", str(args.layers), "--heads", str(args.heads), "--segment-len",
                   str(args.segment_len), "--memory-update", args.memory_update, "--threads", str(args.threads)]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    base_env["PYTHONPATH"] = str(ROOT)
    allocators = {"glibc_default": base_env}
    if args.mmap_threshold > 0:
        allocators[f"mmap_threshold_{args.mmap_threshold}"] = {**base_env,
                                                               "MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)}
    load_before = os.getloadavg()[0]
    results = {}
    for name, env in allocators.items():
        rows = []
        for length in args.lengths:
            row = measure(length, worker_args, env, args.repeats)
            rows.append(row)
            print(f"[{name}] {length:>8} tokens: median {row['seconds_median']:.1f} s, peak RSS "
                  f"{row['peak_rss_mib_min']:.0f}-{row['peak_rss_mib_max']:.0f} MiB over {args.repeats} runs",
                  flush=True)
        for row in rows:
            row["peak_median_vs_first"] = row["peak_rss_mib_median"] / rows[0]["peak_rss_mib_median"]
        results[name] = rows
    for name, rows in results.items():
        print_table(f"allocator: {name} (medians over {args.repeats} fresh processes per length)", rows)

    import torch

    payload = {
        "benchmark": "passkey_long",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": args.threads,
                    # the machine is shared: a 1-minute load average above the core count means the timings
                    # include waiting for a core (peak memory is unaffected)
                    "load_average_1min_before_after": [load_before, os.getloadavg()[0]]},
        "model": {"dim": args.dim, "n_layers": args.layers, "n_heads": args.heads, "segment_len": args.segment_len,
                  "attention": "infini", "memory_update": args.memory_update, "vocab_size": 256,
                  "tokenizer": "byte", "weights": "random (seed 0)"},
        "settings": {"depths": args.depths, "trials": args.trials, "chunk_size": args.chunk_size,
                     "max_new_tokens": args.max_new_tokens, "repeats": args.repeats},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
