"""The training and validation batch streams a DataConfig describes."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from data.config import DataConfig
from data.stream import BatchStream
from data.tokenizer import Tokenizer

VALIDATION_SEED_OFFSET = 1_000_003


class RepeatBatches:
    """Cycle through the first `count` batches of a stream (data.overfit_batches: can the loop fit them?)."""

    def __init__(self, stream: BatchStream, count: int):
        self.batches = [next(stream) for _ in range(count)]
        self.position = 0

    def __iter__(self) -> RepeatBatches:
        return self

    def __next__(self) -> dict[str, Tensor]:
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "repeat", "count": len(self.batches), "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


def build_data(cfg: DataConfig, tokenizer: Tokenizer, rank: int, world_size: int, validation: bool = False,
               segment_len: int | None = None) -> BatchStream:
    """The training stream of this rank (or, with validation=True, a disjoint stream for validation loss), built by
    the data kind's schema (cfg.batches). segment_len: the model's (model.segment_len); passkey data needs it for
    data.passkey_answer_offset other than fixed, which places each answer at an offset within a segment."""
    seed = cfg.seed + (VALIDATION_SEED_OFFSET if validation else 0)
    stream = cfg.batches(tokenizer, rank, world_size, seed, validation, segment_len)
    if cfg.overfit_batches > 0 and not validation:
        return RepeatBatches(stream, cfg.overfit_batches)
    return stream
