"""The memory's benefit on real long documents, at toy scale on CPU: models with different memories trained at
equal compute on the Python standard library's sources, then scored on the held-out test files, loss by segment.

    python benchmarks/stdlib_corpus.py                       # infini_linear, local, xl, full; 200 steps each
    python benchmarks/stdlib_corpus.py --variants infini_linear infini_delta local --steps 400

The corpus is built into --corpus if it is not there yet (data/corpus.py: split by a stable hash of each file's
path). Each variant is trained by `python train.py experiment=stdlib_cpu attention=<variant>` in a subprocess
(same steps, batch and windows for all: equal compute up to the attention itself; `infini`, `local` and `xl` (its
previous segment) carry their state across a document's windows, detached between windows; `full` cannot carry a
state across windows, so it trains with carry_state off). Each model then streams the first --documents test files of
at least --tokens tokens, cut to --tokens, one segment at a time with its state carried (evaluation/perplexity.py,
the code of task=perplexity_stdlib); segment k's loss is the mean over the predictions at positions
[k N, (k + 1) N). Written to --out: stdlib_corpus.json, stdlib_corpus.md (perplexity and loss by segment ranges),
stdlib_corpus.png (loss by segment index, one line per model). Not a test; wall times depend on the machine's load.
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


def segment_ranges(n_segments: int) -> list[tuple[int, int]]:
    """[0, 1), [1, 2), [2, 4), [4, 8), ... up to n_segments: early segments alone, later ones pooled."""
    ranges, start = [], 0
    while start < n_segments:
        end = min(max(1, 2 * start), n_segments)
        ranges.append((start, end))
        start = end
    return ranges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["infini_linear", "local", "xl", "full"])
    parser.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: the experiment's)")
    parser.add_argument("--corpus", default=str(ROOT / "corpora" / "stdlib"))
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--override", action="append", default=[], help="extra train.py override (repeatable)")
    parser.add_argument("--runs", default=str(ROOT / "outputs" / "stdlib_corpus"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from hydra import compose, initialize_config_dir
    from matplotlib.figure import Figure

    from data.corpus import build_corpus
    from data.text import load_documents
    from data.tokenizer import ByteTokenizer
    from evaluation.perplexity import evaluate_perplexity
    from evaluation.report import write_json
    from models.checkpoint import load_model
    from training.checkpointing import latest_checkpoint
    from training.config import register_configs

    register_configs()

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    corpus = Path(args.corpus)
    if not (corpus / "manifest.json").is_file():
        build_corpus(corpus)
    manifest = json.loads((corpus / "manifest.json").read_text())
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=stdlib_cpu", f"data.source={corpus}", *args.override]
                      + ([f"trainer.max_steps={args.steps}"] if args.steps else []))
    steps, segment_len = cfg.trainer.max_steps, cfg.model.segment_len
    tokenizer = ByteTokenizer()
    test = load_documents(str(corpus), "test")
    chosen = [(row["path"], row["text"]) for row in test if len(tokenizer.encode(row["text"])) >= args.tokens]
    chosen = chosen[: args.documents]
    results = {}
    for variant in args.variants:
        run_dir = Path(args.runs) / variant
        carry = "false" if variant == "full" else "true"
        seconds = train_variant(ROOT, "stdlib_cpu", variant, run_dir, [f"data.source={corpus}",
                                f"trainer.max_steps={steps}", f"trainer.carry_state={carry}", *args.override])
        model, _ = load_model(latest_checkpoint(run_dir))
        scored = evaluate_perplexity(model, tokenizer, chosen, chunk_size=segment_len * 8, segment_len=segment_len,
                                     max_tokens=args.tokens)
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        val = [m["val/loss"] for m in metrics if "val/loss" in m]
        results[variant] = {**scored.summary(), "final_val_loss": val[-1] if val else None, "steps": steps,
                            "tokens": steps * cfg.data.batch_size * cfg.data.seq_len, "train_wall_s": round(seconds, 1)}
        print(f"{variant}: test perplexity {scored.perplexity:.3f} ({seconds:.0f} s training)", flush=True)

    n_segments = min(len(r["by_segment"]) for r in results.values())
    ranges = segment_ranges(n_segments)

    def mean_loss(rows, start, end):
        rows = rows[start:end]
        return sum(r["loss"] * r["tokens"] for r in rows) / sum(r["tokens"] for r in rows)

    header = "| model | perplexity | bits/byte | " + " | ".join(
        f"seg {a}" if b == a + 1 else f"seg {a}-{b - 1}" for a, b in ranges) + " |"
    lines = [header, "|---|---:|---:|" + "---:|" * len(ranges)]
    for variant, r in results.items():
        losses = " | ".join(f"{mean_loss(r['by_segment'], a, b):.3f}" for a, b in ranges)
        lines.append(f"| {variant} | {r['perplexity']:.3f} | {r['bits_per_byte']:.3f} | {losses} |")
    title = (f"stdlib corpus, {len(chosen)} test files x {args.tokens} bytes, loss (nats/byte) by segment of "
             f"{segment_len}; {steps} training steps of {cfg.data.batch_size} x {cfg.data.seq_len}")
    table = "\n".join(lines)
    out = Path(args.out)
    write_json(out / "stdlib_corpus.json", {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{cpu_name()}, {os.cpu_count()} "
        f"logical CPUs, shared with other jobs", "python": platform.python_version(), "torch": torch.__version__,
        "command": " ".join(sys.argv), "corpus": manifest["splits"], "corpus_python": manifest["python"],
        "test_files": [path for path, _ in chosen], "results": results})
    (out / "stdlib_corpus.md").write_text(f"{title}\n\n{table}\n")
    fig = Figure(figsize=(6.0, 3.6), dpi=120)
    ax = fig.add_subplot()
    for variant, r in results.items():
        ax.plot([row["segment"] for row in r["by_segment"]], [row["loss"] for row in r["by_segment"]], label=variant)
    ax.set_xlabel(f"segment index ({segment_len} bytes each)")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title(f"stdlib test files, {steps} training steps", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "stdlib_corpus.png")
    print(f"\n{title}\n\n{table}")


if __name__ == "__main__":
    main()
