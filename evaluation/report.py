"""Small output helpers shared by the evaluations: JSON/JSONL files, length labels, optional W&B logging."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


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


class WandbLogger:
    """Thin optional W&B sink. mode 'disabled' (the default) never imports wandb; 'offline' writes a local run
    that `wandb sync` can upload later; 'online' needs the user's login."""

    MODES = ("disabled", "offline", "online")

    def __init__(self, mode: str = "disabled", project: str = "infini-lm", name: str | None = None,
                 entity: str | None = None, config: Mapping[str, Any] | None = None, directory: str | None = None):
        if mode not in self.MODES:
            raise ValueError(f"wandb mode {mode!r} is not one of {self.MODES}")
        self.mode = mode
        self._run = None
        if mode != "disabled":
            import wandb

            self._wandb = wandb
            self._run = wandb.init(mode=mode, project=project, name=name, entity=entity,
                                   config=dict(config or {}), dir=directory, job_type="eval")

    @property
    def enabled(self) -> bool:
        return self._run is not None

    def log(self, metrics: Mapping[str, Any]) -> None:
        if self._run is not None:
            self._run.log(dict(metrics))

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self._run is not None:
            self._run.log({key: self._wandb.Table(columns=columns, data=rows)})

    def log_image(self, key: str, path: str | Path) -> None:
        if self._run is not None:
            self._run.log({key: self._wandb.Image(str(path))})

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
