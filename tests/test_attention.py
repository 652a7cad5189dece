"""Attention layers against the naive per-segment reference, and the kernels against each other."""

import pytest
import torch
import torch.nn.functional as F
from test_model import chunkings

from attention.backends import CPU_BF16_MIN_KEYS, causal_attention
from attention.infini import CausalSelfAttention, InfiniAttention
from attention.reference import reference_layer
from attention.xl import TransformerXLAttention
from models.rope import RotaryEmbedding

DIM, HEADS, SEGMENT = 32, 4, 16


def make_layer(kind: str, n_kv_heads: int = 2, update: str = "linear", seed: int = 0, backend: str = "sdpa"):
    torch.manual_seed(seed)
    rope = RotaryEmbedding(DIM // HEADS)
    if kind == "infini":
        layer = InfiniAttention(DIM, HEADS, n_kv_heads, SEGMENT, rope, update, gate_init=0.0, backend=backend)
        with torch.no_grad():  # distinct gates per head, some near each extreme
            layer.gate_logit.copy_(torch.tensor([-2.0, -0.3, 0.4, 2.5]))
    elif kind == "xl":
        layer = TransformerXLAttention(DIM, HEADS, n_kv_heads, SEGMENT, rope, backend)
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


@pytest.mark.parametrize("kind", ["local", "full", "xl"])
def test_local_and_full_layers_match_reference(kind):
    layer = make_layer(kind)
    x = torch.randn(2, 50, DIM, dtype=torch.float64)
    y, state = layer(x)
    y_ref, _ = reference_layer(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    assert state.memory is None
    # xl keeps the previous complete segment too
    assert state.keys.shape[2] == {"full": 50, "local": 50 % SEGMENT, "xl": SEGMENT + 50 % SEGMENT}[kind]


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


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "bf16-inputs"])
def test_sdpa_on_cpu_runs_reduced_precision_in_float32(autocast):
    """CPU's bf16 SDPA kernel is slow in backward for short segments, so bf16 inputs (or autocast) run in float32
    there: the result is float32 attention of the bf16 inputs, rounded to their dtype, and gradients flow back in
    bf16."""
    q, k, v = (t.bfloat16().requires_grad_() for t in gqa_inputs(9, 9, 2, lead=(3,), dtype=torch.float32))
    expected = causal_attention(q.detach().float(), k.detach().float(), v.detach().float(), "eager").bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = causal_attention(q, k, v, "sdpa")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-2)  # float32 kernels differ by rounding only
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("keys", [CPU_BF16_MIN_KEYS - 1, CPU_BF16_MIN_KEYS])
def test_sdpa_on_cpu_under_autocast_picks_the_kernel_dtype_by_segment_length(keys):
    """What the model hands SDPA under CPU autocast: float32 q, k, v (their projection's output). Below
    CPU_BF16_MIN_KEYS keys the float32 kernel runs (the same result as without autocast, bit for bit); from it the
    bf16 kernel (bit for bit SDPA on the bf16-rounded inputs), which stays within bf16 rounding of float64
    attention, forward and backward. The result and the gradients keep float32."""
    g = torch.Generator().manual_seed(keys)
    q, k, v = (torch.randn(2, 2, keys, 16, generator=g, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = causal_attention(q, k, v, "sdpa")
    assert out.dtype == torch.float32
    if keys < CPU_BF16_MIN_KEYS:
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        expected = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True).float()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    reference = causal_attention(q.double(), k.double(), v.double(), "eager")
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=1.5e-2 if keys >= CPU_BF16_MIN_KEYS else 1e-5)
    cotangent = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), cotangent)
    grads_ref = torch.autograd.grad(reference, (q, k, v), cotangent.double())
    for grad, grad_ref in zip(grads, grads_ref):
        assert grad.dtype == torch.float32
        scale = grad_ref.abs().max().item()
        assert (grad.double() - grad_ref).abs().max().item() <= (2e-2 if keys >= CPU_BF16_MIN_KEYS else 1e-5) * scale


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


@pytest.mark.parametrize("kind", ["infini", "local", "full", "xl"])
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


# ------------------------------------------------------------------------------------- xl (attention/xl.py)


@pytest.mark.parametrize("n_kv_heads", [1, 2])
@pytest.mark.parametrize("length", [9, SEGMENT, 63, 64])
def test_xl_layer_matches_reference_outputs_and_gradients(n_kv_heads, length):
    """Outputs and gradients (inputs and every weight) equal the token-by-token reference, whose previous-segment
    keys/values are detached as well (stop-gradient)."""
    layer = make_layer("xl", n_kv_heads=n_kv_heads)
    x = torch.randn(2, length, DIM, dtype=torch.float64, requires_grad=True)
    y, state = layer(x)
    y_ref, _ = reference_layer(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    # the state: the previous complete segment (if any) and the unfinished one
    kept = length % SEGMENT + (SEGMENT if length >= SEGMENT else 0)
    with torch.no_grad():
        _, k, v = layer.project(x)
    torch.testing.assert_close(state.keys, k[:, :, length - kept :])
    torch.testing.assert_close(state.values, v[:, :, length - kept :])

    weights = torch.randn_like(y)
    params = [x, layer.wq.weight, layer.wk.weight, layer.wv.weight, layer.wo.weight]
    grads = torch.autograd.grad((y * weights).sum(), params)
    grads_ref = torch.autograd.grad((y_ref * weights).sum(), params)
    for name, g, g_ref in zip(["x", "wq", "wk", "wv", "wo"], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11, msg=f"gradient of {name}")
        assert g.abs().sum() > 0, name


def test_xl_reference_stops_the_gradient():
    """The reference's gradients differ from those of the same attention without the stop-gradient, so the
    gradient comparison above checks the detach."""
    layer = make_layer("xl")
    x = torch.randn(1, 2 * SEGMENT, DIM, dtype=torch.float64, requires_grad=True)
    y, _ = reference_layer(layer, x)
    (grad,) = torch.autograd.grad(y[:, SEGMENT:].sum(), x)
    assert torch.equal(grad[:, :SEGMENT], torch.zeros_like(grad[:, :SEGMENT]))


def xl_stream(layer, x, sizes, state=None):
    outputs, start = [], 0
    for size in sizes:
        y, state = layer(x[:, start : start + size], state)
        outputs.append(y)
        start += size
    assert start == x.shape[1]
    return torch.cat(outputs, dim=1), state


def test_xl_chunking_invariance_of_outputs_state_and_gradients():
    layer = make_layer("xl")
    T = 5 * SEGMENT + 7
    x = torch.randn(2, T, DIM, dtype=torch.float64, requires_grad=True)
    whole, whole_state = xl_stream(layer, x, [T])
    weights = torch.randn_like(whole)
    (grad_whole,) = torch.autograd.grad((whole * weights).sum(), x)
    for name, sizes in chunkings(T, SEGMENT).items():
        y, state = xl_stream(layer, x, sizes)
        torch.testing.assert_close(y, whole, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(state.keys, whole_state.keys, msg=name)
        torch.testing.assert_close(state.values, whole_state.values, msg=name)
        (grad,) = torch.autograd.grad((y * weights).sum(), x)
        torch.testing.assert_close(grad, grad_whole, rtol=1e-9, atol=1e-11, msg=name)


def test_xl_causality_and_receptive_field_of_one_layer():
    """Changing token t changes no output before t; segment s depends on segments s and s - 1 only."""
    layer = make_layer("xl")
    T = 4 * SEGMENT
    x = torch.randn(1, T, DIM, dtype=torch.float64)
    with torch.no_grad():
        y, _ = layer(x)
        for t in (0, SEGMENT - 1, SEGMENT + 5, 2 * SEGMENT, 3 * SEGMENT - 1):
            changed = x.clone()
            changed[:, t] += 1.0
            y2, _ = layer(changed)
            moved = (y2 - y).abs().amax(dim=-1)[0]  # (T,)
            assert torch.equal(moved[:t], torch.zeros_like(moved[:t])), f"token {t} changed an earlier output"
            own_end = (t // SEGMENT + 1) * SEGMENT
            assert (moved[t:own_end] > 0).all()  # its own segment from t on
            assert (moved[own_end : own_end + SEGMENT] > 0).all()  # every query of the next segment sees it
            assert torch.equal(moved[own_end + SEGMENT :], torch.zeros_like(moved[own_end + SEGMENT :]))  # 2 back


def test_xl_stop_gradient_at_the_previous_segment():
    """The output of segment s depends on segment s - 1 in the forward pass, but its gradient w.r.t. the inputs
    of segment s - 1 is exactly zero (Transformer-XL's SG); `local` has neither."""
    layer = make_layer("xl")
    x = torch.randn(1, 3 * SEGMENT, DIM, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x)
    (grad,) = torch.autograd.grad(y[:, 2 * SEGMENT :].sum(), x)
    assert torch.equal(grad[:, : 2 * SEGMENT], torch.zeros_like(grad[:, : 2 * SEGMENT]))
    assert (grad[:, 2 * SEGMENT :].abs().sum(-1) > 0).all()
    local = make_layer("local")
    with torch.no_grad():  # same weights (same seed): xl differs from local exactly where the previous segment is
        y_local, _ = local(x)
        torch.testing.assert_close(y[:, :SEGMENT], y_local[:, :SEGMENT], rtol=1e-12, atol=1e-14)
        assert ((y - y_local)[:, SEGMENT:].abs().amax(-1) > 1e-6).all()


def test_xl_zeroed_previous_segment_is_absent():
    """A row whose cached previous segment was zeroed (models.state.reset_rows: a new document) continues as a
    fresh stream; the other rows are unaffected."""
    layer = make_layer("xl")
    x = torch.randn(2, 3 * SEGMENT + 5, DIM, dtype=torch.float64)
    with torch.no_grad():
        _, state = layer(x[:, :SEGMENT])  # exactly one segment: the cache is that segment
        assert state.keys.shape[2] == SEGMENT
        keep = torch.tensor([1.0, 0.0], dtype=torch.float64).view(2, 1, 1, 1)
        reset = state._replace(keys=state.keys * keep, values=state.values * keep)
        for sizes in ([2 * SEGMENT + 5], [3, SEGMENT, SEGMENT + 2], [1] * (2 * SEGMENT + 5)):
            y, _ = xl_stream(layer, x[:, SEGMENT:], sizes, reset)
            carried, _ = xl_stream(layer, x[:, SEGMENT:], sizes, state)
            fresh, _ = layer(x[1:, SEGMENT:])
            torch.testing.assert_close(y[0], carried[0], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(y[1], fresh[0], rtol=1e-10, atol=1e-12)


def test_xl_layer_rejects_write_scale_and_no_segments():
    layer = make_layer("xl")
    x = torch.randn(1, 4, DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match="attention=xl"):
        layer(x, None, torch.ones(1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="positive integer segment_len"):
        TransformerXLAttention(DIM, HEADS, 2, None, RotaryEmbedding(8))
