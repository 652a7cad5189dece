"""The training and validation batch streams a DataConfig describes."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from data.stream import BatchStream
from data.tokenizer import Tokenizer
from training.config import DataConfig

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
    """The training stream of this rank (or, with validation=True, a disjoint stream for validation loss).
    segment_len: the model's (model.segment_len); passkey data needs it for data.passkey_answer_offset other than
    fixed, which places each answer at an offset within a segment."""
    seed = cfg.seed + (VALIDATION_SEED_OFFSET if validation else 0)
    if cfg.kind == "passkey":
        from data.passkey import PasskeyBatches, PasskeyDataset

        mixed = bool(cfg.seq_len_mix) and not validation
        lengths = cfg.seq_len_mix if mixed else [cfg.seq_len]
        datasets = []
        for length in lengths:
            try:
                datasets.append(PasskeyDataset(
                    tokenizer, length, seed, cfg.passkey_digits, (cfg.passkey_depth_min, cfg.passkey_depth_max),
                    loss_on=cfg.loss_on, answer_weight=cfg.answer_weight, answer_offset=cfg.passkey_answer_offset,
                    segment_len=segment_len,
                    haystack_scale=1.0 if validation else cfg.passkey_haystack_scale))  # validation: real memories
            except ValueError as error:  # name the config fields behind the dataset's arguments
                where = "data.seq_len_mix" if mixed else "data.seq_len"
                raise ValueError(f"passkey data with {where} length {length}, data.passkey_answer_offset="
                                 f"{cfg.passkey_answer_offset!r}, model.segment_len={segment_len}: {error}") from error
        stream = PasskeyBatches(datasets, cfg.batch_size, rank, world_size)
    elif cfg.kind in ("text", "booksum"):
        if cfg.source is None:
            raise ValueError(f"data.kind={cfg.kind!r} needs data.source (a hub dataset name or local files)")
        split = cfg.val_split if validation and cfg.val_split is not None else cfg.split
        if cfg.kind == "text":
            from data.text import DocumentWindows, load_documents

            documents = load_documents(cfg.source, split, cfg.text_field)
            stream = DocumentWindows(documents, tokenizer, cfg.seq_len, cfg.batch_size, rank, world_size, seed,
                                     text_field=cfg.text_field)
        else:
            from data.booksum import SummarizationBatches, load_booksum

            examples = load_booksum(cfg.source, split, cfg.booksum_level)
            stream = SummarizationBatches(examples, tokenizer, cfg.seq_len, cfg.batch_size, cfg.max_input_tokens,
                                          rank, world_size, seed)
    elif cfg.kind == "mqar":
        from data.mqar import MQARBatches

        if cfg.mqar.vocab_size > tokenizer.vocab_size:
            raise ValueError(f"data.mqar.vocab_size={cfg.mqar.vocab_size} exceeds the vocabulary of data.tokenizer="
                             f"{cfg.tokenizer!r} ({tokenizer.vocab_size}), which the model is sized by")
        stream = MQARBatches(cfg.mqar, cfg.seq_len, cfg.batch_size, seed, rank, world_size)
    else:
        raise ValueError(f"data.kind={cfg.kind!r} is not one of ('passkey', 'text', 'booksum', 'mqar')")
    if cfg.overfit_batches > 0 and not validation:
        return RepeatBatches(stream, cfg.overfit_batches)
    return stream
