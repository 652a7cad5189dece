"""ROUGE as SCROLLS and the Infini-attention paper report it, computed by Google's `rouge-score` package.

Conventions (ANCHORS.md section 3):
  * F1 x 100 of ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum;
  * with several references, the best reference per ROUGE type (rouge-score's `score_multi`);
  * mean over examples;
  * overall = geometric mean of R-1, R-2 and R-L (of the means);
  * no stemming by default (SCROLLS); Porter stemming is a switch;
  * ROUGE-Lsum treats each line as a sentence, so texts get one sentence per line first. rouge-score can do
    this itself only through nltk's punkt model, a download; we split after `.`, `!` or `?` followed by
    whitespace (and keep existing line breaks). Line breaks are whitespace to the ROUGE tokenizer, so the
    split leaves ROUGE-1/2/L unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
OVERALL_OF = ("rouge1", "rouge2", "rougeL")

_SENTENCE_END = re.compile(r"([.!?][\"')\]]*)\s+")


def split_sentences(text: str) -> str:
    """One sentence per line: break after sentence-final punctuation (and closing quotes/brackets) followed by
    whitespace; existing line breaks stay; empty lines are dropped."""
    lines = _SENTENCE_END.sub("\\1\n", text).splitlines()
    return "\n".join(line.strip() for line in lines if line.strip())


class RougeScorer:
    """Scores one prediction against its references: {rouge type: F1 x 100}, max over references."""

    def __init__(self, use_stemmer: bool = False, sentence_split: bool = True):
        self.use_stemmer = use_stemmer
        self.sentence_split = sentence_split
        self._scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)

    def prepare(self, text: str) -> str:
        """The text rouge-score sees: one sentence per line when sentence_split is on."""
        return split_sentences(text) if self.sentence_split else text

    def score(self, prediction: str, references: Sequence[str]) -> dict[str, float]:
        if isinstance(references, str) or not references:
            raise ValueError("references must be a non-empty list of strings")
        best = self._scorer.score_multi([self.prepare(r) for r in references], self.prepare(prediction))
        return {name: 100.0 * best[name].fmeasure for name in ROUGE_TYPES}


def geometric_mean(values: Sequence[float]) -> float:
    """Geometric mean; 0 if any value is 0 (the SCROLLS overall score of a model that misses one ROUGE type)."""
    if any(v < 0 for v in values):
        raise ValueError(f"geometric mean of negative values {values}")
    if any(v == 0 for v in values):
        return 0.0
    return math.exp(sum(math.log(v) for v in values) / len(values))


def aggregate(per_example: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of every ROUGE type over examples, and `overall` = geometric mean of the mean R-1, R-2, R-L."""
    if not per_example:
        raise ValueError("no examples to aggregate")
    means = {name: sum(s[name] for s in per_example) / len(per_example) for name in ROUGE_TYPES}
    means["overall"] = geometric_mean([means[name] for name in OVERALL_OF])
    return means
