"""Loss curves of training runs side by side, from their run directories' metrics.jsonl: one plot, one table.
Not a test.

    python benchmarks/compare_runs.py RUN_A RUN_B --labels "fp32 (before)" "bf16" --out docs/default_job_loss.png

The plot has two panels: the training loss (a running mean over --smooth logged steps) and the periodic validation
loss, against the step, with a dotted line where each run's stage changed (train/stage). The markdown table (printed)
gives each run's validation loss every --every steps, its first step with val/loss at or below --threshold (the
default job's stage-1 condition) and its last step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def curves(run_dir: Path) -> dict:
    from training.metrics import read_metrics

    records = read_metrics(run_dir)
    if not records:
        raise SystemExit(f"{run_dir}: no metrics.jsonl records")
    train = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    val = [(r["step"], r["val/loss"]) for r in records if "val/loss" in r]
    stages = [(r["step"], r["train/stage"]) for r in records if "train/stage" in r]
    changes = [step for (step, stage), (_, before) in zip(stages[1:], stages) if stage != before]
    return {"train": train, "val": val, "stage_changes": changes}


def running_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="+", default=None)
    parser.add_argument("--out", type=Path, required=True, help="the plot (.png)")
    parser.add_argument("--smooth", type=int, default=10)
    parser.add_argument("--every", type=int, default=400)
    parser.add_argument("--threshold", type=float, default=0.35)
    args = parser.parse_args()
    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error("one label per run")
    data = {label: curves(run) for label, run in zip(labels, args.runs)}

    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4))
    train_ax, val_ax = figure.subplots(1, 2)
    for index, (label, run) in enumerate(data.items()):
        color = f"C{index}"
        steps, losses = zip(*run["train"])
        train_ax.plot(steps, running_mean(list(losses), args.smooth), color=color, label=label)
        if run["val"]:
            val_ax.plot(*zip(*run["val"]), color=color, marker=".", label=label)
        for step in run["stage_changes"]:
            for ax in (train_ax, val_ax):
                ax.axvline(step, color=color, linestyle=":")
    train_ax.set(title=f"training loss (running mean of {args.smooth} logged steps)", xlabel="step", ylabel="loss")
    val_ax.set(title="validation loss (dotted: stage change)", xlabel="step", ylabel="loss")
    for ax in (train_ax, val_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=100)

    last = max(step for run in data.values() for step, _ in run["val"])
    marks = list(range(args.every, last + 1, args.every))
    print("| run | " + " | ".join(f"val/loss @{m}" for m in marks) +
          f" | first val/loss <= {args.threshold} | stage changes |")
    print("|---|" + "---:|" * len(marks) + "---:|---|")
    for label, run in data.items():
        val = dict(run["val"])
        cells = [f"{val[m]:.3f}" if m in val else "-" for m in marks]
        first = next((step for step, loss in run["val"] if loss <= args.threshold), None)
        print(f"| {label} | " + " | ".join(cells) + f" | {first if first is not None else 'never'} | "
              f"{', '.join(map(str, run['stage_changes'])) or '-'} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
