"""Attention layers against the naive per-segment reference, and the kernels against each other."""

import pytest
import torch

from attention.backends import causal_attention
from attention.infini import CausalSelfAttention, InfiniAttention
from attention.reference import reference_layer
from models.rope import RotaryEmbedding

DIM, HEADS, SEGMENT = 32, 4, 16


def make_layer(kind: str, n_kv_heads: int = 2, update: str = "linear", seed: int = 0, backend: str = "sdpa"):
    torch.manual_seed(seed)
    rope = RotaryEmbedding(DIM // HEADS)
    if kind == "infini":
        layer = InfiniAttention(DIM, HEADS, n_kv_heads, SEGMENT, rope, update, gate_init=0.0, backend=backend)
        with torch.no_grad():  # distinct gates per head, some near each extreme
            layer.gate_logit.copy_(torch.tensor([-2.0, -0.3, 0.4, 2.5]))
    else:
        layer = CausalSelfAttention(DIM, HEADS, n_kv_heads, None if kind == "full" else SEGMENT, rope, backend)
    return layer.double()


@pytest.mark.parametrize("update", ["linear", "delta"])
@pytest.mark.parametrize("length", [63, 100, 64])
def test_infini_layer_matches_reference_outputs_memory_and_gradients(update, length):
    layer = make_layer("infini", update=update)
    x = torch.randn(2, length, DIM, dtype=torch.float64, requires_grad=True)
    y, state = layer(x)
    y_ref, memories = reference_layer(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)

    # the memory after the last complete segment; the unfinished segment waits in the cache
    n_complete = length // SEGMENT
    M_ref, z_ref = memories[n_complete - 1]
    torch.testing.assert_close(state.memory.matrix, M_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state.memory.norm, z_ref, rtol=1e-10, atol=1e-12)
    pending = length % SEGMENT
    assert state.keys.shape == (2, 2, pending, DIM // HEADS)
    with torch.no_grad():
        _, k, v = layer.project(x)
    torch.testing.assert_close(state.keys, k[:, :, length - pending :])
    torch.testing.assert_close(state.values, v[:, :, length - pending :])

    # gradients w.r.t. inputs, gate and projections
    weights = torch.randn_like(y)
    params = [x, layer.gate_logit, layer.wq.weight, layer.wk.weight, layer.wv.weight, layer.wo.weight]
    grads = torch.autograd.grad((y * weights).sum(), params)
    grads_ref = torch.autograd.grad((y_ref * weights).sum(), params)
    for name, g, g_ref in zip(["x", "gate", "wq", "wk", "wv", "wo"], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11, msg=f"gradient of {name}")
        assert g.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["local", "full"])
def test_local_and_full_layers_match_reference(kind):
    layer = make_layer(kind)
    x = torch.randn(2, 50, DIM, dtype=torch.float64)
    y, state = layer(x)
    y_ref, _ = reference_layer(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    assert state.memory is None
    assert state.keys.shape[2] == (50 if kind == "full" else 50 % SEGMENT)


def test_memory_gradient_reaches_earlier_segments_and_is_not_detached():
    """BPTT: the loss on segment 2 depends on segment 0's keys and values only through the memory."""
    layer = make_layer("infini")
    x = torch.randn(1, 3 * SEGMENT, DIM, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x)
    (grad,) = torch.autograd.grad(y[:, 2 * SEGMENT :].sum(), x)
    assert grad[:, :SEGMENT].abs().min() > 0
    local = make_layer("local")
    y, _ = local(x)
    (grad,) = torch.autograd.grad(y[:, 2 * SEGMENT :].sum(), x)
    assert torch.equal(grad[:, : 2 * SEGMENT], torch.zeros_like(grad[:, : 2 * SEGMENT]))


def test_memory_reads_unrotated_queries_and_keys():
    """RoPE touches only the local path: with the gate fully on memory, the theta of RoPE changes nothing."""
    outputs = []
    for theta in (10.0, 10000.0):
        layer = make_layer("infini")
        layer.rope.theta = theta
        with torch.no_grad():
            layer.gate_logit.fill_(1e4)  # sigmoid = 1: memory only
        x = torch.randn(1, 40, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        outputs.append(layer(x)[0][:, SEGMENT:])  # segment 0 reads an empty memory
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def gqa_inputs(tq, tk, kv_heads, lead=(), dtype=torch.float64):
    g = torch.Generator().manual_seed(tq * 100 + tk + kv_heads)
    q = torch.randn(*lead, 2, 4, tq, 8, generator=g, dtype=dtype)
    k = torch.randn(*lead, 2, kv_heads, tk, 8, generator=g, dtype=dtype)
    v = torch.randn(*lead, 2, kv_heads, tk, 8, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("tq,tk", [(9, 9), (1, 9), (4, 9), (9, 20)])
def test_sdpa_equals_eager(kv_heads, tq, tk):
    if tq > tk:
        pytest.skip("queries are the last positions of the keys")
    q, k, v = gqa_inputs(tq, tk, kv_heads)
    torch.testing.assert_close(causal_attention(q, k, v, "sdpa"), causal_attention(q, k, v, "eager"))


def test_eager_attention_is_bottom_right_causal_with_gqa():
    q, k, v = gqa_inputs(3, 5, 2)
    out = causal_attention(q, k, v, "eager")
    for h in range(4):
        kv = h // 2
        for i in range(3):
            visible = 5 - 3 + i + 1
            scores = torch.einsum("bd,btd->bt", q[:, h, i], k[:, kv, :visible]) / 8**0.5  # (B, visible)
            expected = torch.einsum("bt,btd->bd", torch.softmax(scores, -1), v[:, kv, :visible])
            torch.testing.assert_close(out[:, h, i], expected)


def test_sdpa_equals_eager_with_segment_batch_dims():
    q, k, v = gqa_inputs(6, 6, 2, lead=(3,))
    torch.testing.assert_close(causal_attention(q, k, v, "sdpa"), causal_attention(q, k, v, "eager"))


def test_unknown_backend_and_flash_without_package():
    q, k, v = gqa_inputs(2, 2, 2)
    with pytest.raises(ValueError, match="unknown attention backend 'triton'"):
        causal_attention(q, k, v, "triton")
    assert causal_attention(q, k, v, "auto").dtype == torch.float64  # auto falls back to sdpa on CPU


@pytest.mark.parametrize("kind", ["infini", "local", "full"])
@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_layer_sdpa_equals_eager_for_gqa(kind, n_kv_heads):
    x = torch.randn(2, 45, DIM, dtype=torch.float64)
    fast = make_layer(kind, n_kv_heads=n_kv_heads, backend="sdpa")
    slow = make_layer(kind, n_kv_heads=n_kv_heads, backend="eager")
    torch.testing.assert_close(fast(x)[0], slow(x)[0], rtol=1e-10, atol=1e-12)


def test_layer_rejects_bad_head_counts_and_update():
    rope = RotaryEmbedding(8)
    with pytest.raises(ValueError, match="n_heads % n_kv_heads"):
        CausalSelfAttention(32, 4, 3, 16, rope)
    with pytest.raises(ValueError, match="unknown memory_update 'hebbian'"):
        InfiniAttention(32, 4, 2, 16, rope, memory_update="hebbian")
