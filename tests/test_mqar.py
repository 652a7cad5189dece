"""MQAR: the generator is exact and seeded, the training stream resumes, the evaluation counts queries right, and
`python -m evaluation task=mqar` and `train.py data=mqar` run end to end on tiny models."""

import json
import random
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import evaluation.mqar as mqar_eval
import train
from data.mqar import (
    FILLER_ID,
    MQARBatches,
    MQARConfig,
    answers_from_tokens,
    distance_bucket,
    example_row,
    mqar_example,
    mqar_trial,
)
from evaluation.run import run
from models import ModelConfig, Transformer
from models.checkpoint import save_model

CONF = Path(__file__).resolve().parents[1] / "conf"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("placement", ["adjacent", "uniform", "power_law"])
@pytest.mark.parametrize("seq_len,pairs,queries", [(64, 8, 0), (65, 5, 3), (24, 6, 0)])
def test_example_layout_is_exact_and_answers_are_recoverable_from_the_tokens(placement, seq_len, pairs, queries):
    cfg = MQARConfig(vocab_size=40, num_pairs=[pairs], num_queries=queries, placement=placement)
    for seed in range(5):
        e = mqar_example(cfg, seq_len, pairs, random.Random(seed))
        n_queries = queries or pairs
        assert len(e.tokens) == seq_len
        # pairs region: key i at 2i, value i at 2i + 1; keys in [1, 20), values in [20, 40), all distinct
        assert e.tokens[: 2 * pairs : 2] == e.keys and e.tokens[1 : 2 * pairs : 2] == e.values
        assert len(set(e.keys)) == pairs and all(1 <= k < 20 for k in e.keys)
        assert len(set(e.values)) == pairs and all(20 <= v < 40 for v in e.values)
        # queries: distinct pairs, at even offsets of the query region, in position order, "key value" each
        assert len(e.query_positions) == n_queries and len(set(e.query_pairs)) == n_queries
        assert e.query_positions == sorted(e.query_positions)
        assert all(p >= 2 * pairs and (p - 2 * pairs) % 2 == 0 and p + 1 < seq_len for p in e.query_positions)
        for p, i in zip(e.query_positions, e.query_pairs):
            assert (e.tokens[p], e.tokens[p + 1]) == (e.keys[i], e.values[i])
        query_slots = {p for q in e.query_positions for p in (q, q + 1)}
        assert all(t == FILLER_ID for p, t in enumerate(e.tokens) if p >= 2 * pairs and p not in query_slots)
        assert answers_from_tokens(e.tokens, pairs, e.query_positions) == e.answers
        assert e.distances == [p - 2 * i for p, i in zip(e.query_positions, e.query_pairs)]
        if placement == "adjacent":
            assert e.query_positions == [2 * pairs + 2 * j for j in range(n_queries)]


def test_hand_checked_example():
    # vocab 9: keys 1..4, values 5..8; 2 pairs, adjacent queries in a 10-token sequence
    cfg = MQARConfig(vocab_size=9, num_pairs=[2], placement="adjacent")
    e = mqar_example(cfg, 10, 2, random.Random(0))
    (k0, k1), (v0, v1) = e.keys, e.values
    first, second = e.query_pairs
    assert e.tokens == [k0, v0, k1, v1, e.keys[first], e.values[first], e.keys[second], e.values[second], 0, 0]
    assert e.query_positions == [4, 6] and e.distances == [4 - 2 * first, 6 - 2 * second]
    tokens, targets, loss_mask = example_row(e, 10)
    assert tokens.tolist() == e.tokens and targets.tolist() == e.tokens[1:] + [0]
    assert loss_mask.tolist() == [0, 0, 0, 0, 1, 0, 1, 0, 0, 0]
    assert [int(targets[p]) for p in e.query_positions] == e.answers


def test_generation_is_seeded_and_identical_across_runs():
    cfg = MQARConfig(num_pairs=[16])
    a = [mqar_trial(cfg, 7, 128, 16, t).tokens for t in range(4)]
    assert a == [mqar_trial(cfg, 7, 128, 16, t).tokens for t in range(4)]
    assert len({tuple(x) for x in a}) == 4  # trials differ
    assert mqar_trial(cfg, 8, 128, 16, 0).tokens != a[0]  # so do seeds
    # a fixed sequence pins the generator across Python versions and machines (sha256-derived seeds)
    pinned = mqar_trial(MQARConfig(vocab_size=9, num_pairs=[2], placement="adjacent"), 0, 10, 2, 0).tokens
    assert pinned == mqar_trial(MQARConfig(vocab_size=9, num_pairs=[2], placement="adjacent"), 0, 10, 2, 0).tokens
    one, two = MQARBatches(cfg, 128, 4, seed=3), MQARBatches(cfg, 128, 4, seed=3)
    for _ in range(2):
        b1, b2 = next(one), next(two)
        assert all(torch.equal(b1[k], b2[k]) for k in b1)


def test_power_law_puts_queries_nearer_the_pairs_than_uniform():
    near = {placement: [] for placement in ("uniform", "power_law")}
    for placement in near:
        cfg = MQARConfig(num_pairs=[8], placement=placement)
        for t in range(200):
            near[placement] += mqar_trial(cfg, 0, 512, 8, t).distances
    mean = {k: sum(v) / len(v) for k, v in near.items()}
    assert mean["power_law"] < 0.6 * mean["uniform"]


def test_stream_batches_shapes_masks_ranks_and_resume():
    cfg = MQARConfig(num_pairs=[2, 4])
    stream = MQARBatches(cfg, 32, 3, seed=1)
    batch = next(stream)
    assert batch["tokens"].shape == batch["targets"].shape == batch["loss_mask"].shape == (3, 32)
    assert batch["new_document"].all()
    for b in range(3):  # the masked targets are the answers of the example's queries
        example = stream.example(b)
        assert batch["tokens"][b].tolist() == example.tokens
        assert batch["targets"][b][batch["loss_mask"][b] == 1].tolist() == example.answers
    state = stream.state_dict()
    expected = next(stream)
    resumed = MQARBatches(cfg, 32, 3, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(expected[k], v) for k, v in next(resumed).items())
    with pytest.raises(ValueError, match="different configuration"):
        MQARBatches(MQARConfig(num_pairs=[2]), 32, 3, seed=1).load_state_dict(state)
    # rank 1 of 2 reads the examples after rank 0's
    rank1 = next(MQARBatches(cfg, 32, 3, seed=1, rank=1, world_size=2))
    assert rank1["tokens"][0].tolist() == stream.example(3).tokens


@pytest.mark.parametrize("kwargs,match", [
    (dict(placement="middle"), "placement must be one of"),
    (dict(vocab_size=9, num_pairs=[5]), "exceeds the 4 distinct keys"),
    (dict(num_pairs=[]), "num_pairs must be a non-empty list"),
    (dict(num_queries=-1), "num_queries must be >= 0"),
    (dict(power_a=0.0), "power_a must lie in"),
])
def test_bad_settings_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MQARConfig(**kwargs)


def test_too_short_sequences_fail_with_the_needed_length():
    with pytest.raises(ValueError, match="needs 2 \\* 8 \\+ 2 \\* 8 = 32 tokens"):
        mqar_example(MQARConfig(num_pairs=[8]), 31, 8, random.Random(0))
    with pytest.raises(ValueError, match="data.seq_len 20 is too short"):
        MQARBatches(MQARConfig(num_pairs=[4, 8]), 20, 2, seed=0)


def test_distance_buckets():
    assert [distance_bucket(d) for d in (2, 3, 4, 7, 8, 100)] == [2, 2, 4, 4, 8, 64]


def tiny(attention: str = "infini", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=2, segment_len=16,
                                   attention=attention, attention_backend="sdpa")).eval()


@pytest.mark.parametrize("attention", ["infini", "local", "full"])
def test_streamed_predictions_equal_one_forward(attention):
    model = tiny(attention)
    tokens = torch.tensor([mqar_trial(MQARConfig(num_pairs=[8]), 0, 64, 8, t).tokens for t in range(2)])
    with torch.no_grad():
        whole = model(tokens).logits.argmax(-1)
    assert torch.equal(mqar_eval.query_predictions(model, tokens, chunk_size=20), whole)  # 20 -> one segment


def test_accuracy_counts_by_pairs_and_distance(monkeypatch):
    """A stand-in model that answers a query only when its distance is below 16: the accuracies are known."""
    cfg = MQARConfig(num_pairs=[2, 8], placement="uniform")

    def predictions(model, tokens, chunk_size):
        out = torch.zeros_like(tokens)
        for row, sequence in enumerate(tokens.tolist()):
            for pairs in (2, 8):
                for t in range(6):
                    e = mqar_trial(cfg, 0, 48, pairs, t)
                    if e.tokens == sequence:
                        for p, d, a in zip(e.query_positions, e.distances, e.answers):
                            out[row, p] = a if d < 16 else FILLER_ID
        return out

    monkeypatch.setattr(mqar_eval, "query_predictions", predictions)
    results = mqar_eval.evaluate_mqar(tiny(), cfg, [48], examples=6, batch_size=4)
    expected = {}
    for pairs in (2, 8):
        distances = [d for t in range(6) for d in mqar_trial(cfg, 0, 48, pairs, t).distances]
        expected[pairs] = sum(d < 16 for d in distances) / len(distances)
    assert results.per_pairs() == pytest.approx(expected)
    assert 0 < expected[2] < 1 or 0 < expected[8] < 1  # the check is not trivial
    by_distance = results.per_distance()
    assert all(by_distance[b] == (1.0 if b < 16 else 0.0) for b in by_distance)
    assert sum(t for _, t in results.distance_counts.values()) == 6 * (2 + 8)


def test_run_mqar_task_end_to_end(tmp_path):
    checkpoint = tmp_path / "ckpt"
    save_model(checkpoint, tiny(), tokenizer="byte")
    with initialize_config_dir(config_dir=str(CONF / "eval"), version_base="1.3"):
        cfg = compose("evaluate", overrides=["task=mqar", f"checkpoint={checkpoint}", f"out_dir={tmp_path / 'o'}",
                                             "task.seq_lens=[32,64]", "task.num_pairs=[2,8,32]", "task.examples=3"])
    summary = run(cfg)
    assert summary["cells"].keys() == {"32", "64"}
    assert summary["cells"]["32"].keys() == {"2", "8"}  # 32 pairs need 128 tokens: skipped
    assert summary["settings"]["skipped"] == [[32, 32], [64, 32]]
    assert all(0.0 <= v <= 1.0 for v in summary["per_pairs"].values())
    assert json.loads((tmp_path / "o" / "mqar_summary.json").read_text())["per_pairs"] == summary["per_pairs"]
    assert "| 8 |" in (tmp_path / "o" / "mqar_table.md").read_text()
    assert (tmp_path / "o" / "mqar_capacity.png").read_bytes()[:8] == PNG


def test_capacity_table_lists_every_model():
    table = mqar_eval.capacity_table({"a": {"per_pairs": {"4": 1.0, "8": 0.5}}, "b": {"per_pairs": {"4": 0.25}}})
    assert table.splitlines() == ["| pairs | a | b |", "|---:|---:|---:|", "| 4 | 100.0 | 25.0 |",
                                  "| 8 | 50.0 | - |"]


def test_train_runs_on_mqar_data_and_checks_its_vocabulary(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["name=test", "debug=smoke", "data=mqar", f"trainer.run_dir={tmp_path}",
                                          "data.seq_len=64", "data.batch_size=4", "data.mqar.num_pairs=[2,4]",
                                          "trainer.max_steps=2", "model.segment_len=16"])
    summary = train.train(cfg)
    assert summary["step"] == 2 and all(v > 0 for v in summary["losses"].values())
    saved = json.loads((Path(summary["checkpoint"]) / "trainer_state.json").read_text())
    assert saved["data"][0]["kind"] == "mqar" and saved["data"][0]["step"] == 2  # the stream's position is saved
    with pytest.raises(ValueError, match="data.mqar.vocab_size=300 exceeds"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            bad = compose("train", overrides=["name=test", "debug=smoke", "data=mqar",
                                              f"trainer.run_dir={tmp_path / 'bad'}", "data.mqar.vocab_size=300",
                                              "model.vocab_size=512"])
        train.train(bad)
