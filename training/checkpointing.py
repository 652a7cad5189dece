"""Training checkpoints: written atomically, loaded without unpickling, resumed exactly.

<run_dir>/checkpoints/step_00000500/
    model.safetensors, config.json     the model directory (models.checkpoint): evaluation and generation load it
    optimizer.safetensors              every tensor of the optimizer state, keyed "<param name>/<state key>"
    rng.safetensors                    torch CPU (and CUDA) generator states
    carry.safetensors                  the memory carried across steps (trainer.carry_state), every rank's
    trainer_state.json                 step, scheduler, optimizer hyper-parameters and scalars, data stream
                                       position of every rank, Python/NumPy RNG states, W&B run id

A checkpoint is written into a hidden temporary directory beside its final name and renamed into place only when
every file is on disk, so a crash mid-write leaves the previous checkpoints intact and no half checkpoint under a
`step_*` name. Model and optimizer state go through torch.distributed.checkpoint's state-dict helpers, which
gather FSDP shards into full tensors (and strip DDP/compile wrappers from names), so a checkpoint is the same
file whatever the parallelism it was written with.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from models.checkpoint import CheckpointError, read_weights, save_model
from models.transformer import Transformer

PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
CARRY = "carry.safetensors"
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories of interrupted writes are ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state dict -> (tensors for safetensors, the JSON-serialisable rest)."""
    tensors, scalars = {}, {}
    for param_name, param_state in state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(param_name, {})[key] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        param_name, _, name = key.rpartition("/")
        state.setdefault(param_name, {})[name] = value
    for param_name, scalars in rest["scalars"].items():
        state.setdefault(param_name, {}).update(scalars)
    return {"state": state, "param_groups": rest["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _set_rng_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = rest["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = rest["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    raw_model: Transformer,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data_states: list[dict[str, Any]],
    trainer_state: dict[str, Any],
    tokenizer: str,
    train_config: dict[str, Any],
    keep_last: int,
    is_main: bool = True,
    carry: dict[str, torch.Tensor] | None = None,
) -> Path | None:
    """Write step `step` atomically and keep the last `keep_last` checkpoints. Collective under FSDP: every rank
    calls it; rank 0 (is_main) writes. Returns the checkpoint path on rank 0."""
    model_state = get_model_state_dict(model, options=FULL)
    optim_state = get_optimizer_state_dict(model, optimizer, options=FULL)
    if not is_main:
        return None
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        save_model(tmp, raw_model, tokenizer, state=model_state, train_config=train_config, step=step)
        optim_tensors, optim_rest = _split_optimizer_state(optim_state)
        save_file(optim_tensors, str(tmp / OPTIMIZER))
        rng_tensors, rng_rest = _rng_state()
        save_file(rng_tensors, str(tmp / RNG))
        if carry:
            save_file({k: v.detach().cpu().contiguous() for k, v in carry.items()}, str(tmp / CARRY))
        state = {"step": step, "scheduler": scheduler.state_dict(), "optimizer": optim_rest, "data": data_states,
                 "rng": rng_rest, **trainer_state}
        (tmp / TRAINER_STATE).write_text(json.dumps(state))
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step after a resume: swap, never leave the name empty of a checkpoint
            old = root / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(stale)
    return final


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a training checkpoint: no {TRAINER_STATE}")
    try:
        return json.loads(state_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{state_file} is corrupt: {error}") from error


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    raw_model: Transformer,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG states from `path`; return the trainer state (step, data
    positions, ...; "carry": the carried-state tensors if any). Every file is read and checked before anything is
    modified."""
    path = Path(path)
    state = read_trainer_state(path)
    weights = read_weights(raw_model, path)
    try:
        optim_tensors = load_file(str(path / OPTIMIZER))
        rng_tensors = load_file(str(path / RNG))
        carry = load_file(str(path / CARRY)) if (path / CARRY).is_file() else {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: optimizer or RNG state is missing or corrupt: {error}") from error
    try:
        optim_state = _join_optimizer_state(optim_tensors, state["optimizer"])
        set_model_state_dict(model, weights, options=FULL)
        set_optimizer_state_dict(model, optimizer, optim_state, options=FULL)
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(rng_tensors, state["rng"])
    except (KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path} does not match this run's model or optimizer: {error}") from error
    return {**state, "carry": carry}
