"""Model weights + config on disk: what training writes and what evaluation and generation load.

A model directory holds
    model.safetensors   the weights (a tied output matrix is stored once, as the embedding)
    config.json         {"model": ModelConfig fields, "tokenizer": "byte" or a local tokenizer path, ...}
Loading never unpickles: safetensors holds raw tensors and config.json plain JSON. The training checkpoint adds its
optimizer and trainer state beside these files (training/checkpointing.py).

Directories that must never be seen half written (training checkpoints, conversions, exports) are written through
`atomic_directory`: into a hidden `.tmp-<name>-<id>` beside the final name, every file fsynced, then renamed into
place and the parent directory fsynced, so after a crash the name holds either the old or the new directory.
`remove_leftovers` cleans what an interrupted write leaves behind.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


def fsync_directory(directory: str | Path) -> None:
    """Make the entries of `directory` (a rename into it, a removal) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str | Path) -> None:
    """fsync every file under `directory`, then the directories themselves (deepest first)."""
    for root, _dirs, files in os.walk(directory, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_directory(root)


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield an empty hidden directory beside `final` to write into. When the block ends without error, its files
    are fsynced and it is renamed to `final`, and the parent is fsynced. An existing `final` is first renamed to
    `.old-<name>-<id>` and removed only after the new directory holds the name, so a crash at any moment leaves a
    complete directory under the name or in `.old-*` (remove_leftovers restores it). On error the temporary
    directory is removed and `final` is untouched."""
    final = Path(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old = None
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            old = parent / f"{OLD_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
            final.rename(old)
        tmp.rename(final)
        fsync_directory(parent)
    except BaseException:
        if old is not None and not final.exists():
            old.rename(final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)
        fsync_directory(parent)


def remove_leftovers(parent: str | Path) -> list[str]:
    """Clean up after writes through atomic_directory that a crash interrupted: `.tmp-*` directories are removed
    (never renamed into place: not known complete); an `.old-<name>-*` whose `<name>` is missing is renamed back
    (the crash fell between the two renames of a swap), any other `.old-*` removed. Returns a line per action.
    Call it only while no other process writes into `parent` (e.g. under the run directory's lock)."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    actions = []
    for path in sorted(parent.iterdir()):
        if path.name.startswith(TMP_PREFIX):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            actions.append(f"removed {path.name} (an interrupted write)")
        elif path.name.startswith(OLD_PREFIX):
            name = path.name[len(OLD_PREFIX):].rsplit("-", 1)[0]
            if not (parent / name).exists():
                path.rename(parent / name)
                actions.append(f"restored {name} from {path.name} (a swap interrupted between its renames)")
            else:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                actions.append(f"removed {path.name} (replaced by {name})")
    if actions:
        fsync_directory(parent)
    return actions


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
