"""Training stages (trainer.stages): a curriculum inside one run, e.g. 512-token sequences, then 2048.

Each StageConfig holds overrides; `resolve_stages` merges them onto the run's typed DataConfig / OptimConfig at
train start, so a misspelt key or a wrong type in any stage fails before the first step, naming the stage and the
key. The loop then asks `stage_at` which stage a step belongs to: at a stage start it rebuilds the data stream
from the stage's DataConfig, and the scheduler (training.optim.build_scheduler) restarts warmup + cosine over the
stage's steps. The optimizer and its state are the run's, shared by all stages.
"""

from __future__ import annotations

import operator
import re
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
    advance_when: tuple[str, str, float] | None = None
    """(metric, "<=" or ">=", value) parsed from StageConfig.advance_when, or None."""

    def should_advance(self, record: dict[str, float]) -> bool:
        """Whether a periodic-evaluation record meets advance_when (False without one). A metric the record lacks
        is an error naming the ones it has: a misspelt metric would otherwise never end the stage."""
        if self.advance_when is None:
            return False
        metric, op, value = self.advance_when
        if metric not in record:
            raise ValueError(f"{self.label}.advance_when names {metric!r}, which the periodic evaluation does not "
                             f"log; it logs {sorted(record)}")
        return _COMPARISONS[op](record[metric], value)

    @property
    def end(self) -> int:
        return self.start + self.steps

    @property
    def label(self) -> str:
        return f"trainer.stages[{self.index}] ({self.name!r})"


_COMPARISONS = {"<=": operator.le, ">=": operator.ge}
_CONDITION = re.compile(r"^\s*(\S+)\s*(<=|>=)\s*(\S+)\s*$")


def parse_advance_when(text: str, label: str) -> tuple[str, str, float] | None:
    """"val/loss <= 0.3" -> ("val/loss", "<=", 0.3); "" -> None; anything else: an error naming the stage."""
    if not text:
        return None
    match = _CONDITION.match(text)
    try:
        value = float(match.group(3)) if match else None
    except ValueError:
        value = None
    if value is None:
        raise ValueError(f"{label}.advance_when={text!r}: expected '<metric> <= <value>' or '<metric> >= <value>', "
                         "e.g. 'val/loss <= 0.3'")
    return match.group(1), match.group(2), value


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
        advance_when = parse_advance_when(stage.advance_when, label)
        if advance_when is not None and i == len(configs) - 1:
            raise ValueError(f"{label}.advance_when: the last stage has no next stage to advance to; it runs to "
                             "trainer.max_steps")
        stages.append(Stage(i, name, start, stage.steps, data, optim, advance_when))
        start += stage.steps
    return stages


class Curriculum:
    """The stages of a run and where each one actually starts. A stage with advance_when may end early; the stages
    after it then start earlier by the steps it saved, and the last stage runs to trainer.max_steps (it gets
    those steps). The learning-rate schedule (training.optim.build_scheduler) reads the boundaries from here, and
    checkpoints record them (state_dict), so a resumed run continues the same curriculum."""

    def __init__(self, stages: list[Stage], max_steps: int):
        self.stages = stages
        self.max_steps = max_steps
        self.starts = [s.start for s in stages]

    def index_at(self, step: int) -> int:
        """The stage of 0-based optimizer step `step` (steps past the end: the last stage)."""
        index = 0
        for i, start in enumerate(self.starts):
            if step >= start:
                index = i
        return index

    def stage_at(self, step: int) -> Stage:
        return self.stages[self.index_at(step)]

    def span(self, index: int) -> tuple[int, int]:
        """(first step, number of steps) of stage `index` as the curriculum now stands."""
        end = self.starts[index + 1] if index + 1 < len(self.starts) else self.max_steps
        return self.starts[index], end - self.starts[index]

    def advance(self, index: int, step: int) -> None:
        """Stage `index` ends after `step` steps of the run: every later stage starts earlier by the steps saved."""
        if index + 1 >= len(self.stages):
            raise ValueError("the last stage cannot advance")
        saved = self.starts[index + 1] - step
        if saved <= 0:
            return
        for later in range(index + 1, len(self.starts)):
            self.starts[later] -= saved

    def could_have_run(self, starts: list[int]) -> bool:
        """Whether `starts` (a checkpoint's) can come from these stages: each stage starts where the one before
        planned to end, or earlier when that one has advance_when."""
        if len(starts) != len(self.stages) or (starts and starts[0] != 0):
            return False
        for before, (start, previous) in enumerate(zip(starts[1:], starts)):
            planned = previous + self.stages[before].steps
            if start > planned or (start < planned and self.stages[before].advance_when is None) or start < previous:
                return False
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"starts": list(self.starts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        starts = [int(s) for s in state["starts"]]
        if len(starts) != len(self.stages):
            raise ValueError(f"the checkpoint's curriculum has {len(starts)} stages, trainer.stages {len(self.stages)}")
        self.starts = starts


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
    """The stage of 0-based optimizer step `step` as planned (no stage advanced early; steps past the end: the
    last stage). A running trainer asks its Curriculum, which knows the actual boundaries."""
    return stages[stage_index(step, [s.steps for s in stages])]
