"""Tokenizers: UTF-8 bytes by default (nothing to download), Hugging Face tokenizers from a local directory.

Every tokenizer maps text to ids without adding special tokens; the data pipelines add EOS themselves where
they want it, so a prompt's token count is exactly what the pipeline assembled.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipelines and evaluations need from a tokenizer."""

    vocab_size: int
    eos_id: int | None
    pad_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, no download, lossless for any text.

    There is no EOS byte (documents are separated by the pipelines, not by a token) and padding uses byte 0,
    always loss-masked. Decoding replaces invalid UTF-8 (e.g. a multi-byte character cut by generation) with
    U+FFFD rather than failing.
    """

    spec = "byte"
    vocab_size = 256
    eos_id: int | None = None
    bos_id: int | None = None
    pad_id = 0

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text`."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the byte ids; invalid UTF-8 becomes U+FFFD."""
        try:
            data = bytes(ids)
        except ValueError:
            bad = next(i for i in ids if not 0 <= i < 256)
            raise ValueError(f"byte token ids must lie in [0, 256), got {bad}") from None
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (never downloaded).

    pad_id falls back to EOS, then to 0, because many LM tokenizers define no pad token; padding is always
    loss-masked, so which id fills it does not matter for training.
    """

    def __init__(self, path: str | Path):
        directory = Path(path).expanduser()
        if not directory.exists():
            raise FileNotFoundError(f"tokenizer directory {str(directory)!r} does not exist")
        if not directory.is_dir():
            raise NotADirectoryError(
                f"tokenizer path {str(directory)!r} is not a directory "
                "(expected one written by save_pretrained)"
            )
        try:
            from transformers import AutoTokenizer
        except ImportError as error:  # transformers is an optional extra
            raise ImportError("HFTokenizer needs transformers: pip install -e '.[hf]'") from error
        self.spec = str(directory)
        self._tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self.vocab_size: int = len(self._tokenizer)
        self.eos_id: int | None = self._tokenizer.eos_token_id
        self.bos_id: int | None = self._tokenizer.bos_token_id
        pad = self._tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else self.eos_id if self.eos_id is not None else 0

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS (verbose=False: books exceed model_max_length on purpose)."""
        return list(self._tokenizer.encode(text, add_special_tokens=False, verbose=False))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens kept and spaces not "cleaned up", so decoding is faithful."""
        return self._tokenizer.decode(
            list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def __repr__(self) -> str:
        return f"HFTokenizer({self.spec!r})"


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """"byte" -> ByteTokenizer; anything else is a local tokenizer directory -> HFTokenizer.

    Hub names are deliberately not resolved: the build and test machines cannot reach the hub, so a tokenizer
    is downloaded once by the user (save_pretrained) and referenced by its path.
    """
    if str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer {str(spec)!r} is neither 'byte' nor an existing local directory "
            f"({str(path)!r} does not exist)"
        )
    return HFTokenizer(path)
