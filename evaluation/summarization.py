"""Book summarization on BookSum (the Infini-attention paper's Table 4) scored with ROUGE.

Each document is truncated so that the whole prompt fits in `max_input_tokens` (the paper: 500K), streamed
through the model in chunks (`models.generation`), and a summary is decoded greedily, by sampling (the
paper: temperature 0.5, top-p 0.95, 1024 steps) or by beam search. ROUGE-1/2/L/Lsum follow the SCROLLS
conventions (evaluation/rouge.py): F1 x 100, best reference, mean over examples, overall = geometric mean
of R-1, R-2, R-L.

    examples = load_booksum("abertsch/booksum-fullbooks", "test", level="book")
    results = evaluate_summarization(model, tokenizer, examples, GenerationConfig(...), max_input_tokens=32768)

Files written when out_dir is given: summarization_examples.jsonl (one line per example: id, prompt length,
prediction, references, ROUGE) and summarization_summary.json.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from data.booksum import SummarizationExample, summarization_prompt
from data.tokenizer import Tokenizer
from evaluation.report import write_json, write_jsonl
from evaluation.rouge import ROUGE_TYPES, RougeScorer, aggregate
from models.generation import GenerationConfig, generate
from models.transformer import Transformer

log = logging.getLogger(__name__)


@dataclass
class SummaryRecord:
    """One example's output and scores (one line of summarization_examples.jsonl)."""

    id: str
    prompt_tokens: int
    generated_tokens: int
    prediction: str
    references: list[str]
    rouge: dict[str, float]
    seconds: float


@dataclass
class SummarizationResults:
    records: list[SummaryRecord]
    settings: dict[str, Any] = field(default_factory=dict)

    def scores(self) -> dict[str, float]:
        """Mean ROUGE-1/2/L/Lsum over examples and the overall geometric mean of R-1, R-2, R-L."""
        return aggregate([r.rouge for r in self.records])

    def summary(self) -> dict[str, Any]:
        return {
            "task": "summarization",
            "examples": len(self.records),
            "rouge": self.scores(),
            "mean_prompt_tokens": sum(r.prompt_tokens for r in self.records) / len(self.records),
            "mean_generated_tokens": sum(r.generated_tokens for r in self.records) / len(self.records),
            "seconds": sum(r.seconds for r in self.records),
            "settings": self.settings,
        }


def rouge_table(results: SummarizationResults) -> str:
    """One-row markdown table of the mean scores, in the paper's column order."""
    scores = results.scores()
    names = [*ROUGE_TYPES, "overall"]
    return "\n".join([
        "| examples | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
        f"| {len(results.records)} | " + " | ".join(f"{scores[n]:.2f}" for n in names) + " |",
    ])


def write_outputs(results: SummarizationResults, out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {
        "examples": write_jsonl(out_dir / "summarization_examples.jsonl", (asdict(r) for r in results.records)),
        "summary": write_json(out_dir / "summarization_summary.json", results.summary()),
        "table": out_dir / "summarization_table.md",
    }
    paths["table"].write_text(rouge_table(results) + "\n")
    return paths


def evaluate_summarization(
    model: Transformer,
    tokenizer: Tokenizer,
    examples: Iterable[SummarizationExample],
    generation: GenerationConfig,
    max_input_tokens: int,
    scorer: RougeScorer | None = None,
    out_dir: str | Path | None = None,
) -> SummarizationResults:
    """Summarize every example and score it against its references.

    generation: decoding settings; with a seed, example i is decoded with seed + i (reproducible sampling that
    does not depend on which other examples run). The tokenizer's EOS (if any) is added to the stop tokens.
    scorer: ROUGE settings (default: no stemming, one sentence per line for Lsum).
    """
    scorer = scorer or RougeScorer()
    stop_tokens = tuple(generation.stop_tokens)
    if tokenizer.eos_id is not None and tokenizer.eos_id not in stop_tokens:
        stop_tokens += (tokenizer.eos_id,)
    was_training = model.training
    model.eval()
    records = []
    try:
        for i, example in enumerate(examples):
            if not example.references:
                raise ValueError(f"example {example.id!r} has no reference summary")
            prompt = summarization_prompt(tokenizer, example.document, max_input_tokens)
            seed = None if generation.seed is None else generation.seed + i
            config = replace(generation, stop_tokens=stop_tokens, seed=seed)
            start = time.perf_counter()
            with torch.inference_mode():
                new_tokens = generate(model, [prompt], config)[0]  # stop token excluded
            seconds = time.perf_counter() - start
            prediction = tokenizer.decode(new_tokens).strip()
            rouge = scorer.score(prediction, example.references)
            records.append(SummaryRecord(str(example.id), len(prompt), len(new_tokens), prediction,
                                         list(example.references), rouge, seconds))
            log.info("example %s: %d prompt tokens, %d generated, R-1 %.2f R-2 %.2f R-L %.2f (%.1fs)", example.id,
                     len(prompt), len(new_tokens), rouge["rouge1"], rouge["rouge2"], rouge["rougeL"], seconds)
            del prompt
    finally:
        model.train(was_training)
    if not records:
        raise ValueError("no summarization examples to evaluate")
    settings = {
        "max_input_tokens": max_input_tokens,
        "generation": asdict(replace(generation, stop_tokens=stop_tokens)),
        "use_stemmer": scorer.use_stemmer,
        "sentence_split": scorer.sentence_split,
    }
    results = SummarizationResults(records, settings)
    if out_dir is not None:
        write_outputs(results, out_dir)
    return results
