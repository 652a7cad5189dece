"""Training throughput of the default job's step, this checkout against an earlier revision, interleaved in one run.
Not a test: it prints a markdown table and writes benchmarks/results/step_ab.json.

    python benchmarks/step_ab.py --baseline 16171d4                  # the revision before the bf16 work
    python benchmarks/step_ab.py --baseline HEAD~3 --rounds 5 --arms "fp32" "bf16"
    python benchmarks/step_ab.py --baseline HEAD --baseline-precision bf16 --arms bf16   # one uncommitted change
    python benchmarks/step_ab.py --baseline HEAD --baseline-precision bf16 --arms bf16 --stages -1 --warmup 2 \
        --steps 2 --overrides trainer=cpu data=passkey data.seq_len=32768 ...   # another shape (profile_step.py's)

Each arm is benchmarks/profile_step.py (the loop of train.py on one stage's batches: forward, backward, clipping,
the optimizer) run in a fresh process: the baseline revision's copy of the script and code (checked out with
`git worktree add --detach` into a temporary directory, removed afterwards) in --baseline-precision (float32
unless told), and this checkout in each
precision of --arms. Every round runs every arm on every --stages entry, the order rotating by round, so slow
phases of a shared machine hit every arm alike; the table reports the median over rounds of each arm's tokens/s
(all tokens / all timed steps; the stages' batches are the same seeded stream in every arm) and its ratio to the
baseline's median. A ratio from one round is noise on a shared VM (seen here: 1.1x to 1.6x between rounds); use
at least 3.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from common import cpu_name  # benchmarks/common.py

ROOT = Path(__file__).resolve().parents[1]


def run_arm(checkout: Path, precision: str, stage: int, args: argparse.Namespace, out: Path) -> dict:
    command = [sys.executable, "benchmarks/profile_step.py", "--stage", str(stage), "--precision", precision,
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--profile-steps", "1", "--top", "0",
               "--threads", str(args.threads), "--output", str(out)]
    if args.overrides:
        command += ["--overrides", *args.overrides]
    env = os.environ | {"PYTHONPATH": str(checkout)}
    done = subprocess.run(command, cwd=checkout, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{checkout} {precision} stage {stage} failed:\n{done.stderr[-2000:]}")
    result = json.loads(out.read_text())
    return {"tokens_per_s": result["tokens_per_s"], "median_step_s": result["median_step_s"],
            "load_average": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="git revision whose default-job step is the baseline")
    parser.add_argument("--arms", nargs="+", default=["bf16", "fp32"], choices=["fp32", "bf16"],
                        help="precisions of this checkout's step to compare with the baseline's")
    parser.add_argument("--baseline-precision", default="fp32", choices=["fp32", "bf16"],
                        help="the baseline revision's precision (bf16 needs a revision whose profile_step.py has "
                             "--precision)")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, -1],
                        help="trainer.stages entries whose batches are timed (default: both of the default job)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--overrides", nargs="+", default=[],
                        help="train.py overrides for every arm (default: the default job), e.g. a longer shape")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "step_ab.json")
    args = parser.parse_args()

    revision = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    started = datetime.now(timezone.utc)
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        baseline = Path(scratch) / f"baseline-{revision}"
        subprocess.run(["git", "worktree", "add", "--detach", str(baseline), revision], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            arms = [("baseline", baseline, args.baseline_precision)]
            arms += [("this", ROOT, precision) for precision in args.arms]
            for round_ in range(args.rounds):
                order = arms[round_ % len(arms):] + arms[: round_ % len(arms)]
                for stage in args.stages:
                    for name, checkout, precision in order:
                        result = run_arm(checkout, precision, stage, args, Path(scratch) / "step.json")
                        result.update(arm=f"{name} {precision}", stage=stage, round=round_)
                        runs.append(result)
                        print(f"round {round_} stage {stage:>2} {name} {precision}: "
                              f"{result['tokens_per_s']:,.0f} tokens/s (load {result['load_average']:.2f})",
                              file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, capture_output=True)

    rows = []
    for stage in args.stages:
        medians = {}
        for arm in dict.fromkeys(r["arm"] for r in runs):
            values = [r["tokens_per_s"] for r in runs if r["arm"] == arm and r["stage"] == stage]
            medians[arm] = statistics.median(values)
            rows.append({"stage": stage, "arm": arm, "tokens_per_s_median": medians[arm], "tokens_per_s": values})
        for row in rows:
            if row["stage"] == stage:
                row["vs_baseline"] = row["tokens_per_s_median"] / medians[f"baseline {args.baseline_precision}"]
    import torch

    report = {
        "benchmark": "step_ab", "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "baseline_revision": revision, "this_revision": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": args.threads},
        "baseline_precision": args.baseline_precision,
        "protocol": {"rounds": args.rounds, "warmup": args.warmup, "steps": args.steps},
        "overrides": args.overrides,
        "results": rows, "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    job = f"training step with {' '.join(args.overrides)}" if args.overrides else "Default-job training step"
    print(f"\n{job}, {args.rounds} interleaved rounds, medians; baseline {revision} ({args.baseline_precision})\n")
    print("| stage | arm | tokens/s (median) | vs baseline | rounds |\n|---:|---|---:|---:|---|")
    for row in rows:
        shown = ", ".join(f"{v / 1e3:.1f}K" for v in row["tokens_per_s"])
        print(f"| {row['stage']} | {row['arm']} | {row['tokens_per_s_median']:,.0f} | {row['vs_baseline']:.2f}x | "
              f"{shown} |")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
