"""Streaming inference over 32K ... 1M tokens with a tiny model: time per token and peak resident memory for each
length, for Infini-attention and for `full` attention until it stops (runs past the time limit or out of
memory). Not a test: it prints markdown tables and writes benchmarks/results/memory_scaling.json (with --dtype
bf16: memory_scaling_bf16.json beside it).

    python benchmarks/memory_scaling.py                            # dim 128, 2 layers, 4 heads, segment 1024
    python benchmarks/memory_scaling.py --dtype bf16               # the same under bf16 autocast
    python benchmarks/memory_scaling.py --lengths 32768 131072 --full-lengths 32768 --output /tmp/quick.json
    python benchmarks/memory_scaling.py --lengths 32768 --full-lengths 32768 --trials 1 --dtype bf16 \
        --output /tmp/quick_bf16.json

What one run is. A fresh subprocess builds the model (eval mode, float32 parameters, batch 1), streams one
throw-away chunk (kernel and RoPE-table warm-up; its state is dropped), then feeds `length` tokens in chunks of
`--chunk-size` through `model(chunk, state)` under torch.inference_mode, carrying the state; every chunk's logits
are computed and dropped (what a streamed perplexity evaluation does). `--dtype bf16` runs every call (warm-up
included) under `torch.autocast("cpu", dtype=torch.bfloat16)`, entered per chunk as train.py does per call
(training/parallel.py Runtime.autocast); parameters stay float32, the memory M and z stay float32, and the
key/value cache of `full` holds what the autocast projections return (bfloat16), which `state_mib` counts.
Chunk tokens are drawn on the fly from a seeded generator, so no length-sized input tensor sits in memory.
`ms_per_token` = streaming time / length. `last_window_ms_per_token` is the same over the last 32K tokens only
(flat time per token means the state does not grow).

Memory. `peak_rss_mib` is the subprocess's high-water resident set (getrusage ru_maxrss): interpreter, torch,
model, state and every temporary. `base_rss_mib` is the resident set after the warm-up, before streaming, so
`added_mib` = peak - base is what streaming added. Two allocators, each in its own subprocess:
  default  glibc malloc as every user runs it. Freed blocks stay in glibc's heap and the mmap threshold adapts
           upwards, so RSS can creep over the first chunks and then plateau although no live tensor grows.
  pinned   MALLOC_MMAP_THRESHOLD_=131072: every block of 128 KiB or more is its own mapping, returned to the OS
           when freed, so RSS tracks live tensors.
The criteria (peak at 1M within 10% of 32K; time per token at 1M within 15% of 32K) are read off the default
allocator; the pinned rows show what is live.

`full` attention carries the key/value cache of the whole stream; each chunk attends to all of it. Its lengths
run in increasing order, each under a wall-clock limit (`--full-timeout`) and an address-space limit
(`--memory-limit-gib`, so that running out of memory is a clean failure of this process, never the kernel's OOM
killer); the first length that fails or times out ends the `full` series (the longer ones are not run).
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

from common import DTYPES, autocast, cpu_name, rss_mib  # benchmarks/common.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = {"fp32": ROOT / "benchmarks" / "results" / "memory_scaling.json",
           "bf16": ROOT / "benchmarks" / "results" / "memory_scaling_bf16.json"}  # default --output per --dtype
ALLOCATORS = {"default": {}, "pinned": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
WINDOW = 32768  # tokens of the last window timed separately


def worker(args: argparse.Namespace) -> dict:
    """Stream `args.length` tokens through a fresh model in this process; return its measurements."""
    if args.memory_limit_gib:
        limit = int(args.memory_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from models import ModelConfig, Transformer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                         segment_len=args.segment_len, attention=args.attention, memory_update=args.memory_update)
    model = Transformer(config).eval()
    generator = torch.Generator().manual_seed(1)

    def chunks(total: int):
        for start in range(0, total, args.chunk_size):
            yield torch.randint(0, 256, (1, min(args.chunk_size, total - start)), generator=generator)

    with torch.inference_mode():
        for chunk in chunks(args.chunk_size):  # warm-up on a throw-away stream
            with autocast(args.dtype):
                model(chunk)
        base = rss_mib()
        state = None
        window_start, done = None, 0
        start = time.perf_counter()
        for chunk in chunks(args.length):
            if window_start is None and done >= args.length - WINDOW:
                window_start = time.perf_counter()
            with autocast(args.dtype):
                out = model(chunk, state)
            state = out.state
            done += chunk.shape[1]
            del out
        end = time.perf_counter()
    state_tensors = [t for s in state for t in (s.keys, s.values, *(s.memory or ()))]
    state_bytes = sum(t.numel() * t.element_size() for t in state_tensors)
    window_tokens = min(WINDOW, args.length)
    return {
        "attention": args.attention, "length": args.length, "allocator": args.allocator, "dtype": args.dtype,
        "state_dtypes": sorted({str(t.dtype) for t in state_tensors}), "threads": args.threads,
        "seconds": end - start, "ms_per_token": 1e3 * (end - start) / args.length,
        "last_window_ms_per_token": 1e3 * (end - (window_start or start)) / window_tokens,
        "base_rss_mib": base, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_rss_mib": rss_mib(), "state_mib": state_bytes / 2**20,
    }


def run_worker(args: argparse.Namespace, attention: str, length: int, allocator: str, timeout: float | None) -> dict:
    command = [sys.executable, __file__, "--worker", "--attention", attention, "--length", str(length),
               "--allocator", allocator]
    for name in ("dim", "layers", "heads", "segment_len", "memory_update", "chunk_size", "threads",
                 "memory_limit_gib", "dtype"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = {**os.environ, **ALLOCATORS[allocator]}
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"attention": attention, "length": length, "allocator": allocator,
                "stopped": f"time limit: still running after {timeout:.0f} s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        reason = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1:] or "?")
        return {"attention": attention, "length": length, "allocator": allocator,
                "stopped": f"failed after {time.perf_counter() - started:.0f} s (exit {done.returncode}): {reason}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_row(trials: list[dict]) -> dict:
    row = dict(trials[0])
    for key in ("seconds", "ms_per_token", "last_window_ms_per_token", "base_rss_mib", "peak_rss_mib",
                "final_rss_mib"):
        row[key] = statistics.median(t[key] for t in trials)
    row["trials"] = len(trials)
    row["added_mib"] = row["peak_rss_mib"] - row["base_rss_mib"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 524288, 1048576])
    parser.add_argument("--full-lengths", type=int, nargs="*", default=None,
                        help="lengths tried with full attention, ascending (default: --lengths)")
    parser.add_argument("--full-timeout", type=float, default=900.0, help="seconds per full-attention run")
    parser.add_argument("--memory-limit-gib", type=float, default=None,
                        help="address-space limit per run (default: 80%% of MemAvailable at start)")
    parser.add_argument("--trials", type=int, default=2, help="Infini runs per length and allocator (median)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--segment-len", type=int, default=1024)
    parser.add_argument("--memory-update", default="linear", choices=["linear", "delta"])
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                        help="fp32, or bf16: every model call under bf16 autocast (float32 parameters)")
    parser.add_argument("--output", type=Path, default=None,
                        help="default: benchmarks/results/memory_scaling.json (fp32), memory_scaling_bf16.json (bf16)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--attention", default="infini", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--allocator", default="default", choices=list(ALLOCATORS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    if args.worker:
        if args.memory_limit_gib == 0:
            args.memory_limit_gib = None
        print(json.dumps(worker(args)))
        return
    if args.output is None:
        args.output = RESULTS[args.dtype]
    if args.memory_limit_gib is None:
        args.memory_limit_gib = round(0.8 * _mem_available_gib(), 1)
    full_lengths = sorted(args.lengths if args.full_lengths is None else args.full_lengths)

    started = datetime.now(timezone.utc)
    load_before = os.getloadavg()
    runs = []
    # Infini: lengths interleaved within each trial, default and pinned allocator alternating
    for trial in range(args.trials):
        for length in args.lengths:
            for allocator in ALLOCATORS:
                result = run_worker(args, "infini", length, allocator, None) | {"trial": trial,
                                                                              "load_average": os.getloadavg()}
                runs.append(result)
                _progress(result)
    # full: ascending lengths until one stops; default allocator, one trial (a control, and slow)
    for length in full_lengths:
        result = run_worker(args, "full", length, "default", args.full_timeout) | {"load_average": os.getloadavg()}
        runs.append(result)
        _progress(result)
        if "stopped" in result:
            break

    rows = []
    for attention in ("infini", "full"):
        for allocator in ALLOCATORS:
            for length in sorted({r["length"] for r in runs}):
                trials = [r for r in runs if (r["attention"], r["allocator"], r["length"]) == (attention, allocator,
                                                                                                  length)]
                good = [t for t in trials if "stopped" not in t]
                if good:
                    rows.append(median_row(good))
                elif trials:
                    rows.append(trials[0])
    criteria = {}
    infini = {r["length"]: r for r in rows if r["attention"] == "infini" and r["allocator"] == "default"
              and "stopped" not in r}
    if infini:
        short, long = infini[min(infini)], infini[max(infini)]
        criteria = {
            "from_tokens": short["length"], "to_tokens": long["length"],
            "peak_rss_ratio": long["peak_rss_mib"] / short["peak_rss_mib"],
            "ms_per_token_ratio": long["ms_per_token"] / short["ms_per_token"],
        }
        criteria["peak_within_10_percent"] = criteria["peak_rss_ratio"] <= 1.10
        criteria["time_within_15_percent"] = criteria["ms_per_token_ratio"] <= 1.15
    import torch

    report = {
        "benchmark": "memory_scaling",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "mem_total_gib": _mem_total_gib(),
                    "platform": platform.platform(), "torch": torch.__version__},
        "torch_threads": args.threads,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "model": {"dim": args.dim, "layers": args.layers, "heads": args.heads, "segment_len": args.segment_len,
                  "memory_update": args.memory_update, "chunk_size": args.chunk_size, "batch": 1,
                  "dtype": DTYPES[args.dtype], "autocast": args.dtype == "bf16", "parameters_dtype": "float32"},
        "limits": {"full_timeout_s": args.full_timeout, "memory_limit_gib": args.memory_limit_gib},
        "criteria_default_allocator": criteria,
        "results": rows, "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"torch threads {args.threads}; load average {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}; model dim "
          f"{args.dim}, {args.layers} layers, {args.heads} heads, segment {args.segment_len}, chunks of "
          f"{args.chunk_size}, batch 1, {args.dtype}{' autocast (float32 parameters)' if args.dtype == 'bf16' else ''}")
    print("| attention | allocator | tokens | ms/token | last 32K ms/token | peak RSS MiB | added MiB | state MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "stopped" in r:
            print(f"| {r['attention']} | {r['allocator']} | {r['length']} | stopped: {r['stopped']} | | | | |")
            continue
        print(f"| {r['attention']} | {r['allocator']} | {r['length']} | {r['ms_per_token']:.4f} | "
              f"{r['last_window_ms_per_token']:.4f} | {r['peak_rss_mib']:.0f} | {r['added_mib']:.0f} | "
              f"{r['state_mib']:.2f} |")
    if criteria:
        print(f"infini, default allocator, {criteria['to_tokens']} vs {criteria['from_tokens']} tokens: peak RSS "
              f"x{criteria['peak_rss_ratio']:.3f}, time per token x{criteria['ms_per_token_ratio']:.3f}")
    print(f"wrote {args.output}")


def _progress(result: dict) -> None:
    shown = (f"{result['ms_per_token']:.4f} ms/token, peak {result['peak_rss_mib']:.0f} MiB" if "stopped" not in result
             else result["stopped"])
    print(f"{result['attention']:>6} {result['allocator']:<7} {result['length']:>8}: {shown}  "
          f"load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)


def _meminfo_gib(key: str) -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _mem_available_gib() -> float:
    return _meminfo_gib("MemAvailable")


def _mem_total_gib() -> float:
    return _meminfo_gib("MemTotal")


if __name__ == "__main__":
    main()
