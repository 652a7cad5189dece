"""RULER-style retrieval evaluation over a length x task grid (prompts: data/ruler.py).

Each prompt is streamed through the model chunk by chunk carrying the state and continued greedily
(`models.generation.generate`) for as many tokens as the expected answer takes plus a margin (or max_new_tokens);
the decoded text is scored with RULER's two metrics:

    all    string_match_all: the share of expected strings found in the output (RULER's score for the needle and
           variable-tracking tasks; 1 for a single needle found, 0.5 for 2 of 4 values)
    part   string_match_part: 1 if any expected string is found

    results = evaluate_ruler(model, tokenizer, lengths=[512, 2048], tasks=TASKS, trials=4, seed=0)
    results.cells("all")        # {(task, length): score}
    print(markdown_table(results, "all"))

Files (write_outputs): ruler_trials.jsonl, ruler_summary.json, ruler_table.md, ruler_heatmap.png.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from data.ruler import TASKS, RulerPrompt, RulerSettings, RulerTemplate, ruler_trial, score_all, score_part
from data.tokenizer import Tokenizer
from evaluation.report import length_label, percent_heatmap, write_json, write_jsonl
from evaluation.tasks import EvalContext, Report, register_task
from models.generation import GenerationConfig, generate
from models.transformer import Transformer

log = logging.getLogger(__name__)

METRICS = ("all", "part")
ANSWER_MARGIN = 8
"""Decoding steps beyond the tokens of the expected answer " a, b, c" (room for a different separator)."""


@dataclass
class RulerTaskConfig:
    """python -m evaluation task=ruler: RULER-style retrieval over lengths x tasks (evaluation/ruler.py)."""

    name: str = "ruler"
    lengths: list[int] = field(default_factory=lambda: [1024, 4096, 16384])
    """Exact prompt lengths in tokens (instruction and question included). The byte tokenizer needs about 640 for
    niah_multiquery's four needles and long question."""
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    """Any of data.ruler.TASKS."""
    trials: int = 4
    """Prompts per (task, length)."""
    seed: int = 0
    """Seeds the prompts: the same seed gives every model the same ones."""
    max_new_tokens: int = 0
    """Greedy decoding steps; 0: the expected answer's tokens + 8."""
    chunk_size: int = 4096
    batch_size: int = 1
    """Prompts of a (task, length) decoded together."""
    metric: str = "all"
    """Score of the markdown table and heat map: all or part."""
    settings: RulerSettings = field(default_factory=RulerSettings)
    """Digits, distractors, values, queries, hops, chains (data/ruler.py)."""


@dataclass
class RulerTrial:
    """One prompt, its output and scores (one line of ruler_trials.jsonl)."""

    task: str
    length: int
    trial: int
    answers: list[str]
    prediction: str
    all: float
    part: float
    needle_spans: list[tuple[int, int]]


@dataclass
class RulerResults:
    lengths: list[int]
    tasks: list[str]
    trials: list[RulerTrial]
    settings: dict[str, Any] = field(default_factory=dict)

    def cells(self, metric: str = "all") -> dict[tuple[str, int], float]:
        """{(task, length): mean score}."""
        if metric not in METRICS:
            raise ValueError(f"unknown RULER metric {metric!r}; expected one of {METRICS}")
        pooled: dict[tuple[str, int], list[float]] = {}
        for t in self.trials:
            pooled.setdefault((t.task, t.length), []).append(getattr(t, metric))
        return {cell: sum(v) / len(v) for cell, v in pooled.items()}

    def per_length(self, metric: str = "all") -> dict[int, float]:
        """{length: mean over the tasks} (each task weighs the same, as RULER averages its tasks)."""
        cells = self.cells(metric)
        return {n: sum(cells[(t, n)] for t in self.tasks) / len(self.tasks) for n in self.lengths}

    def summary(self) -> dict[str, Any]:
        return {
            "task": "ruler",
            "lengths": self.lengths,
            "tasks": self.tasks,
            "metrics": {m: {"cells": {t: {str(n): self.cells(m)[(t, n)] for n in self.lengths} for t in self.tasks},
                            "per_length": {str(n): v for n, v in self.per_length(m).items()},
                            "mean": sum(self.per_length(m).values()) / len(self.lengths)} for m in METRICS},
            "settings": self.settings,
        }


def evaluate_ruler(
    model: Transformer,
    tokenizer: Tokenizer,
    lengths: Sequence[int],
    tasks: Sequence[str] = TASKS,
    trials: int = 4,
    seed: int = 0,
    settings: RulerSettings | None = None,
    max_new_tokens: int = 0,
    chunk_size: int = 4096,
    batch_size: int = 1,
) -> RulerResults:
    """Run and score every (task, length, trial) prompt (module docstring)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown or no RULER task(s) {unknown or list(tasks)}; expected a subset of {TASKS}")
    if not lengths or trials < 1 or batch_size < 1 or max_new_tokens < 0:
        raise ValueError(f"RULER needs lengths, trials >= 1, batch_size >= 1 and max_new_tokens >= 0; got "
                         f"lengths={list(lengths)}, trials={trials}, batch_size={batch_size}, "
                         f"max_new_tokens={max_new_tokens}")
    settings = settings or RulerSettings()
    template = RulerTemplate(tokenizer, settings)
    stop = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
    was_training = model.training
    model.eval()
    records: list[RulerTrial] = []
    try:
        for task in tasks:
            for length in lengths:
                for first in range(0, trials, batch_size):
                    batch = [ruler_trial(template, task, int(length), t, seed)
                             for t in range(first, min(first + batch_size, trials))]
                    steps = max_new_tokens or max(answer_tokens(tokenizer, p) for p in batch) + ANSWER_MARGIN
                    config = GenerationConfig(max_new_tokens=steps, do_sample=False, chunk_size=chunk_size,
                                              stop_tokens=stop)
                    with torch.inference_mode():
                        outputs = generate(model, [p.tokens for p in batch], config)
                    for index, (prompt, new_tokens) in enumerate(zip(batch, outputs)):
                        prediction = tokenizer.decode(list(new_tokens))
                        records.append(RulerTrial(task, int(length), first + index, prompt.answers, prediction,
                                                  score_all(prediction, prompt.answers),
                                                  score_part(prediction, prompt.answers), prompt.needle_spans))
                        log.info("ruler %s length=%d -> %r (expected %s)", task, length, prediction, prompt.answers)
    finally:
        model.train(was_training)
    return RulerResults([int(n) for n in lengths], list(tasks), records,
                        {"trials": trials, "seed": seed, **asdict(settings), "max_new_tokens": max_new_tokens,
                         "chunk_size": chunk_size})


def answer_tokens(tokenizer: Tokenizer, prompt: RulerPrompt) -> int:
    """Tokens of the answer written out as " a, b, c"."""
    return len(tokenizer.encode(" " + ", ".join(prompt.answers)))


def markdown_table(results: RulerResults, metric: str = "all") -> str:
    """Tasks (rows) x lengths (columns), percent; a last row averages the tasks."""
    cells = results.cells(metric)
    lines = ["| task | " + " | ".join(length_label(n) for n in results.lengths) + " |",
             "|---|" + "---:|" * len(results.lengths)]
    for task in results.tasks:
        lines.append(f"| {task} | " + " | ".join(f"{100 * cells[(task, n)]:.1f}" for n in results.lengths) + " |")
    lines.append("| mean | " + " | ".join(f"{100 * v:.1f}" for v in results.per_length(metric).values()) + " |")
    return "\n".join(lines)


def heatmap_figure(results: RulerResults, metric: str = "all") -> Figure:
    cells = results.cells(metric)
    grid = [[100 * cells[(t, n)] for n in results.lengths] for t in results.tasks]  # (tasks, lengths)
    fig, _ = percent_heatmap(
        grid, [length_label(n) for n in results.lengths], list(results.tasks), "prompt length (tokens)", None,
        f"RULER-style retrieval, string_match_{metric} (%)\n{results.settings['trials']} trial(s) per cell",
        (max(5.0, 3.2 + 0.8 * len(results.lengths)), max(3.0, 1.4 + 0.4 * len(results.tasks))), y_fontsize=8)
    fig.tight_layout()
    return fig


def write_outputs(results: RulerResults, out_dir: str | Path, metric: str = "all") -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"trials": write_jsonl(out_dir / "ruler_trials.jsonl", (asdict(t) for t in results.trials)),
             "summary": write_json(out_dir / "ruler_summary.json", results.summary()),
             "table": out_dir / "ruler_table.md", "heatmap": out_dir / "ruler_heatmap.png"}
    other = "part" if metric == "all" else "all"
    paths["table"].write_text(f"RULER-style retrieval, string_match_{metric} (%)\n\n{markdown_table(results, metric)}"
                              f"\n\nstring_match_{other} (%)\n\n{markdown_table(results, other)}\n")
    heatmap_figure(results, metric).savefig(paths["heatmap"])
    return paths


@register_task(RulerTaskConfig)
def ruler_task(task: RulerTaskConfig, ctx: EvalContext) -> Report:
    """Metrics: ruler/<task>/<length> (the configured metric); files (table, heat map, trials) with ctx.out_dir."""
    if task.metric not in METRICS:
        raise ValueError(f"task.metric {task.metric!r} is not one of {METRICS}")
    settings = task.settings if isinstance(task.settings, RulerSettings) else RulerSettings(**task.settings)
    results = evaluate_ruler(ctx.model, ctx.tokenizer, list(task.lengths), list(task.tasks), task.trials, task.seed,
                             settings, task.max_new_tokens, task.chunk_size, task.batch_size)
    metrics = {f"ruler/{t}/{n}": v for (t, n), v in results.cells(task.metric).items()}
    if ctx.out_dir is None:
        return Report(results.summary(), metrics)
    paths = write_outputs(results, ctx.out_dir, task.metric)
    return Report(results.summary(), metrics, {"ruler/heatmap": paths["heatmap"]}, paths["table"].read_text())
