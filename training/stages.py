"""Training stages (trainer.stages): a curriculum inside one run, e.g. 512-token sequences, then 2048.

Each StageConfig holds overrides; `resolve_stages` merges them onto the run's typed DataConfig / OptimConfig at
train start, so a misspelt key or a wrong type in any stage fails before the first step, naming the stage and the
key. The loop then asks `stage_at` which stage a step belongs to: at a stage start it rebuilds the data stream
from the stage's DataConfig, and the scheduler (training.optim.build_scheduler) restarts warmup + cosine over the
stage's steps. The optimizer and its state are the run's, shared by all stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.stream import derived_rng
from training.config import SCHEDULE_FIELDS, DataConfig, OptimConfig, TrainConfig
from training.optim import stage_index

FIXED_DATA_FIELDS = ("tokenizer",)
"""DataConfig fields a stage may not override: the model's vocabulary is fixed for the run."""


@dataclass
class Stage:
    """One resolved stage: global steps [start, start + steps) of the run."""

    index: int
    name: str
    start: int
    """0-based global step of the stage's first optimizer step."""
    steps: int
    data: DataConfig
    """data.* with the stage's overrides; seed is already the stage's stream seed (stage_seed)."""
    optim: OptimConfig
    """optim.* with the stage's schedule overrides."""

    @property
    def end(self) -> int:
        return self.start + self.steps

    @property
    def label(self) -> str:
        return f"trainer.stages[{self.index}] ({self.name!r})"


def stage_seed(seed: int, index: int) -> int:
    """The data seed of stage `index`: data.seed for the first stage (a one-stage run is today's run), then a seed
    derived from (data.seed, index). Why: examples are functions of (seed, index in the stream) and every stage's
    stream starts at index 0, so with one seed a later stage would replay the first stage's examples (the same
    passkeys, at another length)."""
    return seed if index == 0 else derived_rng("training-stage", int(seed), int(index)).randrange(2**31)


def _merge(base: Any, overrides: dict[str, Any], label: str) -> Any:
    """`overrides` merged key by key onto the typed `base` (so the error names the key that failed)."""
    node = OmegaConf.structured(base)
    for key, value in overrides.items():
        try:
            node = OmegaConf.merge(node, {key: value})
        except OmegaConfBaseException as error:
            reason = str(error).splitlines()[0]
            raise ValueError(f"{label}.{key}={value!r}: {reason}") from error
    return OmegaConf.to_object(node)


def resolve_stages(cfg: TrainConfig) -> list[Stage]:
    """The stages of trainer.stages with their overrides merged and checked; [] when there are none."""
    configs = cfg.trainer.stages
    if not configs:
        return []
    total = sum(stage.steps for stage in configs)
    if total != cfg.trainer.max_steps:
        raise ValueError(f"trainer.max_steps={cfg.trainer.max_steps} but the steps of trainer.stages sum to {total}: "
                         f"set trainer.max_steps={total} (a run with stages lasts exactly their steps)")
    stages, start = [], 0
    for i, stage in enumerate(configs):
        name = stage.name or f"stage{i}"
        label = f"trainer.stages[{i}] ({name!r})"
        if stage.steps <= 0:
            raise ValueError(f"{label}.steps={stage.steps}: a stage needs at least one step")
        for key in stage.data:
            if key in FIXED_DATA_FIELDS:
                raise ValueError(f"{label}.data.{key}: cannot change between stages (the model's vocabulary is "
                                 f"fixed for the run); set data.{key} for the whole run")
        for key in stage.optim:
            if key not in SCHEDULE_FIELDS and key in OptimConfig.__dataclass_fields__:
                raise ValueError(f"{label}.optim.{key}: a stage may only override the learning-rate schedule "
                                 f"{SCHEDULE_FIELDS}; the optimizer and its state (Adam moments) are kept for the "
                                 f"whole run, so set optim.{key} for the whole run")
        data = _merge(cfg.data, stage.data, f"{label}.data")
        data.seed = stage_seed(data.seed, i)
        optim = _merge(cfg.optim, stage.optim, f"{label}.optim")
        stages.append(Stage(i, name, start, stage.steps, data, optim))
        start += stage.steps
    return stages


def longest_training_length(train_config: dict[str, Any]) -> int | None:
    """The longest sequence a run trains on: data.seq_len, data.seq_len_mix and every stage's overrides of them.
    Evaluations report lengths as multiples of it ("16x its training length" means 16x the longest sequence it
    saw, not the first stage's). Takes the resolved config as a plain dict (what checkpoints store)."""
    data = train_config.get("data", {})
    lengths = [data.get("seq_len"), *data.get("seq_len_mix", [])]
    for stage in train_config.get("trainer", {}).get("stages", []):
        overrides = stage.get("data", {})
        lengths += [overrides.get("seq_len"), *overrides.get("seq_len_mix", [])]
    lengths = [int(n) for n in lengths if n is not None]
    return max(lengths) if lengths else None


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage of 0-based optimizer step `step` (steps past the end: the last stage)."""
    return stages[stage_index(step, [s.steps for s in stages])]
