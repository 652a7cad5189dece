"""Documents read as a stream (data.streaming=true): a hub corpus such as PG19 (11 GB) or local files are iterated
with `datasets.load_dataset(..., streaming=True)`, never downloaded or converted in full, and cut into the same
training windows as DocumentWindows, with exact resume of the stream position.

    documents = load_document_stream("deepmind/pg19", "train")
    stream = StreamedDocumentWindows(documents, tokenizer, seq_len=8192, batch_size=2)

What differs from DocumentWindows (data/text.py) is only where each batch row's next document comes from: there, an
epoch's permutation of an indexed dataset; here, the next document of this rank's stream, taken by the row that
needs one (rows in batch order, so the assignment is deterministic). With one row per rank both are the same
sequence of documents, and therefore the same batches (tested). No shuffling: documents come in the stream's
order (a shuffle buffer could not be restored exactly), epochs restart the stream (set_epoch). Ranks read
disjoint documents (datasets.distributed.split_dataset_by_node: whole shards when their number divides
world_size, else every world_size-th document).

Exact resume: the state holds, besides the rows' cursors, the stream's own position (IterableDataset.state_dict:
shard and offset, so a resumed run skips whole shards without reading them) and, per row, the position of the
document it is in the middle of; on resume each row re-reads just that document.
"""

from __future__ import annotations

import copy
from typing import Any

import datasets
from datasets.distributed import split_dataset_by_node

from data.stream import check_rank, check_state_config
from data.text import DocumentWindows, MissingFieldError, load_records
from data.tokenizer import Tokenizer


def load_document_stream(source: str, split: str = "train", **load_kwargs: Any) -> datasets.IterableDataset:
    """A hub dataset or local files (the sources load_documents accepts) as an IterableDataset."""
    return load_records(source, split, (), streaming=True, **load_kwargs)


class StreamedDocumentWindows(DocumentWindows):
    """BatchStream of DocumentWindows' windows over an IterableDataset (see the module docstring)."""

    def __init__(
        self,
        documents: datasets.IterableDataset,
        tokenizer: Tokenizer,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        text_field: str = "text",
        append_eos: bool = True,
    ):
        check_rank(batch_size, rank, world_size)
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if not isinstance(documents, datasets.IterableDataset):
            raise TypeError(f"documents must be a datasets.IterableDataset, got {type(documents).__name__} (a "
                            "Dataset converts with .to_iterable_dataset())")
        # a copy never iterated: every reader starts from it (a dataset keeps the position it was loaded at)
        self._pristine = split_dataset_by_node(documents, rank, world_size) if world_size > 1 else documents
        self.text_field, self.tokenizer, self.seq_len = text_field, tokenizer, seq_len
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.append_eos, self.shuffle, self.seed = append_eos, False, 0
        self._cursors = [[0, 0, 0] for _ in range(batch_size)]  # per row: [0, document count, window]
        self._cached: list[tuple[tuple[int, int], list[int]] | None] = [None] * batch_size
        self._positions: list[dict[str, Any] | None] = [None] * batch_size  # stream position of each row's doc
        self._reread: list[bool] = [False] * batch_size  # after a resume: re-read the row's current document
        self._position = {"epoch": 0, "state": None}  # before the stream's next document; state None: epoch start
        self._documents, self._iterator = self._open(self._position)

    def _open(self, position: dict[str, Any]) -> tuple[datasets.IterableDataset, Any]:
        """A fresh copy of the dataset and an iterator whose next document is the one after `position`."""
        documents = copy.deepcopy(self._pristine)
        documents.set_epoch(position["epoch"])
        if position["state"] is not None:
            documents.load_state_dict(position["state"])
        return documents, iter(documents)

    def document_index(self, row: int, epoch: int, position: int) -> int:
        return position  # a stream never runs out for a row: it restarts (next epoch) instead

    def _field(self, item: dict[str, Any]) -> str:
        if self.text_field not in item:
            raise MissingFieldError(f"streamed documents have no field {self.text_field!r}; their fields are "
                                    f"{sorted(item)}")
        return item[self.text_field]

    def _next_document(self) -> tuple[dict[str, Any], str]:
        """The stream's position before its next document, and that document (a new epoch at the end)."""
        for _ in range(2):
            position = copy.deepcopy(self._position)
            try:
                text = self._field(next(self._iterator))
            except StopIteration:
                self._position = {"epoch": position["epoch"] + 1, "state": None}
                self._documents, self._iterator = self._open(self._position)
                continue
            self._position = {"epoch": position["epoch"], "state": self._documents.state_dict()}
            return position, text
        raise ValueError(f"the document stream of rank {self.rank} is empty")

    def _document_at(self, position: dict[str, Any]) -> str:
        """Re-read the document after a saved stream position (the main stream stays where it is)."""
        return self._field(next(self._open(position)[1]))

    def _tokens(self, row: int, epoch: int, position: int, index: int) -> list[int]:
        cached = self._cached[row]
        if cached is not None and cached[0] == (epoch, position):
            return cached[1]
        if self._reread[row]:
            text = self._document_at(self._positions[row])
            self._reread[row] = False
        else:
            self._positions[row], text = self._next_document()
        tokens = self.tokenizer.encode(text)
        if self.append_eos and self.tokenizer.eos_id is not None:
            tokens.append(self.tokenizer.eos_id)
        self._cached[row] = ((epoch, position), tokens)
        return tokens

    def _config(self) -> dict[str, Any]:
        return {"kind": "streamed_document_windows", "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "seq_len": self.seq_len}

    def state_dict(self) -> dict[str, Any]:
        """Rows' cursors, the stream position before each row's current document and the stream's position."""
        return {**self._config(), "rows": [list(cursor) for cursor in self._cursors],
                "row_positions": copy.deepcopy(self._positions), "stream": copy.deepcopy(self._position)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_config("StreamedDocumentWindows", state, self._config())
        rows, positions = state["rows"], state["row_positions"]
        if len(rows) != self.batch_size or len(positions) != self.batch_size:
            raise ValueError(f"StreamedDocumentWindows state needs {self.batch_size} rows, got {len(rows)}")
        self._cursors = [[int(value) for value in cursor] for cursor in rows]
        self._positions = copy.deepcopy(positions)
        self._reread = [position is not None for position in positions]  # rows in the middle of a document
        self._cached = [None] * self.batch_size
        self._position = copy.deepcopy(state["stream"])
        self._documents, self._iterator = self._open(self._position)
