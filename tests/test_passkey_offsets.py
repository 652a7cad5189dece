"""Passkey answers at every offset of a segment: evaluation per offset class (inside / straddles / opens) and
training prompts placed by data.passkey_answer_offset (fixed / uniform / balanced)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter

import pytest
import torch

import evaluation.passkey as passkey_module
from data.passkey import (
    ANSWER,
    OFFSET_CLASSES,
    PasskeyBatches,
    PasskeyDataset,
    PasskeyTemplate,
    offset_class,
    offset_class_ranges,
    random_passkey,
)
from data.passkey import PasskeyDataConfig as DataConfig
from data.stream import derived_rng, shift_and_pad
from data.tokenizer import ByteTokenizer
from evaluation.config import PasskeyTaskConfig
from evaluation.passkey import (
    compact_table,
    evaluate_passkey,
    markdown_table,
    prompt_lengths,
    segment_len_of,
    spread_offsets,
)
from evaluation.report import read_jsonl
from models import ModelConfig, Transformer
from training.data import build_data

TOKENIZER = ByteTokenizer()
TEMPLATE = PasskeyTemplate(TOKENIZER)
Q = TEMPLATE.question_len  # 37 bytes: "What is the pass key? The pass key is"
PNG = b"\x89PNG\r\n\x1a\n"


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    config = dict(vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, segment_len=64, attention="infini",
                  attention_backend="sdpa")
    return Transformer(ModelConfig(**{**config, **overrides})).eval()


def class_from_tokens(tokens: list[int], segment_len: int) -> str:
    """The class read off the prompt itself: where the question (its last q tokens) lies relative to the segment
    of the answer's first token, at position P = len(tokens)."""
    assert tokens[-Q:] == TEMPLATE.question
    p = len(tokens)
    answer_segment, question_start = p // segment_len, p - Q
    if question_start // segment_len == answer_segment:
        return "inside"
    if (p - 1) // segment_len == answer_segment:  # the question's last token shares the answer's segment
        return "straddles"
    return "opens"


# ---------------------------------------------------------------- evaluation: lengths per offset class


def test_offset_class_ranges_partition_a_segment():
    assert Q == 37
    for n in (1, 16, 37, 38, 64, 2048):
        ranges = offset_class_ranges(n, Q)
        assert sorted(r for offsets in ranges.values() for r in offsets) == list(range(n))
        assert all(offset_class(r, n, Q) == name for name, offsets in ranges.items() for r in offsets)
    assert offset_class_ranges(64, Q) == {"inside": range(37, 64), "straddles": range(1, 37), "opens": range(1)}
    assert not offset_class_ranges(16, Q)["inside"] and not offset_class_ranges(37, Q)["inside"]
    assert spread_offsets(range(1, 37), 1) == [19] and spread_offsets(range(1, 37), 2) == [10, 28]
    assert spread_offsets(range(3), 10) == [0, 1, 2]


@pytest.mark.parametrize("segment_len", [16, 64])
@pytest.mark.parametrize("per_class", [1, 3, 100])
def test_expanded_lengths_land_in_their_class(segment_len, per_class, caplog):
    lengths = [256, 300, 1000, 2048, 8000]
    with caplog.at_level(logging.WARNING, logger="evaluation.passkey"):
        rows = prompt_lengths(lengths, segment_len, Q, OFFSET_CLASSES, per_class)
    expected_classes = [c for c in OFFSET_CLASSES if offset_class_ranges(segment_len, Q)[c]]
    if segment_len == 16:  # 16 <= 37: no offset leaves the whole question in the answer's segment
        assert expected_classes == ["straddles", "opens"] and "'inside' is empty" in caplog.text
    assert [p.requested for p in rows] == sorted([p.requested for p in rows], key=lengths.index)
    assert len({p.length for p in rows}) == len(rows)  # every prompt length distinct
    for requested in lengths:
        mine = [p for p in rows if p.requested == requested]
        assert list(dict.fromkeys(p.offset_class for p in mine)) == expected_classes
        base = mine[-1].length  # opens: r = 0
        assert base % segment_len == 0 and abs(base - requested) <= segment_len // 2
        for p in mine:
            size = len(offset_class_ranges(segment_len, Q)[p.offset_class])
            assert sum(m.offset_class == p.offset_class for m in mine) == min(per_class, size)
            assert p.length == base + p.offset and p.offset == p.length % segment_len
            assert offset_class(p.offset, segment_len, Q) == p.offset_class
            tokens = TEMPLATE.prompt(p.length, 0.5, "12345").tokens  # the question's span, from the tokens
            assert class_from_tokens(tokens, segment_len) == p.offset_class
    assert [(p.length, p.offset) for p in prompt_lengths([512], 64, Q)] == [(512 + 50, 50), (512 + 19, 19),
                                                                              (512, 0)]


def test_full_attention_keeps_lengths_as_given():
    assert segment_len_of(ModelConfig(attention="full", segment_len=64)) is None
    assert segment_len_of(ModelConfig(attention="local", segment_len=64)) == 64
    rows = prompt_lengths([500, 512, 2000], None, Q)
    assert [(p.requested, p.length, p.offset, p.offset_class) for p in rows] == [
        (500, 500, None, "none"), (512, 512, None, "none"), (2000, 2000, None, "none")]
    model = tiny_model(attention="full")
    results = evaluate_passkey(model, TOKENIZER, [260, 300], [1.0], 1, seed=0, max_new_tokens=1,
                               segment_len=segment_len_of(model.config))
    assert results.lengths == [260, 300] and not results.by_class
    assert [(t.requested_length, t.length, t.offset, t.offset_class) for t in results.trials] == [
        (260, 260, None, "none"), (300, 300, None, "none")]
    table = markdown_table(results)
    assert "| 260 | " in table and "none" not in table  # rows as before: one per length
    assert results.summary()["metrics"]["exact"]["per_requested_length"].keys() == {"260", "300"}


def test_bad_offset_settings_are_named():
    with pytest.raises(ValueError, match=r"unknown passkey offset class\(es\) \['middle'\]"):
        prompt_lengths([512], 64, Q, ["inside", "middle"])
    with pytest.raises(ValueError, match=r"unknown passkey offset class\(es\) \['middle'\]"):
        evaluate_passkey(tiny_model(), TOKENIZER, [512], [0.5], 1, 0, segment_len=64, offset_classes=["middle"])
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"offsets_per_class must be an integer >= 1, got {bad}"):
            prompt_lengths([512], 64, Q, OFFSET_CLASSES, bad)
    with pytest.raises(ValueError, match="more than once"):
        prompt_lengths([512], 64, Q, ["opens", "opens"])
    with pytest.raises(ValueError, match="is empty"):
        prompt_lengths([512], 64, Q, [])
    with pytest.raises(ValueError, match=r"every requested passkey offset class \['inside'\] is empty"):
        prompt_lengths([512], 16, Q, ["inside"])
    with pytest.raises(ValueError, match="500 and 512 both round to 512 tokens"):
        prompt_lengths([500, 512], 64, Q)
    with pytest.raises(ValueError, match=r"offset_classes / offsets_per_class.*\['opening'\]"):
        PasskeyTaskConfig(offset_classes=["opening"])
    with pytest.raises(ValueError, match="offsets_per_class.*got 0"):
        PasskeyTaskConfig(offsets_per_class=0)


def fake_generate(segment_len: int):
    """A controlled model: answers right exactly when the answer opens a segment, and 3 of 5 digits otherwise."""

    def generate(model, prompts, config):
        outputs = []
        for tokens in prompts:
            key = re.search(r"The pass key is (\d+)\.", TOKENIZER.decode(tokens)).group(1)
            wrong = key[:3] + "".join(str((int(d) + 1) % 10) for d in key[3:])  # 3 of 5 digits right
            answer = key if len(tokens) % segment_len == 0 else wrong
            outputs.append(TOKENIZER.encode(f" {answer}."))
        return outputs

    return generate


def test_evaluation_reports_per_class_tables_and_json(tmp_path, monkeypatch):
    monkeypatch.setattr(passkey_module, "generate", fake_generate(64))
    results = evaluate_passkey(tiny_model(), TOKENIZER, [512, 2048], [0.0, 1.0], 2, seed=0, out_dir=tmp_path,
                               segment_len=64, training_length=256)
    rows = read_jsonl(tmp_path / "passkey_trials.jsonl")
    assert len(rows) == 2 * 3 * 2 * 2
    assert {(r["requested_length"], r["length"], r["offset"], r["offset_class"]) for r in rows} == {
        (n, n + r, r, c) for n in (512, 2048) for r, c in ((50, "inside"), (19, "straddles"), (0, "opens"))}
    assert all(r["exact"] == (r["offset_class"] == "opens") for r in rows)

    summary = json.loads((tmp_path / "passkey_summary.json").read_text())
    exact = summary["metrics"]["exact"]
    assert summary["requested_lengths"] == [512, 2048] and summary["offset_classes"] == list(OFFSET_CLASSES)
    assert summary["lengths"] == [562, 531, 512, 2098, 2067, 2048]
    assert exact["per_length_class"] == {str(n): {"inside": 0.0, "straddles": 0.0, "opens": 1.0} for n in (512, 2048)}
    assert exact["per_class"] == {"inside": 0.0, "straddles": 0.0, "opens": 1.0}
    assert exact["per_requested_length"] == {"512": pytest.approx(1 / 3), "2048": pytest.approx(1 / 3)}
    assert exact["class_cells"]["2048"]["opens"] == {"0.0": 1.0, "1.0": 1.0}
    assert exact["per_length"]["531"] == 0.0 and exact["mean"] == pytest.approx(1 / 3)
    assert summary["metrics"]["digit_accuracy"]["per_class"]["inside"] == pytest.approx(0.6)
    assert summary["settings"]["segment_len"] == 64 and summary["settings"]["question_tokens"] == Q

    table = (tmp_path / "passkey_table.md").read_text()
    assert "| length | 0% | 100% | mean | digit accuracy |" in table
    assert "| 2048 (x8) opens, P=2048 | 100.0 | 100.0 | 100.0 | 100.0 |" in table
    assert "| 512 (x2) straddles, P=531 | 0.0 | 0.0 | 0.0 | 60.0 |" in table
    assert "| 512 (x2) inside, P=562 | 0.0 | 0.0 | 0.0 | 60.0 |" in table
    assert "| length | inside | straddles | opens | overall |" in table
    assert "| 512 (x2) | 0.0 | 0.0 | 100.0 | 33.3 |" in table and "| all lengths | 0.0 | 0.0 | 100.0 | 33.3 |" in table
    assert compact_table(results, "digit_accuracy").splitlines()[2] == "| 512 (x2) | 60.0 | 60.0 | 100.0 | 73.3 |"
    assert (tmp_path / "passkey_heatmap.png").read_bytes()[:8] == PNG

    spread = evaluate_passkey(tiny_model(), TOKENIZER, [512], [0.5], 1, seed=0, segment_len=64, offsets_per_class=2,
                              offset_classes=["straddles", "opens"])
    assert markdown_table(spread).splitlines()[2:] == ["| 512 straddles, P=522/540 | 0.0 | 0.0 | 60.0 |",
                                                       "| 512 opens, P=512 | 100.0 | 100.0 | 100.0 |"]


def test_evaluation_with_a_real_model_runs_every_class(tmp_path):
    results = evaluate_passkey(tiny_model(), TOKENIZER, [256], [0.5], 1, seed=0, max_new_tokens=2, segment_len=64,
                               out_dir=tmp_path)
    assert [(t.length, t.offset_class) for t in results.trials] == [(306, "inside"), (275, "straddles"),
                                                                    (256, "opens")]
    assert results.rows() == [(256, "inside"), (256, "straddles"), (256, "opens")]
    assert (tmp_path / "passkey_heatmap.png").read_bytes()[:8] == PNG


# ---------------------------------------------------------------- training: answer offsets


def digest(batches) -> str:
    """sha256 of the batches' tensors (the way the pre-offset-mode batches were recorded)."""
    h = hashlib.sha256()
    for b in batches:
        for k in [k for k in ("tokens", "targets", "loss_mask", "new_document") if k in b]:
            h.update(k.encode())
            h.update(str(b[k].dtype).encode())
            h.update(str(tuple(b[k].shape)).encode())
            h.update(b[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def test_fixed_mode_batches_are_those_of_before_the_offset_modes():
    # recorded with the code before data.passkey_answer_offset (length_jitter=0)
    datasets = [PasskeyDataset(TOKENIZER, n, seed=7) for n in (256, 384, 512)]
    stream = PasskeyBatches(datasets, batch_size=3, rank=1, world_size=2)
    assert digest([next(stream) for _ in range(6)]) == \
        "e1d7a24d356263cfad567993685b04f92791d93de32329bdc25f1f5c380e232f"
    weighted = PasskeyDataset(TOKENIZER, 320, seed=11, loss_on="all", answer_weight=3.0, depth_range=(0.2, 0.8))
    assert digest([next(PasskeyBatches(weighted, 4)) for _ in range(2)]) == \
        "5973ecb07d97f77fc80e088fdf526da4c7ca4d60e1c5424c3a7e4aa45ff70c11"
    for n, recorded in ((263, "b95cfe1b47e543ed0665a3f09b1e73e85f651c4f9b0dd2d6ddc3a9f1bd6e0fb9"),
                        (512, "74a046721385c1960163f692d8f5c030e3fb61ba303694564c7e3d3e0d23a188")):
        fixed = PasskeyDataset(TOKENIZER, n, seed=5, answer_offset="fixed", segment_len=64)
        assert digest([fixed[i] for i in range(0, 400, 7)]) == recorded
    # ... and equal to a direct construction: the prompt fills the sequence, the answer ends it
    fixed = PasskeyDataset(TOKENIZER, 512, seed=5)
    for i in (0, 1, 99):
        rng = derived_rng("passkey-train", 5, i)
        key, depth = random_passkey(rng, 5), rng.uniform(0.0, 1.0)
        answer = TOKENIZER.encode(ANSWER.format(key=key))
        prompt = TEMPLATE.prompt(512 + 1 - len(answer), depth, key).tokens
        tokens, targets, mask = shift_and_pad(prompt + answer, 512, TOKENIZER.pad_id, len(prompt))
        row = fixed[i]
        assert torch.equal(row["tokens"], tokens) and torch.equal(row["targets"], targets)
        assert torch.equal(row["loss_mask"], mask)
    # through build_data, with the model's segment length passed as train.py does
    cfg = DataConfig(seq_len=512, seq_len_mix=[256, 384, 512], batch_size=3, seed=7)
    assert digest([next(build_data(cfg, TOKENIZER, 1, 2, segment_len=64)) for _ in range(1)]) == \
        digest([next(PasskeyBatches(datasets, batch_size=3, rank=1, world_size=2))])


def check_examples(dataset: PasskeyDataset, indices: range) -> list[int]:
    """Every example's layout (answer right after the prompt, padding after it); returns the offsets r."""
    offsets = []
    for i in indices:
        prompt = dataset.prompt(i)
        n = len(prompt.tokens)
        assert dataset.seq_len + 1 - 7 - (dataset.segment_len - 1) <= n <= dataset.seq_len + 1 - 7
        offsets.append(n % dataset.segment_len)
    for i in indices[:20]:
        prompt, example = dataset.prompt(i), dataset[i]
        n = len(prompt.tokens)
        assert example["loss_mask"].nonzero().flatten().tolist() == list(range(n - 1, n + 6))
        assert TOKENIZER.decode(example["targets"][n - 1 : n + 6].tolist()) == f" {prompt.passkey}."
        assert example["tokens"][n + 6 :].eq(TOKENIZER.pad_id).all()
    return offsets


def test_uniform_offsets_hit_every_offset_evenly():
    for segment_len, count in ((16, 3200), (64, 6400)):  # 200 and 100 expected per offset
        dataset = PasskeyDataset(TOKENIZER, 512, seed=4, answer_offset="uniform", segment_len=segment_len)
        counts = Counter(check_examples(dataset, range(count)))
        expected = count / segment_len
        assert sorted(counts) == list(range(segment_len))
        assert all(0.6 * expected <= c <= 1.4 * expected for c in counts.values()), counts  # > 4 sd either side
        plain = PasskeyDataset(TOKENIZER, 512, seed=4)
        assert all(dataset.prompt(i).passkey == plain.prompt(i).passkey for i in range(50))  # same keys, depths


def test_balanced_offsets_give_each_class_a_third():
    dataset = PasskeyDataset(TOKENIZER, 512, seed=9, answer_offset="balanced", segment_len=64)
    offsets = check_examples(dataset, range(6000))
    classes = Counter(offset_class(r, 64, Q) for r in offsets)
    assert all(1800 <= classes[c] <= 2200 for c in OFFSET_CLASSES), classes  # 2000 expected, sd 37
    counts = Counter(offsets)
    assert sorted(counts) == list(range(64))  # every offset of every class
    for name, expected in (("inside", 2000 / 27), ("straddles", 2000 / 36)):
        inside_class = [counts[r] for r in offset_class_ranges(64, Q)[name]]
        assert all(0.5 * expected <= c <= 1.5 * expected for c in inside_class), (name, inside_class)
    assert counts[0] == classes["opens"]


def test_offset_modes_are_deterministic_resumable_and_checked():
    uniform = PasskeyDataset(TOKENIZER, 512, seed=3, answer_offset="uniform", segment_len=64)
    again = PasskeyDataset(TOKENIZER, 512, seed=3, answer_offset="uniform", segment_len=64)
    assert [again.prompt(i).tokens for i in (9, 2, 5)] == [uniform.prompt(i).tokens for i in (9, 2, 5)]
    stream = PasskeyBatches([uniform, PasskeyDataset(TOKENIZER, 448, 3, answer_offset="uniform", segment_len=64)], 2)
    for _ in range(3):
        next(stream)
    state = json.loads(json.dumps(stream.state_dict()))
    assert state["answer_offset"] == "uniform" and state["segment_len"] == 64
    expected = [next(stream) for _ in range(2)]
    resumed = PasskeyBatches(stream.datasets, 2)
    resumed.load_state_dict(state)
    assert digest([next(resumed) for _ in range(2)]) == digest(expected)
    fixed_state = PasskeyBatches(PasskeyDataset(TOKENIZER, 512, seed=3), 2).state_dict()
    assert "answer_offset" not in fixed_state  # states saved before the modes keep loading
    with pytest.raises(ValueError, match="answer_offset"):
        PasskeyBatches(uniform, 2).load_state_dict(fixed_state)

    with pytest.raises(ValueError, match="answer_offset must be one of"):
        PasskeyDataset(TOKENIZER, 512, seed=0, answer_offset="jitter", segment_len=64)
    with pytest.raises(ValueError, match="needs the model's segment_len"):
        PasskeyDataset(TOKENIZER, 512, seed=0, answer_offset="uniform")
    with pytest.raises(ValueError, match=r"\['inside'\] is empty"):
        PasskeyDataset(TOKENIZER, 512, seed=0, answer_offset="balanced", segment_len=32)
    cfg = DataConfig(seq_len=512, seq_len_mix=[256, 512], passkey_answer_offset="balanced")
    with pytest.raises(ValueError, match=r"data.seq_len_mix length 256, data.passkey_answer_offset='balanced', "
                                         r"model.segment_len=64: .*shortened by up to 63 tokens.*minimum is 247"):
        build_data(cfg, TOKENIZER, 0, 1, segment_len=64)
    build_data(cfg, TOKENIZER, 0, 1, validation=True, segment_len=64)  # validation uses seq_len 512 only
    with pytest.raises(ValueError, match="data.seq_len length 512.*needs the model's segment_len"):
        build_data(DataConfig(seq_len=512, passkey_answer_offset="uniform"), TOKENIZER, 0, 1)


def test_haystack_spans_and_write_scale_augmentation():
    """The haystack spans are exactly the filler; write_scale is c on them (one c per example, log-uniform in
    [1, haystack_scale], deterministic) and 1 elsewhere; off at 1; validation batches never scaled."""
    from data.passkey import PasskeyDataset
    from data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("byte")
    dataset = PasskeyDataset(tokenizer, 512, seed=3, haystack_scale=16.0)
    cs = []
    for index in range(200):
        prompt, row = dataset.prompt(index), dataset[index]
        (b0, b1), (a0, a1) = prompt.haystack
        assert b1 <= prompt.needle_start < prompt.needle_end <= a0 and a1 <= prompt.length
        assert prompt.tokens[b0:b1] == dataset.template.filler(b1 - b0)
        assert prompt.tokens[a0:a1] == dataset.template.filler(a1 - a0)
        outside = [t for i, t in enumerate(prompt.tokens) if not (b0 <= i < b1 or a0 <= i < a1)]
        assert len(outside) == dataset.template.fixed_length(prompt.passkey)  # instruction, needle, question, \n
        scale = row["write_scale"]
        inside = torch.zeros(512, dtype=torch.bool)
        inside[b0:b1] = inside[a0:a1] = True
        assert torch.equal(scale[~inside], torch.ones(int((~inside).sum())))
        c = scale[inside].unique()
        assert c.numel() == 1 and 1.0 <= float(c) <= 16.0
        cs.append(float(c))
        assert torch.equal(dataset[index]["write_scale"], scale)  # a function of (seed, index)
    logs = torch.tensor(cs).log() / torch.tensor(16.0).log()  # log-uniform: uniform in [0, 1]
    assert logs.min() < 0.1 and logs.max() > 0.9 and 0.35 < logs.mean() < 0.65
    assert "write_scale" not in PasskeyDataset(tokenizer, 512, seed=3)[0]
    with pytest.raises(ValueError, match="haystack_scale must be >= 1"):
        PasskeyDataset(tokenizer, 512, seed=3, haystack_scale=0.5)
    from data.passkey import PasskeyDataConfig as DataConfig
    from training.data import build_data

    config = DataConfig(seq_len=512, batch_size=2, passkey_haystack_scale=8.0)
    assert build_data(config, tokenizer, 0, 1, segment_len=64).__next__()["write_scale"].max() > 1
    assert "write_scale" not in next(build_data(config, tokenizer, 0, 1, validation=True, segment_len=64))
