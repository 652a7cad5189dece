"""GPU training throughput and model FLOPs utilisation (MFU) of a ~1B Infini-Transformer at 32K tokens with 2K
segments, bf16, flash-attn local attention; and the memory path's overhead over `local` attention (same model,
no memory). Runs where CUDA is present (written for one H200); without CUDA it says so and exits 0. Not a test:
it prints a markdown table and writes benchmarks/results/gpu.json.

    pip install -e ".[gpu]"                     # flash-attn (optional: without it, torch SDPA's flash kernel)
    python benchmarks/gpu.py                    # Llama-3.2-1B shape (conf/model/llama_1b.yaml), 32K tokens
    python benchmarks/gpu.py --compile          # the same with torch.compile per block (compile time reported)
    python benchmarks/gpu.py --device cpu --dim 128 --layers 2 --heads 4 --kv-heads 2 --ffn-dim 256 \\
        --vocab 256 --length 1024 --segment-len 256 --steps 1 --output /tmp/gpu_smoke.json   # exercise the code

What one step is. Forward of (batch, length) tokens under bf16 autocast (float32 master weights, as
`trainer.precision=bf16` trains; the compressive memory stays float32), next-token cross-entropy, backward,
gradients set to None. The loss is taken in chunks of `--loss-chunk` positions, each under activation
checkpointing, so the (length x vocab) logits are never all alive (128K vocabulary x 32K tokens would be 16 GiB
in float32); that recomputes the output projection in backward, which the MFU below does not count.

MFU. Model FLOPs per token (not counting recomputation):
    6 * P_matmul + 3 * 4 * n_layers * H * D * (N + 1) / 2 + 3 * 2 * n_layers * (H + Hkv) * D * (D + 1)
with P_matmul = n_layers * (dim * (H + 2 Hkv) * D + H * D * dim + 3 * dim * ffn_dim) + dim * vocab (the
output projection is a matmul even when tied; the embedding is a lookup), causal attention inside segments of N
tokens, and for infini the memory's retrieval sigma(Q)[M | z] and update sigma(K)^T[V | 1] (delta: one more
retrieval per key). MFU = model FLOPs per token * tokens/s / the bf16 matmul rate measured on this GPU in the
same run (square torch.mm at 4K, 8K and 16K, best of repeats).

Protocol. Variants are interleaved (infini, local, infini, local, ...); each trial times `--steps` steps after
`--warmup` warm-up steps (torch.cuda.synchronize around the timed region); figures are medians over trials. Peak
memory is torch.cuda.max_memory_allocated per variant.

Status: written for an H200, not yet run on one (no GPU was available where it was written); the CPU smoke command
above exercises every line except the CUDA-specific timing and the flash-attn kernel.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gpu.json"
VARIANTS = {"infini-linear": ("infini", "linear"), "infini-delta": ("infini", "delta"), "local": ("local", "linear")}


def model_flops_per_token(variant: str, args: argparse.Namespace) -> dict:
    H, Hkv, D = args.heads, args.kv_heads, args.dim // args.heads
    dim, layers, N = args.dim, args.layers, args.segment_len
    p_matmul = layers * (dim * (H + 2 * Hkv) * D + H * D * dim + 3 * dim * args.ffn_dim) + dim * args.vocab
    attention = 3 * 4 * layers * H * D * (N + 1) / 2
    memory = 0.0
    if variant.startswith("infini"):
        memory = 3 * 2 * layers * (H + Hkv) * D * (D + 1)
        if variant == "infini-delta":
            memory += 3 * 2 * layers * Hkv * D * (D + 1)
    return {"matmul_params": p_matmul, "weights": 6 * p_matmul, "attention": attention, "memory": memory,
            "total": 6 * p_matmul + attention + memory}


def bf16_matmul_peak(device, sizes=(4096, 8192, 16384), repeats: int = 10) -> dict:
    """Best bf16 torch.mm rate over square sizes, TFLOP/s."""
    import torch

    rates = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        _sync(device)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            _sync(device)
            best = min(best, time.perf_counter() - start)
        rates[n] = 2 * n**3 / best / 1e12
        del a, b
    return {"tflops": max(rates.values()), "by_size": rates}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(variant: str, args: argparse.Namespace, device):
    import torch
    from torch.utils.checkpoint import checkpoint

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from attention.backends import flash_available
    from models import ModelConfig, Transformer

    attention, update = VARIANTS[variant]
    backend = "flash" if device.type == "cuda" and flash_available() else "sdpa"
    config = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                         n_kv_heads=args.kv_heads, ffn_dim=args.ffn_dim, rope_theta=500000.0, tie_embeddings=True,
                         attention=attention, memory_update=update, segment_len=args.segment_len,
                         attention_backend=backend)
    torch.manual_seed(0)
    model = Transformer(config).to(device)
    for block in model.layers:  # as training/parallel.py does
        if args.activation_checkpointing:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        if args.compile:
            block.compile()
    return model, backend


def make_step(model, tokens, args: argparse.Namespace, device):
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def chunk_loss(h, target):  # (B, c, dim) -> summed token loss; logits live only inside this call
        logits = model.logits(h).float()
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            h, _ = model.hidden(inputs)
            loss = 0.0
            for start in range(0, h.shape[1], args.loss_chunk):
                stop = start + args.loss_chunk
                loss = loss + checkpoint(chunk_loss, h[:, start:stop], targets[:, start:stop], use_reentrant=False)
        (loss / targets.numel()).backward()
        model.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["infini-linear", "local"], choices=list(VARIANTS))
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--segment-len", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--ffn-dim", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--loss-chunk", type=int, default=4096)
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (as trainer.compile)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each block in backward (if 32K tokens do not fit; lowers MFU: recomputation "
                             "is not counted)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only to smoke-test this script")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here (torch.cuda.is_available() is False); nothing measured. "
              "Run it on a GPU machine, e.g. one H200.")
        return
    device = torch.device(args.device)
    if args.dim % args.heads or args.heads % args.kv_heads:
        parser.error("need dim % heads == 0 and heads % kv_heads == 0")

    started = datetime.now(timezone.utc)
    peak = bf16_matmul_peak(device) if device.type == "cuda" else {"tflops": float("nan"), "by_size": {}}
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.length + 1), generator=generator).to(device)
    models, steps, info = {}, {}, {}
    for variant in args.variants:
        model, backend = build(variant, args, device)
        models[variant] = model
        steps[variant] = make_step(model, tokens, args, device)
        start = time.perf_counter()
        for _ in range(args.warmup):  # includes compilation with --compile
            steps[variant]()
        _sync(device)
        info[variant] = {"backend": backend, "warmup_s": time.perf_counter() - start,
                         "parameters": sum(p.numel() for p in model.parameters())}
        model.cpu()  # one model on the GPU at a time
        if device.type == "cuda":
            torch.cuda.empty_cache()
    times = {variant: [] for variant in args.variants}
    peaks = {variant: 0 for variant in args.variants}
    for trial in range(args.trials):
        for variant in args.variants:
            model = models[variant].to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            steps[variant]()  # re-warm after the move
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[variant]()
            _sync(device)
            times[variant].append((time.perf_counter() - start) / args.steps)
            if device.type == "cuda":
                peaks[variant] = max(peaks[variant], torch.cuda.max_memory_allocated(device))
            model.cpu()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"trial {trial} {variant}: {times[variant][-1]:.3f} s/step", file=sys.stderr, flush=True)

    rows = []
    for variant in args.variants:
        step_s = statistics.median(times[variant])
        tokens_per_s = args.batch * args.length / step_s
        flops = model_flops_per_token(variant, args)
        achieved = flops["total"] * tokens_per_s / 1e12
        rows.append({"variant": variant, **info[variant], "step_s": step_s, "step_s_trials": times[variant],
                     "tokens_per_s": tokens_per_s, "model_flops_per_token": flops, "achieved_tflops": achieved,
                     "mfu": achieved / peak["tflops"], "peak_memory_gib": peaks[variant] / 2**30})
    local = next((r for r in rows if r["variant"] == "local"), None)
    for r in rows:
        if local is not None and r is not local:
            r["memory_path_overhead_vs_local"] = r["step_s"] / local["step_s"] - 1
    report = {
        "benchmark": "gpu",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "platform": platform.platform(), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "host_load_average": os.getloadavg()},
        "bf16_matmul_peak_tflops": peak["tflops"], "bf16_matmul_peak": peak,
        "shape": {k: getattr(args, k) for k in ("batch", "length", "segment_len", "dim", "layers", "heads",
                                                "kv_heads", "ffn_dim", "vocab", "loss_chunk", "compile",
                                                "activation_checkpointing")},
        "protocol": {"trials": args.trials, "warmup": args.warmup, "steps": args.steps,
                     "precision": "bf16 autocast, float32 weights and memory"},
        "results": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['machine']['device']}: bf16 matmul peak {peak['tflops']:.0f} TFLOP/s; {args.layers} layers, dim "
          f"{args.dim}, {args.heads}/{args.kv_heads} heads, ffn {args.ffn_dim}, vocab {args.vocab}, "
          f"{args.batch} x {args.length} tokens, segments of {args.segment_len}")
    print("| variant | attention kernel | step s | tokens/s | GFLOP/token | TFLOP/s | MFU | memory path overhead | "
          "peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        overhead = f"{100 * r['memory_path_overhead_vs_local']:+.1f}%" if "memory_path_overhead_vs_local" in r else "-"
        print(f"| {r['variant']} | {r['backend']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
              f"{r['model_flops_per_token']['total'] / 1e9:.2f} | {r['achieved_tflops']:.1f} | {100 * r['mfu']:.1f}% | "
              f"{overhead} | {r['peak_memory_gib']:.1f} |")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
