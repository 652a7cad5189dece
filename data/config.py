"""The data config's common fields; each data kind extends DataConfig with its own fields and its loader.

A kind is one schema + one YAML + its loader: the schema (a DataConfig subclass naming its `kind`, with `batches`
building the kind's BatchStream) lives in the kind's module (data/passkey.py PasskeyDataConfig, data/text.py
TextDataConfig, data/booksum.py BooksumDataConfig), is listed in training/config.py DATA_SCHEMAS, and
conf/data/<name>.yaml names its schema in its defaults (`- <kind>_schema`). Hydra composes the chosen YAML onto
that schema alone, so a field of another kind (say data.seq_len_mix with data=pg19) fails at compose time instead
of being silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from data.stream import BatchStream
from data.tokenizer import Tokenizer

E = TypeVar("E", bound=StrEnum)


def choice(enum: type[E], value: str, where: str) -> E:
    """`value` as a member of `enum`, or a ValueError naming `where` and the allowed values. Hydra checks enum
    fields at compose time; this covers configs built in Python (tests, checkpoints' plain dicts)."""
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"{where}={value!r} is not one of {[m.value for m in enum]}") from None


@dataclass
class DataConfig:
    """Fields every data kind has. Subclasses give `kind` their name as its default and implement `batches`."""

    kind: str = ""
    """The kind's name, fixed by its schema: `data.kind` in configs and checkpoints, `<kind>_schema` in Hydra's
    ConfigStore."""
    tokenizer: str = "byte"
    """'byte' (UTF-8 bytes, vocab 256) or a local Hugging Face tokenizer directory."""
    seq_len: int = 512
    """Tokens per training sequence (the training length; segments of model.segment_len inside it)."""
    batch_size: int = 8
    """Sequences per process and micro-step; the global batch is batch_size * world_size * grad_accum."""
    seed: int = 0
    overfit_batches: int = 0
    """Debugging: train on the first this many batches over and over (0: off)."""

    def __post_init__(self) -> None:
        if self.kind != type(self).kind:
            raise ValueError(f"data.kind={self.kind!r} does not match the data schema {type(self).__name__} (kind "
                             f"{type(self).kind!r}): choose a data config of that kind instead of setting kind")

    def batches(self, tokenizer: Tokenizer, rank: int, world_size: int, seed: int, validation: bool,
                segment_len: int | None) -> BatchStream:
        """This kind's stream of rank `rank` with `seed` (the validation stream when validation=True)."""
        raise NotImplementedError(f"{type(self).__name__} does not build batches")


@dataclass
class SourceDataConfig(DataConfig):
    """Fields of the kinds that read a hub dataset or local files (text, booksum)."""

    source: str | None = None
    """Hub dataset name (e.g. deepmind/pg19) or local file / directory / glob (.txt, .jsonl, .parquet)."""
    split: str = "train"
    val_split: str | None = "validation"
    """Split for validation loss; None: validate on held-out batches of the training stream's generator."""

    def split_for(self, validation: bool) -> str:
        """The split a stream reads; data.source is required."""
        if self.source is None:
            raise ValueError(f"data.kind={self.kind!r} needs data.source (a hub dataset name or local files)")
        return self.val_split if validation and self.val_split is not None else self.split
