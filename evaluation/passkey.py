"""Passkey retrieval (Landmark Attention's template, as used by the Infini-attention paper's Table 3).

A prompt of an exact token length (instruction and question included) hides a random passkey at a relative
depth of the filler; the model decodes a few tokens greedily after "The pass key is". The prompts come from
`data.passkey.iter_passkey_trials` (the lazy form of `passkey_trials`), seeded, so every model sees the same
prompts. The prompt is streamed through
the model chunk by chunk carrying the state (`models.generation`), so memory stays bounded at any length for
`infini` and `local` attention (a tiny model evaluates a 1M-token prompt on a 2-core CPU: see
benchmarks/passkey_long.py).

Per trial three scores:
    exact           the first integer of the output equals the passkey (the Landmark / paper score)
    substring       the passkey's digits appear anywhere in the output (RULER, the HF reproduction)
    digit_accuracy  share of the passkey's digits the first integer of the output gets right, position by
                    position (partial credit: tells "almost" from "nothing")

    results = evaluate_passkey(model, tokenizer, lengths=[1024, 4096], depths=[0.0, 0.5, 1.0], trials=5, seed=0)
    results.accuracy("exact")          # {(length, depth): accuracy in [0, 1]}
    print(markdown_table(results))     # lengths x depths, percent
    save_heatmap(results, "passkey.png")

Files written when out_dir is given: passkey_trials.jsonl (one line per trial), passkey_summary.json,
passkey_table.md, passkey_heatmap.png.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from data.passkey import PasskeyPrompt, iter_passkey_trials
from data.tokenizer import Tokenizer
from evaluation.report import length_label, write_json, write_jsonl
from models.generation import GenerationConfig, generate
from models.transformer import Transformer

log = logging.getLogger(__name__)

METRICS = ("exact", "substring", "digit_accuracy")
METRIC_NAMES = {"exact": "exact match of the first integer", "substring": "passkey as a substring",
                "digit_accuracy": "digit-level accuracy"}
NAMED_DEPTHS = {"start": 0.0, "middle": 0.5, "end": 1.0}

_INTEGER = re.compile(r"\d+")


@dataclass(frozen=True)
class PasskeyScore:
    exact: bool
    substring: bool
    digit_accuracy: float


def score_passkey(prediction: str, passkey: int | str) -> PasskeyScore:
    """Score one decoded answer against the passkey (see the module docstring for the three scores)."""
    key = str(passkey)
    if not key.isdigit():
        raise ValueError(f"passkey must be a non-negative integer, got {passkey!r}")
    match = _INTEGER.search(prediction)
    predicted = match.group() if match else ""
    exact = bool(predicted) and int(predicted) == int(key)
    correct_digits = sum(p == k for p, k in zip(predicted, key, strict=False))
    return PasskeyScore(exact=exact, substring=key in prediction, digit_accuracy=correct_digits / len(key))


def depth_grid(points: int) -> list[float]:
    """`points` evenly spaced depths from 0 (needle right after the instruction) to 1 (right before the
    question): 3 -> [0, 0.5, 1], 11 -> every 10%."""
    if points < 1:
        raise ValueError(f"depth grid needs at least one point, got {points}")
    if points == 1:
        return [0.5]
    return [round(i / (points - 1), 6) for i in range(points)]


@dataclass
class PasskeyTrial:
    """One prompt, its decoded answer and its scores (one line of passkey_trials.jsonl)."""

    length: int
    depth: float
    trial: int
    passkey: str
    prediction: str
    exact: bool
    substring: bool
    digit_accuracy: float
    needle_start: int
    needle_end: int
    seconds: float


@dataclass
class PasskeyResults:
    """Every trial of a length x depth grid, with the per-cell accuracies."""

    lengths: list[int]
    depths: list[float]
    trials: list[PasskeyTrial]
    settings: dict[str, Any] = field(default_factory=dict)

    def accuracy(self, metric: str = "exact") -> dict[tuple[int, float], float]:
        """{(length, depth): mean of `metric` over the cell's trials}, in [0, 1]."""
        if metric not in METRICS:
            raise ValueError(f"unknown passkey metric {metric!r}; expected one of {METRICS}")
        cells: dict[tuple[int, float], list[float]] = {}
        for t in self.trials:
            cells.setdefault((t.length, t.depth), []).append(float(getattr(t, metric)))
        return {cell: sum(v) / len(v) for cell, v in cells.items()}

    def mean(self, metric: str = "exact") -> float:
        """Mean of `metric` over all trials."""
        return sum(float(getattr(t, metric)) for t in self.trials) / len(self.trials)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: settings, per-metric overall / per-length / per-cell accuracies (cells as
        {length: {depth: accuracy}}, keys as strings)."""
        metrics: dict[str, Any] = {}
        for metric in METRICS:
            cells = self.accuracy(metric)
            per_length = {}
            for length in self.lengths:
                values = [t for t in self.trials if t.length == length]
                per_length[str(length)] = sum(float(getattr(t, metric)) for t in values) / len(values)
            metrics[metric] = {
                "mean": self.mean(metric),
                "per_length": per_length,
                "cells": {str(n): {str(d): cells[(n, d)] for d in self.depths} for n in self.lengths},
            }
        return {
            "task": "passkey",
            "lengths": self.lengths,
            "depths": self.depths,
            "n_trials": len(self.trials),
            "settings": self.settings,
            "metrics": metrics,
            "seconds": sum(t.seconds for t in self.trials),
        }


def _depth_label(depth: float) -> str:
    return f"{100 * depth:g}%"


def markdown_table(results: PasskeyResults, metric: str = "exact") -> str:
    """Lengths (rows) x depths (columns), accuracy in percent, with a mean column."""
    cells = results.accuracy(metric)
    header = "| length | " + " | ".join(_depth_label(d) for d in results.depths) + " | mean |"
    rule = "|---:|" + "---:|" * (len(results.depths) + 1)
    lines = [header, rule]
    for n in results.lengths:
        row = [cells[(n, d)] for d in results.depths]
        values = " | ".join(f"{100 * v:.1f}" for v in row)
        lines.append(f"| {length_label(n)} | {values} | {100 * sum(row) / len(row):.1f} |")
    return "\n".join(lines)


def heatmap_figure(results: PasskeyResults, metric: str = "exact") -> Figure:
    """Depth (rows, 0% at the top) x length (columns) heat map of `metric` in percent. A plain matplotlib
    Figure (Agg canvas, no pyplot global state): save it, or hand it to W&B."""
    cells = results.accuracy(metric)
    grid = [[100 * cells[(n, d)] for n in results.lengths] for d in results.depths]  # (depths, lengths)
    fig = Figure(figsize=(max(4.5, 1.8 + 0.8 * len(results.lengths)), max(3.0, 1.4 + 0.35 * len(results.depths))),
                 dpi=120)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(results.lengths)), [length_label(n) for n in results.lengths])
    ax.set_yticks(range(len(results.depths)), [_depth_label(d) for d in results.depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
    trials = len(results.trials) // max(1, len(results.lengths) * len(results.depths))
    ax.set_title(f"passkey retrieval: {metric} (%)\n{trials} trial(s) per cell", fontsize=10)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def save_heatmap(results: PasskeyResults, path: str | Path, metric: str = "exact") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    heatmap_figure(results, metric).savefig(path)
    return path


def write_outputs(results: PasskeyResults, out_dir: str | Path, metric: str = "exact") -> dict[str, Path]:
    """passkey_trials.jsonl, passkey_summary.json, passkey_table.md and passkey_heatmap.png in out_dir."""
    out_dir = Path(out_dir)
    table = f"Passkey retrieval, {METRIC_NAMES[metric]} (%)\n\n{markdown_table(results, metric)}\n"
    paths = {
        "trials": write_jsonl(out_dir / "passkey_trials.jsonl", (asdict(t) for t in results.trials)),
        "summary": write_json(out_dir / "passkey_summary.json", results.summary()),
        "table": out_dir / "passkey_table.md",
        "heatmap": save_heatmap(results, out_dir / "passkey_heatmap.png", metric),
    }
    paths["table"].write_text(table)
    return paths


def _batches(prompts: Iterable[PasskeyPrompt], batch_size: int) -> Iterator[list[PasskeyPrompt]]:
    """Consecutive prompts of equal length in batches of up to batch_size (equal lengths need no padding).
    Lazy: only one batch of prompts exists at a time, which matters at 1M tokens."""
    batch: list[PasskeyPrompt] = []
    for prompt in prompts:
        if batch and (len(batch) == batch_size or len(batch[0].tokens) != len(prompt.tokens)):
            yield batch
            batch = []
        batch.append(prompt)
    if batch:
        yield batch


def evaluate_passkey(
    model: Transformer,
    tokenizer: Tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float] = (0.0, 0.5, 1.0),
    trials: int = 5,
    seed: int = 0,
    chunk_size: int = 4096,
    out_dir: str | Path | None = None,
    max_new_tokens: int = 10,
    digits: int = 5,
    batch_size: int = 1,
) -> PasskeyResults:
    """Run the passkey grid on `model` and score every trial. Cheap enough at small lengths to call from the
    training loop; writes files (see the module docstring) only when out_dir is given.

    lengths: exact prompt lengths in tokens; depths: needle depths in [0, 1]; trials per (length, depth) cell;
    seed fixes the prompts (identical across models); chunk_size: tokens per forward call of the streamed
    prefill; batch_size: prompts of equal length decoded together (1 keeps memory lowest).
    """
    if not lengths or not depths:
        raise ValueError("passkey evaluation needs at least one length and one depth")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"needle depth {d} is outside [0, 1]")
    lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
    prompts = iter_passkey_trials(tokenizer, lengths, depths, trials, seed, digits=digits)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, chunk_size=chunk_size,
                              stop_tokens=() if tokenizer.eos_id is None else (tokenizer.eos_id,))
    was_training = model.training
    model.eval()
    counters: dict[tuple[int, float], int] = {}
    records: list[PasskeyTrial] = []
    try:
        for batch in _batches(prompts, batch_size):
            start = time.perf_counter()
            with torch.inference_mode():
                outputs = generate(model, [p.tokens for p in batch], config)
            seconds = (time.perf_counter() - start) / len(batch)
            for prompt, new_tokens in zip(batch, outputs):
                prediction = tokenizer.decode(list(new_tokens))
                score = score_passkey(prediction, prompt.passkey)
                cell = (len(prompt.tokens), float(prompt.depth))
                counters[cell] = counters.get(cell, 0) + 1
                records.append(PasskeyTrial(
                    length=cell[0], depth=cell[1], trial=counters[cell] - 1, passkey=prompt.passkey,
                    prediction=prediction, exact=score.exact, substring=score.substring,
                    digit_accuracy=score.digit_accuracy, needle_start=prompt.needle_start,
                    needle_end=prompt.needle_end, seconds=seconds,
                ))
                log.info("passkey length=%d depth=%.2f key=%s -> %r exact=%s (%.1fs)", cell[0], cell[1],
                         prompt.passkey, prediction, score.exact, seconds)
            del batch, outputs  # free the (possibly 1M-token) prompts before building the next ones
    finally:
        model.train(was_training)
    settings = {"trials": trials, "seed": seed, "chunk_size": chunk_size, "max_new_tokens": max_new_tokens,
                "digits": digits, "batch_size": batch_size}
    results = PasskeyResults(lengths, depths, records, settings)
    if out_dir is not None:
        write_outputs(results, out_dir)
    return results
