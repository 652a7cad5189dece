"""evaluation/memory_probe.py on tiny random models: read weights and needle shares against a hand computation
(with and without a write gate), the reads by segment against the layer's streamed memory, write knock-outs
against the naive reference layer, the predicted-share formula, the files, `python -m evaluation
task=memory_probe` end to end, and the refusal of models without memory."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attention.infini import InfiniAttention
from attention.reference import reference_layer
from data.tokenizer import ByteTokenizer
from evaluation.memory_probe import (
    ALL_LAYERS,
    UNMODIFIED,
    filler_ratio,
    knockout_keep,
    memory_tokens_at,
    needle_share_summary,
    predicted_share,
    probe_memory,
    probe_prompts,
    read_weights,
    share_statistics,
    teacher_forced_logits,
)
from models import ModelConfig, Transformer
from models.checkpoint import save_model

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
N = 16  # segment length of the tiny models
TOKENIZER = ByteTokenizer()


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    base = dict(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, segment_len=N, attention="infini",
                attention_backend="eager")
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**base, **overrides}))
    with torch.no_grad():
        for layer in model.layers:
            attention = layer.attention
            if isinstance(attention, InfiniAttention):
                attention.gate_logit.uniform_(-2, 2)
                if attention.rule.write_gate is not None:  # beta that differs from token to token
                    attention.rule.write_gate.weight.normal_(0, 2.0)
                    attention.rule.write_gate.bias.uniform_(-1, 1)
    return model.double().eval()


@torch.no_grad()
def layer_inputs(model: Transformer, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Every attention sub-block's input of one unchunked forward (independent of the probe's chunked one)."""
    captured = []
    hooks = [layer.attention.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
             for layer in model.layers]
    try:
        model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(captured) == len(model.layers)  # one call per layer: the forward was not sub-chunked
    return captured


@torch.no_grad()
def hand_weights(attention: InfiniAttention, x: torch.Tensor, i: int, head: int) -> tuple[list[float], torch.Tensor]:
    """w_t for the query at position i (batch row 0), one token at a time from the weights and the rule's naive
    pieces: [w_t for t < N * (i // N)] and the values v_t (T_mem, D)."""
    H, Hkv, D = attention.n_heads, attention.n_kv_heads, attention.head_dim
    kv = head // (H // Hkv)
    sigma = attention.rule.feature_map.reference
    q = (x[0, i] @ attention.wq.weight.T).view(H, D)[head]
    sq = sigma(q)
    weights, values = [], []
    for t in range(N * (i // N)):
        k = (x[0, t] @ attention.wk.weight.T).view(Hkv, D)[kv]
        v = (x[0, t] @ attention.wv.weight.T).view(Hkv, D)[kv]
        sk = sigma(k)
        beta = 1.0 if attention.rule.write_gate is None else float(attention.rule.write_gate.reference(k, v, kv))
        weights.append(beta * sum(float(sq[d] * sk[d]) for d in range(len(sq))))
        values.append(v)
    return weights, torch.stack(values)


@torch.no_grad()
def streamed_memory(model: Transformer, tokens: torch.Tensor, segments: int, layer: int):
    """The layer's memory after `segments` whole segments, from the model's own streamed state."""
    state = model(tokens[:, : segments * N]).state
    return state[layer].memory


@torch.no_grad()
def test_needle_share_and_reads_match_a_hand_computation_linear():
    model = tiny_model()
    length, depth, seed = 300, 0.5, 4
    results = probe_memory(model, TOKENIZER, [length], [depth], trials=1, seed=seed, knockouts=False,
                           chunk_size=3 * N)
    (prompt,) = probe_prompts(TOKENIZER, [length], [depth], 1, seed)
    probe = results.at(length)
    assert (probe.offset, probe.offset_class) == (300 % N, "straddles")  # 12 < the 37-token question
    assert probe.answer_offsets == [0, 1, 2, 3, 4]  # " 12345.": " " at P predicts digit 1, ...
    assert list(prompt.answer_positions) == [300, 301, 302, 303, 304]
    tokens = torch.tensor([prompt.tokens])
    inputs = layer_inputs(model, tokens)
    needle = range(prompt.needle_start, prompt.needle_end)
    for layer, attention in enumerate(a.attention for a in model.layers):
        x = inputs[layer]
        for head in range(4):
            shares, needle_w, filler_w, n_needle, n_filler = [], 0.0, 0.0, 0, 0
            for i in prompt.answer_positions:
                w, _ = hand_weights(attention, x, i, head)
                in_needle = sum(w[t] for t in needle if t < len(w))
                shares.append(in_needle / sum(w))
                needle_w, filler_w = needle_w + in_needle, filler_w + sum(w) - in_needle
                n_needle += sum(1 for t in needle if t < len(w))
                n_filler += sum(1 for t in range(len(w)) if t not in needle)
            assert probe.needle_share[layer][head] == pytest.approx(sum(shares) / len(shares), rel=1e-10)
            assert probe.needle_share_by_depth[depth][layer][head] == pytest.approx(sum(shares) / len(shares),
                                                                                    rel=1e-10)
            ratio = (filler_w / n_filler) / (needle_w / n_needle)
            assert probe.filler_ratio[layer][head] == pytest.approx(ratio, rel=1e-10)

    # linear rule: sum_t w_t is exactly sigma(q) . z and sum_t w_t v_t exactly sigma(q) M of the streamed memory
    layer, head, i = 1, 3, prompt.answer_positions[0]
    attention = model.layers[layer].attention
    w, values = hand_weights(attention, inputs[layer], i, head)
    memory = streamed_memory(model, tokens, i // N, layer)
    kv = head // 2
    q = (inputs[layer][0, i] @ attention.wq.weight.T).view(4, 8)[head]
    sq = attention.rule.feature_map.reference(q)
    torch.testing.assert_close(torch.tensor(sum(w), dtype=torch.float64), sq @ memory.norm[0, kv],
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.tensor(w, dtype=torch.float64) @ values, sq @ memory.matrix[0, kv],
                               rtol=1e-12, atol=1e-12)
    batched = read_weights(attention, inputs[layer], [i])[0, head, 0]  # (T,)
    torch.testing.assert_close(batched[: len(w)], torch.tensor(w, dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.all(batched[len(w) :] == 0)  # the query's own segment and later: not in memory

    # reads by segment: sigma(q) . z and ||A_mem|| of the layer's streamed memory, averaged over the segment
    curve = results.segment_curve
    assert curve is not None and curve.length == length and len(curve.sigma_qz[0]) == -(-length // N)
    segment = 7
    memory = streamed_memory(model, tokens, segment, layer)
    q_all = (inputs[layer][0, segment * N : (segment + 1) * N] @ attention.wq.weight.T).view(N, 4, 8)[:, head]
    sq_all = attention.rule.feature_map.reference(q_all)  # (N, D)
    qz = sq_all @ memory.norm[0, kv]
    norm = ((sq_all @ memory.matrix[0, kv]) / qz[:, None]).norm(dim=-1)
    assert curve.sigma_qz_by_head[layer][head][segment] == pytest.approx(float(qz.mean()), rel=1e-10)
    assert curve.read_norm_by_head[layer][head][segment] == pytest.approx(float(norm.mean()), rel=1e-10)
    assert curve.sigma_qz[layer][0] == 0.0  # segment 0 reads an empty memory


@torch.no_grad()
def test_read_weights_include_the_write_gate():
    model = tiny_model(seed=1, memory_write_gate=True)
    length, seed = 280, 2
    results = probe_memory(model, TOKENIZER, [length], [0.0, 1.0], trials=1, seed=seed, knockouts=False,
                           segment_curve=False)
    prompts = probe_prompts(TOKENIZER, [length], [0.0, 1.0], 1, seed)
    layer, head = 0, 1
    attention = model.layers[layer].attention
    shares, needle_betas, filler_betas = [], [], []
    for prompt in prompts:
        tokens = torch.tensor([prompt.tokens])
        x = layer_inputs(model, tokens)[layer]
        needle = range(prompt.needle_start, prompt.needle_end)
        for i in prompt.answer_positions:
            w, _ = hand_weights(attention, x, i, head)
            shares.append(sum(w[t] for t in needle if t < len(w)) / sum(w))
        # the weights include beta: their sum is still sigma(q) . z of the streamed (gated) memory
        i = prompt.answer_positions[-1]
        memory = streamed_memory(model, tokens, i // N, layer)
        q = (x[0, i] @ attention.wq.weight.T).view(4, 8)[head]
        expected = attention.rule.feature_map.reference(q) @ memory.norm[0, head // 2]
        assert sum(hand_weights(attention, x, i, head)[0]) == pytest.approx(float(expected), rel=1e-12)
        for t in range(length):  # KV head 0's write strengths over the prompt
            k = (x[0, t] @ attention.wk.weight.T).view(2, 8)[0]
            v = (x[0, t] @ attention.wv.weight.T).view(2, 8)[0]
            (needle_betas if t in needle else filler_betas).append(float(attention.rule.write_gate.reference(k, v, 0)))
    probe = results.at(length)
    assert probe.needle_share[layer][head] == pytest.approx(sum(shares) / len(shares), rel=1e-10)
    assert probe.write_strength is not None
    assert probe.write_strength["needle"][layer][0] == pytest.approx(sum(needle_betas) / len(needle_betas), rel=1e-10)
    assert probe.write_strength["filler"][layer][0] == pytest.approx(sum(filler_betas) / len(filler_betas), rel=1e-10)
    assert 0.05 < min(needle_betas + filler_betas) and max(needle_betas + filler_betas) < 0.95  # beta really varies


@pytest.mark.parametrize("update,feature_map", [("delta", "elu"), ("delta_corrected", "elu"), ("linear", "dpfp")])
def test_other_rules_weights_and_reads(update, feature_map):
    """delta: z is the linear rule's sum, so sum_t w_t is still exactly sigma(q) . z; delta_corrected scales each
    term of z by gamma <= 1, which the weights leave out (sum_t w_t >= sigma(q) . z); the reads by segment are the
    layer's own streamed memory for every rule."""
    model = tiny_model(seed=6, memory_update=update, memory_feature_map=feature_map)
    results = probe_memory(model, TOKENIZER, [260, 330], [0.5], 1, seed=1, chunk_size=2 * N)
    (prompt,) = probe_prompts(TOKENIZER, [330], [0.5], 1, 1)
    tokens = torch.tensor([prompt.tokens])
    layer, head, i = 1, 2, prompt.answer_positions[0]
    attention = model.layers[layer].attention
    x = layer_inputs(model, tokens)[layer]
    w = read_weights(attention, x, [i])[0, head, 0]
    memory = streamed_memory(model, tokens, i // N, layer)
    with torch.no_grad():
        q = (x[0, i] @ attention.wq.weight.T).view(4, 8)[head]
        qz = float(attention.rule.features(q) @ memory.norm[0, head // 2])
        segment = 9
        memory = streamed_memory(model, tokens, segment, layer)
        q_seg = (x[0, segment * N : (segment + 1) * N] @ attention.wq.weight.T).view(N, 4, 8)[:, head]
        curve_qz = float((attention.rule.features(q_seg) @ memory.norm[0, head // 2]).mean())
    if update == "delta_corrected":
        assert float(w.sum()) > qz * (1 + 1e-6)
    else:
        assert float(w.sum()) == pytest.approx(qz, rel=1e-12)
    assert results.segment_curve.sigma_qz_by_head[layer][head][segment] == pytest.approx(curve_qz, rel=1e-10)
    assert all(math.isfinite(v) for p in results.per_length for row in p.needle_share for v in row)


@torch.no_grad()
def reference_logits(model: Transformer, tokens: torch.Tensor, positions, keep: dict[int, torch.Tensor]):
    """The whole model through attention.reference's naive layer in one call, write_scale over the whole input."""
    h = model.tok_embeddings(tokens)
    for index, block in enumerate(model.layers):
        a, _ = reference_layer(block.attention, block.attention_norm(h), keep.get(index))
        h = h + a
        h = h + block.feed_forward(block.ffn_norm(h))
    return model.logits(h[:, list(positions)])


@pytest.mark.parametrize("knocked", [[0, 1], [1]], ids=["all-layers", "layer1"])
def test_knockout_equals_the_reference_without_the_filler_writes(knocked):
    model = tiny_model(seed=2)
    prompts = probe_prompts(TOKENIZER, [400], [0.0, 1.0], 1, seed=5)
    tokens = torch.tensor([p.tokens for p in prompts])
    positions = prompts[0].answer_positions
    keep = torch.stack([knockout_keep(p, keep_last_tokens=20) for p in prompts]).double()
    assert keep[0, 0] == 1 and keep[0, prompts[0].needle_start] == 1 and keep[0, -25] == 1
    assert keep[0, prompts[0].needle_end + 1] == 0 and 0.3 < keep.mean() < 0.8
    chosen = {i: keep for i in knocked}
    logits = teacher_forced_logits(model, tokens, positions, chosen, chunk_size=5 * N)  # 6 chunks of 80 tokens
    torch.testing.assert_close(logits, reference_logits(model, tokens, positions, chosen), rtol=1e-9, atol=1e-9)
    unmodified = teacher_forced_logits(model, tokens, positions)
    torch.testing.assert_close(unmodified, model(tokens).logits[:, list(positions)], rtol=1e-10, atol=1e-10)
    assert (logits - unmodified).abs().max() > 1e-4  # the knock-out does change the answer's logits

    # the probe's knock-out scores are these logits' verdicts
    variant = ALL_LAYERS if knocked == [0, 1] else "layer1"
    results = probe_memory(model, TOKENIZER, [400], [0.0, 1.0], 1, seed=5, keep_last_tokens=20, segment_curve=False)
    targets = torch.tensor([p.answer_targets for p in prompts])
    correct = (logits.argmax(-1) == targets).double()
    score = results.at(400).knockout[variant]
    assert score.exact == pytest.approx(float(correct.min(-1).values.mean()))
    assert score.digit_accuracy == pytest.approx(float(correct.mean()))
    assert score.digit_accuracy_by_depth[1.0] == pytest.approx(float(correct[1].mean()))
    assert set(results.at(400).knockout) == {UNMODIFIED, "layer0", "layer1", ALL_LAYERS}


def test_knockout_leaves_the_model_unmodified():
    model = tiny_model(seed=3).train()
    before = model(torch.tensor([probe_prompts(TOKENIZER, [260], [0.5], 1, 0)[0].tokens])).logits
    probe_memory(model, TOKENIZER, [260], [0.5], 1, seed=0, segment_curve=False)
    assert model.training  # mode restored
    (prompt,) = probe_prompts(TOKENIZER, [260], [0.5], 1, 0)
    tokens = torch.tensor([prompt.tokens])
    torch.testing.assert_close(model(tokens).logits, before, rtol=0, atol=0)
    # a knock-out of the wrong length is refused, naming the argument
    bad = torch.ones(1, tokens.shape[1] - 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="write_scale"):
        teacher_forced_logits(model, tokens, prompt.answer_positions, {0: bad, 1: bad}, chunk_size=4096)


def test_predicted_share_on_a_synthetic_case():
    # one query, 80 tokens in memory: 10 needle tokens weigh 2 each (head 0) or 1 (head 1), 70 filler 0.5 each
    T, needle_range = 100, range(10, 20)
    w = torch.zeros(1, 2, 1, T, dtype=torch.float64)
    w[0, :, 0, :80] = 0.5
    w[0, 0, 0, 10:20], w[0, 1, 0, 10:20] = 2.0, 1.0
    needle = torch.zeros(1, T, dtype=torch.bool)
    needle[0, needle_range.start : needle_range.stop] = True
    in_memory = (torch.arange(T) < 80).unsqueeze(0)  # (A=1, T)
    stats = share_statistics(w, needle, in_memory)
    torch.testing.assert_close(stats.share[0, :, 0], torch.tensor([20 / 55, 10 / 45], dtype=torch.float64))
    r = filler_ratio([stats])
    torch.testing.assert_close(r, torch.tensor([0.25, 0.5], dtype=torch.float64))
    # at its own length the formula gives the measured share; with 1000 filler tokens it dilutes
    assert predicted_share(0.25, 10, 70) == pytest.approx(20 / 55)
    assert predicted_share(0.5, 10, 70) == pytest.approx(10 / 45)
    assert predicted_share(0.25, 10, 1000) == pytest.approx(10 / 260)
    # a length 4x longer with weights of the same profile measures what the formula predicted
    w4 = torch.full((1, 2, 1, 4 * 80 + 20), 0.5, dtype=torch.float64)
    w4[0, 0, 0, 10:20], w4[0, 1, 0, 10:20] = 2.0, 1.0
    in_memory4 = (torch.arange(w4.shape[-1]) < 320).unsqueeze(0)
    needle4 = torch.zeros(1, w4.shape[-1], dtype=torch.bool)
    needle4[0, 10:20] = True
    measured = share_statistics(w4 * in_memory4, needle4, in_memory4).share[0, :, 0]
    predicted = [predicted_share(float(r[h]), 10, 320 - 10) for h in range(2)]
    torch.testing.assert_close(measured, torch.tensor(predicted, dtype=torch.float64))
    # tokens in memory at answer offsets -1..3: a first digit predicted from the segment before a boundary
    assert memory_tokens_at(8192, [-1, 0, 1, 2, 3], 64) == pytest.approx((8128 + 4 * 8192) / 5)


def test_files_tables_and_flat_metrics(tmp_path):
    model = tiny_model(seed=4, memory_write_gate=True)
    results = probe_memory(model, TOKENIZER, [256, 320, 1024], [0.0, 1.0], 1, seed=0, training_length=256,
                           out_dir=tmp_path)
    assert [p.offset_class for p in results.per_length] == ["opens", "opens", "opens"]
    written = json.loads((tmp_path / "memory_probe.json").read_text())
    assert written["task"] == "memory_probe" and written["lengths"] == [256, 320, 1024]
    row = written["per_length"]["1024"]
    assert len(row["needle_share"]) == 2 and len(row["needle_share"][0]) == 4
    assert set(row["needle_share_by_depth"]) == {"0.0", "1.0"} and set(row["knockout"]) == {
        UNMODIFIED, "layer0", "layer1", ALL_LAYERS}
    assert len(row["write_strength"]["filler"][1]) == 2  # [layer][KV head]
    assert written["predicted_share"]["256"]["1024"] == results.predicted_share(256, 1024)
    assert len(written["segment_curve"]["sigma_qz"][1]) == 1024 // N
    assert len(written["gates"]) == 2 and len(written["gates"][0]) == 4
    table = (tmp_path / "memory_probe.md").read_text()
    for heading in ("## Prompt ends", "## Needle share", "## Filler-to-needle ratio", "## Write knock-out",
                    "## Gates", "## Write strength", "## Reads by the query's segment at 1024 tokens"):
        assert heading in table
    assert "predicted at 1024 (4.0x) from 256 / measured (%)" in table
    assert "| 1024 (4x, opens) |" in table
    assert (tmp_path / "memory_probe.png").read_bytes()[:8] == PNG
    metrics = needle_share_summary(results)
    assert metrics["probe/needle_share/1024/layer1/head3"] == pytest.approx(results.at(1024).needle_share[1][3])
    means = [v for row in results.at(1024).needle_share for v in row]
    assert metrics["probe/needle_share/1024/mean"] == pytest.approx(sum(means) / len(means))
    assert "probe/exact/256" in metrics and all(math.isfinite(v) for v in metrics.values())


def test_python_m_evaluation_memory_probe_from_a_checkpoint(tmp_path):
    checkpoint = tmp_path / "ckpt"
    save_model(checkpoint, tiny_model(seed=5).float(), tokenizer="byte")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "evaluation", "task=memory_probe", f"checkpoint={checkpoint}", f"out_dir={out}",
         "task.lengths=[260,520]", "task.depths=[0.5]", "task.trials=1", "threads=1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "# Memory probe" in done.stdout and "## Write knock-out" in done.stdout
    for name in ("memory_probe.json", "memory_probe.md", "memory_probe.png", "memory_probe_summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "memory_probe_summary.json").read_text())
    assert summary["checkpoint"] == str(checkpoint) and summary["lengths"] == [260, 520]


@pytest.mark.parametrize("attention", ["local", "full"])
def test_models_without_memory_are_refused(attention):
    model = tiny_model(attention=attention)
    with pytest.raises(ValueError, match=f"attention='infini'.*attention='{attention}'.*no memory"):
        probe_memory(model, TOKENIZER, [260], [0.5], 1, seed=0)

