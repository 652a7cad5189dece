"""Peak memory and speed of `models.generation.generate` after prompts of 4K ... 1M tokens. Not a test: it prints
a table and writes benchmarks/results/generation_memory.json.

    python benchmarks/generation_memory.py                         # infini, dim 256 x 4 layers; 4K, 16K, 64K
                                                                   # (chunk 1024: every length runs several chunks,
                                                                   # so the allocator's creep is in both peaks)
    python benchmarks/generation_memory.py --dim 64 --layers 2 --segment-len 1024 --lengths 4096 65536 1048576 \
        --output benchmarks/results/generation_memory_1m.json     # a 1M-token prompt with a smaller model
    python benchmarks/generation_memory.py --attention full --dim 64 --layers 2 --chunk-size 1024 \
        --allocators pinned --output /tmp/full.json              # control: a state that grows is seen

What is measured. Every prompt length runs in a fresh subprocess, so each peak is that process's own
high-water mark (getrusage ru_maxrss, = VmHWM on Linux): the interpreter, torch, the model, the prompt and every
activation and state tensor, whatever allocator served them (tracemalloc would miss torch's C++ allocations).
`base` is the current resident size (VmRSS) just before generate() is called, after the model and the prompt
(a Python list) exist; `added` = peak - base is what generation itself added.

RSS is not live memory. With glibc's default malloc, a freed tensor above the mmap threshold raises that
threshold (up to 32 MiB), so the next chunk's temporaries come from the heap, which fragments and is not given
back: RSS creeps up over the first few chunks of a long prompt and then plateaus, although nothing generation
holds grows. Each length is therefore measured twice:
  default  glibc as every user runs it (the creep included);
  pinned   MALLOC_MMAP_THRESHOLD_=131072 fixes the threshold, so every tensor of 128 KiB or more is its own
           mapping, returned to the OS when freed: RSS then tracks live tensors, and the peak is the memory
           generation needs.
The criterion (generation after a 64K-token prompt within 10% of after a 4K-token prompt) is checked for both.

A second, separately timed pass (default allocator only) repeats the prefill and the decoding steps to split
the time into prefill throughput and milliseconds per decoded token, and reports the size of the streaming state
after the prompt (for `infini`: the compressive memory plus the keys/values of the unfinished segment). Timings
on a shared machine are noisy; the memory columns are not.
The `full` attention baseline is a control that the measurement sees growth when there is some: its state is
the key/value cache of the whole stream.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from common import peak_rss_mib, rss_mib  # benchmarks/common.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "generation_memory.json"
ALLOCATORS = {"default": {}, "pinned": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def worker(args: argparse.Namespace) -> dict:
    """Run one prompt length in this process and return its measurements."""
    import torch

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from models import ModelConfig, Transformer
    from models.generation import GenerationConfig, generate, prefill

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                         segment_len=args.segment_len, attention=args.attention, attention_backend="sdpa")
    model = Transformer(config).eval()
    prompt = torch.randint(0, 256, (args.length,), generator=torch.Generator().manual_seed(1)).tolist()
    gen_config = GenerationConfig(max_new_tokens=args.new_tokens, chunk_size=args.chunk_size)

    base = rss_mib()
    start = time.perf_counter()
    new_tokens = generate(model, [prompt], gen_config)[0]
    generate_s = time.perf_counter() - start
    peak = peak_rss_mib()

    row = {
        "prompt_tokens": args.length, "new_tokens": len(new_tokens), "base_rss_mib": round(base, 1),
        "peak_rss_mib": round(peak, 1), "generation_added_mib": round(peak - base, 1),
        "generate_s": round(generate_s, 2),
    }
    if not args.timing:
        return row
    # timing breakdown (after the peak was read, so it does not count)
    tokens = torch.tensor([prompt])
    start = time.perf_counter()
    logits, state = prefill(model, tokens, chunk_size=args.chunk_size)
    prefill_s = time.perf_counter() - start
    state_bytes = sum(t.numel() * t.element_size() for s in state for t in (s.keys, s.values, *(s.memory or ())))
    start = time.perf_counter()
    with torch.no_grad():
        token = logits.argmax(-1, keepdim=True)
        for _ in range(args.new_tokens):
            out = model(token, state)
            token, state = out.logits[:, -1].argmax(-1, keepdim=True), out.state
    decode_ms = (time.perf_counter() - start) / args.new_tokens * 1000
    return {**row, "state_mib_after_prompt": round(state_bytes / 2**20, 3),
            "prefill_tokens_per_s": round(args.length / prefill_s), "decode_ms_per_token": round(decode_ms, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--attention", choices=("infini", "local", "xl", "full"), default="infini")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--segment-len", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--allocators", nargs="+", choices=sorted(ALLOCATORS), default=["default", "pinned"])
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)  # worker mode: one length, JSON to stdout
    parser.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.length is not None:
        print(json.dumps(worker(args)))
        return

    settings = {k: v for k, v in vars(args).items() if k not in ("lengths", "output", "length", "timing",
                                                                   "allocators")}
    print(f"generate(): {args.attention}, dim {args.dim}, {args.layers} layers, {args.heads} heads, segment "
          f"{args.segment_len}, chunk {args.chunk_size}, {args.new_tokens} new tokens, {args.threads} threads")
    print(f"{'allocator':>9} {'prompt':>9} {'base MiB':>9} {'peak MiB':>9} {'added MiB':>9} {'state MiB':>9} "
          f"{'prefill tok/s':>13} {'decode ms/tok':>13}")
    rows, criterion = [], {}
    for allocator in args.allocators:
        for length in args.lengths:
            command = [sys.executable, __file__, "--length", str(length)] + [
                item for key, value in settings.items() for item in (f"--{key.replace('_', '-')}", str(value))
            ] + (["--timing"] if allocator == "default" else [])
            env = {**os.environ, **ALLOCATORS[allocator]}
            if allocator == "default":
                env.pop("MALLOC_MMAP_THRESHOLD_", None)
            done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                raise SystemExit(f"worker for {length} tokens failed with exit code {done.returncode}")
            row = {"allocator": allocator, **json.loads(done.stdout.strip().splitlines()[-1])}
            rows.append(row)
            timing = [str(row.get(key, "-")) for key in ("state_mib_after_prompt", "prefill_tokens_per_s",
                                                          "decode_ms_per_token")]
            print(f"{allocator:>9} {row['prompt_tokens']:>9} {row['base_rss_mib']:>9.1f} {row['peak_rss_mib']:>9.1f} "
                  f"{row['generation_added_mib']:>9.1f} {timing[0]:>9} {timing[1]:>13} {timing[2]:>13}", flush=True)
        by_length = {row["prompt_tokens"]: row for row in rows if row["allocator"] == allocator}
        if 4096 in by_length and 65536 in by_length:
            ratio = by_length[65536]["peak_rss_mib"] / by_length[4096]["peak_rss_mib"]
            criterion[allocator] = {"peak_64k_over_4k": round(ratio, 4), "within_10_percent": ratio <= 1.10}
    for allocator, verdict in criterion.items():
        ratio = verdict["peak_64k_over_4k"]
        print(f"{allocator}: peak after 64K / peak after 4K = {ratio:.3f} "
              f"({'within' if ratio <= 1.10 else 'NOT within'} 10%)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = {"settings": settings, "rows": rows, "criterion": criterion,
              "machine": {"python": platform.python_version(), "platform": platform.platform()}}
    args.output.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
