"""Model weights + config on disk: what training writes and what evaluation and generation load.

A model directory holds
    model.safetensors   the weights (a tied output matrix is stored once, as the embedding)
    config.json         {"model": ModelConfig fields, "tokenizer": "byte" or a local tokenizer path, ...}
Loading never unpickles: safetensors holds raw tensors and config.json plain JSON. The training checkpoint adds its
optimizer and trainer state beside these files (see train.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.config import ModelConfig
from models.transformer import Transformer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


def model_state_dict(model: Transformer, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Weights as contiguous CPU tensors, the tied output matrix left out (safetensors forbids shared storage).
    `state`: an already gathered state dict (e.g. the full state of an FSDP-sharded model); default the model's."""
    state = model.state_dict() if state is None else state
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    if model.config.tie_embeddings:
        state.pop("output.weight", None)
    return state


def save_model(
    directory: str | Path,
    model: Transformer,
    tokenizer: str = "byte",
    state: dict[str, torch.Tensor] | None = None,
    **extra: Any,
) -> None:
    """Write model.safetensors and config.json into `directory` (created if needed). `state` as in
    model_state_dict; `extra` goes into config.json beside the model config and tokenizer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(model_state_dict(model, state), str(directory / WEIGHTS))
    meta = {"model": asdict(model.config), "tokenizer": tokenizer, **extra}
    (directory / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_config(directory: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The ModelConfig and the whole config.json of a model directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    path = directory / CONFIG
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(directory)!r} has no {CONFIG}")
    try:
        meta = json.loads(path.read_text())
        model_fields = {f.name for f in fields(ModelConfig)}
        unknown = sorted(set(meta["model"]) - model_fields)
        if unknown:
            raise CheckpointError(f"{path}: unknown ModelConfig fields {unknown}")
        return ModelConfig(**meta["model"]), meta
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is not a valid model config: {error}") from error


def read_weights(model: Transformer, directory: str | Path) -> dict[str, torch.Tensor]:
    """The full state dict in a model directory, checked against `model`'s names and shapes (the tied output
    matrix restored), naming any missing, unexpected or misshapen tensor."""
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(directory)!r} has no {WEIGHTS}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is corrupt or truncated: {error}") from error
    expected = {name for name in model.state_dict() if not (model.config.tie_embeddings and name == "output.weight")}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the model: missing {missing}, unexpected {unexpected}")
    wrong = [name for name, t in model.state_dict().items() if name in state and state[name].shape != t.shape]
    if wrong:
        raise CheckpointError(f"{path}: tensors with the wrong shape: {wrong}")
    if model.config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


def load_weights(model: Transformer, directory: str | Path) -> None:
    """Load model.safetensors into `model` (see read_weights for the checks)."""
    model.load_state_dict(read_weights(model, directory))


def load_model(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[Transformer, dict[str, Any]]:
    """Build the Transformer a model directory describes and load its weights. Returns (model in eval mode,
    the config.json contents)."""
    config, meta = read_config(directory)
    model = Transformer(config)
    load_weights(model, directory)
    model.to(device=device, dtype=dtype).eval()
    return model, meta
