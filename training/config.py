"""Typed schemas of the training configuration, registered in Hydra's ConfigStore.

conf/train.yaml composes YAML files onto these dataclasses, so a misspelt key or a value of the wrong type fails
at compose time with Hydra's message (e.g. "Key 'lrr' not in 'OptimConfig'"). Every field is documented here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from data.booksum import BooksumDataConfig
from data.config import DataConfig, choice
from data.mqar import MQARDataConfig
from data.passkey import PasskeyDataConfig
from data.text import TextDataConfig
from models.config import ModelConfig
from training.lora import LoraConfig

DATA_SCHEMAS: tuple[type[DataConfig], ...] = (PasskeyDataConfig, TextDataConfig, BooksumDataConfig, MQARDataConfig)
"""The data kinds: each schema is registered as data/<kind>_schema, which conf/data/*.yaml files extend. A new
kind adds its schema (a DataConfig subclass with its loader, in data/<kind>.py) here."""


class Optimizer(StrEnum):
    adamw = "adamw"
    adafactor = "adafactor"


class Schedule(StrEnum):
    cosine = "cosine"
    constant = "constant"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(StrEnum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Parallel(StrEnum):
    auto = "auto"
    ddp = "ddp"
    fsdp = "fsdp"
    none = "none"


class WandbMode(StrEnum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class OptimConfig:
    name: Optimizer = Optimizer.adamw
    """adamw | adafactor (the paper's optimizer; torch.optim.Adafactor)."""
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr * min_lr_ratio."""
    warmup_steps: int = 100
    schedule: Schedule = Schedule.cosine
    """cosine (linear warmup, then cosine to min_lr_ratio at trainer.max_steps) | constant (after warmup)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Applied to matrices only; never to norms, biases or gates."""
    gate_lr_multiplier: float = 10.0
    """The gate logits learn at lr * this, without weight decay: with the base lr, Adam moves a gate by ~lr per
    step and gates stay near sigmoid(0) = 0.5 (the Hugging Face reproduction's finding)."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    no_weight_decay: list[str] = field(default_factory=list)
    """fnmatch patterns of parameter names (as model.named_parameters() spells them, e.g.
    "layers.*.attention.wk.weight"; `*` also matches dots) moved to the no-decay group: matrices that should not
    be pulled towards zero. A pattern that matches no parameter is an error (a misspelt name would otherwise
    silently decay what it meant to spare)."""

    def __post_init__(self) -> None:
        self.name = choice(Optimizer, self.name, "optim.name")
        self.schedule = choice(Schedule, self.schedule, "optim.schedule")


SCHEDULE_FIELDS = ("lr", "warmup_steps", "min_lr_ratio", "schedule")
"""The OptimConfig fields a training stage may override: the optimizer itself (its parameter groups, betas, weight
decay and Adam moments) lives through the whole run, only its learning-rate schedule restarts per stage."""


@dataclass
class StageConfig:
    """One stage of a curriculum inside one run (trainer.stages), e.g. short sequences first, then long ones.

    Why stages rather than chained runs: the optimizer state (Adam moments) and the step count carry over, and a
    checkpoint/resume mid-curriculum continues exactly. Every override is checked against DataConfig /
    OptimConfig at train start, before any step, so a misspelt key in stage 3 does not fail hours in."""

    steps: int = MISSING
    """Optimizer steps of this stage (> 0); the stages' steps must sum to trainer.max_steps."""
    data: dict[str, Any] = field(default_factory=dict)
    """Overrides of DataConfig fields for this stage, e.g. {seq_len: 2048, seq_len_mix: [512, 1024, 2048],
    batch_size: 4}. The stream is rebuilt at the stage start; from the second stage on its seed is derived from
    (data.seed, stage index) so a stage does not replay the previous stage's examples. Not data.tokenizer (the
    model's vocabulary is fixed for the run). Validation batches stay those of the base data config."""
    optim: dict[str, Any] = field(default_factory=dict)
    """Overrides of the schedule fields of OptimConfig only (SCHEDULE_FIELDS: lr, warmup_steps, min_lr_ratio,
    schedule): the schedule restarts at the stage start, warmup then cosine (or constant) over this stage's
    steps at this stage's lr."""
    name: str = ""
    """A label for logs and checkpoints; empty: "stage<i>" (i from 0)."""
    advance_when: str = ""
    """End the stage early, at the first periodic evaluation (trainer.eval_every) whose record meets this
    condition: "<metric> <= <value>" or "<metric> >= <value>", e.g. "val/loss <= 0.3" (validation batches are the
    current stage's). `steps` is then the most the stage may take; the steps it saves go to the last stage, so the
    run still lasts trainer.max_steps. Why: a curriculum advances when a stage has done its job (the recurrent
    memory transformers' curricula add a segment once training converges), and when that happens varies from run
    to run (the default job's retrieval appears between ~1500 and ~2500 steps). Empty: the stage lasts `steps`. Not
    on the last stage."""


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    device: Device = Device.auto
    """auto (cuda if available, else cpu) | cpu | cuda."""
    precision: Precision = Precision.auto
    """auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16. bf16 is autocast with float32 parameters; on CPU the
    weight matmuls run in bf16 (fast with AVX-512 BF16 / AMX, slow without) and attention, RoPE, the memory M and z,
    the norms' arithmetic (their output is written in bf16 for the next linear) and the loss in float32 (README
    "Performance")."""
    retain_heap: bool = True
    """On CPU with glibc: keep the memory a step frees in the process heap for the next step (mallopt: no block mapped
    on its own, the heap never trimmed; training/parallel.py retain_heap) instead of returning it to the system and
    faulting fresh zeroed pages in again. Thousands of page faults fewer per default-job step, hundreds of thousands
    at 32K tokens (README "Performance"); RSS stays at its high-water mark. false: glibc's defaults."""
    parallel: Parallel = Parallel.auto
    """Under torchrun: auto (ddp) | ddp | fsdp (FSDP2 fully_shard per block) | none."""
    tbptt_segments: int = 0
    """Back-propagation through time is truncated every this many segments (memory detached, backward run per
    chunk); 0: full BPTT over the whole sequence."""
    carry_state: bool = False
    """Carry the memory across training steps (document streams; a row's memory resets at a new document)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (bounds memory at long training lengths)."""
    compile: bool = False
    """torch.compile each block."""
    log_every: int = 10
    eval_every: int = 200
    """Validation loss and a quick passkey check every this many steps; 0 disables."""
    eval_batches: int = 4
    ckpt_every: int = 500
    """Checkpoint every this many steps (and at the end, and on SIGTERM/SIGUSR1); 0: only at the end."""
    keep_last: int = 3
    init_from: str | None = None
    """Start from these weights instead of a random init: a model directory of ours (model.safetensors +
    config.json) or a Hugging Face Llama directory (converted; new gates at model.gate_init). Ignored when
    resuming."""
    resume: str = "auto"
    """auto (latest checkpoint in the run directory, else start fresh) | none | path to a checkpoint directory.
    Starting before the run directory's newest checkpoint (an earlier step, or none) moves the later checkpoints
    aside to <run_dir>/branches/ (training/checkpointing.py)."""
    resume_changes: list[str] = field(default_factory=list)
    """Config keys (or prefixes, e.g. [optim.lr, model] or [optim]) that may differ from the resumed checkpoint's
    config. Without them a resume whose model, data, optim, seed, precision, ... changed is refused with the list of
    changes; changes of logging, evaluation, checkpoint cadence and trainer.max_steps are always allowed (listed).
    Accepted optim changes take effect (hyper-parameters and base learning rates; Adam moments kept)."""
    run_dir: str = "${hydra:runtime.output_dir}"
    progress: bool = True
    """A tqdm progress bar with tokens/s on rank 0."""
    seed: int = 0
    stages: list[StageConfig] = field(default_factory=list)
    """A curriculum inside the run: the stages run in order, each with its own data overrides and a restarted
    learning-rate schedule (see StageConfig); max_steps must equal the sum of their steps. Empty: one stage of
    max_steps on data.* and optim.* as given."""

    def __post_init__(self) -> None:
        self.device = choice(Device, self.device, "trainer.device")
        self.precision = choice(Precision, self.precision, "trainer.precision")
        self.parallel = choice(Parallel, self.parallel, "trainer.parallel")


@dataclass
class LoggerConfig:
    wandb: bool = False
    """Log to Weights & Biases too (rank 0). Metrics always go to <run_dir>/metrics.jsonl."""
    project: str = "infini-lm"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: WandbMode = WandbMode.offline
    """offline (default: files in the run directory, `wandb sync` later) | online | disabled."""

    def __post_init__(self) -> None:
        self.mode = choice(WandbMode, self.mode, "logger.mode")


@dataclass
class EvalConfig:
    """Evaluations during and after training: lists of tasks of the evaluation registry (evaluation/tasks.py, the
    tasks of `python -m evaluation task=...`), each entry {task: <name>, <field>: <value>, ...} a task's schema
    defaults (evaluation/config.py) with these fields, plus an optional `label`. Checked at train start."""

    periodic: list[dict[str, Any]] = field(default_factory=list)
    """Run at every periodic evaluation (trainer.eval_every) on the model in training, after the validation loss;
    their metrics go into the same record (passkey: val/passkey_exact, val/passkey_exact/<length>[/<class>];
    memory_probe: probe/needle_share/<length>/...). No files."""
    final: list[dict[str, Any]] = field(default_factory=list)
    """Run after the last step: tables printed, files in <run_dir>/<label> (label: the task's name unless given),
    metrics logged at the last step (passkey/exact/<length>[/<class>], probe/...)."""


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA continual pre-training (training/lora.py); off by default."""
    name: str = "run"
    """A label for the run (W&B name, log lines)."""


def register_configs() -> None:
    """Register the schemas: train.yaml extends `train_schema`; the group files are typed by their field of
    TrainConfig, except data files, which extend their kind's schema (`<kind>_schema`)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, node in (("model", ModelConfig), ("optim", OptimConfig), ("trainer", TrainerConfig),
                        ("logger", LoggerConfig)):
        cs.store(group=group, name="schema", node=node)
    for schema in DATA_SCHEMAS:  # data/*.yaml name their kind's schema: `defaults: [<kind>_schema]`
        cs.store(group="data", name=f"{schema.kind}_schema", node=schema)
