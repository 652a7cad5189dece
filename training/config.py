"""Typed schemas of the training configuration, registered in Hydra's ConfigStore.

conf/train.yaml composes YAML files onto these dataclasses, so a misspelt key or a value of the wrong type fails
at compose time with Hydra's message (e.g. "Key 'lrr' not in 'OptimConfig'"). Every field is documented here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from data.mqar import MQARConfig
from data.passkey import check_offset_settings
from models.config import ModelConfig


@dataclass
class DataConfig:
    kind: str = "passkey"
    """passkey (generated, no download) | text (PG19-style documents) | booksum (summarization fine-tuning) |
    mqar (generated multi-query associative recall, data/mqar.py; settings in data.mqar)."""
    tokenizer: str = "byte"
    """'byte' (UTF-8 bytes, vocab 256) or a local Hugging Face tokenizer directory."""
    seq_len: int = 512
    """Tokens per training sequence (the training length; segments of model.segment_len inside it)."""
    batch_size: int = 8
    """Sequences per process and micro-step; the global batch is batch_size * world_size * grad_accum."""
    seed: int = 0
    # passkey
    passkey_digits: int = 5
    passkey_depth_min: float = 0.0
    passkey_depth_max: float = 1.0
    loss_on: str = "answer"
    """passkey: 'answer' (loss on the passkey tokens only) or 'all' (every token)."""
    seq_len_mix: list[int] = field(default_factory=list)
    """passkey: each step's sequence length is drawn uniformly from these (a length curriculum by mixture);
    empty: always seq_len. The validation stream and the evaluation's "training length" use seq_len."""
    passkey_answer_offset: str = "fixed"
    """passkey: where the answer starts within its segment of model.segment_len tokens (r = P mod N, P the
    prompt length). fixed: the prompt fills the sequence, so every answer of a length sits at one offset (the
    question inside the answer's segment); uniform: r uniform over 0..N-1; balanced: each offset class with
    probability 1/3 (opens r = 0: the question reachable only through memory, as at evaluation lengths like 2^k;
    straddles 0 < r < q; inside r >= q; q the question's tokens, 37 bytes), r uniform inside it. uniform and
    balanced shorten the prompt by up to N-1 tokens (padding after the answer, no loss), so every training length
    needs N-1 tokens beyond the template's minimum; balanced needs N > q."""
    passkey_haystack_scale: float = 1.0
    """passkey, training augmentation (1: off): each example's filler tokens are written into the memory with a
    multiplicity c drawn log-uniformly from [1, this] (data/passkey.py, PasskeyDataset). Under the linear rule a
    token written with weight c adds what c copies add, so short prompts present the memory states of prompts with
    up to this many times their filler. Validation batches and evaluation prompts are never scaled."""
    answer_weight: float = 1.0
    """passkey: weight of the answer tokens in the loss (with loss_on=all: > 1 keeps them from drowning)."""
    # text and booksum
    source: str | None = None
    """Hub dataset name (e.g. deepmind/pg19) or local file / directory / glob (.txt, .jsonl, .parquet)."""
    split: str = "train"
    val_split: str | None = "validation"
    """Split for validation loss; None: validate on held-out batches of the training stream's generator."""
    text_field: str = "text"
    booksum_level: str = "book"
    """booksum: 'book' (abertsch/booksum-fullbooks schema) or 'chapter' (kmfoda/booksum schema)."""
    max_input_tokens: int = 32768
    """booksum: the document is truncated to this many tokens before the summary prompt."""
    # mqar
    mqar: MQARConfig = field(default_factory=MQARConfig)
    """mqar: vocabulary, pair counts, queries and their placement (data/mqar.py); the length is data.seq_len."""
    overfit_batches: int = 0
    """Debugging: train on the first this many batches over and over (0: off)."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """adamw | adafactor (the paper's optimizer; torch.optim.Adafactor)."""
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr * min_lr_ratio."""
    warmup_steps: int = 100
    schedule: str = "cosine"
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
    device: str = "auto"
    """auto (cuda if available, else cpu) | cpu | cuda."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16."""
    parallel: str = "auto"
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
    """auto (latest checkpoint in the run directory, else start fresh) | none | path to a checkpoint directory."""
    run_dir: str = "${hydra:runtime.output_dir}"
    progress: bool = True
    """A tqdm progress bar with tokens/s on rank 0."""
    seed: int = 0
    stages: list[StageConfig] = field(default_factory=list)
    """A curriculum inside the run: the stages run in order, each with its own data overrides and a restarted
    learning-rate schedule (see StageConfig); max_steps must equal the sum of their steps. Empty: one stage of
    max_steps on data.* and optim.* as given."""


@dataclass
class LoggerConfig:
    wandb: bool = False
    """Log to Weights & Biases too (rank 0). Metrics always go to <run_dir>/metrics.jsonl."""
    project: str = "infini-lm"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "offline"
    """offline (default: files in the run directory, `wandb sync` later) | online | disabled."""


@dataclass
class EvalConfig:
    passkey_lengths: list[int] = field(default_factory=lambda: [512, 2048])
    """Quick passkey check during training (token lengths; one prompt length per offset class each, see
    offset_classes)."""
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    passkey_trials: int = 2
    final_passkey_lengths: list[int] = field(default_factory=list)
    """Passkey evaluation after training (table, JSON, heat map in <run_dir>/passkey); empty: skip."""
    final_passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    final_passkey_trials: int = 4
    offset_classes: list[str] = field(default_factory=lambda: ["inside", "straddles", "opens"])
    """Both passkey evaluations report each length per class of where the answer starts in its segment (inside,
    straddles, opens; evaluation/passkey.py): length L runs at P = N * round(L / N) + r for each class listed
    (N = model.segment_len; a class empty for N is skipped with a note). Ignored for model.attention=full, whose
    lengths are used as given. Each class adds a prompt per (length, depth, trial)."""
    offsets_per_class: int = 1
    """Offsets per class, evenly spread inside it (1: the class's middle offset; opens has only r = 0)."""
    chunk_size: int = 4096
    """Prompts are streamed through the model in chunks of this many tokens."""
    seed: int = 1234
    probe_lengths: list[int] = field(default_factory=list)
    """`infini` models: at every periodic evaluation, the memory probe's needle share of the read weight and
    filler-to-needle ratio at these prompt lengths (evaluation/memory_probe.py; depths 0, 0.5, 1, one trial, no
    knock-outs), logged as probe/needle_share/<length>/...; empty: off."""
    final_probe_lengths: list[int] = field(default_factory=list)
    """`infini` models: after training, the full memory probe (knock-outs included) at these lengths, written to
    <run_dir>/probe (memory_probe.json/.md/.png); empty: off."""

    def __post_init__(self) -> None:
        """Bad class names fail when the config is built, not after training."""
        try:
            check_offset_settings(list(self.offset_classes), self.offsets_per_class)
        except ValueError as error:
            raise ValueError(f"evaluation.offset_classes / evaluation.offsets_per_class: {error}") from error


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    name: str = "run"
    """A label for the run (W&B name, log lines)."""


def register_configs() -> None:
    """Register the schemas: train.yaml extends `train_schema`; each group file extends its group's `schema`."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, node in (("model", ModelConfig), ("data", DataConfig), ("optim", OptimConfig),
                        ("trainer", TrainerConfig), ("logger", LoggerConfig)):
        cs.store(group=group, name="schema", node=node)
