"""LoRA continual pre-training with PEFT: low-rank adapters on chosen projections, while the Infini-attention
parameters a converted Llama lacks (the gates, any memory-rule parameters) train in full.

    python train.py experiment=booksum_8b_pretrain_lora trainer.init_from=<converted Llama>   # `lora` section on
    python -m training.lora merge RUN_DIR/checkpoints/step_00001000 merged/   # adapters folded into the weights

apply_lora injects PEFT's LoRA layers into the Transformer in place (peft.inject_adapter_in_model: the module
tree keeps its names, `layers.0.attention.wq` becomes a LoRA layer around the original linear) and leaves
trainable only the adapters and the parameters matched by `train_fully`. A training checkpoint then holds the
frozen base weights, the adapters and the optimizer state of the trainable ones, so resuming is exact like any
other run; merge_lora folds the adapters into the base weights (W + B A * alpha / r) and returns a plain
Transformer that the rest of the project (evaluation, generation, models.hf export) loads.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from torch import nn

from models.checkpoint import read_config, read_weights, save_model
from models.transformer import Transformer

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


@dataclass
class LoraConfig:
    """The `lora` section of the training config (off by default)."""

    enabled: bool = False
    rank: int = 16
    """r: rank of each adapter's update B A."""
    alpha: float = 32.0
    """The update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])
    """Projections that get adapters: wq wk wv wo (attention), w1 w3 w2 (SwiGLU gate, up, down), output."""
    train_fully: list[str] = field(default_factory=lambda: ["*.gate_logit", "*.rule.*"])
    """fnmatch patterns of parameters trained in full (not through adapters); the default: the gates beta and
    every memory-rule parameter (e.g. a write gate), the Infini-attention parameters a converted Llama lacks."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"lora.targets={list(self.targets)}: {unknown or 'empty'}; choose among {TARGETS}")
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"lora.rank={self.rank} (>= 1), lora.alpha={self.alpha} (> 0) and "
                             f"lora.dropout={self.dropout} (in [0, 1)) out of range")


def apply_lora(model: Transformer, cfg: LoraConfig) -> Transformer:
    """Inject adapters into `model` in place and freeze everything but them and cfg.train_fully. Returns model."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    peft_config = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                 target_modules=list(cfg.targets), bias="none")
    inject_adapter_in_model(peft_config, model)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name or any(fnmatchcase(name, p) for p in cfg.train_fully))
    return model


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base linear (W <- W + scale * B A) and put the plain linear back: the model's
    parameter names become those of a model without LoRA. In place; returns model."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def lora_summary(model: nn.Module) -> str:
    """One line: how many parameters train, in adapters and in full."""
    params = dict(model.named_parameters())
    adapters = sum(p.numel() for n, p in params.items() if p.requires_grad and ".lora_" in n)
    full = sum(p.numel() for n, p in params.items() if p.requires_grad and ".lora_" not in n)
    total = sum(p.numel() for p in params.values())
    return (f"lora: {adapters + full:,} of {total:,} parameters train ({adapters:,} in adapters, {full:,} in full: "
            "gates and memory-rule parameters)")


def lora_config_of(meta: dict[str, Any]) -> LoraConfig | None:
    """The LoRA settings a training checkpoint's config.json records (None: trained without LoRA)."""
    section = meta.get("train_config", {}).get("lora") or {}
    return LoraConfig(**section) if section.get("enabled") else None


def merge_checkpoint(checkpoint: str | Path, output: str | Path) -> Transformer:
    """A training checkpoint of a LoRA run -> a plain model directory (models/checkpoint.py) with the adapters
    merged into the weights."""
    config, meta = read_config(checkpoint)
    lora = lora_config_of(meta)
    if lora is None:
        raise ValueError(f"{checkpoint}: its train_config has no enabled `lora` section; nothing to merge")
    model = apply_lora(Transformer(config), lora)
    model.load_state_dict(read_weights(model, checkpoint))
    merge_lora(model)
    save_model(output, model, tokenizer=meta.get("tokenizer", "byte"), merged_from=str(Path(checkpoint).resolve()))
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.lora", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="training checkpoint of a LoRA run -> plain model directory")
    merge.add_argument("checkpoint")
    merge.add_argument("output")
    args = parser.parse_args(argv)
    merge_checkpoint(args.checkpoint, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
