"""The streaming state of a Transformer and what the trainer does with it.

ModelState is one AttentionState per layer: the local attention's key/value cache (for `xl` the previous segment
too) and, for `infini`, the compressive memory (M, z). It is explicit (passed in and returned by
Transformer.forward), never stored on the module. Here: mapping a function over it, truncating back-propagation,
resetting rows that start a new document, named tensors for checkpoints, and the scalars the trainer logs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attention.infini import AttentionState
from attention.memory import Memory

if TYPE_CHECKING:
    from models.transformer import Transformer

ModelState = tuple[AttentionState, ...]


def map_state(state: ModelState, fn: Callable[[Tensor], Tensor]) -> ModelState:
    """Apply fn to every tensor of a state (detach, index_select for beams, .to(device), ...)."""
    return tuple(
        AttentionState(fn(s.keys), fn(s.values), None if s.memory is None else Memory(*map(fn, s.memory)))
        for s in state
    )


def detach_state(state: ModelState) -> ModelState:
    """Cut back-propagation through time at this point of the stream (truncated BPTT)."""
    return map_state(state, Tensor.detach)


def reset_rows(state: ModelState | None, new_document: Tensor) -> ModelState | None:
    """Empty the memory of the rows that start a new document (trainer.carry_state); the others keep theirs.
    new_document: (B,) bool.

    The rows' cached keys/values are zeroed too. Between training windows (seq_len a multiple of segment_len,
    checked by train.validate) `infini` and `local` cache nothing, and `xl` caches exactly the previous segment,
    which attention/xl.py then treats as absent for an all-zero row: that row's next segment sees only itself."""
    if state is None:
        return None
    keep = (~new_document).to(state[0].keys.device)

    def reset(t: Tensor) -> Tensor:
        return t * keep.view(-1, *([1] * (t.dim() - 1))).to(t.dtype)

    return tuple(AttentionState(reset(s.keys), reset(s.values),
                                None if s.memory is None else Memory(*map(reset, s.memory))) for s in state)


def flatten_state(state: ModelState, prefix: str) -> dict[str, Tensor]:
    """A carried state as named tensors for a checkpoint ("<prefix>layer<i>/<name>")."""
    tensors = {}
    for i, s in enumerate(state):
        tensors[f"{prefix}layer{i}/keys"], tensors[f"{prefix}layer{i}/values"] = s.keys, s.values
        if s.memory is not None:
            tensors[f"{prefix}layer{i}/matrix"], tensors[f"{prefix}layer{i}/norm"] = s.memory
    return tensors


def unflatten_state(tensors: dict[str, Tensor], prefix: str, n_layers: int, device: torch.device) -> ModelState:
    """The inverse of flatten_state, on `device`."""

    def get(key: str) -> Tensor | None:
        value = tensors.get(prefix + key)
        return None if value is None else value.to(device)

    return tuple(
        AttentionState(get(f"layer{i}/keys"), get(f"layer{i}/values"),
                       None if get(f"layer{i}/matrix") is None else Memory(get(f"layer{i}/matrix"),
                                                                            get(f"layer{i}/norm")))
        for i in range(n_layers)
    )


def state_metrics(model: Transformer, state: ModelState | None) -> dict[str, float]:
    """Per layer and head sigmoid(gate); per layer the Frobenius norm of M and the mean of z (batch mean)."""
    metrics = {}
    gates = model.gates()
    if gates is not None:
        for layer, row in enumerate(gates.tolist()):
            for head, value in enumerate(row):
                metrics[f"gate/layer{layer}/head{head}"] = value
    for layer, s in enumerate(state or ()):
        if s.memory is not None:
            metrics[f"memory/M_norm/layer{layer}"] = float(s.memory.matrix.norm(dim=(-2, -1)).mean())
            metrics[f"memory/z_mean/layer{layer}"] = float(s.memory.norm.mean())
    return metrics
