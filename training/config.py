"""Typed schemas of the training configuration, registered in Hydra's ConfigStore.

conf/train.yaml composes YAML files onto these dataclasses, so a misspelt key or a value of the wrong type fails
at compose time with Hydra's message (e.g. "Key 'lrr' not in 'OptimConfig'"). Every field is documented here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from models.config import ModelConfig


@dataclass
class DataConfig:
    kind: str = "passkey"
    """passkey (generated, no download) | text (PG19-style documents) | booksum (summarization fine-tuning)."""
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
    passkey_length_jitter: int = 0
    """passkey: prompts are shorter by a random 0..this many tokens (padded after the answer), so answers start
    at every offset within a segment, including on a segment boundary as in evaluation; use model.segment_len."""
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
    """Quick passkey check during training (token lengths)."""
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    passkey_trials: int = 2
    final_passkey_lengths: list[int] = field(default_factory=list)
    """Passkey evaluation after training (table, JSON, heat map in <run_dir>/passkey); empty: skip."""
    final_passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    final_passkey_trials: int = 4
    chunk_size: int = 4096
    """Prompts are streamed through the model in chunks of this many tokens."""
    seed: int = 1234


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
