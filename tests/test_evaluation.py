"""Evaluation building blocks: passkey scoring, ROUGE wrapper, streamed perplexity, Table 1 footprints."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

from data.tokenizer import ByteTokenizer
from evaluation.memory_footprint import (
    FootprintSetting,
    footprint_table,
    footprints,
    full_kv_cache_footprint,
    human_count,
    infini_footprint,
    memorizing_transformer_footprint,
    rmt_footprint,
    transformer_xl_footprint,
)
from evaluation.passkey import depth_grid, score_passkey
from evaluation.perplexity import evaluate_perplexity, score_document, segment_table
from evaluation.report import length_label, read_jsonl
from evaluation.rouge import RougeScorer, aggregate, geometric_mean, split_sentences
from models import ModelConfig, Transformer


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    base = dict(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, segment_len=16,
                attention="infini", attention_backend="sdpa")
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**base, **overrides})).double().eval()
    with torch.no_grad():  # distinct gates so the memory path matters
        for layer in model.layers:
            if hasattr(layer.attention, "gate_logit"):
                layer.attention.gate_logit.uniform_(-2, 2)
    return model


# ---------------------------------------------------------------- passkey scoring


@pytest.mark.parametrize(
    ("prediction", "key", "exact", "substring", "digits"),
    [
        (" 48213. Remember it.", "48213", True, True, 1.0),
        ("48213", 48213, True, True, 1.0),
        (" 48213999", "48213", False, True, 1.0),  # first integer too long: not exact, digits all right
        (" 48219", "48213", False, False, 0.8),
        (" 4821", "48213", False, False, 0.8),  # a missing digit counts as wrong
        (" 12 then 48213", "48213", False, True, 0.0),  # the first integer is what counts
        (" the pass key", "48213", False, False, 0.0),
        ("", "48213", False, False, 0.0),
        (" 048213", "48213", True, True, 0.0),  # same integer; position by position every digit is off
    ],
)
def test_score_passkey_known_cases(prediction, key, exact, substring, digits):
    score = score_passkey(prediction, key)
    assert score.exact is exact
    assert score.substring is substring
    assert score.digit_accuracy == pytest.approx(digits)


def test_score_passkey_rejects_non_numeric_key():
    with pytest.raises(ValueError, match="non-negative integer"):
        score_passkey("123", "12a")


def test_depth_grid_and_length_labels():
    assert depth_grid(3) == [0.0, 0.5, 1.0]
    assert depth_grid(11)[1] == pytest.approx(0.1) and depth_grid(11)[-1] == 1.0 and len(depth_grid(11)) == 11
    assert depth_grid(1) == [0.5]
    with pytest.raises(ValueError):
        depth_grid(0)
    assert [length_label(n) for n in (32768, 131072, 1048576, 5000, 3 * 2**20)] == ["32K", "128K", "1M", "5000",
                                                                                      "3M"]


# ---------------------------------------------------------------- ROUGE

PREDICTION = "The cat sat on the mat. It was happy! Then the dog came running."
REFERENCES = [
    "A cat was sitting on a mat. The cat was happy.\nA dog arrived.",
    "The dog ran to the happy cat, which sat on the mat.",
]


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_wrapper_equals_rouge_score_called_directly(use_stemmer):
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    direct = rouge_scorer.RougeScorer(types, use_stemmer=use_stemmer)
    ours = RougeScorer(use_stemmer=use_stemmer, sentence_split=True).score(PREDICTION, REFERENCES)
    # max over references, per type, of rouge-score's F1 on the newline-split texts
    per_ref = [direct.score(split_sentences(r), split_sentences(PREDICTION)) for r in REFERENCES]
    for name in types:
        assert ours[name] == pytest.approx(100 * max(s[name].fmeasure for s in per_ref), abs=1e-12)
    # the sentence split is whitespace to ROUGE-1/2/L: the raw texts give the same scores
    raw = [direct.score(r, PREDICTION) for r in REFERENCES]
    for name in ("rouge1", "rouge2", "rougeL"):
        assert ours[name] == pytest.approx(100 * max(s[name].fmeasure for s in raw), abs=1e-12)
    # the two references really disagree, so "max over references" is exercised
    assert {per_ref[0]["rouge1"].fmeasure, per_ref[1]["rouge1"].fmeasure} != {per_ref[0]["rouge1"].fmeasure}


def test_rouge_lsum_uses_sentence_lines():
    text_a = "the cat sat on the mat. the dog ran away."
    text_b = "the dog ran away. the cat sat on the mat."
    split = RougeScorer(sentence_split=True).score(text_b, [text_a])
    unsplit = RougeScorer(sentence_split=False).score(text_b, [text_a])
    assert split["rougeLsum"] == pytest.approx(100.0)  # same sentences in another order: summary-level LCS is 1
    assert unsplit["rougeLsum"] == pytest.approx(unsplit["rougeL"])  # one "sentence": plain LCS
    assert unsplit["rougeL"] < 100.0
    assert split["rouge1"] == unsplit["rouge1"] == pytest.approx(100.0)


def test_stemming_switch_changes_scores():
    plain = RougeScorer(use_stemmer=False).score("the cats were running", ["the cat was run"])
    stemmed = RougeScorer(use_stemmer=True).score("the cats were running", ["the cat was run"])
    assert plain["rouge1"] == pytest.approx(100 * 0.25)
    assert stemmed["rouge1"] == pytest.approx(100 * 0.75)


def test_split_sentences():
    assert split_sentences('He said "Hi." Then he left!  Why? 3.5 stays.\n\nNew.') == (
        'He said "Hi."\nThen he left!\nWhy?\n3.5 stays.\nNew.'
    )


def test_overall_is_geometric_mean_of_r1_r2_rl():
    per_example = [
        {"rouge1": 40.0, "rouge2": 10.0, "rougeL": 20.0, "rougeLsum": 30.0},
        {"rouge1": 30.0, "rouge2": 6.0, "rougeL": 16.0, "rougeLsum": 10.0},
    ]
    scores = aggregate(per_example)
    assert scores["rouge1"] == 35.0 and scores["rouge2"] == 8.0 and scores["rougeL"] == 18.0
    assert scores["rougeLsum"] == 20.0
    assert scores["overall"] == pytest.approx((35.0 * 8.0 * 18.0) ** (1 / 3))
    # the paper's Table 4 row for Infini Linear+Delta: 40.0 / 8.8 / 17.9 -> 18.5
    assert geometric_mean([40.0, 8.8, 17.9]) == pytest.approx(18.5, abs=0.05)
    assert geometric_mean([40.0, 0.0, 17.9]) == 0.0
    with pytest.raises(ValueError):
        aggregate([])


def test_rouge_rejects_missing_references():
    with pytest.raises(ValueError, match="non-empty list"):
        RougeScorer().score("x", [])
    with pytest.raises(ValueError, match="non-empty list"):
        RougeScorer().score("x", "a string is not a list of references")


# ---------------------------------------------------------------- perplexity


@torch.no_grad()
def one_pass_nll(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """Reference: the whole document in one forward call, no state; NLL of tokens 1..n-1."""
    logits = model(torch.tensor([tokens])).logits[0]  # (n, V)
    return F.cross_entropy(logits[:-1], torch.tensor(tokens[1:]), reduction="none")


@pytest.mark.parametrize("attention", ["infini", "local", "full"])
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 1000])
def test_streamed_perplexity_equals_one_pass(attention, chunk_size):
    model = tiny_model(attention=attention, memory_update="delta" if attention == "infini" else "linear")
    tokens = torch.randint(0, 256, (75,), generator=torch.Generator().manual_seed(1)).tolist()
    reference = one_pass_nll(model, tokens)
    score = score_document(model, tokens, chunk_size=chunk_size)
    assert score.n_tokens == 74
    assert score.nll == pytest.approx(float(reference.sum()), rel=1e-10)
    # per segment of 16 predicting positions: 16, 16, 16, 16, 10
    assert score.segment_tokens == [16, 16, 16, 16, 10]
    expected = [float(reference[k : k + 16].sum()) for k in range(0, 74, 16)]
    assert score.segment_nll == pytest.approx(expected, rel=1e-10)


def test_prefix_token_scores_the_first_token():
    model = tiny_model()
    tokens = list(range(40, 70))
    with_prefix = score_document(model, tokens, chunk_size=8, prefix_token=3)
    reference = one_pass_nll(model, [3, *tokens])
    assert with_prefix.n_tokens == 30
    assert with_prefix.nll == pytest.approx(float(reference.sum()), rel=1e-10)


def test_memory_is_reset_per_document_and_aggregation_is_token_weighted(tmp_path):
    model = tiny_model()
    tokenizer = ByteTokenizer()
    texts = ["A short first document about memory.", "A second, longer document that spans more segments. " * 3]
    alone = [score_document(model, tokenizer.encode(t), chunk_size=5) for t in texts]
    results = evaluate_perplexity(model, tokenizer, [("a", texts[0]), ("b", texts[1])], chunk_size=5,
                                  out_dir=tmp_path)
    assert [s.nll for s in results.scores] == pytest.approx([s.nll for s in alone], rel=1e-12)
    total_nll, total_tokens = sum(s.nll for s in alone), sum(s.n_tokens for s in alone)
    assert total_tokens == len(texts[0].encode()) + len(texts[1].encode()) - 2
    assert results.perplexity == pytest.approx(math.exp(total_nll / total_tokens))
    assert results.bits_per_byte == pytest.approx(total_nll / total_tokens / math.log(2))
    # files
    summary = json.loads((tmp_path / "perplexity_summary.json").read_text())
    assert summary["tokens"] == total_tokens and summary["documents"] == 2
    assert summary["perplexity"] == pytest.approx(results.perplexity)
    rows = read_jsonl(tmp_path / "perplexity_documents.jsonl")
    assert [r["id"] for r in rows] == ["a", "b"]
    assert [r["nll"] for r in rows] == pytest.approx([s.nll for s in alone])
    by_segment = summary["by_segment"]
    assert sum(r["tokens"] for r in by_segment) == total_tokens
    first = by_segment[0]
    expected_first = (alone[0].segment_nll[0] + alone[1].segment_nll[0]) / 32
    assert first["tokens"] == 32 and first["documents"] == 2 and first["loss"] == pytest.approx(expected_first)
    table = (tmp_path / "perplexity_segments.md").read_text()
    assert table == segment_table(results) + "\n" and f"| 0 | 32 | 2 | {expected_first:.4f} |" in table
    assert (tmp_path / "perplexity_segments.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- memory footprint (Table 1)


def test_paper_table1_numbers():
    paper = FootprintSetting()  # 12 layers, 8 heads, d = 128, N = 2048
    assert infini_footprint(paper) == 1_585_152
    assert transformer_xl_footprint(paper) == 50_331_648
    assert memorizing_transformer_footprint(paper) == 183_451_648
    assert rmt_footprint(paper) == 2_457_600
    assert [human_count(f(paper)) for f in (infini_footprint, transformer_xl_footprint,
                                            memorizing_transformer_footprint, rmt_footprint)] == [
        "1.6M", "50M", "183M", "2.5M"]
    table = footprint_table(paper)
    for text in ("| Infini-Transformer | 1,585,152 | 1.6M |", "| Transformer-XL | 50,331,648 | 50M |",
                 "| Memorizing Transformers | 183,451,648 | 183M |", "| RMT | 2,457,600 | 2.5M |"):
        assert text in table


def test_footprint_of_a_model_config():
    config = ModelConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, segment_len=1024)
    setting = FootprintSetting.from_model_config(config, length=2**20)
    assert (setting.n_layers, setting.n_heads, setting.head_dim, setting.segment_len) == (4, 4, 64, 1024)
    assert full_kv_cache_footprint(setting) == 2 * 64 * 2 * 2**20 * 4  # grouped-query: 2 KV heads
    rows = footprints(setting)
    assert rows["infini (ours: memory only, per KV head)"] == 64 * 65 * 2 * 4
    assert rows["Infini-Transformer"] == 64 * 65 * 4 * 4  # the paper's formula counts query heads
    # xl: previous segment + at most N - 1 unfinished tokens, keys and values, per KV head and layer
    assert rows["xl (ours: previous + worst-case unfinished segment, per KV head)"] == 2 * 64 * 2 * (2 * 1024 - 1) * 4


# ---------------------------------------------------------------- W&B sink


def test_wandb_is_off_by_default_and_rejects_unknown_modes():
    from evaluation.report import WandbLogger

    logger = WandbLogger()
    assert logger.mode == "disabled" and not logger.enabled
    logger.log({"x": 1.0})  # a no-op, no wandb import, no network
    logger.finish()
    with pytest.raises(ValueError, match="'onlin'"):
        WandbLogger("onlin")
