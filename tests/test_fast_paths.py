"""The fast paths that benchmarks/ motivated, each against its slow, obviously-correct reference: cached RoPE
tables vs the direct formula, hand-written RMSNorm/SwiGLU/feature-map backward vs autograd's composition, and the
CPU chunking of long inputs vs one pass (outputs, state and gradients)."""

from __future__ import annotations

import pytest
import torch

import models.streaming as streaming
from attention.feature_maps import EluPlusOne
from attention.reference import feature_map
from models import ModelConfig, Transformer
from models.layers import RMSNorm, SwiGLU, _RMSNormFunction, _SwiGLUFunction, rms_norm_reference, swiglu_reference
from models.rope import RopeScaling, RotaryEmbedding, rotate_half


def direct_rope(rope: RotaryEmbedding, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The textbook formula, angles and cos/sin in float32 (RotaryEmbedding.cos_sin)."""
    cos, sin = rope.cos_sin(positions)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("scaling", [RopeScaling(), RopeScaling("yarn", 4.0, 64)], ids=["none", "yarn"])
def test_cached_rope_matches_the_direct_formula(dtype, scaling):
    rope = RotaryEmbedding(16, 10000.0, scaling)
    x = torch.randn(2, 3, 40, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    for start in (0, 7, 900):  # 900: the table grows past its first capacity
        positions = torch.arange(start, start + 40)
        expected = direct_rope(rope, x, positions)
        fast = rope.rotate(x, start)
        assert fast.dtype == dtype
        torch.testing.assert_close(fast, expected, **tolerance)
        torch.testing.assert_close(rope(x, positions), fast, rtol=0, atol=0)  # one table for every caller
    # arbitrary (non-contiguous, repeated) positions through forward
    positions = torch.tensor([5, 0, 5, 33, 2])
    torch.testing.assert_close(rope(x[..., :5, :], positions), direct_rope(rope, x[..., :5, :], positions),
                               **tolerance)


def test_rope_table_independent_of_its_size_and_of_theta_changes():
    rope = RotaryEmbedding(8, 100.0)
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    small = rope.rotate(x, 3)
    rope.tables(100_000, x.device, torch.float64)  # grow the table
    assert torch.equal(rope.rotate(x, 3), small)
    rope.theta = 10.0  # the cache follows a changed theta (tests and HF conversion set it after construction)
    torch.testing.assert_close(rope.rotate(x, 3), direct_rope(rope, x, torch.arange(3, 8)), rtol=1e-6, atol=1e-6)


def test_rope_table_built_under_inference_mode_serves_autograd():
    rope = RotaryEmbedding(8)
    with torch.inference_mode():
        rope.rotate(torch.randn(1, 4, 8), 0)
    x = torch.randn(1, 4, 8, requires_grad=True)
    rope.rotate(x, 0).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def test_rms_norm_fast_path_matches_reference_values_and_gradients():
    norm = RMSNorm(16).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, dtype=torch.float64))
    x = rand(3, 10, 16) * 3
    grad = torch.randn(3, 10, 16, dtype=torch.float64)
    fast = norm(x)
    reference = rms_norm_reference(x, norm.weight, norm.eps)
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
    fast_grads = torch.autograd.grad(fast, (x, norm.weight), grad)
    reference_grads = torch.autograd.grad(reference, (x, norm.weight), grad)
    for a, b in zip(fast_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-5), (rand(2, 3, 16), rand(16)))


def test_rms_norm_under_autocast_normalises_in_float32_writes_bf16_and_bf16_weights_use_the_reference():
    norm = RMSNorm(16)
    x = torch.randn(4, 16)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)  # normalised in float32, written in bf16 (the next linear's cast, done here)
        assert out.dtype == torch.bfloat16 and out.grad_fn.name().endswith("_RMSNormFunctionBackward")
        expected = rms_norm_reference(x, norm.weight, norm.eps)
        assert expected.dtype == torch.float32
        torch.testing.assert_close(out, expected.bfloat16(), rtol=0, atol=0)  # one rounding of the float32 result
    grad = torch.randn(4, 16).bfloat16()
    (fast,) = torch.autograd.grad(out, x, grad)
    (reference,) = torch.autograd.grad(expected, x, grad.float())
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, reference, rtol=1e-6, atol=1e-6)  # the bf16 gradient, promoted exactly
    bf16 = RMSNorm(16).bfloat16()
    xb = x.bfloat16()
    assert torch.equal(bf16(xb), rms_norm_reference(xb, bf16.weight, bf16.eps))


def test_swiglu_under_autocast_matches_autocasts_reference_values_and_gradients():
    """The fast path under autocast computes what autocast makes of the reference's three linears (bf16 inputs,
    silu and product in bf16); gradients reach the float32 input and weights in float32."""
    mlp = SwiGLU(16, 40)
    x = rand(2, 9, 16, dtype=torch.float32)
    grad = torch.randn(2, 9, 16)
    weights = (mlp.w1.weight, mlp.w3.weight, mlp.w2.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = mlp(x)
        reference = swiglu_reference(x, *weights)
    assert fast.dtype == reference.dtype == torch.bfloat16
    assert fast.grad_fn.name() != reference.grad_fn.name()  # the fast path ran
    torch.testing.assert_close(fast, reference, rtol=0, atol=0)
    fast_grads = torch.autograd.grad(fast, (x, *weights), grad.bfloat16())
    reference_grads = torch.autograd.grad(reference, (x, *weights), grad.bfloat16())
    for a, b in zip(fast_grads, reference_grads):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())
    # and both within bf16 rounding of the float32 computation
    exact = swiglu_reference(x, *weights)
    torch.testing.assert_close(fast.float(), exact, rtol=3e-2, atol=3e-2 * exact.abs().max().item())


@pytest.mark.parametrize("keep_silu", [False, True], ids=["recomputed", "kept"])
def test_swiglu_function_with_kept_or_recomputed_silu_matches_reference_in_every_backward(keep_silu):
    """Both backward variants (silu(a) recomputed: float32/float64; kept from forward: bf16) give the reference's
    gradients in float64, and a second backward of the same graph gives them again (the kept silu(a) is not
    overwritten by the first)."""
    mlp = SwiGLU(16, 40).double()
    x = rand(2, 9, 16)
    grad = torch.randn(2, 9, 16, dtype=torch.float64)
    weights = (mlp.w1.weight, mlp.w3.weight, mlp.w2.weight)
    fast = _SwiGLUFunction.apply(x, *weights, keep_silu)
    torch.testing.assert_close(fast, swiglu_reference(x, *weights), rtol=1e-12, atol=1e-12)
    expected = torch.autograd.grad(swiglu_reference(x, *weights), (x, *weights), grad)
    for _ in range(2):
        for a, b in zip(torch.autograd.grad(fast, (x, *weights), grad, retain_graph=True), expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_swiglu_fast_path_matches_reference_values_and_gradients():
    mlp = SwiGLU(16, 40).double()
    x = rand(2, 9, 16)
    grad = torch.randn(2, 9, 16, dtype=torch.float64)
    weights = (mlp.w1.weight, mlp.w3.weight, mlp.w2.weight)
    fast, reference = mlp(x), swiglu_reference(x, *weights)
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
    fast_grads = torch.autograd.grad(fast, (x, *weights), grad)
    for a, b in zip(fast_grads, torch.autograd.grad(reference, (x, *weights), grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    mlp.w3.weight.requires_grad_(False)  # frozen weights: their gradient is skipped, the others are unchanged
    grads = torch.autograd.grad(mlp(x), (x, mlp.w1.weight, mlp.w2.weight), grad)
    expected = torch.autograd.grad(swiglu_reference(x, *weights), (x, mlp.w1.weight, mlp.w2.weight), grad)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_feature_map_copy_matches_elu_plus_one_values_and_gradients():
    feature_map_contiguous = EluPlusOne(4)
    x = (rand(2, 3, 50, 4) * 4).detach().requires_grad_()
    transposed = x.transpose(1, 2)  # a non-contiguous input, as the layers pass it
    fast = feature_map_contiguous(transposed)
    assert fast.is_contiguous()
    reference = feature_map(transposed)
    torch.testing.assert_close(fast, reference, rtol=0, atol=0)
    grad = torch.randn_like(reference)
    (g_fast,) = torch.autograd.grad(fast, x, grad)
    (g_reference,) = torch.autograd.grad(reference, x, grad)
    torch.testing.assert_close(g_fast, g_reference, rtol=1e-12, atol=1e-15)
    assert torch.autograd.gradcheck(feature_map_contiguous, (rand(3, 5),))
    y = torch.randn(4, 3)  # a contiguous input is copied, never modified in place
    before = y.clone()
    feature_map_contiguous(y)
    assert torch.equal(y, before)


@pytest.mark.parametrize("attention,update", [("infini", "linear"), ("infini", "delta"), ("local", "linear")])
def test_cpu_chunking_of_long_inputs_equals_one_pass(monkeypatch, attention, update):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, segment_len=8,
                         attention=attention, memory_update=update)
    model = Transformer(config).double()
    tokens = torch.randint(0, 32, (2, 8 * 7 + 3))  # 7 segments and a partial one

    def run(chunk_bytes):
        monkeypatch.setattr(streaming, "CPU_CHUNK_BYTES", chunk_bytes)
        model.zero_grad(set_to_none=True)
        out = model(tokens)
        (out.logits.square().mean() + sum(s.memory.matrix.sum() for s in out.state if s.memory is not None)
         ).backward()
        return out, [p.grad.clone() for p in model.parameters()]

    bytes_per_segment = 2 * 8 * max(config.dim, config.ffn_dim, 4 * 5) * 8
    assert model._cpu_chunk_len(tokens) is None
    whole, whole_grads = run(streaming.CPU_CHUNK_BYTES)
    monkeypatch.setattr(streaming, "CPU_CHUNK_BYTES", 3 * bytes_per_segment)
    assert model._cpu_chunk_len(tokens) == 3 * 8  # 8 segments -> chunks of 3, 3, 2
    chunked, chunked_grads = run(3 * bytes_per_segment)
    torch.testing.assert_close(chunked.logits, whole.logits, rtol=1e-10, atol=1e-12)
    for a, b in zip(chunked.state, whole.state):
        torch.testing.assert_close(a.keys, b.keys)
        if a.memory is not None:
            torch.testing.assert_close(a.memory.matrix, b.memory.matrix, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(a.memory.norm, b.memory.norm, rtol=1e-10, atol=1e-12)
    for a, b in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_full_attention_is_never_chunked():
    model = Transformer(ModelConfig(vocab_size=32, dim=16, n_layers=1, n_heads=4, attention="full", segment_len=8))
    assert model._cpu_chunk_len(torch.zeros(64, 1 << 20, dtype=torch.long, device="meta")) is None
