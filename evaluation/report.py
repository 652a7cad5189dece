"""Small output helpers shared by the evaluations: JSON/JSONL files, length labels, optional W&B logging."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from training.metrics import WandbRun


def write_json(path: str | Path, payload: Any) -> Path:
    """Pretty JSON, keys in insertion order (the summary reads top to bottom); parent folders created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n")
    return path


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """One JSON object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def length_label(n: int) -> str:
    """Token counts the way papers write them: 32768 -> '32K', 1048576 -> '1M', 5000 -> '5000'."""
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20}M"
    if n >= 2**10 and n % 2**10 == 0:
        return f"{n // 2**10}K"
    return str(n)


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN/inf in strict readers: store them as null."""
    return x if math.isfinite(x) else None


def WandbLogger(mode: str = "disabled", project: str = "infini-lm", name: str | None = None,  # noqa: N802
                entity: str | None = None, config: Mapping[str, Any] | None = None,
                directory: str | None = None) -> WandbRun:
    """The evaluation's W&B run (training.metrics.WandbRun, shared with training): mode disabled (the default)
    never imports wandb."""
    return WandbRun(mode, project=project, name=name, entity=entity, config=dict(config or {}), dir=directory,
                    job_type="eval")


def percent_heatmap(grid: list[list[float]], x_ticks: list[str], y_ticks: list[str], x_label: str, y_label: str | None,
                    title: str, figsize: tuple[float, float], y_fontsize: float | None = None):
    """A heat map of percentages (rows x columns, 0-100, red to green, each cell's value written in it) as a plain
    matplotlib Figure (Agg canvas, no pyplot global state). Returns (figure, axes) for additions such as separator
    lines; the passkey and RULER tables use it."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=120)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(x_ticks)), x_ticks)
    ax.set_yticks(range(len(y_ticks)), y_ticks, **({} if y_fontsize is None else {"fontsize": y_fontsize}))
    ax.set_xlabel(x_label)
    if y_label is not None:
        ax.set_ylabel(y_label)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax)
    return fig, ax
