"""Long-document language-modelling data (PG19 schema: one book per row in field `text`).

`load_documents` reads a hub dataset or local files through the `datasets` library; `DocumentWindows` cuts
documents into training windows, one document stream per batch row, so a trainer carrying memory across steps
sees each document in order and resets a row's memory where its new document starts.

Local sources (anything that exists on disk, contains a glob character, starts with / . ~, or ends in a known
suffix; everything else is a hub name):
    a file          .txt (text builder), .jsonl / .json (json), .parquet (parquet), .csv (csv)
    a glob          e.g. "books/*.txt"; every match must have a known suffix
    a directory     its files with known suffixes (recursively; hidden files skipped). When it has a
                    subdirectory named after the split (PG19's train/ validation/ test/ layout) only that is
                    read; otherwise files named after a split (train.jsonl, test-00000-of-00001.parquet) are
                    filtered by it, and asking for a split that no file is named after is an error rather than
                    silently reading another split.
A .txt file is one document by default (the text builder's sample_by="document"): PG19 ships one book per
.txt file, and the builder's own default (one row per line) would cut books into lines. Pass
txt_sample_by="line" or "paragraph" for corpora with one document per line or per blank-line block.
For a single file or glob, `split` only names the split; the files are what was asked for. Slices work as
with hub datasets: split="train[:100]" reads the train files and keeps their first 100 rows.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from data.config import SourceDataConfig
from data.stream import BatchStream, check_rank, check_state_config, derived_rng, shift_and_pad, stack_rows
from data.tokenizer import Tokenizer

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SPLIT_NAMES = ("train", "validation", "valid", "val", "dev", "test")
TXT_SAMPLE_BY = ("document", "paragraph", "line")


class MissingFieldError(ValueError):
    """A dataset lacks a field the pipeline needs."""


def is_local_source(source: str) -> bool:
    """Whether `source` means files on disk rather than a hub dataset name like "deepmind/pg19"."""
    if Path(source).expanduser().exists() or any(char in source for char in "*?["):
        return True
    return source.startswith(("/", ".", "~")) or Path(source).suffix.lower() in BUILDERS


def _split_of(relative: Path) -> str | None:
    """The split a file belongs to by its path: a directory named after a split, or a file name starting
    with one followed by "-", "_" or "." (train.jsonl, test-00000-of-00001.parquet)."""
    for directory in relative.parts[:-1]:
        if directory in SPLIT_NAMES:
            return directory
    name = relative.name
    for split in SPLIT_NAMES:
        if name.startswith(split) and name[len(split) : len(split) + 1] in ("-", "_", "."):
            return split
    return None


def _directory_files(directory: Path, split: str) -> list[Path]:
    if (directory / split).is_dir():
        directory = directory / split
        by_split = None
    else:
        by_split = split
    files = sorted(
        path for path in directory.rglob("*")
        if path.is_file() and path.suffix.lower() in BUILDERS
        and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    )
    if not files:
        raise FileNotFoundError(f"directory {str(directory)!r} holds no {'/'.join(BUILDERS)} files")
    if by_split is None:
        return files
    splits = {path: _split_of(path.relative_to(directory)) for path in files}
    named = [path for path in files if splits[path] == split]
    found = sorted({s for s in splits.values() if s is not None})
    if named:
        return named
    if found:
        raise FileNotFoundError(
            f"directory {str(directory)!r} has files for splits {found} but none for split {split!r}"
        )
    return files


def local_data_files(source: str, split: str) -> list[str]:
    """The files a local `source` means for `split` (see the module docstring), sorted."""
    path = Path(source).expanduser()
    if any(char in source for char in "*?["):
        files = sorted(Path(match) for match in glob.glob(str(path), recursive=True) if Path(match).is_file())
        if not files:
            raise FileNotFoundError(f"no files match {source!r}")
    elif path.is_dir():
        files = _directory_files(path, split)
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"data path {source!r} does not exist")
    unknown = sorted({str(file) for file in files if file.suffix.lower() not in BUILDERS})
    if unknown:
        raise ValueError(f"cannot read {unknown[:3]}: supported suffixes are {sorted(BUILDERS)}")
    return [str(file) for file in files]


def load_records(
    source: str,
    split: str = "train",
    fields: Sequence[str] = (),
    *,
    cache_dir: str | None = None,
    txt_sample_by: str = "document",
    **load_kwargs: Any,
) -> datasets.Dataset:
    """A `datasets.Dataset` from a hub name or local files, checked to have every name in `fields`.

    Shared by the PG19 and BookSum loaders so both resolve sources and report missing fields the same way.
    `load_kwargs` go to `datasets.load_dataset` (e.g. revision= for a hub dataset).
    """
    if txt_sample_by not in TXT_SAMPLE_BY:
        raise ValueError(f"txt_sample_by must be one of {TXT_SAMPLE_BY}, got {txt_sample_by!r}")
    if is_local_source(source):
        split_name = split.split("[", 1)[0]  # "train[:100]": files of "train", then datasets slices them
        files = local_data_files(source, split_name)
        builders = sorted({BUILDERS[Path(file).suffix.lower()] for file in files})
        if len(builders) > 1:
            raise ValueError(f"{source!r} mixes file types (builders {builders}); load one type at a time")
        empty = [file for file in files if _is_blank(Path(file))]
        if len(empty) == len(files):
            raise ValueError(f"data source {source!r}: {'every file is' if len(files) > 1 else 'the file is'} empty "
                             f"or only whitespace: {empty[:5]}")
        options = {"sample_by": txt_sample_by} if builders[0] == "text" else {}
        try:
            dataset = datasets.load_dataset(
                builders[0], data_files={split_name: files}, split=split, cache_dir=cache_dir, **options, **load_kwargs
            )
        except datasets.exceptions.DatasetGenerationError as error:
            raise _unreadable_file(source, files, error) from error
        if isinstance(dataset, datasets.Dataset) and len(dataset) == 0:  # (a streamed IterableDataset has no len)
            raise ValueError(f"data source {source!r} (split {split!r}) holds no rows; its files: {files[:5]}")
    else:
        try:
            dataset = datasets.load_dataset(source, split=split, cache_dir=cache_dir, **load_kwargs)
        except (ConnectionError, FileNotFoundError, OSError, ValueError) as error:
            raise FileNotFoundError(
                f"data source {source!r} is not a local path ({str(Path(source).expanduser().absolute())!r} does not "
                f"exist), so it was looked up as a Hugging Face Hub dataset name, which failed: {error}. For local "
                "files, check the path (relative paths are taken from the directory train.py runs in)."
            ) from error
    missing = [field for field in fields if field not in dataset.column_names]
    if missing:
        names = ", ".join(repr(field) for field in missing)
        raise MissingFieldError(
            f"dataset {source!r} (split {split!r}) has no field {names}; "
            f"its columns are {dataset.column_names}"
        )
    return dataset


def _is_blank(path: Path, limit: int = 1 << 16) -> bool:
    """Whether a (small) file holds nothing but whitespace; files over `limit` bytes are not read."""
    size = path.stat().st_size
    return size == 0 or (size <= limit and not path.read_bytes().strip())


def _unreadable_file(source: str, files: list[str], error: Exception) -> Exception:
    """The error `datasets` raised while reading local files, rewritten to name the file when it is not UTF-8."""
    cause = error.__cause__ or error.__context__
    if isinstance(cause, UnicodeDecodeError) or "codec can't decode" in str(cause):
        for file in files:
            if Path(file).suffix.lower() == ".parquet":
                continue
            data = Path(file).read_bytes()
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as bad:
                return ValueError(f"data file {file!r} is not UTF-8 text: byte 0x{data[bad.start]:02x} at offset "
                                  f"{bad.start} ({bad.reason}); convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)")
    return ValueError(f"data source {source!r}: reading {files[:5]} failed: {cause or error}")


def load_documents(
    source: str,
    split: str = "train",
    text_field: str = "text",
    *,
    cache_dir: str | None = None,
    txt_sample_by: str = "document",
    **load_kwargs: Any,
) -> datasets.Dataset:
    """Documents for language modelling from a hub dataset (e.g. "deepmind/pg19") or local files.

    A .txt file is one document unless txt_sample_by says otherwise (module docstring).
    """
    return load_records(
        source, split, [text_field], cache_dir=cache_dir, txt_sample_by=txt_sample_by, **load_kwargs
    )


class DocumentWindows:
    """BatchStream of consecutive windows of documents, one document stream per batch row.

    Epoch e orders the documents by a permutation seeded from (seed, e) (identity with shuffle=False); global
    row g = rank * batch_size + b reads documents order[g], order[g + R], order[g + 2R], ... with
    R = world_size * batch_size, so rows and ranks never share a document within an epoch. A document of L
    tokens (EOS appended when the tokenizer has one and append_eos) is cut into ceil((L - 1) / seq_len)
    windows of seq_len + 1 tokens that overlap by one token: every token but the first is a target exactly
    once. The last window is padded with pad_id and loss-masked; documents with fewer than 2 tokens have no
    target and are skipped. new_document[b] is True on a document's first window. A row that runs out of
    documents starts its next epoch on its own (rows advance at different speeds through different lengths).

    Documents are tokenized lazily, one per row at a time. The state is each row's cursor (epoch, document
    position in the row, next window): per rank, so each rank saves and restores its own.
    """

    def __init__(
        self,
        documents: datasets.Dataset | Sequence[str],
        tokenizer: Tokenizer,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        text_field: str = "text",
        append_eos: bool = True,
    ):
        check_rank(batch_size, rank, world_size)
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if isinstance(documents, datasets.Dataset):
            if text_field not in documents.column_names:
                raise MissingFieldError(
                    f"documents have no field {text_field!r}; their columns are {documents.column_names}"
                )
            documents = documents.select_columns([text_field])
        elif isinstance(documents, str):
            raise TypeError("documents must be a sequence of strings or a datasets.Dataset, not one string")
        self.documents = documents
        self.text_field = text_field
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.append_eos = append_eos
        self.num_rows = world_size * batch_size  # R: document streams across all ranks
        if len(documents) < self.num_rows:
            raise ValueError(
                f"DocumentWindows needs at least world_size * batch_size = {self.num_rows} documents (world size "
                f"{world_size}, data.batch_size {batch_size}: one document stream per batch row of every process; "
                f"lower data.batch_size or add documents), got {len(documents)}"
            )
        self._cursors = [[0, 0, 0] for _ in range(batch_size)]  # per row: [epoch, document position, window]
        self._cached: list[tuple[tuple[int, int], list[int]] | None] = [None] * batch_size
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        """Document order of `epoch`; the two most recent are kept (rows are rarely more than one apart)."""
        if epoch not in self._orders:
            order = list(range(len(self.documents)))
            if self.shuffle:
                derived_rng("document-order", int(self.seed), epoch).shuffle(order)
            if len(self._orders) >= 2:
                del self._orders[min(self._orders)]
            self._orders[epoch] = order
        return self._orders[epoch]

    def _text(self, index: int) -> str:
        item = self.documents[index]
        return item[self.text_field] if isinstance(self.documents, datasets.Dataset) else item

    def document_index(self, row: int, epoch: int, position: int) -> int | None:
        """Index in `documents` of the position-th document of batch row `row` in `epoch`; None past the end."""
        slot = self.rank * self.batch_size + row + position * self.num_rows
        order = self._order(epoch)
        return order[slot] if slot < len(order) else None

    def _tokens(self, row: int, epoch: int, position: int, index: int) -> list[int]:
        cached = self._cached[row]
        if cached is not None and cached[0] == (epoch, position):
            return cached[1]
        tokens = self.tokenizer.encode(self._text(index))
        if self.append_eos and self.tokenizer.eos_id is not None:
            tokens.append(self.tokenizer.eos_id)
        self._cached[row] = ((epoch, position), tokens)
        return tokens

    def _next_window(self, row: int) -> tuple[list[int], bool]:
        """The next window of `row` and whether it starts a document; advances the row's cursor."""
        cursor = self._cursors[row]
        epochs_without_window = 0
        while True:
            epoch, position, window = cursor
            index = self.document_index(row, epoch, position)
            if index is None:  # the row finished this epoch
                epochs_without_window += 1
                if epochs_without_window > 1:
                    raise ValueError(
                        f"row {row} of rank {self.rank} found no document with at least 2 tokens in a whole "
                        "epoch: are the documents (nearly) empty?"
                    )
                cursor[:] = [epoch + 1, 0, 0]
                continue
            tokens = self._tokens(row, epoch, position, index)
            start = window * self.seq_len
            if start + 1 >= len(tokens):  # no target left in this document
                cursor[:] = [epoch, position + 1, 0]
                continue
            cursor[2] = window + 1
            return tokens[start : start + self.seq_len + 1], window == 0

    def __iter__(self) -> DocumentWindows:
        return self

    def __next__(self) -> dict[str, Any]:
        rows, new_document = [], []
        for row in range(self.batch_size):
            window, first = self._next_window(row)
            rows.append(shift_and_pad(window, self.seq_len, self.tokenizer.pad_id))
            new_document.append(first)
        return stack_rows(rows, new_document)

    def _config(self) -> dict[str, Any]:
        return {"kind": "document_windows", "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "seed": self.seed,
                "shuffle": self.shuffle, "num_documents": len(self.documents)}

    def state_dict(self) -> dict[str, Any]:
        """Per-row cursors [epoch, document position, next window] and the configuration they hold for."""
        return {**self._config(), "rows": [list(cursor) for cursor in self._cursors]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_config("DocumentWindows", state, self._config())
        rows = state["rows"]
        if len(rows) != self.batch_size or any(len(cursor) != 3 for cursor in rows):
            raise ValueError(f"DocumentWindows state needs {self.batch_size} cursors of 3 ints, got {rows!r}")
        self._cursors = [[int(value) for value in cursor] for cursor in rows]
        self._cached = [None] * self.batch_size


@dataclass
class TextDataConfig(SourceDataConfig):
    """data.kind=text: long documents (PG19 schema) cut into training windows (DocumentWindows)."""

    kind: str = "text"
    text_field: str = "text"
    streaming: bool = False
    """Read data.source as a stream (datasets' streaming=True: a hub corpus such as deepmind/pg19 is never
    downloaded in full), documents in the stream's order (no shuffle), exact resume of the stream position
    (data/streaming.py)."""

    def batches(self, tokenizer: Tokenizer, rank: int, world_size: int, seed: int, validation: bool,
                segment_len: int | None) -> BatchStream:
        if self.streaming:
            from data.streaming import StreamedDocumentWindows, load_document_stream

            return StreamedDocumentWindows(load_document_stream(self.source, self.split_for(validation)), tokenizer,
                                           self.seq_len, self.batch_size, rank, world_size, text_field=self.text_field)
        documents = load_documents(self.source, self.split_for(validation), self.text_field)
        return DocumentWindows(documents, tokenizer, self.seq_len, self.batch_size, rank, world_size, seed,
                               text_field=self.text_field)
