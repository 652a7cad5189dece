"""The batch interface every training data source implements, and the helpers the sources share.

A batch is a dict of tensors (B batch rows, T = seq_len):
    tokens        (B, T) int64    model input
    targets       (B, T) int64    next-token targets: the source sequence shifted by one
    loss_mask     (B, T) float32  1 where the target counts in the loss, 0 on prompts and padding
    new_document  (B,)   bool     True where row b starts a new document: a trainer that carries the model's
                                  memory across steps resets that row's memory first
and optionally
    write_scale   (B, T) float32  a multiplier of each token's memory write (Transformer.forward's write_scale;
                                  the passkey haystack-scale augmentation); absent: every token written once

A stream is an endless iterator of such batches plus `state_dict()` / `load_state_dict()`: the state is small,
JSON-serialisable and taken after the batches already returned by `next`, so a run resumed from it receives
exactly the batch it would have received next. Streams are plain iterators in the training process (no
DataLoader workers prefetching ahead of the recorded state).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

BATCH_KEYS = ("tokens", "targets", "loss_mask", "new_document")


@runtime_checkable
class BatchStream(Protocol):
    """An endless, resumable iterator of training batches (see the module docstring for the batch layout)."""

    def __iter__(self) -> Iterator[dict[str, Tensor]]: ...

    def __next__(self) -> dict[str, Tensor]: ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the stream, taken after the last batch returned."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the next batch is the one the saved stream would have returned next."""
        ...


def derived_rng(*parts: object) -> random.Random:
    """A random.Random seeded from a hash of `parts` (ints, floats, strings).

    Why: seeds derived this way are identical across processes and Python versions (no hash randomisation) and
    independent for neighbouring inputs, unlike `Random(seed + i)`.
    """
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def shift_and_pad(
    sequence: Sequence[int], seq_len: int, pad_id: int, loss_from: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """One batch row from a sequence of at most seq_len + 1 tokens.

    tokens = sequence[:-1], targets = sequence[1:], both padded with pad_id to seq_len. loss_mask is 1 on the
    targets sequence[i] with loss_from <= i (so a prompt is excluded by passing its length) and 0 on padding.
    Returns tokens (T,) int64, targets (T,) int64, loss_mask (T,) float32.
    """
    if not 2 <= len(sequence) <= seq_len + 1:
        raise ValueError(f"a row needs between 2 and seq_len + 1 = {seq_len + 1} tokens, got {len(sequence)}")
    n_targets = len(sequence) - 1
    full = torch.tensor(sequence, dtype=torch.int64)  # (n_targets + 1,)
    tokens = torch.full((seq_len,), pad_id, dtype=torch.int64)  # (T,)
    targets = torch.full((seq_len,), pad_id, dtype=torch.int64)  # (T,)
    tokens[:n_targets] = full[:-1]
    targets[:n_targets] = full[1:]
    loss_mask = torch.zeros(seq_len, dtype=torch.float32)  # (T,)
    loss_mask[max(loss_from - 1, 0) : n_targets] = 1.0  # target j is sequence[j + 1]
    return tokens, targets, loss_mask


def stack_rows(
    rows: Sequence[tuple[Tensor, Tensor, Tensor]], new_document: Sequence[bool]
) -> dict[str, Tensor]:
    """A batch dict from per-row (tokens, targets, loss_mask) triples of equal length."""
    if len(rows) != len(new_document):
        raise ValueError(f"{len(rows)} rows but {len(new_document)} new_document flags")
    return {
        "tokens": torch.stack([row[0] for row in rows]),  # (B, T)
        "targets": torch.stack([row[1] for row in rows]),  # (B, T)
        "loss_mask": torch.stack([row[2] for row in rows]),  # (B, T)
        "new_document": torch.tensor(list(new_document), dtype=torch.bool),  # (B,)
    }


def check_rank(batch_size: int, rank: int, world_size: int) -> None:
    """Shared argument checks of the data-parallel streams."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")


def check_state_config(kind: str, state: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse a state saved by a differently configured stream: it would silently yield other data."""
    missing = [key for key in expected if key not in state]
    if missing:
        raise ValueError(f"{kind} state lacks {missing}; it has keys {sorted(state)}")
    differing = {key: (state[key], value) for key, value in expected.items() if state[key] != value}
    if differing:
        details = ", ".join(f"{key}: saved {saved!r}, now {now!r}" for key, (saved, now) in differing.items())
        raise ValueError(f"{kind} state was saved with a different configuration ({details})")
