"""Memory rules and their research variants (attention/rules/, attention/feature_maps.py): each against the naive
reference (outputs, M, z, gradients), chunking invariance, causality, gradcheck, and the property that makes it
a variant; the registry that makes a new rule one file."""

import random

import pytest
import torch

from attention.feature_maps import DPFP, EluPlusOne, build_feature_map
from attention.infini import InfiniAttention
from attention.memory import Memory, augment, with_ones
from attention.reference import reference_layer
from attention.rules import RULES, MemoryRule, build_rule, register_rule, rule_names
from attention.rules.linear import Linear
from models import ModelConfig, Transformer
from models.rope import RotaryEmbedding

DIM, HEADS, KV_HEADS, SEGMENT = 32, 4, 2, 16
HEAD_DIM = DIM // HEADS

# (memory_update, memory_feature_map, memory_write_gate): the paper's two rules are in tests/test_attention.py
VARIANTS = [
    ("delta_corrected", "elu", False),
    ("linear", "elu", True),
    ("delta", "elu", True),
    ("delta_corrected", "elu", True),
    ("linear", "dpfp", False),
    ("delta_corrected", "dpfp", True),
]
IDS = [f"{u}-{f}{'-gate' if g else ''}" for u, f, g in VARIANTS]


def randomise_write_gate(module: torch.nn.Module, seed: int = 0) -> None:
    """Write gates start at w = 0 (every token alike); give them per-token variation a test can see."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, MemoryRule) and m.write_gate is not None:
                m.write_gate.weight.copy_(torch.randn(m.write_gate.weight.shape, generator=g))
                m.write_gate.bias.copy_(torch.randn(m.write_gate.bias.shape, generator=g))


def make_layer(update: str, feature_map: str, write_gate: bool, seed: int = 0) -> InfiniAttention:
    torch.manual_seed(seed)
    layer = InfiniAttention(DIM, HEADS, KV_HEADS, SEGMENT, RotaryEmbedding(HEAD_DIM), update, backend="sdpa",
                            feature_map=feature_map, write_gate=write_gate)
    with torch.no_grad():
        layer.gate_logit.copy_(torch.tensor([-2.0, -0.3, 0.4, 2.5]))
    randomise_write_gate(layer, seed)
    return layer.double()


@pytest.mark.parametrize("length", [63, 64])
@pytest.mark.parametrize("update,feature_map,write_gate", VARIANTS, ids=IDS)
def test_variant_layer_matches_reference_outputs_memory_and_gradients(update, feature_map, write_gate, length):
    layer = make_layer(update, feature_map, write_gate)
    x = torch.randn(2, length, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1),
                    requires_grad=True)
    y, state = layer(x)
    y_ref, memories = reference_layer(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    M_ref, z_ref = memories[length // SEGMENT - 1]
    assert state.memory.matrix.shape == (2, KV_HEADS, layer.rule.key_dim, HEAD_DIM)
    torch.testing.assert_close(state.memory.matrix, M_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state.memory.norm, z_ref, rtol=1e-10, atol=1e-12)

    weights = torch.randn_like(y)
    named = {"x": x, "gate": layer.gate_logit, "wq": layer.wq.weight, "wk": layer.wk.weight, "wv": layer.wv.weight,
             "wo": layer.wo.weight, **{f"rule.{n}": p for n, p in layer.rule.named_parameters()}}
    grads = torch.autograd.grad((y * weights).sum(), list(named.values()))
    grads_ref = torch.autograd.grad((y_ref * weights).sum(), list(named.values()))
    for name, g, g_ref in zip(named, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11, msg=f"gradient of {name}")
        assert g.abs().sum() > 0, name
    assert ("rule.write_gate.weight" in named) == write_gate


@pytest.mark.parametrize("update,feature_map,write_gate", VARIANTS[:2] + VARIANTS[-1:], ids=IDS[:2] + IDS[-1:])
def test_write_scale_matches_reference_and_zero_removes_the_tokens(update, feature_map, write_gate):
    """write_scale (knock-outs at 0, augmentation above 1) equals the reference with the same multipliers, and
    knocking out every write leaves the memory empty."""
    layer = make_layer(update, feature_map, write_gate)
    x = torch.randn(2, 50, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    scale = (torch.rand(2, 50, generator=g) > 0.4).double() * torch.rand(2, 50, generator=g, dtype=torch.float64) * 8
    y, state = layer(x, None, scale)
    y_ref, memories = reference_layer(layer, x, scale)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state.memory.matrix, memories[2][0], rtol=1e-10, atol=1e-12)
    _, state = layer(x, None, torch.zeros(2, 50, dtype=torch.float64))
    assert torch.equal(state.memory.matrix, torch.zeros_like(state.memory.matrix))
    assert torch.equal(state.memory.norm, torch.zeros_like(state.memory.norm))
    with pytest.raises(ValueError, match="write_scale"):
        layer(x, None, torch.ones(2, 49, dtype=torch.float64))
    _, half = layer(x[:, :20])
    with pytest.raises(ValueError, match="starts on a segment boundary"):  # 4 cached tokens of segment 1
        layer(x[:, 20:], half, torch.ones(2, 30, dtype=torch.float64))


def test_linear_write_scale_c_equals_c_copies_of_the_token():
    """Under (4) a token written with weight c adds exactly what c copies add: the augmentation's premise."""
    rule = build_rule("linear", 1, 4).double()
    g = torch.Generator().manual_seed(0)
    sigma_k = rule.features(torch.randn(1, 1, 1, 3, 4, generator=g, dtype=torch.float64))
    values = with_ones(torch.randn(1, 1, 1, 3, 4, generator=g, dtype=torch.float64))
    empty = augment(rule.empty(1, dtype=torch.float64))
    _, scaled = rule.prefix(empty, sigma_k, values, torch.tensor([[[[1.0, 3.0, 1.0]]]], dtype=torch.float64))
    index = torch.tensor([0, 1, 1, 1, 2])  # token 1 three times
    copies, copied_values = sigma_k[:, :, :, index], values[:, :, :, index]
    _, copied = rule.prefix(empty, copies, copied_values, None)
    torch.testing.assert_close(scaled, copied, rtol=1e-12, atol=1e-12)


def test_write_scale_through_the_model_per_layer_and_refused_without_memory():
    model = tiny_model("linear", "elu", False)
    x = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    ones = model(x, None, torch.ones(2, 24, dtype=torch.float64))
    torch.testing.assert_close(ones.logits, model(x).logits, rtol=0, atol=0)
    per_layer = torch.ones(2, 2, 24, dtype=torch.float64)
    per_layer[1] = 0.0  # layer 1 writes nothing, layer 0 everything
    out = model(x, None, per_layer)
    assert torch.equal(out.state[1].memory.norm, torch.zeros_like(out.state[1].memory.norm))
    torch.testing.assert_close(out.state[0].memory.norm, ones.state[0].memory.norm)
    with pytest.raises(ValueError, match="write_scale must be"):
        model(x, None, torch.ones(3, 2, 24, dtype=torch.float64))
    local = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, segment_len=8, attention="local"))
    with pytest.raises(ValueError, match="keeps no memory"):
        local(x, None, torch.ones(2, 24))


def tiny_model(update: str, feature_map: str, write_gate: bool, segment_len: int = 8, **overrides) -> Transformer:
    torch.manual_seed(0)
    fields = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, segment_len=segment_len,
                  attention="infini", memory_update=update, memory_feature_map=feature_map,
                  memory_write_gate=write_gate, attention_backend="sdpa")
    config = ModelConfig(**{**fields, **overrides})
    model = Transformer(config).double()
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.gate_logit.uniform_(-2, 2)
    randomise_write_gate(model)
    return model


@pytest.mark.parametrize("update,feature_map,write_gate", VARIANTS, ids=IDS)
def test_variant_chunking_invariance(update, feature_map, write_gate):
    model = tiny_model(update, feature_map, write_gate)
    T, N = 43, 8
    x = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(0))
    whole = model(x)
    rng = random.Random(0)
    sizes = []
    while sum(sizes) < T:
        sizes.append(min(rng.randint(1, 2 * N + 3), T - sum(sizes)))
    for name, chunks in {"random": sizes, "token by token": [1] * T, "misaligned": [3, N, 2 * N + 1, T - 3 - 3 * N - 1]
                         }.items():
        state, logits, start = None, [], 0
        for size in chunks:
            out = model(x[:, start : start + size], state)
            logits.append(out.logits)
            state, start = out.state, start + size
        torch.testing.assert_close(torch.cat(logits, 1), whole.logits, rtol=1e-10, atol=1e-10, msg=name)
        for s, w in zip(state, whole.state):
            torch.testing.assert_close(s.memory.matrix, w.memory.matrix, msg=name)
            torch.testing.assert_close(s.memory.norm, w.memory.norm, msg=name)


@pytest.mark.parametrize("update,feature_map,write_gate", VARIANTS, ids=IDS)
def test_variant_causality(update, feature_map, write_gate):
    """Gradient of output t w.r.t. input s: exactly 0 for s > t; non-zero within a segment and across segments
    (through the memory, never detached)."""
    model = tiny_model(update, feature_map, write_gate)
    T = 4 * 8 + 3
    x = torch.randint(0, 64, (1, T), generator=torch.Generator().manual_seed(1))
    captured = {}

    def hook(module, inputs, output):
        captured["emb"] = output.detach().requires_grad_()
        return captured["emb"]

    handle = model.tok_embeddings.register_forward_hook(hook)
    logits = model(x).logits
    handle.remove()
    zero = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        (grad,) = torch.autograd.grad(logits[0, t].sum(), captured["emb"], retain_graph=True)
        zero[t] = (grad[0] == 0).all(dim=-1)
    t_idx, s_idx = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    assert zero[s_idx > t_idx].all(), "an output depends on a later input"
    assert not zero[(s_idx <= t_idx)].any()


@pytest.mark.parametrize("update", ["linear", "delta", "delta_corrected"])
@pytest.mark.parametrize("feature_map", ["elu", "dpfp"])
def test_gradcheck_rule_prefix_with_write_strength(update, feature_map):
    torch.manual_seed(0)
    rule = build_rule(update, 1, 3, feature_map).double()
    Dk = rule.key_dim
    k = torch.randn(1, 1, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    beta = torch.rand(1, 1, 3, 2, dtype=torch.float64).add(0.1).requires_grad_()
    M = torch.randn(1, 1, Dk, 3, dtype=torch.float64, requires_grad=True)
    z = torch.rand(1, 1, Dk, dtype=torch.float64).add(0.5).requires_grad_()

    def run(k, v, beta, M, z):
        prev, final = rule.prefix(augment(Memory(M, z)), rule.features(k), with_ones(v), beta)
        return prev, final

    assert torch.autograd.gradcheck(run, (k, v, beta, M, z))


def test_linear_write_gate_at_init_equals_the_paper_layer():
    """At init the gate writes every token with the same beta = sigmoid(4); (3) divides it out, so the layer equals
    the paper's linear layer (up to rounding) until training makes beta differ between tokens."""
    torch.manual_seed(0)
    paper = InfiniAttention(DIM, HEADS, KV_HEADS, SEGMENT, RotaryEmbedding(HEAD_DIM), "linear", backend="sdpa").double()
    torch.manual_seed(0)
    gated = InfiniAttention(DIM, HEADS, KV_HEADS, SEGMENT, RotaryEmbedding(HEAD_DIM), "linear", backend="sdpa",
                            write_gate=True).double()
    x = torch.randn(2, 70, DIM, dtype=torch.float64)
    (y_paper, s_paper), (y_gated, s_gated) = paper(x), gated(x)
    torch.testing.assert_close(y_gated, y_paper, rtol=1e-12, atol=1e-13)
    beta = torch.sigmoid(torch.tensor(4.0, dtype=torch.float64))
    torch.testing.assert_close(s_gated.memory.norm, beta * s_paper.memory.norm, rtol=1e-12, atol=0)


def test_delta_corrected_stops_z_growing_for_stored_content_and_keeps_it_in_range():
    """Writing the same segment again adds nothing to z (every gamma is 0) or to M (the delta rule); with fresh
    keys gamma lies in [0, 1]."""
    rule = build_rule("delta_corrected", 2, 4).double()
    g = torch.Generator().manual_seed(0)
    sigma_k = rule.features(torch.randn(1, 2, 1, 6, 4, generator=g, dtype=torch.float64))
    values = with_ones(torch.randn(1, 2, 1, 6, 4, generator=g, dtype=torch.float64))
    empty = augment(rule.empty(1, dtype=torch.float64))
    _, once = rule.prefix(empty, sigma_k, values, None)
    _, twice = rule.prefix(once, sigma_k, values, None)
    torch.testing.assert_close(twice[..., -1], once[..., -1], rtol=0, atol=1e-12)  # z unchanged
    delta = build_rule("delta", 2, 4).double()
    _, twice_paper = delta.prefix(once, sigma_k, values, None)
    assert (twice_paper[..., -1] - once[..., -1]).abs().min() > 1e-3  # the paper's (5) keeps adding to z
    gamma = rule.norm_increment(sigma_k[:, :, 0], sigma_k[:, :, 0] @ once[..., -1].unsqueeze(-1) * 0.3)
    assert ((gamma >= 0) & (gamma <= 1)).all() and (gamma > 0).any()


@pytest.mark.parametrize("update,feature_map,write_gate", VARIANTS, ids=IDS)
def test_variants_stay_finite_over_long_streams(update, feature_map, write_gate):
    model = tiny_model(update, feature_map, write_gate, segment_len=64, n_layers=1).float()
    x = torch.randint(0, 64, (1, 20_000), generator=torch.Generator().manual_seed(0))
    state = None
    with torch.no_grad():
        for start in range(0, x.shape[1], 4093):
            out = model(x[:, start : start + 4093], state)
            state = out.state
            assert torch.isfinite(out.logits).all()
    assert torch.isfinite(state[0].memory.matrix).all() and torch.isfinite(state[0].memory.norm).all()


def test_dpfp_fast_path_matches_its_formula_values_and_gradients():
    dpfp = build_feature_map("dpfp", 4)
    assert isinstance(dpfp, DPFP) and dpfp.out_dim == 24
    x = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    fast, slow = dpfp(x), dpfp.reference(x)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-14)
    assert (fast >= 0).all()
    torch.testing.assert_close(fast.norm(dim=-1), torch.ones(3, 5, dtype=torch.float64))
    grad = torch.randn_like(fast)
    torch.testing.assert_close(torch.autograd.grad(fast, x, grad)[0], torch.autograd.grad(slow, x, grad)[0])
    # one entry by hand: r = [relu(x), relu(-x)], phi_(j=1, i=0) = r_0 * r_7 for 2D = 8
    x0 = torch.tensor([1.0, -2.0, 3.0, -0.5], dtype=torch.float64)
    r = torch.tensor([1.0, 0.0, 3.0, 0.0, 0.0, 2.0, 0.0, 0.5], dtype=torch.float64)
    phi = torch.stack([r[i] * r[(i - j) % 8] for j in (1, 2, 3) for i in range(8)])
    torch.testing.assert_close(dpfp(x0), phi / phi.norm())
    assert torch.equal(dpfp(torch.zeros(4)), torch.zeros(24))  # no NaN for an all-zero input
    elu = EluPlusOne(4)
    torch.testing.assert_close(elu(x), elu.reference(x), rtol=0, atol=1e-15)


def test_registry_names_every_rule_and_a_new_rule_is_one_class():
    assert {"linear", "delta", "delta_corrected"} <= set(rule_names())
    with pytest.raises(ValueError, match="unknown memory_update 'hebbian'"):
        build_rule("hebbian", 2, 8)
    with pytest.raises(ValueError, match="ModelConfig.memory_update='hebbian' is not one of"):
        ModelConfig(memory_update="hebbian")
    with pytest.raises(ValueError, match="ModelConfig.memory_feature_map='relu' is not one of"):
        ModelConfig(memory_feature_map="relu")

    @register_rule
    class HalfLinear(Linear):
        """A toy rule: (4) with every write halved (reads are unchanged, (3) divides it out)."""

        name = "half_linear_test"

        def prefix(self, state, sigma_k, values_aug, strength):
            return super().prefix(state, sigma_k * 0.5, values_aug, strength)

        def reference_write(self, M, z, M_prev, z_prev, sigma_k, value, strength):
            return super().reference_write(M, z, M_prev, z_prev, sigma_k * 0.5, value, strength)

    try:
        model = tiny_model("half_linear_test", "elu", False)
        paper = tiny_model("linear", "elu", False)
        x = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(0))
        out, out_paper = model(x), paper(x)
        torch.testing.assert_close(out.logits, out_paper.logits, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.state[0].memory.norm, 0.5 * out_paper.state[0].memory.norm)
        y_ref, _ = reference_layer(model.layers[0].attention, torch.randn(1, 20, 32, dtype=torch.float64))
        assert torch.isfinite(y_ref).all()
    finally:
        del RULES["half_linear_test"]
