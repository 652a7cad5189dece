"""The registry of evaluation tasks: `python -m evaluation task=<option>` looks the task up here by its config's
`name`, and Hydra types each conf/eval/task/*.yaml by the schema registered with it.

A new task is its module plus its YAML: the module defines a schema (a dataclass whose `name` field defaults to the
task's name) and a runner decorated with @register_task(schema); the YAML in conf/eval/task/ extends
`<name>_schema`. Modules of the evaluation package are imported on first use of the registry (as attention/rules
does for memory rules), so nothing else needs an edit.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class EvalContext:
    """What a task runs on: the same for `python -m evaluation` (a checkpoint) and for training (the live model)."""

    model: Any = None
    """The Transformer (eval mode), or None for a task registered with needs_model=False."""
    tokenizer: Any = None
    out_dir: Path | None = None
    """Where the task writes its files; None: write nothing (training's periodic evaluations)."""
    training_length: int | None = None
    """The longest sequence the model trained on, when known (tables label lengths as multiples of it)."""
    checkpoint: str | None = None
    """The model directory `python -m evaluation` was given (tasks without a model may read its config)."""


@dataclass
class Report:
    """A task's result."""

    summary: dict[str, Any]
    """JSON-ready; written as <name>_summary.json by `python -m evaluation`."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Flat scalars named "<task>/<metric>[/...]", logged to W&B and metrics.jsonl."""
    images: dict[str, Path] = field(default_factory=dict)
    text: str = ""
    """What the task prints (its tables); empty when nothing was written."""


Runner = Callable[[Any, EvalContext], Report]
"""runner(task_config, context) -> Report."""


@dataclass(frozen=True)
class Task:
    name: str
    schema: type
    run: Runner
    needs_model: bool = True
    periodic_prefix: tuple[str, str] | None = None
    """(old, new): during training's periodic evaluations, metric names starting with `old` start with `new`
    instead (passkey: "val/passkey_exact..." next to val/loss, as the curves of earlier runs are named)."""
    infini_only: bool = False
    """Training skips the task for models without a memory (model.attention other than infini)."""

    def periodic_name(self, metric: str) -> str:
        if self.periodic_prefix and metric.startswith(self.periodic_prefix[0]):
            return self.periodic_prefix[1] + metric[len(self.periodic_prefix[0]):]
        return metric


TASKS: dict[str, Task] = {}


def register_task(schema: type, needs_model: bool = True, periodic_prefix: tuple[str, str] | None = None,
                  infini_only: bool = False) -> Callable[[Runner], Runner]:
    """Decorator of a task's runner: the task is named by schema's `name` default, and its schema is stored in
    Hydra's ConfigStore as task/<name>_schema (what conf/eval/task/<option>.yaml files extend). The other
    arguments are Task's fields."""
    name = schema.__dataclass_fields__["name"].default

    def register(runner: Runner) -> Runner:
        if name in TASKS and TASKS[name].run is not runner:
            raise ValueError(f"two evaluation tasks are named {name!r}: {TASKS[name].run} and {runner}")
        TASKS[name] = Task(name, schema, runner, needs_model, periodic_prefix, infini_only)
        ConfigStore.instance().store(group="task", name=f"{name}_schema", node=schema)
        return runner

    return register


_discovered = False


def discover() -> dict[str, Task]:
    """Every registered task; the evaluation package's modules are imported on the first call."""
    global _discovered
    if not _discovered:
        _discovered = True
        import evaluation

        for module in pkgutil.iter_modules(evaluation.__path__):
            if module.name != "__main__":
                importlib.import_module(f"evaluation.{module.name}")
    return TASKS


def get_task(name: str) -> Task:
    tasks = discover()
    if name not in tasks:
        raise ValueError(f"task.name {name!r} is not one of {tuple(sorted(tasks))}")
    return tasks[name]


def task_config(entry: dict[str, Any], where: str) -> tuple[Task, Any]:
    """A training config's task entry ({task: <name>, <field>: <value>, ...}: the named task's schema defaults with
    these fields) as (Task, typed task config). Errors name `where` and the field."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    entry = dict(entry)
    if "task" not in entry:
        raise ValueError(f"{where}: name the task, e.g. {{task: passkey, lengths: [512]}} (one of "
                         f"{tuple(sorted(discover()))})")
    name = entry.pop("task")
    try:
        task = get_task(name)
    except ValueError as error:
        raise ValueError(f"{where}.task: {error}") from None
    node = OmegaConf.structured(task.schema)
    for key, value in entry.items():
        try:
            node = OmegaConf.merge(node, {key: value})
        except OmegaConfBaseException as error:
            raise ValueError(f"{where}.{key}={value!r}: {str(error).splitlines()[0]}") from error
    return task, OmegaConf.to_object(node)
