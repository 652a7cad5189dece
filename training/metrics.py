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

from training.config import LoggerConfig

WANDB_ID_FILE = "wandb_run_id.txt"


class MetricsLogger:
    def __init__(self, cfg: LoggerConfig, run_dir: Path, run_config: dict[str, Any], enabled: bool, name: str):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.wandb and cfg.mode != "disabled":
            self.wandb_run = _init_wandb(cfg, run_dir, run_config, name)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        if self.enabled and self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Image(str(path))}, step=step)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def _init_wandb(cfg: LoggerConfig, run_dir: Path, run_config: dict[str, Any], name: str):
    if cfg.mode not in ("offline", "online", "disabled"):
        raise ValueError(f"logger.mode={cfg.mode!r} is not one of ('offline', 'online', 'disabled')")
    import wandb

    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(
        project=cfg.project, entity=cfg.entity, group=cfg.group, name=cfg.name or name, tags=list(cfg.tags),
        mode=cfg.mode, dir=str(run_dir), id=run_id, resume="allow", config=run_config,
    )


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (tests and reports)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
