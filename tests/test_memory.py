"""Compressive memory math: eqs. (3)-(5), the parallel/scan forms, float64 gradcheck."""

import pytest
import torch

from attention.memory import Memory, segment_memories
from attention.reference import delta_update, feature_map, linear_update, retrieve


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def random_memory(B=2, H=3, D=4, Dv=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    sigma_k = feature_map(torch.randn(B, H, 7, D, generator=g))
    values = torch.randn(B, H, 7, Dv, generator=g)
    return Memory(sigma_k.transpose(-1, -2) @ values, sigma_k.sum(-2))


def test_feature_map_is_elu_plus_one_and_positive():
    x = torch.tensor([-30.0, -1.0, 0.0, 0.5, 3.0])
    expected = torch.tensor([torch.exp(torch.tensor(-30.0)), torch.exp(torch.tensor(-1.0)), 1.0, 1.5, 4.0])
    torch.testing.assert_close(feature_map(x), expected, rtol=0, atol=1e-15)
    # positive wherever exp(x) - 1 + 1 does not round to 0 (x > -36 in float64, > -16 in float32), never negative
    x = torch.linspace(-30.0, 30.0, 1001)
    assert (feature_map(x) > 0).all()
    assert (feature_map(torch.linspace(-1000.0, 1000.0, 1001)) >= 0).all()


def test_retrieval_matches_equation_3_elementwise():
    memory = random_memory()
    sigma_q = feature_map(torch.randn(2, 3, 6, 4))
    out = retrieve(sigma_q, *memory)
    for b in range(2):
        for h in range(3):
            for t in range(6):
                expected = sigma_q[b, h, t] @ memory.matrix[b, h] / (sigma_q[b, h, t] @ memory.norm[b, h])
                torch.testing.assert_close(out[b, h, t], expected, rtol=1e-12, atol=0)


def test_empty_memory_retrieves_exactly_zero_with_finite_gradient():
    memory = Memory.empty(2, 3, 4, 5)
    assert memory.matrix.dtype == torch.float32  # the state is at least float32
    q = torch.randn(2, 3, 6, 4, dtype=torch.float32, requires_grad=True)
    out = retrieve(feature_map(q), *memory)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))  # nothing stored: no signal, and no NaN


def test_linear_and_delta_updates_match_equations_4_and_5():
    memory = random_memory()
    sigma_k = feature_map(torch.randn(2, 3, 6, 4))
    values = torch.randn(2, 3, 6, 5)
    M, z = linear_update(*memory, sigma_k, values)
    expected_M = memory.matrix + torch.einsum("bhnd,bhne->bhde", sigma_k, values)
    torch.testing.assert_close(M, expected_M)
    torch.testing.assert_close(z, memory.norm + sigma_k.sum(2))
    M_delta, z_delta = delta_update(*memory, sigma_k, values)
    stored = (sigma_k @ memory.matrix) / (sigma_k @ memory.norm.unsqueeze(-1))
    torch.testing.assert_close(M_delta, memory.matrix + torch.einsum("bhnd,bhne->bhde", sigma_k, values - stored))
    torch.testing.assert_close(z_delta, z)  # z is updated as in (4)


def test_delta_update_on_empty_memory_equals_linear_update():
    memory = Memory.empty(2, 3, 4, 5, dtype=torch.float64)
    sigma_k = feature_map(torch.randn(2, 3, 6, 4))
    values = torch.randn(2, 3, 6, 5)
    for a, b in zip(linear_update(*memory, sigma_k, values), delta_update(*memory, sigma_k, values)):
        assert torch.equal(a, b)


def test_delta_update_does_not_rewrite_a_stored_association():
    """Writing a key-value pair the memory already retrieves exactly leaves M unchanged (the point of (5))."""
    sigma_k = feature_map(torch.randn(1, 1, 1, 4))
    values = torch.randn(1, 1, 1, 5)
    M, z = linear_update(*Memory.empty(1, 1, 4, 5, dtype=torch.float64), sigma_k, values)
    M2, _ = delta_update(M, z, sigma_k, values)
    torch.testing.assert_close(M2, M, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("update", ["linear", "delta"])
@pytest.mark.parametrize("n_complete_offset", [0, 1])
def test_segment_memories_match_sequential_updates(update, n_complete_offset):
    S, N = 5, 3
    memory = random_memory(H=2, D=4, Dv=4)
    sigma_k = feature_map(torch.randn(2, 2, S, N, 4))
    values = torch.randn(2, 2, S, N, 4)
    n_complete = S - n_complete_offset
    matrix_prev, norm_prev, final = segment_memories(memory, sigma_k, values, n_complete, update)
    write = linear_update if update == "linear" else delta_update
    M, z = memory
    for s in range(S):
        torch.testing.assert_close(matrix_prev[:, :, s], M, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(norm_prev[:, :, s], z, rtol=1e-12, atol=1e-12)
        if s < n_complete:
            M, z = write(M, z, sigma_k[:, :, s], values[:, :, s])
    torch.testing.assert_close(final.matrix, M, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final.norm, z, rtol=1e-12, atol=1e-12)


def test_segment_memories_rejects_bad_arguments():
    memory = random_memory(H=2, D=4, Dv=4)
    sigma_k, values = torch.ones(2, 2, 3, 2, 4), torch.ones(2, 2, 3, 2, 4)
    with pytest.raises(ValueError, match="n_complete"):
        segment_memories(memory, sigma_k, values, 1, "linear")
    with pytest.raises(ValueError, match="unknown memory update 'hebbian'"):
        segment_memories(memory, sigma_k, values, 3, "hebbian")


def flat(outputs):
    matrix_prev, norm_prev, final = outputs
    return matrix_prev, norm_prev, final.matrix, final.norm


def test_gradcheck_memory_functions():
    g = torch.Generator().manual_seed(0)

    def rand(*shape, positive=False):
        x = torch.randn(*shape, generator=g)
        return (x.abs() + 0.1 if positive else x).requires_grad_()

    q, k, v = rand(1, 2, 3, 4), rand(1, 2, 3, 4), rand(1, 2, 3, 3)
    M, z = rand(1, 2, 4, 3), rand(1, 2, 4, positive=True)
    assert torch.autograd.gradcheck(lambda q, M, z: retrieve(feature_map(q), M, z), (q, M, z))
    assert torch.autograd.gradcheck(lambda k, v, M, z: linear_update(M, z, feature_map(k), v), (k, v, M, z))
    assert torch.autograd.gradcheck(lambda k, v, M, z: delta_update(M, z, feature_map(k), v), (k, v, M, z))
    ks, vs = rand(1, 2, 3, 2, 4), rand(1, 2, 3, 2, 3)
    for update in ("linear", "delta"):
        assert torch.autograd.gradcheck(
            lambda k, v, M, z, update=update: flat(segment_memories(Memory(M, z), feature_map(k), v, 2, update)),
            (ks, vs, M, z),
        )
