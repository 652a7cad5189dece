"""models/state.py: the streaming state's helpers (row reset, checkpoint round trip, logged scalars)."""

from __future__ import annotations

import torch

from models import ModelConfig, Transformer
from models.state import detach_state, flatten_state, reset_rows, state_metrics, unflatten_state


def tiny(attention: str = "infini") -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, segment_len=16,
                                   attention=attention))


def state_after(model: Transformer, batch: int = 3, length: int = 40):
    tokens = torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(1))
    return model(tokens).state


def test_reset_rows_empties_only_new_documents():
    state = state_after(tiny())
    reset = reset_rows(state, torch.tensor([False, True, False]))
    for before, after in zip(state, reset):
        assert torch.equal(after.memory.matrix[1], torch.zeros_like(after.memory.matrix[1]))
        assert torch.equal(after.memory.norm[1], torch.zeros_like(after.memory.norm[1]))
        assert torch.equal(after.memory.matrix[[0, 2]], before.memory.matrix[[0, 2]])
        assert torch.equal(after.memory.norm[[0, 2]], before.memory.norm[[0, 2]])
        # the key/value cache of the reset row is zeroed too (empty between training windows but for xl)
        for cached_before, cached_after in ((before.keys, after.keys), (before.values, after.values)):
            assert torch.equal(cached_after[1], torch.zeros_like(cached_after[1]))
            assert torch.equal(cached_after[[0, 2]], cached_before[[0, 2]])
    assert reset_rows(None, torch.tensor([True])) is None


def test_reset_rows_makes_xl_rows_start_a_fresh_stream():
    """xl carries the previous segment across training windows; a reset row then sees none: its next window's
    logits equal a fresh stream's, while the other rows keep attending to their previous segment."""
    model = tiny("xl").double()
    tokens = torch.randint(0, 64, (3, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        state = model(tokens[:, :32]).state  # two whole segments: the cache is the second one
        assert state[0].keys.shape[2] == 16
        reset = reset_rows(state, torch.tensor([False, True, False]))
        logits = model(tokens[:, 32:], reset).logits
        carried = model(tokens[:, 32:], state).logits
        fresh = model(tokens[1:2, 32:]).logits
    torch.testing.assert_close(logits[1], fresh[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits[[0, 2]], carried[[0, 2]], rtol=1e-12, atol=1e-14)
    assert (logits[1] - carried[1]).abs().max() > 1e-6


def test_flatten_and_unflatten_round_trip_exactly():
    for attention in ("infini", "local"):
        state = detach_state(state_after(tiny(attention)))
        tensors = flatten_state(state, "rank0/")
        expected = {"rank0/layer0/keys", "rank0/layer0/values", "rank0/layer1/keys", "rank0/layer1/values"}
        if attention == "infini":
            expected |= {"rank0/layer0/matrix", "rank0/layer0/norm", "rank0/layer1/matrix", "rank0/layer1/norm"}
        assert set(tensors) == expected
        back = unflatten_state(tensors, "rank0/", 2, torch.device("cpu"))
        for a, b in zip(state, back):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            assert (a.memory is None) == (b.memory is None)
            if a.memory is not None:
                assert torch.equal(a.memory.matrix, b.memory.matrix) and torch.equal(a.memory.norm, b.memory.norm)


def test_state_metrics_are_the_gates_and_memory_norms():
    model = tiny()
    with torch.no_grad():
        model.layers[1].attention.gate_logit[2] = 1.0
    state = detach_state(state_after(model))
    metrics = state_metrics(model, state)
    assert metrics["gate/layer0/head0"] == 0.5
    assert metrics["gate/layer1/head2"] == torch.sigmoid(torch.tensor(1.0)).item()
    for layer, s in enumerate(state):
        manual = torch.stack([torch.linalg.matrix_norm(m).mean() for m in s.memory.matrix]).mean()  # (B,) means
        assert abs(metrics[f"memory/M_norm/layer{layer}"] - float(manual)) < 1e-5
        assert metrics[f"memory/z_mean/layer{layer}"] == float(s.memory.norm.mean())
    assert len(metrics) == 2 * 4 + 2 * 2
    assert state_metrics(tiny("full"), None) == {}
