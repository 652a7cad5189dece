"""Metrics: always to <run_dir>/metrics.jsonl; also to Weights & Biases when logger.wandb is on. Rank 0 only.

W&B runs offline by default (files under <run_dir>/wandb, `wandb sync` uploads them later), so training never
depends on a network. The run id is stored in the run directory and reused on resume, so a resumed run continues
the same W&B run.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path
from typing import Any

from data.config import choice
from training.config import LoggerConfig, WandbMode

WANDB_ID_FILE = "wandb_run_id.txt"


class WandbRun:
    """The optional W&B sink of training (MetricsLogger) and evaluation (`python -m evaluation`). mode disabled
    never imports wandb; offline writes a local run that `wandb sync` can upload later; online needs a login.
    init: the keyword arguments of wandb.init besides mode (project, name, config, dir, id, ...)."""

    def __init__(self, mode: str = "disabled", **init: Any):
        self.mode = choice(WandbMode, mode, "wandb mode").value
        self._run = None
        if self.mode != "disabled":
            import wandb

            self._wandb = wandb
            self._run = wandb.init(mode=self.mode, **init)

    @property
    def enabled(self) -> bool:
        return self._run is not None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._run is not None:
            self._run.log(dict(metrics), step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> None:
        if self._run is not None:
            self._run.log({key: self._wandb.Table(columns=columns, data=rows)}, step=step)

    def log_image(self, key: str, path: str | Path, step: int | None = None) -> None:
        if self._run is not None:
            self._run.log({key: self._wandb.Image(str(path))}, step=step)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class MetricsLogger:
    def __init__(self, cfg: LoggerConfig, run_dir: Path, run_config: dict[str, Any], enabled: bool, name: str):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb = WandbRun()
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.wandb and cfg.mode != "disabled":
            id_file = run_dir / WANDB_ID_FILE  # the same W&B run continues on resume
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self.wandb = WandbRun(cfg.mode, project=cfg.project, entity=cfg.entity, group=cfg.group,
                                  name=cfg.name or name, tags=list(cfg.tags), dir=str(run_dir), id=run_id,
                                  resume="allow", config=run_config)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.wandb.log(metrics, step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        self.wandb.log_image(key, path, step)

    def finish(self) -> None:
        self.wandb.finish()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (tests and reports)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
