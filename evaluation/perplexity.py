"""Long-document perplexity (PG19 protocol, ANCHORS.md section 3).

Each document is streamed through the model chunk by chunk carrying the state (compressive memory for
`infini`), the state is reset between documents, and every token is scored exactly once: the logits at
position t predict token t + 1, and the last position of a chunk predicts the first token of the next chunk.
With `prepend_eos` and a tokenizer that has an end-of-text token, the document is preceded by it (as after the
previous document of a packed stream), so its first token is scored too; otherwise (the default, as in training
where every stream starts at a document's first token; the byte tokenizer has no EOS anyway) the first token is
context only and a document of n tokens contributes n - 1 predictions.

Reported: token-weighted perplexity exp(sum NLL / tokens) over all documents; bits per token; bits per byte
for the byte tokenizer (one token is one byte); and the mean loss by segment index (segment k holds the
predictions made at positions [kN, (k+1)N) of the stream) which shows whether memory helps later segments.

    result = evaluate_perplexity(model, tokenizer, documents, chunk_size=4096, out_dir="eval/pg19")

Files written when out_dir is given: perplexity_documents.jsonl, perplexity_summary.json,
perplexity_segments.md, perplexity_segments.png.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from data.tokenizer import ByteTokenizer, Tokenizer
from evaluation.report import finite_or_none, write_json, write_jsonl
from models.streaming import stream
from models.transformer import Transformer

log = logging.getLogger(__name__)


@dataclass
class DocumentScore:
    """Summed NLL (nats) of one document, in total and per segment index."""

    n_tokens: int
    nll: float
    segment_nll: list[float]
    segment_tokens: list[int]

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.n_tokens) if self.n_tokens else float("nan")


@torch.inference_mode()
def stream_scores(
    model: Transformer, inputs: Tensor, targets: Tensor, chunk_size: int = 4096, first: int = 0
) -> tuple[Tensor, Tensor]:
    """Stream inputs (B, T) through `model` from an empty state, chunk_size tokens per call, and score the targets
    (B, T) at positions >= first: returns their NLL (B, T - first) float64 on the CPU and whether each target was
    the argmax (B, T - first). Positions before `first` are context only: their logits are never computed. Memory
    is that of one chunk whatever T (with `infini` attention)."""
    device = model.tok_embeddings.weight.device
    B, T = inputs.shape
    nll = torch.zeros(B, T - first, dtype=torch.float64)
    greedy = torch.zeros(B, T - first, dtype=torch.bool)

    def step(span: slice, state):
        h, state = model.hidden(inputs[:, span].to(device), state)  # (B, C, dim)
        lo = max(span.start, first)
        if lo < span.stop:  # logits only where a target is scored
            logits = model.logits(h[:, lo - span.start :])  # (B, stop - lo, V)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; fp64 stays
            chunk_targets = targets[:, lo : span.stop].to(device)
            nll[:, lo - first : span.stop - first] = F.cross_entropy(
                logits.transpose(1, 2), chunk_targets, reduction="none").double().cpu()  # (B, stop - lo)
            greedy[:, lo - first : span.stop - first] = (logits.argmax(-1) == chunk_targets).cpu()
        return None, state

    stream(step, T, chunk_size, None)
    return nll, greedy


@torch.inference_mode()
def score_document(
    model: Transformer,
    tokens: Sequence[int] | Tensor,
    chunk_size: int = 4096,
    segment_len: int | None = None,
    prefix_token: int | None = None,
) -> DocumentScore:
    """Stream one document through `model` from an empty state and sum the NLL of every token.

    tokens: the document's token ids; prefix_token: a token fed before the document (its prediction of the
    first token is scored), or None to use the first token as context only; segment_len: bucket size of the
    per-segment losses (default: the model's segment length).
    """
    segment_len = segment_len or model.config.segment_len
    ids = torch.as_tensor(tokens, dtype=torch.long).flatten()
    if prefix_token is not None:
        ids = torch.cat([torch.tensor([prefix_token], dtype=torch.long), ids])
    inputs, targets = ids[:-1], ids[1:]  # position t predicts token t + 1
    n = inputs.numel()
    token_nll, _ = stream_scores(model, inputs.unsqueeze(0), targets.unsqueeze(0), chunk_size)
    token_nll = token_nll[0]  # (n,)
    segment_index = torch.arange(n) // segment_len  # segment of the predicting position
    n_segments = int(segment_index[-1]) + 1 if n else 0
    segment_nll = torch.zeros(n_segments, dtype=torch.float64).index_add_(0, segment_index, token_nll)
    segment_tokens = torch.bincount(segment_index, minlength=n_segments)
    return DocumentScore(n, float(token_nll.sum()), segment_nll.tolist(), segment_tokens.tolist())


@dataclass
class PerplexityResults:
    """Per-document scores and their token-weighted aggregates."""

    documents: list[dict[str, Any]]
    scores: list[DocumentScore]
    segment_len: int
    bytes_per_token: float | None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.scores)

    @property
    def nll_per_token(self) -> float:
        return sum(s.nll for s in self.scores) / self.n_tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_per_token)

    @property
    def bits_per_byte(self) -> float | None:
        if self.bytes_per_token is None:
            return None
        return self.nll_per_token / math.log(2) / self.bytes_per_token

    def segment_losses(self) -> list[dict[str, float]]:
        """Token-weighted mean NLL per segment index over all documents reaching that segment."""
        n_segments = max((len(s.segment_nll) for s in self.scores), default=0)
        rows = []
        for k in range(n_segments):
            nll = sum(s.segment_nll[k] for s in self.scores if k < len(s.segment_nll))
            tokens = sum(s.segment_tokens[k] for s in self.scores if k < len(s.segment_tokens))
            docs = sum(1 for s in self.scores if k < len(s.segment_nll))
            rows.append({"segment": k, "loss": nll / tokens, "perplexity": math.exp(nll / tokens),
                         "tokens": tokens, "documents": docs})
        return rows

    def summary(self) -> dict[str, Any]:
        return {
            "task": "perplexity",
            "documents": len(self.scores),
            "tokens": self.n_tokens,
            "loss": self.nll_per_token,
            "perplexity": finite_or_none(self.perplexity),
            "bits_per_token": self.nll_per_token / math.log(2),
            "bits_per_byte": self.bits_per_byte,
            "segment_len": self.segment_len,
            "by_segment": self.segment_losses(),
            "settings": self.settings,
        }


def segment_table(results: PerplexityResults) -> str:
    """Markdown: loss and perplexity by segment index."""
    lines = [f"Loss by segment index (segment = {results.segment_len} tokens)", "",
             "| segment | tokens | documents | loss (nats) | perplexity |", "|---:|---:|---:|---:|---:|"]
    for row in results.segment_losses():
        lines.append(f"| {row['segment']} | {row['tokens']} | {row['documents']} | {row['loss']:.4f} "
                     f"| {row['perplexity']:.3f} |")
    lines.append(f"| all | {results.n_tokens} | {len(results.scores)} | {results.nll_per_token:.4f} "
                 f"| {results.perplexity:.3f} |")
    return "\n".join(lines)


def segment_figure(results: PerplexityResults) -> Figure:
    """Loss against segment index (Agg canvas, no pyplot state)."""
    rows = results.segment_losses()
    fig = Figure(figsize=(6, 3.5), dpi=120)
    ax = fig.add_subplot()
    ax.plot([r["segment"] for r in rows], [r["loss"] for r in rows], marker="o")
    ax.axhline(results.nll_per_token, color="gray", linestyle="--", label="all tokens")
    ax.set_xlabel(f"segment index ({results.segment_len} tokens each)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("Does memory help later segments?")
    ax.legend()
    fig.tight_layout()
    return fig


def write_outputs(results: PerplexityResults, out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    rows = [{**doc, "tokens": s.n_tokens, "nll": s.nll, "perplexity": finite_or_none(s.perplexity)}
            for doc, s in zip(results.documents, results.scores)]
    paths = {
        "documents": write_jsonl(out_dir / "perplexity_documents.jsonl", rows),
        "summary": write_json(out_dir / "perplexity_summary.json", results.summary()),
        "table": out_dir / "perplexity_segments.md",
        "plot": out_dir / "perplexity_segments.png",
    }
    paths["table"].write_text(segment_table(results) + "\n")
    segment_figure(results).savefig(paths["plot"])
    return paths


def evaluate_perplexity(
    model: Transformer,
    tokenizer: Tokenizer,
    documents: Iterable[str | tuple[str, str]],
    chunk_size: int = 4096,
    segment_len: int | None = None,
    max_tokens: int | None = None,
    prepend_eos: bool = False,
    out_dir: str | Path | None = None,
) -> PerplexityResults:
    """Score every document (a text, or an (id, text) pair) and aggregate token-weighted.

    max_tokens: keep only the first max_tokens tokens of each document (None: whole documents).
    """
    segment_len = segment_len or model.config.segment_len
    was_training = model.training
    model.eval()
    # the byte tokenizer has no EOS: then the first token of a document is context only
    prefix_token = tokenizer.eos_id if prepend_eos else None
    docs, scores = [], []
    try:
        for i, item in enumerate(documents):
            doc_id, text = (str(i), item) if isinstance(item, str) else item
            tokens = tokenizer.encode(text)
            if max_tokens is not None:
                tokens = tokens[:max_tokens]
            if len(tokens) < (1 if prefix_token is not None else 2):
                log.warning("document %s has too few tokens to score; skipped", doc_id)
                continue
            start = time.perf_counter()
            score = score_document(model, tokens, chunk_size, segment_len, prefix_token)
            seconds = time.perf_counter() - start
            docs.append({"id": doc_id, "seconds": seconds})
            scores.append(score)
            log.info("document %s: %d tokens, perplexity %.3f (%.1fs)", doc_id, score.n_tokens,
                     score.perplexity, seconds)
    finally:
        model.train(was_training)
    if not scores:
        raise ValueError("no document had enough tokens to score")
    bytes_per_token = 1.0 if isinstance(tokenizer, ByteTokenizer) else None
    settings = {"chunk_size": chunk_size, "max_tokens": max_tokens, "prepend_eos": prepend_eos,
                "first_token_scored": prefix_token is not None}
    results = PerplexityResults(docs, scores, segment_len, bytes_per_token, settings)
    if out_dir is not None:
        write_outputs(results, out_dir)
    return results
