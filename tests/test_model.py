"""Transformer-level properties: chunking invariance, causality, batch independence, gate extremes, delta vs
linear, long streams, config validation."""

import random

import pytest
import torch

from models import ModelConfig, Transformer, detach_state, map_state

SEGMENT = 8


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, segment_len=SEGMENT,
                attention="infini", memory_update="linear", gate_init=0.0, attention_backend="sdpa")
    return ModelConfig(**{**base, **overrides})


def tiny_model(seed: int = 0, dtype=torch.float64, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**overrides)).to(dtype)
    with torch.no_grad():  # distinct gate per head and layer
        for layer in model.layers:
            if hasattr(layer.attention, "gate_logit"):
                layer.attention.gate_logit.uniform_(-2, 2)
    return model


def tokens(batch: int, length: int, seed: int = 0, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def chunkings(T: int, segment: int = SEGMENT, seed: int = 0) -> dict[str, list[int]]:
    """Ways to cut a stream of T tokens into calls (chunk sizes summing to T), for chunking-invariance tests."""
    rng = random.Random(seed)
    random_sizes = []
    while sum(random_sizes) < T:
        random_sizes.append(min(rng.randint(1, 2 * segment + 3), T - sum(random_sizes)))
    return {
        "per segment": [segment] * (T // segment) + [T % segment],
        "random": random_sizes,
        "token by token": [1] * T,
        "misaligned": [3, segment, 2 * segment + 1, T - 3 - segment - 2 * segment - 1],
    }


def stream(model, x, chunk_sizes):
    state, logits, start = None, [], 0
    for size in chunk_sizes:
        out = model(x[:, start : start + size], state)
        logits.append(out.logits)
        state, start = out.state, start + size
    assert start == x.shape[1]
    return torch.cat(logits, dim=1), state


ALL_KINDS = [("infini", "linear"), ("infini", "delta"), ("local", "linear"), ("full", "linear"), ("xl", "linear")]


@pytest.mark.parametrize("kind,update", ALL_KINDS)
def test_chunking_invariance(kind, update):
    model = tiny_model(attention=kind, memory_update=update)
    T = 43  # 5 full segments + 3 tokens
    x = tokens(2, T)
    whole, whole_state = stream(model, x, [T])
    for name, sizes in chunkings(T).items():
        logits, state = stream(model, x, sizes)
        torch.testing.assert_close(logits, whole, rtol=1e-10, atol=1e-10, msg=name)
        for layer_state, whole_layer_state in zip(state, whole_state):
            torch.testing.assert_close(layer_state.keys, whole_layer_state.keys, msg=name)
            if kind == "infini":
                torch.testing.assert_close(layer_state.memory.matrix, whole_layer_state.memory.matrix, msg=name)
                torch.testing.assert_close(layer_state.memory.norm, whole_layer_state.memory.norm, msg=name)


def embedding_jacobian_zeros(model, x):
    """For every output position t, which input positions s receive exactly zero gradient."""
    captured = {}

    def hook(module, inputs, output):
        captured["emb"] = output.detach().requires_grad_()
        return captured["emb"]

    handle = model.tok_embeddings.register_forward_hook(hook)
    try:
        logits = model(x).logits
    finally:
        handle.remove()
    T = x.shape[1]
    zero = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        (grad,) = torch.autograd.grad(logits[0, t].sum(), captured["emb"], retain_graph=True)
        zero[t] = (grad[0] == 0).all(dim=-1)
    return zero


@pytest.mark.parametrize("kind,update", ALL_KINDS)
def test_causality_across_segment_boundaries(kind, update):
    model = tiny_model(attention=kind, memory_update=update)
    T = 4 * SEGMENT + 3
    zero = embedding_jacobian_zeros(model, tokens(1, T))
    t_idx, s_idx = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    future = s_idx > t_idx
    assert zero[future].all(), "an output depends on a later input"
    same_segment = (s_idx // SEGMENT == t_idx // SEGMENT) & ~future
    assert not zero[same_segment].any()
    earlier_segments = s_idx // SEGMENT < t_idx // SEGMENT
    if kind in ("local", "xl"):  # no gradient path across segments (xl: stop-gradient at the previous segment)
        assert zero[earlier_segments].all()
    else:  # through the memory (infini) or the attention (full), and never detached
        assert not zero[earlier_segments].any()


def test_xl_receptive_field_grows_by_one_segment_per_layer():
    """Forward dependence of `xl` (its gradient is stopped, so the Jacobian test above cannot see it): with
    n_layers = 2, segment s depends on segments s - 2 .. s and not on s - 3; a token changes no earlier output."""
    model = tiny_model(attention="xl")
    T = 5 * SEGMENT
    x = tokens(1, T)
    with torch.no_grad():
        logits = model(x).logits
        for t in (3, SEGMENT + 2):
            changed = x.clone()
            changed[0, t] = (changed[0, t] + 1) % 64
            moved = (model(changed).logits - logits).abs().amax(-1)[0]  # (T,)
            reach = (t // SEGMENT + 3) * SEGMENT  # the end of the segment two after t's
            assert torch.equal(moved[:t], torch.zeros_like(moved[:t]))
            assert (moved[t:reach] > 0).all()
            assert torch.equal(moved[reach:], torch.zeros_like(moved[reach:]))


@pytest.mark.parametrize("kind,update", ALL_KINDS)
def test_batch_independence(kind, update):
    model = tiny_model(attention=kind, memory_update=update, dtype=torch.float32)
    x = tokens(3, 29)
    batched = model(x).logits
    for b in range(3):
        alone = model(x[b : b + 1]).logits
        torch.testing.assert_close(alone[0], batched[b], rtol=1e-5, atol=1e-6)


def copy_weights(source: Transformer, target: Transformer) -> None:
    target_state = target.state_dict()
    target.load_state_dict({k: v for k, v in source.state_dict().items() if k in target_state}, strict=False)
    assert set(target_state) <= set(source.state_dict())


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_gate_fully_local_equals_local_attention(update):
    infini = tiny_model(memory_update=update)
    with torch.no_grad():
        for layer in infini.layers:
            layer.attention.gate_logit.fill_(-1e4)  # sigmoid(-1e4) == 0 exactly
    local = tiny_model(attention="local")
    copy_weights(infini, local)
    x = tokens(2, 5 * SEGMENT + 1)
    torch.testing.assert_close(infini(x).logits, local(x).logits, rtol=0, atol=1e-13)


def test_single_segment_with_local_gate_equals_full_attention():
    infini = tiny_model(segment_len=64)
    with torch.no_grad():
        for layer in infini.layers:
            layer.attention.gate_logit.fill_(-1e4)
    full = tiny_model(attention="full")
    copy_weights(infini, full)
    x = tokens(2, 64)
    torch.testing.assert_close(infini(x).logits, full(x).logits, rtol=0, atol=1e-13)


def test_gate_fully_on_memory_differs_from_local():
    model = tiny_model()
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.gate_logit.fill_(1e4)
    local = tiny_model(attention="local")
    copy_weights(model, local)
    x = tokens(1, 3 * SEGMENT)
    difference = (model(x).logits - local(x).logits).abs().amax(dim=(0, 2))  # (T,)
    assert (difference > 1e-3).all()  # even segment 0: reading an empty memory gives 0, not A_dot


def test_delta_equals_linear_until_the_memory_holds_something():
    """Segment 0 reads the empty memory; the first write is identical ((5) reduces to (4) on an empty memory), so
    segment 1 reads the same M_1; from the second write on, the rules differ."""
    linear = tiny_model(memory_update="linear", n_layers=1)
    delta = tiny_model(memory_update="delta", n_layers=1)
    copy_weights(linear, delta)
    x = tokens(2, 3 * SEGMENT)
    out_linear, out_delta = linear(x), delta(x)
    torch.testing.assert_close(out_delta.logits[:, : 2 * SEGMENT], out_linear.logits[:, : 2 * SEGMENT],
                               rtol=1e-12, atol=1e-12)
    assert (out_delta.logits[:, 2 * SEGMENT :] - out_linear.logits[:, 2 * SEGMENT :]).abs().max() > 1e-4
    one = linear(x[:, :SEGMENT]).state[0].memory, delta(x[:, :SEGMENT]).state[0].memory
    torch.testing.assert_close(one[0].matrix, one[1].matrix, rtol=1e-12, atol=1e-12)
    assert (out_linear.state[0].memory.matrix - out_delta.state[0].memory.matrix).abs().max() > 1e-4


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_memory_stays_finite_and_constant_size_over_1e5_tokens(update):
    model = tiny_model(memory_update=update, dtype=torch.float32, n_layers=1, segment_len=256)
    x = torch.randint(0, 64, (1, 100_000), generator=torch.Generator().manual_seed(0))
    state, sizes = None, set()
    with torch.no_grad():
        for start in range(0, x.shape[1], 4093):  # chunks that straddle segment boundaries
            out = model(x[:, start : start + 4093], state)
            state = out.state
            assert torch.isfinite(out.logits).all()
            sizes.add(tuple(s.memory.matrix.shape for s in state))
            assert all(s.keys.shape[2] < 256 for s in state)
    assert len(sizes) == 1
    for s in state:
        assert torch.isfinite(s.memory.matrix).all() and torch.isfinite(s.memory.norm).all()
        assert s.memory.matrix.dtype == torch.float32
        # z grows linearly with the tokens written (sigma > 0): 1e5 tokens, not an overflow
        assert 1e3 < s.memory.norm.max() < 1e7


def test_memory_state_is_float32_under_bf16_autocast():
    model = tiny_model(dtype=torch.float32)
    x = tokens(1, 3 * SEGMENT + 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.logits.dtype == torch.bfloat16
    assert all(s.memory.matrix.dtype == torch.float32 and s.memory.norm.dtype == torch.float32 for s in out.state)
    reference = model(x).logits
    assert (out.logits.float() - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.parametrize("attention", ["infini", "local"])
def test_bf16_autocast_training_step_matches_float32(attention):
    """trainer.precision=bf16 on CPU: the loss and every parameter's gradient within bf16 rounding of the float32
    step (loss within 1%, each gradient at cosine similarity > 0.999 and norm within 3%), memory float32."""
    model = tiny_model(dtype=torch.float32, attention=attention)
    x = tokens(2, 4 * SEGMENT + 3, seed=3)
    results = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten())
        grads = torch.autograd.grad(loss, list(model.parameters()))
        assert all(g.dtype == torch.float32 for g in grads)
        if attention == "infini":
            assert all(s.memory.matrix.dtype == s.memory.norm.dtype == torch.float32 for s in out.state)
        results.append((loss.item(), grads))
    (loss32, grads32), (loss16, grads16) = results
    assert abs(loss16 - loss32) < 0.01 * loss32
    for (name, _), a, b in zip(model.named_parameters(), grads32, grads16):
        cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cosine > 0.999, (name, cosine)
        assert abs(b.norm() / a.norm() - 1) < 0.03, name


def test_state_lives_outside_the_module():
    model = tiny_model()
    names_before = {name for name, _ in model.named_buffers()}
    x = tokens(1, 2 * SEGMENT + 3)
    first = model(x).logits
    second = model(x).logits  # a second fresh stream is not affected by the first
    assert torch.equal(first, second)
    assert names_before == set() and {name for name, _ in model.named_buffers()} == set()


def test_state_helpers_detach_and_reorder():
    model = tiny_model()
    out = model(tokens(3, 2 * SEGMENT + 3))
    detached = detach_state(out.state)
    assert all(not s.memory.matrix.requires_grad and not s.keys.requires_grad for s in detached)
    order = torch.tensor([2, 0, 1])
    reordered = map_state(out.state, lambda t: t.index_select(0, order))
    torch.testing.assert_close(reordered[1].memory.matrix[0], out.state[1].memory.matrix[2])


def test_tied_embeddings_share_one_matrix():
    model = tiny_model(tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    n_params = sum(p.numel() for p in model.parameters())
    untied = sum(p.numel() for p in tiny_model(tie_embeddings=False).parameters())
    assert untied - n_params == 64 * 32


def test_gates_report_sigmoid_per_layer_and_head():
    model = tiny_model(gate_init=0.0)
    model.init_weights()
    torch.testing.assert_close(model.gates(), torch.full((2, 4), 0.5, dtype=torch.float64))
    assert tiny_model(attention="full").gates() is None


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("segment_len", 0, "ModelConfig.segment_len must be a positive integer"),
        ("segment_len", -4, "ModelConfig.segment_len must be a positive integer"),
        ("n_heads", 5, "ModelConfig.n_heads=5 must divide ModelConfig.dim=32"),
        ("n_kv_heads", 3, "ModelConfig.n_kv_heads=3 must divide ModelConfig.n_heads=4"),
        ("attention", "sparse", "ModelConfig.attention='sparse' is not one of"),
        ("memory_update", "hebbian", "ModelConfig.memory_update='hebbian' is not one of"),
        ("attention_backend", "triton", "ModelConfig.attention_backend='triton' is not one of"),
        ("dim", 2.5, "ModelConfig.dim must be a positive integer"),
        ("norm_eps", 0.0, "ModelConfig.norm_eps must be positive"),
    ],
)
def test_config_validation_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        tiny_config(**{field: value})


def test_model_rejects_bad_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match="tokens must be"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="state has 1 layers"):
        model(tokens(1, 4), state=model(tokens(1, 4)).state[:1])
