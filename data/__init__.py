"""Data for training and evaluation: tokenizers, passkey prompts, long documents (PG19), BookSum.

Every training source is a BatchStream (data/stream.py): an endless iterator of batches
{tokens (B, T) int64, targets (B, T) int64, loss_mask (B, T) float32, new_document (B,) bool} with
state_dict()/load_state_dict() for exact resume. Nothing here downloads at import or test time.
"""

from data.booksum import (
    SUMMARY_SEPARATOR,
    SummarizationBatches,
    SummarizationExample,
    load_booksum,
    summarization_prompt,
    summarization_row,
)
from data.passkey import (
    FILLER,
    INSTRUCTION,
    NEEDLE,
    QUESTION,
    PasskeyBatches,
    PasskeyDataset,
    PasskeyPrompt,
    PasskeyTemplate,
    iter_passkey_trials,
    passkey_prompt,
    passkey_trials,
    random_passkey,
    trial_passkey,
)
from data.stream import BATCH_KEYS, BatchStream, shift_and_pad
from data.text import DocumentWindows, MissingFieldError, load_documents, load_records
from data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "BATCH_KEYS",
    "FILLER",
    "INSTRUCTION",
    "NEEDLE",
    "QUESTION",
    "SUMMARY_SEPARATOR",
    "BatchStream",
    "ByteTokenizer",
    "DocumentWindows",
    "HFTokenizer",
    "MissingFieldError",
    "PasskeyBatches",
    "PasskeyDataset",
    "PasskeyPrompt",
    "PasskeyTemplate",
    "SummarizationBatches",
    "SummarizationExample",
    "Tokenizer",
    "iter_passkey_trials",
    "load_booksum",
    "load_documents",
    "load_records",
    "load_tokenizer",
    "passkey_prompt",
    "passkey_trials",
    "random_passkey",
    "shift_and_pad",
    "summarization_prompt",
    "summarization_row",
    "trial_passkey",
]
