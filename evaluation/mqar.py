"""MQAR evaluation: associative-recall accuracy by number of key-value pairs and by pair-to-query distance.

Every (sequence length, pair count) cell holds `examples` sequences from data.mqar.mqar_trial (seeded, the same for
every model). Each sequence is run teacher-forced through the model (streamed in chunks of whole segments, the
state carried, as the model reads any long input) and a query counts as correct when the argmax of the logits at
its key's position is the pair's value. Accuracy is the share of correct queries.

    results = evaluate_mqar(model, MQARConfig(num_pairs=[4, 8, 16]), seq_lens=[256], examples=32)
    results.per_pairs()        # {pairs: accuracy}, the capacity curve
    results.per_distance()     # {2^k: accuracy} of queries whose distance lies in [2^k, 2^(k+1))

Files (write_outputs): mqar_summary.json, mqar_table.md, mqar_capacity.png. `capacity_table` and
`capacity_figure` put several models' summaries in one table / plot (benchmarks/mqar_capacity.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from data.mqar import MQARConfig, check_mqar_config, distance_bucket, min_seq_len, mqar_trial
from evaluation.report import write_json
from evaluation.tasks import EvalContext, Report, register_task
from models.transformer import Transformer


@dataclass
class MQARTaskConfig:
    """python -m evaluation task=mqar: MQAR accuracy over seq_lens x num_pairs (evaluation/mqar.py)."""

    name: str = "mqar"
    seq_lens: list[int] = field(default_factory=lambda: [256])
    """Sequence lengths in tokens (each cell's sequences are exactly this long)."""
    num_pairs: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64])
    """Key-value pairs per sequence, one cell each (a cell is skipped when its pairs and queries do not fit)."""
    vocab_size: int = 256
    """Ids used (data/mqar.py); at most the model's vocabulary. Use the training run's value."""
    num_queries: int = 0
    """Queries per sequence; 0: every pair."""
    placement: str = "power_law"
    """adjacent | uniform | power_law (data/mqar.py)."""
    power_a: float = 0.01
    examples: int = 32
    """Sequences per cell."""
    batch_size: int = 16
    seed: int = 0
    """Seeds the sequences: the same seed gives every model the same ones."""
    chunk_size: int = 4096
    """Tokens per forward call (rounded down to whole segments)."""


@dataclass
class MQARCell:
    seq_len: int
    num_pairs: int
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


@dataclass
class MQARResults:
    cells: list[MQARCell]
    distance_counts: dict[int, list[int]]
    """{distance bucket 2^k: [correct, total]} over every cell."""
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def seq_lens(self) -> list[int]:
        return list(dict.fromkeys(c.seq_len for c in self.cells))

    @property
    def pair_counts(self) -> list[int]:
        return sorted(dict.fromkeys(c.num_pairs for c in self.cells))

    def per_pairs(self) -> dict[int, float]:
        """{pairs: accuracy over every length}: the capacity curve."""
        pooled: dict[int, list[int]] = {}
        for c in self.cells:
            counts = pooled.setdefault(c.num_pairs, [0, 0])
            counts[0] += c.correct
            counts[1] += c.total
        return {n: pooled[n][0] / pooled[n][1] for n in sorted(pooled)}

    def per_distance(self) -> dict[int, float]:
        return {d: c / t for d, (c, t) in sorted(self.distance_counts.items())}

    def mean(self) -> float:
        return sum(c.correct for c in self.cells) / sum(c.total for c in self.cells)

    def summary(self) -> dict[str, Any]:
        """JSON-ready; integer keys as strings."""
        return {
            "task": "mqar",
            "accuracy": self.mean(),
            "per_pairs": {str(n): v for n, v in self.per_pairs().items()},
            "cells": {str(t): {str(c.num_pairs): c.accuracy for c in self.cells if c.seq_len == t}
                      for t in self.seq_lens},
            "per_distance": {str(d): {"accuracy": c / t, "queries": t}
                             for d, (c, t) in sorted(self.distance_counts.items())},
            "settings": self.settings,
        }


@torch.inference_mode()
def query_predictions(model: Transformer, tokens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Argmax prediction at every position of tokens (B, T), streamed in chunks of whole segments: (B, T) int64."""
    segment = model.config.segment_len if model.config.attention != "full" else 1
    chunk = max(segment, chunk_size - chunk_size % segment)
    device = model.tok_embeddings.weight.device
    state, predictions = None, []
    for start in range(0, tokens.shape[1], chunk):
        out = model(tokens[:, start : start + chunk].to(device), state)
        state = out.state
        predictions.append(out.logits.argmax(-1).cpu())  # (B, chunk)
    return torch.cat(predictions, dim=1)


def evaluate_mqar(
    model: Transformer,
    cfg: MQARConfig,
    seq_lens: Sequence[int],
    examples: int = 32,
    seed: int = 0,
    batch_size: int = 16,
    chunk_size: int = 4096,
) -> MQARResults:
    """Accuracy of every (seq_len, num_pairs) cell of cfg.num_pairs x seq_lens (module docstring). Cells whose
    pairs and queries do not fit their length are skipped (listed in settings["skipped"])."""
    check_mqar_config(cfg, "task")
    if cfg.vocab_size > model.config.vocab_size:
        raise ValueError(f"MQAR vocab_size {cfg.vocab_size} exceeds the model's vocabulary {model.config.vocab_size}")
    if examples < 1 or batch_size < 1:
        raise ValueError(f"examples and batch_size must be >= 1, got {examples} and {batch_size}")
    was_training = model.training
    model.eval()
    cells, distances, skipped = [], {}, []
    try:
        for seq_len in seq_lens:
            for pairs in cfg.num_pairs:
                if min_seq_len(cfg, pairs) > seq_len:
                    skipped.append([int(seq_len), int(pairs)])
                    continue
                correct = total = 0
                for first in range(0, examples, batch_size):
                    batch = [mqar_trial(cfg, seed, seq_len, pairs, t)
                             for t in range(first, min(first + batch_size, examples))]
                    predicted = query_predictions(model, torch.tensor([e.tokens for e in batch]), chunk_size)
                    for row, example in enumerate(batch):
                        for position, answer, distance in zip(example.query_positions, example.answers,
                                                              example.distances):
                            hit = int(predicted[row, position]) == answer
                            correct += hit
                            total += 1
                            counts = distances.setdefault(distance_bucket(distance), [0, 0])
                            counts[0] += hit
                            counts[1] += 1
                cells.append(MQARCell(int(seq_len), int(pairs), correct, total))
    finally:
        model.train(was_training)
    if not cells:
        raise ValueError(f"no MQAR cell fits: every num_pairs in {list(cfg.num_pairs)} needs more than the lengths "
                         f"{list(seq_lens)}")
    settings = {**asdict(cfg), "seq_lens": [int(n) for n in seq_lens], "examples": examples, "seed": seed,
                "skipped": skipped, "attention": model.config.attention, "segment_len": model.config.segment_len}
    return MQARResults(cells, distances, settings)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown_table(results: MQARResults) -> str:
    """Pairs (rows) x sequence lengths (columns) + the pooled capacity column, accuracy in percent; then accuracy
    by distance bucket."""
    by_cell = {(c.seq_len, c.num_pairs): c.accuracy for c in results.cells}
    lengths, pooled = results.seq_lens, results.per_pairs()
    lines = ["| pairs | " + " | ".join(f"T={n}" for n in lengths) + " | all |",
             "|---:|" + "---:|" * (len(lengths) + 1)]
    for pairs in results.pair_counts:
        cells = " | ".join(_percent(by_cell.get((n, pairs))) for n in lengths)
        lines.append(f"| {pairs} | {cells} | {_percent(pooled[pairs])} |")
    lines += ["", "| distance (tokens) | queries | accuracy |", "|---:|---:|---:|"]
    for bucket, (correct, total) in sorted(results.distance_counts.items()):
        lines.append(f"| {bucket}-{2 * bucket - 1} | {total} | {_percent(correct / total)} |")
    return "\n".join(lines)


def capacity_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per pair count, one column per model (its summary's per_pairs), accuracy in percent."""
    pairs = sorted({int(n) for s in summaries.values() for n in s["per_pairs"]})
    lines = ["| pairs | " + " | ".join(summaries) + " |", "|---:|" + "---:|" * len(summaries)]
    for n in pairs:
        lines.append(f"| {n} | " + " | ".join(_percent(s["per_pairs"].get(str(n))) for s in summaries.values())
                     + " |")
    return "\n".join(lines)


def capacity_figure(summaries: Mapping[str, Mapping[str, Any]], title: str = "MQAR capacity") -> Figure:
    """Accuracy (%) against pairs (log2 axis), one line per model."""
    fig = Figure(figsize=(5.5, 3.6), dpi=120)
    ax = fig.add_subplot()
    for name, summary in summaries.items():
        points = sorted((int(n), 100 * v) for n, v in summary["per_pairs"].items())
        ax.plot([p for p, _ in points], [a for _, a in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("key-value pairs")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_outputs(results: MQARResults, out_dir: str | Path, label: str = "model") -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = results.summary()
    paths = {"summary": write_json(out_dir / "mqar_summary.json", summary), "table": out_dir / "mqar_table.md",
             "plot": out_dir / "mqar_capacity.png"}
    paths["table"].write_text(f"MQAR accuracy (%), {results.settings['examples']} sequences per cell, placement "
                              f"{results.settings['placement']}\n\n{markdown_table(results)}\n")
    capacity_figure({label: summary}).savefig(paths["plot"])
    return paths



@register_task(MQARTaskConfig)
def mqar_task(task: MQARTaskConfig, ctx: EvalContext) -> Report:
    """Metrics: mqar/accuracy and mqar/pairs/<n>; files (table, capacity plot, JSON) when ctx.out_dir is set."""
    data = MQARConfig(vocab_size=task.vocab_size, num_pairs=list(task.num_pairs), num_queries=task.num_queries,
                      placement=task.placement, power_a=task.power_a)
    results = evaluate_mqar(ctx.model, data, list(task.seq_lens), task.examples, task.seed, task.batch_size,
                            task.chunk_size)
    metrics = {"mqar/accuracy": results.mean(), **{f"mqar/pairs/{n}": v for n, v in results.per_pairs().items()}}
    if ctx.out_dir is None:
        return Report(results.summary(), metrics)
    paths = write_outputs(results, ctx.out_dir, Path(str(ctx.checkpoint)).name if ctx.checkpoint else "model")
    return Report(results.summary(), metrics, {"mqar/capacity": paths["plot"]}, paths["table"].read_text())
