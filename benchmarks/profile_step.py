"""Where a training step of the default job spends its time: torch.profiler over real training steps, the top ops
by self CPU time. Not a test: it prints a markdown table and writes benchmarks/results/profile_step.json.

    python benchmarks/profile_step.py                          # the default job's last stage, 2 threads, in its
                                                               # trainer.precision (bf16 autocast)
    python benchmarks/profile_step.py --precision fp32         # the same step in float32
    python benchmarks/profile_step.py --overrides attention=local --stage 0 --output /tmp/local.json
    python benchmarks/profile_step.py --by-shape 20            # also the top 20 (op, input shapes) pairs

What one step is: the loop of train.py exactly (train.forward_backward on one batch of the chosen stage's training
stream, gradient clipping, the optimizer step, gradients set to None), on the composed training config
(`conf/train.yaml` plus --overrides, i.e. `python train.py <overrides>`). --warmup steps run first (allocator
and thread-pool warm-up, and the first batches of the stream); then --steps steps are timed without the profiler
(wall clock per step, median: the tokens/s of this machine at this moment; and the minor page faults per step, fresh
pages the allocator mapped), then --profile-steps more run under
torch.profiler and every op's self CPU time is summed over them. The machine's other load shows in both; run it
alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import cpu_name, peak_rss_mib  # noqa: E402


def build(overrides: list[str], stage_index: int, precision: str | None):
    """(model, optimizer, batches iterator, step function, facts) of the composed training config."""
    from hydra import compose, initialize_config_dir

    import train
    from data.tokenizer import load_tokenizer
    from models.transformer import Transformer
    from training.data import build_data
    from training.optim import build_optimizer
    from training.parallel import init_runtime, parallelize
    from training.stages import resolve_stages

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        composed = compose("train", overrides=["name=profile", "trainer.run_dir=unused", *overrides])
    cfg, _ = train.to_train_config(composed)
    stages = resolve_stages(cfg)
    if stages and not -len(stages) <= stage_index < len(stages):
        raise SystemExit(f"--stage {stage_index}: the config has {len(stages)} stages")
    data_cfg = stages[stage_index].data if stages else cfg.data
    cfg.trainer.device = "cpu"
    if precision is not None:
        cfg.trainer.precision = precision
    train.seed_everything(cfg.trainer.seed)
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    runtime = init_runtime(cfg.trainer)  # as train.py: precision (auto: fp32 on CPU), trainer.retain_heap
    precision = "fp32" if runtime.autocast_dtype is None else "bf16"
    module = parallelize(model, cfg.trainer, runtime)  # trainer.compile / activation checkpointing, as train.py
    batches = build_data(data_cfg, tokenizer, 0, 1, validation=False, segment_len=cfg.model.segment_len)
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")

    def step() -> int:
        batch = next(batches)
        n_targets = float(batch["loss_mask"].sum())
        train.forward_backward(module, batch, None, runtime, cfg.trainer, cfg.model.segment_len,
                               1.0 / max(n_targets, 1.0), sync=True)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch["tokens"].numel()

    facts = {"data": {"kind": data_cfg.kind, "seq_len": data_cfg.seq_len, "batch_size": data_cfg.batch_size,
                      "seq_len_mix": list(getattr(data_cfg, "seq_len_mix", []) or [])},
             "model": {k: getattr(cfg.model, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "segment_len",
                                                           "vocab_size")},
             "attention": str(cfg.model.attention), "memory_update": str(cfg.model.memory_update),
             "parameters": sum(p.numel() for p in model.parameters())}
    return step, facts | {"precision": precision}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--overrides", nargs="*", default=[], help="train.py overrides (default: the default job)")
    parser.add_argument("--stage", type=int, default=-1, help="which trainer.stages entry's data (default: the last)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="default: the config's trainer.precision (auto: fp32 on CPU)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="timed steps without the profiler")
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--by-shape", type=int, default=0, metavar="K",
                        help="also record input shapes and list the top K (op, input shapes) pairs by self time "
                             "(which of an op's calls cost: e.g. `mul` split into RoPE's, SwiGLU's, the gate's)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "profile_step.json")
    args = parser.parse_args()
    if min(args.threads, args.steps, args.profile_steps) < 1 or args.warmup < 0:
        parser.error("--threads, --steps and --profile-steps must be positive, --warmup >= 0")
    torch.set_num_threads(args.threads)

    step, facts = build(args.overrides, args.stage, args.precision)
    for _ in range(args.warmup):
        step()
    times, tokens = [], []
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.steps):
        start = time.perf_counter()
        tokens.append(step())  # a length mix varies the tokens per step
        times.append(time.perf_counter() - start)
    faults_per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / args.steps
    median_s = statistics.median(times)
    tokens_per_s = sum(tokens) / sum(times)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape > 0) as prof:
        for _ in range(args.profile_steps):
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    by_shape = []
    if args.by_shape:
        shaped = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_cpu_time_total > 0]
        shaped.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        by_shape = [{"op": e.key, "input_shapes": e.input_shapes, "calls_per_step": e.count / args.profile_steps,
                     "self_ms_per_step": e.self_cpu_time_total / 1e3 / args.profile_steps}
                    for e in shaped[: args.by_shape]]
    total_us = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = [{"op": e.key, "calls_per_step": e.count / args.profile_steps,
             "self_ms_per_step": e.self_cpu_time_total / 1e3 / args.profile_steps,
             "share": e.self_cpu_time_total / total_us} for e in events]

    print(f"\nTraining step of `python train.py {' '.join(args.overrides)}` (stage {args.stage}, {facts['data']}), "
          f"{facts['precision']}, {args.threads} threads, {cpu_name()}\n")
    print(f"median step {1e3 * median_s:.1f} ms over {args.steps} steps, {tokens_per_s:,.0f} tokens/s (all tokens / "
          f"all time; {min(tokens)}-{max(tokens)} tokens per step), {faults_per_step:,.0f} page faults per step;\n"
          f"profiled self CPU time "
          f"{total_us / 1e3 / args.profile_steps:.1f} ms per step "
          f"(the profiler's overhead included)\n")
    print("| op | calls / step | self ms / step | share |\n|---|---:|---:|---:|")
    for row in rows[: args.top]:
        print(f"| {row['op']} | {row['calls_per_step']:.0f} | {row['self_ms_per_step']:.2f} | "
              f"{100 * row['share']:.1f}% |")
    if by_shape:
        print("\n| op | input shapes | calls / step | self ms / step |\n|---|---|---:|---:|")
        for row in by_shape:
            shapes = ", ".join(str(tuple(shape)) for shape in row["input_shapes"]) or "-"
            print(f"| {row['op']} | {shapes} | {row['calls_per_step']:.1f} | {row['self_ms_per_step']:.2f} |")

    result = {
        "benchmark": "profile_step", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": args.threads},
        "command": " ".join(sys.argv), "stage": args.stage, **facts,
        "timed_steps": args.steps, "median_step_s": median_s, "step_s": times, "tokens_per_step": tokens,
        "tokens_per_s": tokens_per_s, "minor_faults_per_step": faults_per_step, "profile_steps": args.profile_steps,
        "profiled_self_ms_per_step": total_us / 1e3 / args.profile_steps, "peak_rss_mib": peak_rss_mib(),
        "ops": rows, "ops_by_input_shape": by_shape,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
