"""RoPE and its context-extension rules: the numbers of transformers' own rope init functions, the defining
properties of each rule, and config validation."""

from __future__ import annotations

import math

import pytest
import torch

from models.config import ModelConfig
from models.rope import RopeScaling, RotaryEmbedding, rotate_half, rotate_reference

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

HEAD_DIM, THETA = 64, 500000.0



def hf_inv_freq(rope_parameters: dict) -> tuple[torch.Tensor, float]:
    """transformers' inverse frequencies and attention factor for a Llama with head_dim 64."""
    config = transformers.LlamaConfig(
        hidden_size=HEAD_DIM * 4, num_attention_heads=4, max_position_embeddings=131072,
        rope_parameters={"rope_theta": THETA, **rope_parameters},
    )
    return ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](config, torch.device("cpu"))


def ours(scaling: RopeScaling) -> RotaryEmbedding:
    return RotaryEmbedding(HEAD_DIM, THETA, scaling)


def test_llama3_matches_transformers():
    # Llama 3.1's published values; wavelengths cover all three regimes (kept, blended, divided)
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    expected, attention_factor = hf_inv_freq(params)
    rope = ours(RopeScaling("llama3", 8.0, 8192, low_freq_factor=1.0, high_freq_factor=4.0))
    torch.testing.assert_close(rope.inv_freq(), expected, rtol=1e-6, atol=0)
    assert attention_factor == 1.0 and rope.scaling.cos_sin_multiplier() == 1.0
    # the three regimes are really exercised: some kept, some divided by 8, some in between
    plain = RotaryEmbedding(HEAD_DIM, THETA).inv_freq()
    ratio = plain / rope.inv_freq()
    assert (ratio == 1).sum() > 0 and (ratio == 8).sum() > 0 and ((ratio > 1) & (ratio < 8)).sum() > 0


@pytest.mark.parametrize("factor,original", [(4.0, 4096), (16.0, 2048), (2.5, 100)])
def test_yarn_matches_transformers(factor, original):
    params = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    expected, attention_factor = hf_inv_freq(params)
    rope = ours(RopeScaling("yarn", factor, original))
    torch.testing.assert_close(rope.inv_freq(), expected, rtol=1e-6, atol=0)
    assert rope.scaling.cos_sin_multiplier() == pytest.approx(attention_factor, rel=1e-12)
    assert attention_factor == pytest.approx(0.1 * math.log(factor) + 1)


def test_yarn_explicit_attention_factor_and_betas_match_transformers():
    params = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096,
              "attention_factor": 1.3, "beta_fast": 16.0, "beta_slow": 2.0}
    expected, attention_factor = hf_inv_freq(params)
    rope = ours(RopeScaling("yarn", 8.0, 4096, beta_fast=16.0, beta_slow=2.0, attention_factor=1.3))
    torch.testing.assert_close(rope.inv_freq(), expected, rtol=1e-6, atol=0)
    assert attention_factor == 1.3
    cos, sin = rope.cos_sin(torch.arange(5))
    # position 0: angle 0 for every frequency, so cos = attention factor, sin = 0
    torch.testing.assert_close(cos[0], torch.full((HEAD_DIM,), 1.3))
    assert torch.equal(sin[0], torch.zeros(HEAD_DIM))
    plain_cos, plain_sin = RotaryEmbedding(HEAD_DIM, THETA).cos_sin(torch.arange(5))
    angles = torch.arange(5.0).unsqueeze(-1) * rope.inv_freq()
    torch.testing.assert_close(sin[:, : HEAD_DIM // 2], 1.3 * angles.sin())
    assert not torch.allclose(cos, plain_cos)


def test_linear_matches_transformers_and_is_position_interpolation():
    expected, _ = hf_inv_freq({"rope_type": "linear", "factor": 4.0})
    rope = ours(RopeScaling("linear", 4.0))
    torch.testing.assert_close(rope.inv_freq(), expected, rtol=1e-6, atol=0)
    # position interpolation: position 4p with factor 4 rotates exactly as position p without scaling
    x = torch.randn(2, 3, 10, HEAD_DIM, dtype=torch.float64)
    plain = RotaryEmbedding(HEAD_DIM, THETA)
    torch.testing.assert_close(rope(x, torch.arange(10) * 4), plain(x, torch.arange(10)), rtol=0, atol=1e-5)


def test_default_matches_transformers():
    config = transformers.LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4,
                                      rope_parameters={"rope_type": "default", "rope_theta": THETA})
    model = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    torch.testing.assert_close(RotaryEmbedding(HEAD_DIM, THETA).inv_freq(), model.inv_freq, rtol=1e-6, atol=0)


def test_ntk_aware_theta_rule():
    s = 4.0
    rope = ours(RopeScaling("ntk", s))
    inv = rope.inv_freq().double()
    plain = RotaryEmbedding(HEAD_DIM, THETA).inv_freq().double()
    scaled_theta = THETA * s ** (HEAD_DIM / (HEAD_DIM - 2))
    expected = scaled_theta ** -(torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    torch.testing.assert_close(inv, expected.float().double(), rtol=0, atol=0)
    assert inv[0] == 1.0  # the fastest dimension is untouched
    torch.testing.assert_close(plain[-1] / inv[-1], torch.tensor(s, dtype=torch.float64), rtol=1e-6, atol=0)
    assert ((plain / inv)[1:-1] > 1).all() and ((plain / inv)[1:-1] < s).all()


@pytest.mark.parametrize("kind", ["none", "linear", "ntk", "yarn", "llama3"])
def test_scaled_rope_stays_relative(kind):
    """q_m . k_n depends only on m - n for every rule (the attention factor scales it, uniformly)."""
    scaling = RopeScaling(kind, 1.0 if kind == "none" else 4.0, None if kind in ("none", "linear", "ntk") else 64)
    rope = RotaryEmbedding(16, 10000.0, scaling)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)

    def score(m, n):
        return rope(q.view(1, 16), torch.tensor([m])) @ rope(k.view(1, 16), torch.tensor([n])).T

    torch.testing.assert_close(score(7, 3), score(104, 100), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(score(3, 3), score(50, 50), rtol=1e-4, atol=1e-5)


def test_rotation_formula():
    rope = RotaryEmbedding(4, 100.0)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    inv = torch.tensor([1.0, 0.1])
    angle = torch.cat([inv, inv]) * 5
    expected = x * angle.cos() + rotate_half(x) * angle.sin()
    torch.testing.assert_close(rope(x, torch.tensor([5])), expected)
    assert torch.equal(rotate_half(x), torch.tensor([[-3.0, -4.0, 1.0, 2.0]]))


@pytest.mark.parametrize("kind", ["none", "yarn"])
def test_fast_rotation_equals_formula_with_gradients(kind):
    """rotate / forward (per-half autograd function, backward = the rotation by -angle) equal rotate_reference in
    float64, outputs and input gradients (first and second order), on the strided (B*S, H, N, D) views of a
    time-major projection that the layers pass; the output keeps that layout."""
    scaling = RopeScaling(kind, 1.0 if kind == "none" else 4.0, None if kind == "none" else 64)
    rope = RotaryEmbedding(8, 100.0, scaling)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 12, 3 * 2 * 8, dtype=torch.float64, generator=g, requires_grad=True)  # (B, T, 3 H D)
    view = qkv[..., 16:32].reshape(2, 12, 2, 8).reshape(6, 4, 2, 8).transpose(1, 2)  # k: (B*S, H, N, D), N = 4
    cos, sin = rope.cos_sin(torch.arange(4))
    expected = rotate_reference(view, cos.double(), sin.double())
    out = rope.rotate(view)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)  # float32 tables vs the float32 formula: 1 ulp
    torch.testing.assert_close(rope(view, torch.arange(4)), out, rtol=0, atol=0)  # one table for both paths
    assert out.stride() == view.transpose(1, 2).contiguous().transpose(1, 2).stride()  # time-major kept
    weight = torch.randn(out.shape, dtype=torch.float64, generator=g)
    (grad,) = torch.autograd.grad((out * weight).sum(), qkv, create_graph=True)
    (expected_grad,) = torch.autograd.grad((expected * weight).sum(), qkv, create_graph=True)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)
    assert grad[..., :16].abs().max() == 0 and grad[..., 32:].abs().max() == 0  # only k's slice
    assert torch.autograd.gradcheck(rope.rotate, (view.detach().requires_grad_(),))
    assert torch.autograd.gradgradcheck(rope.rotate, (view.detach().requires_grad_(),))
    # the 2-position start offset of a call in the middle of a segment
    start_out = rope.rotate(view[:, :, 2:], start=2)
    torch.testing.assert_close(start_out, out[:, :, 2:], rtol=0, atol=0)


def test_model_config_passes_scaling_to_rope():
    from models.transformer import Transformer

    cfg = ModelConfig(dim=32, n_heads=2, n_layers=1, rope_scaling="llama3", rope_scaling_factor=8.0,
                      rope_original_max_position_embeddings=64, rope_low_freq_factor=2.0, rope_high_freq_factor=8.0)
    model = Transformer(cfg)
    assert model.rope.scaling == RopeScaling("llama3", 8.0, 64, 2.0, 8.0)
    assert model.layers[0].attention.rope is model.rope


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"rope_scaling": "ropey"}, "rope_scaling='ropey' is not one of"),
        ({"rope_scaling_factor": 4.0}, "has no effect with rope_scaling='none'"),
        ({"rope_scaling": "linear", "rope_scaling_factor": 0.0}, "rope_scaling_factor must be a positive number"),
        ({"rope_scaling": "llama3", "rope_scaling_factor": 8.0}, "needs rope_original_max_position_embeddings"),
        ({"rope_scaling": "yarn", "rope_scaling_factor": 8.0}, "needs rope_original_max_position_embeddings"),
        ({"rope_scaling": "llama3", "rope_scaling_factor": 8.0, "rope_original_max_position_embeddings": 64,
          "rope_low_freq_factor": 4.0, "rope_high_freq_factor": 4.0}, "must be below rope_high_freq_factor"),
        ({"rope_scaling": "yarn", "rope_scaling_factor": 8.0, "rope_original_max_position_embeddings": 64,
          "rope_yarn_beta_fast": 1.0}, "must be below rope_yarn_beta_fast"),
        ({"rope_scaling": "linear", "rope_scaling_factor": 2.0, "rope_attention_factor": 1.2}, "only used by"),
        ({"rope_original_max_position_embeddings": 0}, "positive integer or None"),
    ],
)
def test_config_rejects_bad_rope_scaling(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**fields)
