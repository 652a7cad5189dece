"""Passkey retrieval (Landmark Attention's template, as used by the Infini-attention paper's Table 3).

A prompt of an exact token length (instruction and question included) hides a random passkey at a relative
depth of the filler; the model decodes a few tokens greedily after "The pass key is". The prompts come from
`data.passkey.iter_passkey_trials` (the lazy form of `passkey_trials`), seeded, so every model sees the same
prompts. The prompt is streamed through
the model chunk by chunk carrying the state (`models.generation`), so memory stays bounded at any length for
`infini`, `local` and `xl` attention (a tiny model evaluates a 1M-token prompt on a 2-core CPU: see
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

Offset classes. Segments are fixed by absolute position (segment s = tokens [sN, (s+1)N)), so a prompt of P tokens
tests something different depending on r = P mod N, where its answer starts (data.passkey.offset_class_ranges):
`opens` (r = 0: the question is reachable only through the memory), `straddles` (0 < r < q, q the question's
tokens: the question crosses a boundary) and `inside` (r >= q: the whole question is in the answer's segment).
With segment_len=N each requested length L becomes one prompt length per class, P = N * round(L / N) + r (half
up), r a fixed offset of the class (the middle one; evenly spread with offsets_per_class > 1), and results are
reported per (requested length, class):

    results = evaluate_passkey(model, tokenizer, [2048, 8192], segment_len=64, training_length=512)
    results.class_accuracy("exact")    # {(requested length, class): accuracy}
    print(compact_table(results))      # requested lengths x classes, + overall

Without segment_len (e.g. `full` attention, whose attention has no segments) the lengths are used as given and
their class is "none". `segment_len_of(model.config)` picks the right one.

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

from data.passkey import (
    OFFSET_CLASSES,
    PasskeyPrompt,
    PasskeyTemplate,
    check_offset_settings,
    iter_passkey_trials,
    offset_class_ranges,
)
from data.tokenizer import Tokenizer
from evaluation.report import length_label, percent_heatmap, write_json, write_jsonl
from models.config import ModelConfig
from models.generation import GenerationConfig, generate
from models.transformer import Transformer

log = logging.getLogger(__name__)

METRICS = ("exact", "substring", "digit_accuracy")
METRIC_NAMES = {"exact": "exact match of the first integer", "substring": "passkey as a substring",
                "digit_accuracy": "digit-level accuracy"}
NAMED_DEPTHS = {"start": 0.0, "middle": 0.5, "end": 1.0}
NO_CLASS = "none"
"""The offset class of prompts evaluated without segments (segment_len=None)."""

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


def segment_len_of(config: ModelConfig) -> int | None:
    """The segment length that decides a passkey prompt's offset class for this model: model.segment_len for
    `infini`, `local` and `xl` attention, None for `full` (it attends over the whole stream, so offsets mean
    nothing)."""
    return None if config.attention == "full" else config.segment_len


@dataclass(frozen=True)
class PromptLength:
    """One concrete prompt length of the grid: the requested length it stands for and where its answer lands."""

    requested: int
    """The length asked for (a row of the tables)."""
    length: int
    """P, the prompt's exact length in tokens; the answer starts at position P."""
    offset: int | None
    """r = P mod segment_len; None without segments."""
    offset_class: str
    """inside | straddles | opens (OFFSET_CLASSES), or "none" without segments."""


def spread_offsets(offsets: range, count: int) -> list[int]:
    """`count` offsets of `offsets`, evenly spread: the centres of `count` equal bins (count 1: the middle one,
    away from both class edges); all of them when the class has fewer."""
    count = min(count, len(offsets))
    return [offsets[(2 * i + 1) * len(offsets) // (2 * count)] for i in range(count)]


def prompt_lengths(
    lengths: Sequence[int],
    segment_len: int | None,
    question_len: int,
    offset_classes: Sequence[str] = OFFSET_CLASSES,
    offsets_per_class: int = 1,
) -> list[PromptLength]:
    """The concrete prompt lengths of requested `lengths`, in order: each length, then each class of
    offset_classes (in the given order), then each offset. segment_len None: the lengths as given, class "none".

    With segment_len N, P = N * round(L / N) + r (half up). A class empty for this N and question length q
    (`inside` when N <= q) is skipped with a logged note; an error if every requested class is empty, or if two
    requested lengths round to the same multiple of N (their prompts would be identical).
    """
    check_offset_settings(offset_classes, offsets_per_class)
    if segment_len is None:
        return [PromptLength(int(n), int(n), None, NO_CLASS) for n in lengths]
    if segment_len < 1:
        raise ValueError(f"segment_len must be >= 1 or None, got {segment_len}")
    ranges = offset_class_ranges(segment_len, question_len)
    chosen: dict[str, list[int]] = {}
    for name in offset_classes:
        if not ranges[name]:
            log.warning("passkey offset class %r is empty with segment_len=%d and a %d-token question "
                        "(inside needs r >= %d with r < %d): skipped", name, segment_len, question_len,
                        question_len, segment_len)
            continue
        if offsets_per_class > len(ranges[name]):
            log.info("passkey offset class %r has only %d offset(s) with segment_len=%d: using all of them",
                     name, len(ranges[name]), segment_len)
        chosen[name] = spread_offsets(ranges[name], offsets_per_class)
    if not chosen:
        raise ValueError(f"every requested passkey offset class {list(offset_classes)} is empty with "
                         f"segment_len={segment_len} and a {question_len}-token question")
    rows: list[PromptLength] = []
    bases: dict[int, int] = {}
    for requested in (int(n) for n in lengths):
        base = segment_len * ((requested + segment_len // 2) // segment_len)
        if base in bases:
            raise ValueError(f"passkey lengths {bases[base]} and {requested} both round to {base} tokens "
                             f"({base // segment_len} segments of {segment_len}), so their prompts would be the "
                             "same: keep one of them")
        bases[base] = requested
        for name, offsets in chosen.items():
            rows.extend(PromptLength(requested, base + r, r, name) for r in offsets)
    return rows


@dataclass
class PasskeyTrial:
    """One prompt, its decoded answer and its scores (one line of passkey_trials.jsonl)."""

    requested_length: int
    """The requested length this prompt stands for (== length without segments)."""
    length: int
    offset: int | None
    """r = length mod segment_len, where the answer starts in its segment; None without segments."""
    offset_class: str
    """inside | straddles | opens, or "none" without segments."""
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
    """Every trial of a length x depth grid, with the per-cell accuracies. `lengths` are the concrete prompt
    lengths; `prompt_lengths` says which requested length and offset class each stands for (default: each length
    for itself, class "none")."""

    lengths: list[int]
    depths: list[float]
    trials: list[PasskeyTrial]
    settings: dict[str, Any] = field(default_factory=dict)
    prompt_lengths: list[PromptLength] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prompt_lengths:
            self.prompt_lengths = [PromptLength(n, n, None, NO_CLASS) for n in dict.fromkeys(self.lengths)]

    @property
    def requested_lengths(self) -> list[int]:
        """The requested lengths, in evaluation order."""
        return list(dict.fromkeys(p.requested for p in self.prompt_lengths))

    @property
    def offset_classes(self) -> list[str]:
        """The classes evaluated, in the requested order (["none"] without segments)."""
        return list(dict.fromkeys(p.offset_class for p in self.prompt_lengths))

    @property
    def by_class(self) -> bool:
        """Whether the prompts were placed by offset class (evaluated with a segment length)."""
        return self.offset_classes != [NO_CLASS]

    def rows(self) -> list[tuple[int, str]]:
        """(requested length, class) in table order."""
        return list(dict.fromkeys((p.requested, p.offset_class) for p in self.prompt_lengths))

    def _pooled(self, metric: str, key) -> dict[Any, float]:
        if metric not in METRICS:
            raise ValueError(f"unknown passkey metric {metric!r}; expected one of {METRICS}")
        cells: dict[Any, list[float]] = {}
        for t in self.trials:
            cells.setdefault(key(t), []).append(float(getattr(t, metric)))
        return {cell: sum(v) / len(v) for cell, v in cells.items()}

    def class_cells(self, metric: str = "exact") -> dict[tuple[int, str, float], float]:
        """{(requested length, class, depth): accuracy}, the offsets of a class pooled."""
        return self._pooled(metric, lambda t: (t.requested_length, t.offset_class, t.depth))

    def class_accuracy(self, metric: str = "exact") -> dict[tuple[int, str], float]:
        """{(requested length, class): accuracy over every depth and offset of the class}."""
        return self._pooled(metric, lambda t: (t.requested_length, t.offset_class))

    def per_class(self, metric: str = "exact") -> dict[str, float]:
        """{class: accuracy over every requested length}."""
        return self._pooled(metric, lambda t: t.offset_class)

    def per_requested_length(self, metric: str = "exact") -> dict[int, float]:
        """{requested length: accuracy over every class}."""
        return self._pooled(metric, lambda t: t.requested_length)

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
        {length: {depth: accuracy}}, keys as strings; lengths are the concrete prompt lengths), and by offset
        class: per_requested_length (classes pooled), per_class (requested lengths pooled), per_length_class
        {requested: {class: accuracy}} and class_cells {requested: {class: {depth: accuracy}}}."""
        metrics: dict[str, Any] = {}
        for metric in METRICS:
            cells = self.accuracy(metric)
            per_length = {}
            for length in self.lengths:
                values = [t for t in self.trials if t.length == length]
                per_length[str(length)] = sum(float(getattr(t, metric)) for t in values) / len(values)
            by_class, class_cells = self.class_accuracy(metric), self.class_cells(metric)
            rows = self.rows()
            metrics[metric] = {
                "mean": self.mean(metric),
                "per_length": per_length,
                "cells": {str(n): {str(d): cells[(n, d)] for d in self.depths} for n in self.lengths},
                "per_requested_length": {str(n): v for n, v in self.per_requested_length(metric).items()},
                "per_class": self.per_class(metric),
                "per_length_class": {str(n): {c: by_class[(n, c)] for m, c in rows if m == n}
                                     for n in self.requested_lengths},
                "class_cells": {str(n): {c: {str(d): class_cells[(n, c, d)] for d in self.depths}
                                         for m, c in rows if m == n} for n in self.requested_lengths},
            }
        return {
            "task": "passkey",
            "lengths": self.lengths,
            "requested_lengths": self.requested_lengths,
            "offset_classes": self.offset_classes,
            "prompt_lengths": [asdict(p) for p in self.prompt_lengths],
            "depths": self.depths,
            "n_trials": len(self.trials),
            "settings": self.settings,
            "metrics": metrics,
            "seconds": sum(t.seconds for t in self.trials),
        }


def _depth_label(depth: float) -> str:
    return f"{100 * depth:g}%"


def _multiple(length: int, training_length: int | None) -> str:
    """" (x16)": length as a multiple of the training length (one decimal when not whole); "" without one."""
    if not training_length:
        return ""
    return f" (x{round(length / training_length, 1):g})"


def _training_length(results: PasskeyResults, training_length: int | None) -> int | None:
    return training_length if training_length is not None else results.settings.get("training_length")


def row_label(results: PasskeyResults, requested: int, offset_class: str, training_length: int | None = None
              ) -> str:
    """"8192 (x16) opens, P=8192" (several offsets: "P=8211/8230"); without classes as before: "8K" or "500"."""
    multiple = _multiple(requested, _training_length(results, training_length))
    if offset_class == NO_CLASS:
        return f"{length_label(requested)}{multiple}"
    lengths = [p.length for p in results.prompt_lengths if (p.requested, p.offset_class) == (requested, offset_class)]
    return f"{requested}{multiple} {offset_class}, P={'/'.join(str(n) for n in lengths)}"


def markdown_table(results: PasskeyResults, metric: str = "exact", training_length: int | None = None) -> str:
    """Rows: each requested length (x each offset class when evaluated with segments); columns: depths, then
    the row's mean and, unless `metric` is digit_accuracy, its digit accuracy; percent. training_length (default:
    the one recorded in results.settings) adds "(xK)" to the labels."""
    cells = results.class_cells(metric)
    digits = results.class_accuracy("digit_accuracy") if metric != "digit_accuracy" else None
    header = "| length | " + " | ".join(_depth_label(d) for d in results.depths) + " | mean |"
    header += " digit accuracy |" if digits is not None else ""
    rule = "|---:|" + "---:|" * (len(results.depths) + 1 + (digits is not None))
    lines = [header, rule]
    for n, c in results.rows():
        row = [cells[(n, c, d)] for d in results.depths]
        values = " | ".join(f"{100 * v:.1f}" for v in row)
        line = f"| {row_label(results, n, c, training_length)} | {values} | {100 * sum(row) / len(row):.1f} |"
        lines.append(line + (f" {100 * digits[(n, c)]:.1f} |" if digits is not None else ""))
    return "\n".join(lines)


def compact_table(results: PasskeyResults, metric: str = "exact", training_length: int | None = None) -> str:
    """Requested lengths (rows) x offset classes (columns) + overall, every depth and offset pooled, percent;
    a last row pools the lengths. "-" where a class has no prompt."""
    by_class, classes = results.class_accuracy(metric), results.offset_classes
    per_length, per_class = results.per_requested_length(metric), results.per_class(metric)
    training_length = _training_length(results, training_length)
    lines = ["| length | " + " | ".join(classes) + " | overall |", "|---:|" + "---:|" * (len(classes) + 1)]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    for n in results.requested_lengths:
        values = " | ".join(cell(by_class.get((n, c))) for c in classes)
        lines.append(f"| {n}{_multiple(n, training_length)} | {values} | {cell(per_length[n])} |")
    values = " | ".join(cell(per_class.get(c)) for c in classes)
    lines.append(f"| all lengths | {values} | {cell(results.mean(metric))} |")
    return "\n".join(lines)


def class_note(results: PasskeyResults) -> str:
    """One line saying what the classes mean for the evaluated segment and question lengths."""
    n, q = results.settings.get("segment_len"), results.settings.get("question_tokens")
    skipped = results.settings.get("skipped_offset_classes") or []
    return (f"Offset classes (segment {n} tokens, question {q} tokens, r = P mod {n}): opens r = 0 (the question "
            f"is reachable only through memory), straddles 0 < r < {min(n, q)}, inside {q} <= r < {n}."
            + (f" Skipped, empty for this segment length: {', '.join(skipped)}." if skipped else ""))


def heatmap_figure(results: PasskeyResults, metric: str = "exact") -> Figure:
    """Depth (rows, 0% at the top) x length (columns) heat map of `metric` in percent; with offset classes one
    row per (requested length, class) and one column per depth, so rows read like the markdown table. A plain
    matplotlib Figure (Agg canvas, no pyplot global state): save it, or hand it to W&B."""
    if results.by_class:
        return _class_heatmap_figure(results, metric)
    cells = results.accuracy(metric)
    grid = [[100 * cells[(n, d)] for n in results.lengths] for d in results.depths]  # (depths, lengths)
    trials = len(results.trials) // max(1, len(results.lengths) * len(results.depths))
    fig, _ = percent_heatmap(
        grid, [length_label(n) for n in results.lengths], [_depth_label(d) for d in results.depths],
        "prompt length (tokens)", "needle depth", f"passkey retrieval: {metric} (%)\n{trials} trial(s) per cell",
        (max(4.5, 1.8 + 0.8 * len(results.lengths)), max(3.0, 1.4 + 0.35 * len(results.depths))))
    fig.tight_layout()
    return fig


def _class_heatmap_figure(results: PasskeyResults, metric: str) -> Figure:
    cells, rows = results.class_cells(metric), results.rows()
    grid = [[100 * cells[(n, c, d)] for d in results.depths] for n, c in rows]  # (rows, depths)
    labels = [row_label(results, n, c) for n, c in rows]
    trials = len(results.trials) // max(1, len(results.lengths) * len(results.depths))
    fig, ax = percent_heatmap(
        grid, [_depth_label(d) for d in results.depths], labels, "needle depth", "length, offset class",
        f"passkey retrieval: {metric} (%) by offset class\n{trials} trial(s) per cell and offset",
        (max(6.0, 3.0 + 0.08 * max(map(len, labels)) + 0.6 * len(results.depths)), max(3.0, 1.6 + 0.32 * len(rows))),
        y_fontsize=8)
    for boundary in [i - 0.5 for i in range(1, len(rows)) if rows[i][0] != rows[i - 1][0]]:
        ax.axhline(boundary, color="black", linewidth=1.5)  # between requested lengths
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
    if results.by_class:
        table += (f"\nBy offset class, every depth pooled, {METRIC_NAMES[metric]} (%)\n\n"
                  f"{compact_table(results, metric)}\n\n{class_note(results)}\n")
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
    segment_len: int | None = None,
    offset_classes: Sequence[str] = OFFSET_CLASSES,
    offsets_per_class: int = 1,
    training_length: int | None = None,
) -> PasskeyResults:
    """Run the passkey grid on `model` and score every trial. Cheap enough at small lengths to call from the
    training loop; writes files (see the module docstring) only when out_dir is given.

    lengths: prompt lengths in tokens (exact without segment_len); depths: needle depths in [0, 1]; trials per
    (prompt length, depth) cell; seed fixes the prompts (identical across models); chunk_size: tokens per forward
    call of the streamed prefill; batch_size: prompts of equal length decoded together (1 keeps memory lowest).
    segment_len: the model's segment length (segment_len_of(model.config)); given, each length L is evaluated at
    one prompt length per offset class of offset_classes, offsets_per_class offsets each (prompt_lengths);
    None: the lengths as given. training_length: labels rows with their multiple of it ("(x16)").
    """
    if not lengths or not depths:
        raise ValueError("passkey evaluation needs at least one length and one depth")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"needle depth {d} is outside [0, 1]")
    depths = [float(d) for d in depths]
    question_len = PasskeyTemplate(tokenizer).question_len
    rows = prompt_lengths(lengths, segment_len, question_len, offset_classes, offsets_per_class)
    row_of = {p.length: p for p in rows}
    lengths = [p.length for p in rows]
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
                row = row_of[cell[0]]
                records.append(PasskeyTrial(
                    requested_length=row.requested, length=cell[0], offset=row.offset, offset_class=row.offset_class,
                    depth=cell[1], trial=counters[cell] - 1, passkey=prompt.passkey,
                    prediction=prediction, exact=score.exact, substring=score.substring,
                    digit_accuracy=score.digit_accuracy, needle_start=prompt.needle_start,
                    needle_end=prompt.needle_end, seconds=seconds,
                ))
                log.info("passkey length=%d (%s) depth=%.2f key=%s -> %r exact=%s (%.1fs)", cell[0],
                         row.offset_class, cell[1], prompt.passkey, prediction, score.exact, seconds)
            del batch, outputs  # free the (possibly 1M-token) prompts before building the next ones
    finally:
        model.train(was_training)
    settings = {"trials": trials, "seed": seed, "chunk_size": chunk_size, "max_new_tokens": max_new_tokens,
                "digits": digits, "batch_size": batch_size, "segment_len": segment_len,
                "question_tokens": question_len, "training_length": training_length}
    if segment_len is not None:
        evaluated = {p.offset_class for p in rows}
        settings.update(offset_classes=list(offset_classes), offsets_per_class=offsets_per_class,
                        skipped_offset_classes=[c for c in offset_classes if c not in evaluated])
    results = PasskeyResults(lengths, depths, records, settings, rows)
    if out_dir is not None:
        write_outputs(results, out_dir)
    return results
