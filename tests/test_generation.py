"""Generation: streaming decoding equals full recomputation, beam search equals exhaustive search where it
must, decoding strategies agree where they should, seeds reproduce, batching never changes a result."""

from __future__ import annotations

import itertools

import pytest
import torch

from models.checkpoint import save_model
from models.config import ModelConfig
from models.generation import (
    GenerationConfig,
    _beam_search,
    _choose,
    generate,
    main,
    prefill,
    sampling_logits,
)
from models.transformer import Transformer

SEGMENT = 8



def tiny_model(attention="infini", memory_update="linear", vocab_size=48, seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, segment_len=SEGMENT,
                         attention=attention, memory_update=memory_update, init_std=0.2, **kw)
    model = Transformer(config).eval()
    with torch.no_grad():  # gates away from 0.5 and different per head, so the memory path matters
        for layer in model.layers:
            if hasattr(layer.attention, "gate_logit"):
                layer.attention.gate_logit.copy_(torch.linspace(-2, 2, 4))
    return model


def prompt(length, seed=0, vocab=48) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy_by_recomputation(model, tokens: list[int], steps: int, stop=()) -> list[int]:
    """Reference: the whole sequence recomputed from scratch for every new token, no state carried."""
    sequence, new = list(tokens), []
    for _ in range(steps):
        with torch.no_grad():
            token = int(model(torch.tensor([sequence])).logits[0, -1].argmax())
        if token in stop:
            break
        sequence.append(token)
        new.append(token)
    return new


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("chunk_size", [1, 3, SEGMENT, 100])
def test_prefill_equals_one_forward_pass(model, chunk_size):
    x = torch.tensor([prompt(37, 1), prompt(37, 2)])
    with torch.no_grad():
        full = model(x)
    logits, state = prefill(model, x, chunk_size=chunk_size)
    assert logits.dtype == torch.float32 and logits.shape == (2, 48)
    torch.testing.assert_close(logits, full.logits[:, -1], rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(state, full.state):
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=1e-5, atol=1e-5)  # 37 % 8 = 5 cached tokens
        torch.testing.assert_close(ours.memory.matrix, theirs.memory.matrix, rtol=1e-5, atol=1e-5)
    # continuing from a state: prefill(b, prefill(a)) == forward(a + b)
    head, state = prefill(model, x[:, :20], chunk_size=chunk_size)
    logits2, _ = prefill(model, x[:, 20:], state, chunk_size=chunk_size)
    torch.testing.assert_close(logits2, full.logits[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention,memory_update", [("infini", "linear"), ("infini", "delta"), ("local", "linear"),
                                                     ("full", "linear"), ("xl", "linear")])
def test_streaming_greedy_equals_full_recomputation(attention, memory_update):
    model = tiny_model(attention, memory_update)
    tokens = prompt(21, 3)  # decoding starts mid-segment and crosses three segment boundaries
    expected = greedy_by_recomputation(model, tokens, 24)
    assert len(set(expected)) > 4  # a non-degenerate continuation
    for chunk_size in (4, 4096):
        config = GenerationConfig(max_new_tokens=24, chunk_size=chunk_size)
        assert generate(model, [tokens], config) == [expected]


def test_decoding_feeds_one_token_per_step(model):
    seen = []
    handle = model.tok_embeddings.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape))
    try:
        generate(model, [prompt(30), prompt(30, 1)], GenerationConfig(max_new_tokens=10, chunk_size=16))
        generate(model, [prompt(30)], GenerationConfig(max_new_tokens=6, num_beams=3, chunk_size=64))
    finally:
        handle.remove()
    # greedy: prompt in chunks of 16, then 9 single-token steps (the 10th token needs no forward pass);
    # beams: the prompt once (one row), then 5 steps of one token for each of the 3 beams
    assert seen == [(2, 16), (2, 14)] + [(2, 1)] * 9 + [(1, 30)] + [(3, 1)] * 5


def test_stop_tokens_and_max_new_tokens(model):
    tokens = prompt(12, 4)
    free = generate(model, [tokens], GenerationConfig(max_new_tokens=15))[0]
    assert len(free) == 15 and free == greedy_by_recomputation(model, tokens, 15)
    stop = next(t for i, t in enumerate(free) if i >= 3 and t not in free[:i])
    cut = free.index(stop)
    assert generate(model, [tokens], GenerationConfig(max_new_tokens=15, stop_tokens=(stop, 47)))[0] == free[:cut]
    assert generate(model, [tokens, tokens[:5]], GenerationConfig(max_new_tokens=0)) == [[], []]


def test_beam_search_with_one_beam_equals_greedy(model):
    """generate() routes num_beams=1 to greedy decoding; the beam-search code itself with one beam must agree,
    with and without a stop token being hit."""
    prompts = [prompt(12, 4), prompt(12, 6)]
    config = GenerationConfig(max_new_tokens=15, length_penalty=2.0)
    greedy = generate(model, prompts, config)
    assert _beam_search(model, torch.tensor(prompts), config) == greedy
    stop = greedy[1][6]
    config = GenerationConfig(max_new_tokens=15, stop_tokens=(stop,), length_penalty=2.0)
    greedy = generate(model, prompts, config)
    assert len(greedy[1]) < 15  # the stop token was really hit
    assert _beam_search(model, torch.tensor(prompts), config) == greedy


def test_beam_search_is_exhaustive_when_beams_cover_every_prefix():
    """With K >= V^(n-1) beams and no length penalty, beam search must return the most likely n-token
    continuation, found here by scoring all V^n of them with full recomputation."""
    V, n = 5, 3
    model = tiny_model(vocab_size=V, seed=1)
    tokens = prompt(11, 0, vocab=V)
    best, best_score = None, float("-inf")
    with torch.no_grad():
        for continuation in itertools.product(range(V), repeat=n):
            sequence = torch.tensor([tokens + list(continuation)])
            log_probs = model(sequence).logits[0].double().log_softmax(-1)
            score = sum(float(log_probs[len(tokens) - 1 + i, t]) for i, t in enumerate(continuation))
            if score > best_score:
                best, best_score = list(continuation), score
    greedy = generate(model, [tokens], GenerationConfig(max_new_tokens=n))[0]
    beam = generate(model, [tokens], GenerationConfig(max_new_tokens=n, num_beams=V ** (n - 1), length_penalty=0.0))
    assert beam[0] == best
    assert greedy != best  # the search found something greedy misses (so this test can tell them apart)


def test_beam_search_ranks_finished_hypotheses_with_length_penalty():
    """V=4 with stop token 0, 3 new tokens at most, 16 beams: no hypothesis that could win is ever pruned, so
    beam search must return the best of all 40 hypotheses (stop after 0, 1 or 2 tokens, or 3 tokens without
    stop) under sum(log p) / length ** length_penalty, the length counting the stop token."""
    V, n, stop = 4, 3, 0
    model = tiny_model(vocab_size=V, seed=2)
    tokens = prompt(9, 1, vocab=V)
    hypotheses = [list(c) + [stop] for k in range(n) for c in itertools.product(range(1, V), repeat=k)]
    hypotheses += [list(c) for c in itertools.product(range(1, V), repeat=n)]
    log_p = {}
    with torch.no_grad():
        for h in hypotheses:
            log_probs = model(torch.tensor([tokens + h])).logits[0].double().log_softmax(-1)
            log_p[tuple(h)] = sum(float(log_probs[len(tokens) - 1 + i, t]) for i, t in enumerate(h))
    chosen = {}
    for lp in (0.0, 1.0, 4.0):
        best = max(hypotheses, key=lambda h: log_p[tuple(h)] / len(h) ** lp)
        config = GenerationConfig(max_new_tokens=n, num_beams=16, stop_tokens=(stop,), length_penalty=lp)
        chosen[lp] = generate(model, [tokens], config)[0]
        assert chosen[lp] == [t for t in best if t != stop]
    assert chosen == {0.0: [], 1.0: [1], 4.0: [1, 3]}  # the length penalty changes the answer


def test_top_k_one_equals_greedy(model):
    prompts = [prompt(10, 1), prompt(26, 2)]
    greedy = generate(model, prompts, GenerationConfig(max_new_tokens=20))
    sampled = generate(model, prompts, GenerationConfig(max_new_tokens=20, do_sample=True, top_k=1, temperature=0.7,
                                                        seed=0))
    assert sampled == greedy


def test_fixed_seed_reproduces_samples_independently_of_batching(model):
    prompts = [prompt(10, 1), prompt(26, 2), prompt(10, 3)]
    config = GenerationConfig(max_new_tokens=20, do_sample=True, temperature=1.3, top_p=0.9, seed=11)
    first = generate(model, prompts, config)
    assert generate(model, prompts, config) == first
    other = generate(model, prompts, GenerationConfig(max_new_tokens=20, do_sample=True, temperature=1.3, top_p=0.9,
                                                      seed=12))
    assert other != first
    # prompt i draws from its own generator seeded with seed + i, however prompts are grouped
    for i, p in enumerate(prompts):
        alone = GenerationConfig(max_new_tokens=20, do_sample=True, temperature=1.3, top_p=0.9, seed=11 + i)
        assert generate(model, [p], alone) == [first[i]]


def test_batched_prompts_of_different_lengths_equal_generating_alone(model):
    prompts = [prompt(5, 1), prompt(13, 2), prompt(5, 3), prompt(20, 4), prompt(1, 5)]
    for config in (GenerationConfig(max_new_tokens=12, chunk_size=6),
                   GenerationConfig(max_new_tokens=8, num_beams=3, chunk_size=6)):
        batched = generate(model, prompts, config)
        assert batched == [generate(model, [p], config)[0] for p in prompts]
    assert batched[0] != batched[2]  # same length, different prompts: rows were not mixed up


def test_sampling_logits_top_k_top_p_temperature():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda out: torch.isfinite(out[0]).nonzero().flatten().tolist()
    assert kept(sampling_logits(logits, top_p=0.8)) == [0, 1]  # 0.5 + 0.3 reaches 0.8
    assert kept(sampling_logits(logits, top_p=0.81)) == [0, 1, 2]
    assert kept(sampling_logits(logits, top_p=0.2)) == [0]  # the most likely token is always kept
    assert kept(sampling_logits(logits, top_k=3)) == [0, 1, 2]
    assert kept(sampling_logits(logits, top_k=2, top_p=0.99)) == [0, 1]
    shuffled = logits[:, [2, 0, 3, 1]]
    assert kept(sampling_logits(shuffled, top_p=0.8)) == [1, 3]  # works on unsorted logits
    torch.testing.assert_close(sampling_logits(logits, temperature=0.5), logits / 0.5)


def test_samples_follow_the_tempered_truncated_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]).repeat(4000, 1)
    config = GenerationConfig(do_sample=True, temperature=2.0, top_k=4, seed=0)
    generators = [torch.Generator().manual_seed(0)] * 4000  # one generator shared: independent draws
    counts = torch.bincount(_choose(logits, config, generators), minlength=5).double() / 4000
    expected = torch.cat([torch.softmax(logits[0, :4] / 2.0, -1), torch.zeros(1)]).double()
    torch.testing.assert_close(counts, expected, rtol=0, atol=0.03)
    assert counts[4] == 0


def test_invalid_requests_are_refused(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], GenerationConfig())
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside \[0, 48\)"):
        generate(model, [[1, 48]], GenerationConfig())
    with pytest.raises(ValueError, match="sampling with num_beams > 1"):
        GenerationConfig(do_sample=True, num_beams=2)
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(ValueError, match=r"time >= 1"):
        prefill(model, torch.zeros(1, 0, dtype=torch.long))


def test_cli_generates_from_a_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    model = tiny_model(vocab_size=256)
    save_model(tmp_path, model, tokenizer="byte")
    main([str(tmp_path), "--prompt", "Once upon a time", "--max-new-tokens", "12", "--chunk-size", "5"])
    printed = capsys.readouterr().out
    expected = generate(model, [list(b"Once upon a time")], GenerationConfig(max_new_tokens=12))[0]
    assert printed == bytes(expected).decode("utf-8", errors="replace") + "\n"


@pytest.mark.slow
def test_million_token_prompt_streams_in_bounded_memory():
    model = tiny_model(vocab_size=256)
    tokens = torch.randint(0, 256, (1, 1_000_003), generator=torch.Generator().manual_seed(0))
    logits, state = prefill(model, tokens, chunk_size=4096)
    assert torch.isfinite(logits).all()
    assert all(s.keys.shape[2] == 1_000_003 % SEGMENT for s in state)
    assert all(torch.isfinite(s.memory.matrix).all() and s.memory.norm.min() > 0 for s in state)
    out = generate(model, [tokens[0, :100_000].tolist()], GenerationConfig(max_new_tokens=4))
    assert len(out[0]) == 4
