"""MQAR capacity of small models with different memories, trained and evaluated on CPU: one table, one plot.

    python benchmarks/mqar_capacity.py                                   # infini_linear infini_delta local full
    python benchmarks/mqar_capacity.py --variants infini_linear infini_delta_corrected --steps 1000
    python benchmarks/mqar_capacity.py --override data.mqar.placement=uniform

Each variant (a conf/attention option) is trained by `python train.py experiment=mqar_cpu attention=<variant>` in a
subprocess (its run directory under --runs), then its final checkpoint is evaluated with evaluation/mqar.py
(the code of `python -m evaluation task=mqar`) on the same seeded sequences at each of --pairs. Written to --out:
mqar_capacity.json (per variant: accuracy by pairs and by distance, final validation loss, steps, tokens, wall
time), mqar_capacity.md (the table) and mqar_capacity.png (the plot). Not a test; wall times depend on the load of
the machine (recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from common import cpu_name, train_variant  # benchmarks/common.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["infini_linear", "infini_delta", "local", "full"])
    parser.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: the experiment's)")
    parser.add_argument("--pairs", type=int, nargs="+", default=None,
                        help="evaluated pair counts (default: the training counts and 1.5x the largest)")
    parser.add_argument("--examples", type=int, default=64, help="evaluation sequences per pair count")
    parser.add_argument("--override", action="append", default=[], help="extra train.py override (repeatable)")
    parser.add_argument("--runs", default=str(ROOT / "outputs" / "mqar_capacity"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from data.mqar import MQARConfig
    from evaluation.mqar import capacity_figure, capacity_table, evaluate_mqar
    from evaluation.report import write_json
    from models.checkpoint import load_model
    from training.checkpointing import latest_checkpoint
    from training.config import register_configs

    register_configs()

    torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=mqar_cpu", *args.override]
                      + ([f"trainer.max_steps={args.steps}"] if args.steps else []))
    data = cfg.data
    steps = cfg.trainer.max_steps
    train_pairs = list(data.mqar.num_pairs)
    pairs = args.pairs or sorted({*train_pairs, int(1.5 * max(train_pairs))})
    evaluation = MQARConfig(vocab_size=data.mqar.vocab_size, num_pairs=pairs, num_queries=data.mqar.num_queries,
                            placement=data.mqar.placement, power_a=data.mqar.power_a)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the training subprocesses' threads too
    results, summaries = {}, {}
    for variant in args.variants:
        run_dir = Path(args.runs) / variant
        seconds = train_variant(ROOT, "mqar_cpu", variant, run_dir, [f"trainer.max_steps={steps}", *args.override])
        model, _ = load_model(latest_checkpoint(run_dir))
        evaluated = evaluate_mqar(model, evaluation, [data.seq_len], examples=args.examples, seed=0)
        summary = evaluated.summary()
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        val = [m["val/loss"] for m in metrics if "val/loss" in m]
        summaries[variant] = summary
        results[variant] = {**summary, "final_val_loss": val[-1] if val else None, "steps": steps,
                            "tokens": steps * data.batch_size * data.seq_len, "train_wall_s": round(seconds, 1)}
        print(f"{variant}: accuracy {100 * summary['accuracy']:.1f}% ({seconds:.0f} s training)", flush=True)
    out = Path(args.out)
    table = capacity_table(summaries)
    title = (f"MQAR capacity: T={data.seq_len}, vocab {data.mqar.vocab_size}, segment {cfg.model.segment_len}, "
             f"{steps} steps")
    write_json(out / "mqar_capacity.json", {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{cpu_name()}, {os.cpu_count()} "
        f"logical CPUs, shared with other jobs", "python": platform.python_version(), "torch": torch.__version__,
        "command": " ".join(sys.argv), "overrides": args.override, "train_pairs": train_pairs, "eval_pairs": pairs,
        "examples": args.examples, "seq_len": data.seq_len, "results": results})
    (out / "mqar_capacity.md").write_text(f"{title}\n\n{table}\n")
    capacity_figure(summaries, title).savefig(out / "mqar_capacity.png")
    print(f"\n{title}\n\n{table}")


if __name__ == "__main__":
    main()
