"""BookSum summarization data: loading (book and chapter level), the prompt template, training batches.

Book level follows `abertsch/booksum-fullbooks` (fields bid, source, title, summary, book), chapter level
`kmfoda/booksum` (fields chapter, summary_text, ids such as chapter_id / book_id / bid, source). Both have one
row per (text, summary source); rows with the same id and the same text are one example whose references are
all their summaries, which is what ROUGE's max over references needs. A summary field holding a list (of
strings, or of {"text": ...} records as in the cleaned BookSum copies) contributes every element.

Training and evaluation share `summarization_prompt`: the document (truncated to fit) followed by
SUMMARY_SEPARATOR; the model learns to continue it with the summary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from torch import Tensor

from data.config import SourceDataConfig, choice
from data.stream import BatchStream, check_rank, check_state_config, derived_rng, shift_and_pad, stack_rows
from data.text import load_records
from data.tokenizer import Tokenizer

SUMMARY_SEPARATOR = "\n\nSummary:\n"
LEVELS = {
    # level: (document field, summary field, id fields: the first one present names the example)
    "book": ("book", "summary", ("bid",)),
    "chapter": ("chapter", "summary_text", ("chapter_id", "book_id", "bid")),
}


class BooksumLevel(StrEnum):
    """Which BookSum schema a source has (LEVELS)."""

    book = "book"
    chapter = "chapter"


@dataclass
class SummarizationExample:
    """One document and every reference summary of it."""

    id: str
    document: str
    references: list[str]


def _references(value: Any) -> list[str]:
    """Summary texts in a summary field: a string, or a list of strings / {"text": ...} records."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    texts: list[str] = []
    for item in value:
        text = item.get("text") if isinstance(item, dict) else item
        if isinstance(text, str) and text.strip():
            texts.append(text)
    return texts


def load_booksum(
    source: str, split: str, level: str, *, cache_dir: str | None = None, **load_kwargs: Any
) -> list[SummarizationExample]:
    """BookSum examples from a hub dataset or local files (resolved like `data.text.load_documents`).

    Rows are grouped by (id, document text); references keep first-seen order, duplicates dropped. Rows
    with an empty document or summary contribute nothing. Different texts sharing an id get "#2", "#3" ...
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level!r}")
    document_field, summary_field, id_fields = LEVELS[level]
    required = [document_field, summary_field] + ([id_fields[0]] if level == "book" else [])
    dataset = load_records(source, split, required, cache_dir=cache_dir, **load_kwargs)
    id_field = next((field for field in id_fields if field in dataset.column_names), None)
    columns = [document_field, summary_field] + ([id_field] if id_field is not None else [])
    grouped: dict[tuple[str, str], list[str]] = {}
    for row_index, row in enumerate(dataset.select_columns(columns)):
        document = row[document_field]
        if not isinstance(document, str) or not document.strip():
            continue
        row_id = str(row[id_field]) if id_field is not None else f"{split}-{row_index}"
        references = grouped.setdefault((row_id, document), [])
        for text in _references(row[summary_field]):
            if text not in references:
                references.append(text)
    examples: list[SummarizationExample] = []
    seen_ids: dict[str, int] = {}
    for (row_id, document), references in grouped.items():
        if not references:
            continue
        seen_ids[row_id] = seen_ids.get(row_id, 0) + 1
        example_id = row_id if seen_ids[row_id] == 1 else f"{row_id}#{seen_ids[row_id]}"
        examples.append(SummarizationExample(example_id, document, references))
    return examples


def summarization_prompt(tokenizer: Tokenizer, document: str, max_input_tokens: int) -> list[int]:
    """Tokens of document + SUMMARY_SEPARATOR, at most max_input_tokens: the document's beginning is kept and
    the separator always is, so the model is always asked for a summary."""
    separator = tokenizer.encode(SUMMARY_SEPARATOR)
    if max_input_tokens <= len(separator):
        raise ValueError(
            f"max_input_tokens must exceed the separator's {len(separator)} tokens, got {max_input_tokens}"
        )
    return tokenizer.encode(document)[: max_input_tokens - len(separator)] + separator


def summarization_row(
    tokenizer: Tokenizer, document: str, summary: str, seq_len: int, max_input_tokens: int
) -> tuple[Tensor, Tensor, Tensor]:
    """One training row: prompt + summary (+ EOS when the tokenizer has one), cut to seq_len + 1 tokens and
    shifted; loss_mask is 1 exactly on the targets that are summary (or EOS) tokens.
    Returns tokens (T,) int64, targets (T,) int64, loss_mask (T,) float32."""
    if max_input_tokens > seq_len:
        raise ValueError(f"max_input_tokens ({max_input_tokens}) must be <= seq_len ({seq_len}) so that at "
                         "least one summary token is a target")
    prompt = summarization_prompt(tokenizer, document, max_input_tokens)
    answer = tokenizer.encode(summary) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    sequence = (prompt + answer)[: seq_len + 1]
    return shift_and_pad(sequence, seq_len, tokenizer.pad_id, loss_from=len(prompt))


class SummarizationBatches:
    """BatchStream of (document, reference) pairs: every reference of every example is one training item.

    The items form an endless sequence of epochs, each a permutation seeded from (seed, epoch) (in order with
    shuffle=False); step n of rank r holds positions (n * world_size + r) * batch_size + j of that sequence,
    so ranks see disjoint items and the state is just the step. Every row is a new document.
    """

    def __init__(
        self,
        examples: Sequence[SummarizationExample],
        tokenizer: Tokenizer,
        seq_len: int,
        batch_size: int,
        max_input_tokens: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        check_rank(batch_size, rank, world_size)
        if max_input_tokens > seq_len:
            raise ValueError(f"max_input_tokens ({max_input_tokens}) must be <= seq_len ({seq_len}) so "
                             "that at least one summary token is a target")
        self.items = [(i, r) for i, example in enumerate(examples) for r in range(len(example.references))]
        if not self.items:
            raise ValueError("SummarizationBatches needs at least one example with a reference summary")
        self.examples = list(examples)
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.max_input_tokens = max_input_tokens
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.step = 0
        self._orders: dict[int, list[int]] = {}

    def item(self, position: int) -> tuple[int, int]:
        """(example index, reference index) at `position` of the endless item sequence."""
        epoch, offset = divmod(position, len(self.items))
        if epoch not in self._orders:
            order = list(range(len(self.items)))
            if self.shuffle:
                derived_rng("summarization-order", int(self.seed), epoch).shuffle(order)
            if len(self._orders) >= 2:
                del self._orders[min(self._orders)]
            self._orders[epoch] = order
        return self.items[self._orders[epoch][offset]]

    def positions(self, step: int) -> range:
        """Item positions of this rank's rows at `step`."""
        start = (step * self.world_size + self.rank) * self.batch_size
        return range(start, start + self.batch_size)

    def __iter__(self) -> SummarizationBatches:
        return self

    def __next__(self) -> dict[str, Tensor]:
        rows = []
        for position in self.positions(self.step):
            example_index, reference_index = self.item(position)
            example = self.examples[example_index]
            summary = example.references[reference_index]
            rows.append(summarization_row(self.tokenizer, example.document, summary, self.seq_len,
                                          self.max_input_tokens))
        self.step += 1
        return stack_rows(rows, [True] * self.batch_size)

    def _config(self) -> dict[str, Any]:
        return {"kind": "summarization", "batch_size": self.batch_size, "world_size": self.world_size,
                "seq_len": self.seq_len, "max_input_tokens": self.max_input_tokens, "seed": self.seed,
                "shuffle": self.shuffle, "num_items": len(self.items)}

    def state_dict(self) -> dict[str, Any]:
        return {**self._config(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_config("SummarizationBatches", state, self._config())
        self.step = int(state["step"])


@dataclass
class BooksumDataConfig(SourceDataConfig):
    """data.kind=booksum: summarization fine-tuning, loss on the summary tokens only (SummarizationBatches)."""

    kind: str = "booksum"
    booksum_level: BooksumLevel = BooksumLevel.book
    """book (abertsch/booksum-fullbooks schema) or chapter (kmfoda/booksum schema)."""
    max_input_tokens: int = 32768
    """The document is truncated to this many tokens before the summary prompt."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.booksum_level = choice(BooksumLevel, self.booksum_level, "data.booksum_level")

    def batches(self, tokenizer: Tokenizer, rank: int, world_size: int, seed: int, validation: bool,
                segment_len: int | None) -> BatchStream:
        examples = load_booksum(self.source, self.split_for(validation), self.booksum_level.value)
        return SummarizationBatches(examples, tokenizer, self.seq_len, self.batch_size, self.max_input_tokens,
                                    rank, world_size, seed)
