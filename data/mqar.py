"""Multi-query associative recall (MQAR, Zoology: Arora et al. 2023): how many key-value pairs a model can store
and retrieve, the capacity test of a memory.

A sequence of exactly seq_len token ids (no tokenizer: MQAR lives in id space, any model vocabulary):

    k1 v1 k2 v2 ... kD vD | 0 0 kq vq 0 0 0 kq' vq' 0 ...
    ----- D pairs -------   ---- query region: filler id 0, Q queries ----

Keys are drawn without replacement from the ids [1, 1 + K) and values without replacement from [1 + K, V), with
K = (V - 1) // 2 and V = vocab_size; id 0 is the filler. The query region is cut into two-token slots at even
offsets (as in Zoology); Q of them hold a query "k v": a key of one of the pairs, then its value, so the target of
the query key's position is the pair's value. Only those Q targets are scored (loss_mask / accuracy). Which pairs
are queried (Q of the D, without replacement, in random order) and which slots hold them (`placement`) are drawn:

    adjacent    the first Q slots: every query right after the pairs (the distances are about 2D)
    uniform     Q slots uniformly without replacement
    power_law   Zoology's choice: slot s (0-based) with probability proportional to (s + 1) ** (power_a - 1), so
                most queries sit near the pairs and a long tail far away

The distance of a query is (position of its key in the query region) - (position of the key in the pairs): the
number of tokens the model must carry the pair across. Every example is a function of (seed, index) only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from data.config import DataConfig
from data.stream import check_rank, check_state_config, derived_rng, stack_rows
from data.tokenizer import Tokenizer

PLACEMENTS = ("adjacent", "uniform", "power_law")
FILLER_ID = 0


@dataclass
class MQARConfig:
    """What an MQAR example looks like (everything but its length, which the caller gives: data.seq_len when
    training, the grid's lengths when evaluating)."""

    vocab_size: int = 256
    """Ids used: 0 the filler, keys [1, 1 + K), values [1 + K, vocab_size), K = (vocab_size - 1) // 2. At most the
    model's vocabulary."""
    num_pairs: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    """Key-value pairs per sequence; training draws each example's count uniformly from this list."""
    num_queries: int = 0
    """Queries per sequence (at most the pairs); 0: every pair is queried once."""
    placement: str = "power_law"
    """adjacent | uniform | power_law: which two-token slots of the query region hold the queries (module doc)."""
    power_a: float = 0.01
    """power_law: slot s has probability proportional to (s + 1) ** (power_a - 1) (Zoology's default 0.01)."""

    def __post_init__(self) -> None:
        check_mqar_config(self)

    @property
    def key_ids(self) -> range:
        return range(1, 1 + (self.vocab_size - 1) // 2)

    @property
    def value_ids(self) -> range:
        return range(1 + (self.vocab_size - 1) // 2, self.vocab_size)

    def queries_for(self, num_pairs: int) -> int:
        """Q, the queries of a sequence with num_pairs pairs."""
        return num_pairs if self.num_queries == 0 else min(self.num_queries, num_pairs)


def check_mqar_config(cfg: MQARConfig, where: str = "mqar") -> None:
    """Reject settings no sequence can satisfy, naming the field and value."""
    if cfg.vocab_size < 5:
        raise ValueError(f"{where}.vocab_size must be >= 5 (filler, 2 keys, 2 values), got {cfg.vocab_size}")
    if cfg.placement not in PLACEMENTS:
        raise ValueError(f"{where}.placement must be one of {PLACEMENTS}, got {cfg.placement!r}")
    if not cfg.num_pairs or any(not isinstance(n, int) or n < 1 for n in cfg.num_pairs):
        raise ValueError(f"{where}.num_pairs must be a non-empty list of integers >= 1, got {list(cfg.num_pairs)}")
    most = min(len(cfg.key_ids), len(cfg.value_ids))
    if max(cfg.num_pairs) > most:
        raise ValueError(f"{where}.num_pairs {max(cfg.num_pairs)} exceeds the {most} distinct keys/values of "
                         f"vocab_size {cfg.vocab_size}")
    if cfg.num_queries < 0:
        raise ValueError(f"{where}.num_queries must be >= 0 (0: every pair), got {cfg.num_queries}")
    if not 0 < cfg.power_a <= 1:
        raise ValueError(f"{where}.power_a must lie in (0, 1], got {cfg.power_a}")


def min_seq_len(cfg: MQARConfig, num_pairs: int) -> int:
    """The shortest sequence that holds num_pairs pairs and their queries: 2D + 2Q tokens."""
    return 2 * num_pairs + 2 * cfg.queries_for(num_pairs)


@dataclass
class MQARExample:
    """One MQAR sequence and where its answers are."""

    tokens: list[int]
    """The sequence, exactly seq_len ids."""
    keys: list[int]
    """Key of pair i (at position 2i)."""
    values: list[int]
    """Value of pair i (at position 2i + 1)."""
    query_positions: list[int]
    """Position of each query's key; the target there (the next token) is the answer."""
    query_pairs: list[int]
    """The pair each query asks for."""

    @property
    def answers(self) -> list[int]:
        return [self.values[i] for i in self.query_pairs]

    @property
    def distances(self) -> list[int]:
        """Tokens from the pair's key to the query's key, per query."""
        return [p - 2 * i for p, i in zip(self.query_positions, self.query_pairs)]


def mqar_example(cfg: MQARConfig, seq_len: int, num_pairs: int, rng: random.Random) -> MQARExample:
    """One sequence of seq_len ids with num_pairs pairs (module docstring), drawn from `rng`."""
    if num_pairs < 1 or num_pairs > min(len(cfg.key_ids), len(cfg.value_ids)):
        raise ValueError(f"num_pairs {num_pairs} must lie in [1, {min(len(cfg.key_ids), len(cfg.value_ids))}] "
                         f"for vocab_size {cfg.vocab_size}")
    n_queries = cfg.queries_for(num_pairs)
    if seq_len < min_seq_len(cfg, num_pairs):
        raise ValueError(f"MQAR seq_len {seq_len} is too short for {num_pairs} pairs and {n_queries} queries "
                         f"(needs 2 * {num_pairs} + 2 * {n_queries} = {min_seq_len(cfg, num_pairs)} tokens)")
    keys = rng.sample(cfg.key_ids, num_pairs)
    values = rng.sample(cfg.value_ids, num_pairs)
    context = 2 * num_pairs
    slots = (seq_len - context) // 2  # two-token slots of the query region
    if cfg.placement == "adjacent":
        chosen = list(range(n_queries))
    elif cfg.placement == "uniform":
        chosen = rng.sample(range(slots), n_queries)
    else:
        chosen = _power_law_slots(slots, n_queries, cfg.power_a, rng)
    pairs = rng.sample(range(num_pairs), n_queries)
    tokens = [FILLER_ID] * seq_len
    for i in range(num_pairs):
        tokens[2 * i], tokens[2 * i + 1] = keys[i], values[i]
    order = sorted(range(n_queries), key=lambda j: chosen[j])  # queries listed by position
    positions = [context + 2 * chosen[j] for j in order]
    asked = [pairs[j] for j in order]
    for position, pair in zip(positions, asked):
        tokens[position], tokens[position + 1] = keys[pair], values[pair]
    return MQARExample(tokens, keys, values, positions, asked)


def _power_law_slots(slots: int, count: int, power_a: float, rng: random.Random) -> list[int]:
    """`count` distinct slots of range(slots), slot s with weight (s + 1) ** (power_a - 1), drawn one at a time
    without replacement (exact and dependency-free: Efraimidis-Spirakis keys u ** (1 / w), largest first)."""
    weights = [(s + 1) ** (power_a - 1) for s in range(slots)]
    keyed = sorted(range(slots), key=lambda s: rng.random() ** (1.0 / weights[s]), reverse=True)
    return keyed[:count]


def mqar_trial(cfg: MQARConfig, seed: int, seq_len: int, num_pairs: int, trial: int) -> MQARExample:
    """Evaluation example `trial` of the (seq_len, num_pairs) cell: a function of these and cfg only, so every
    model is tested on the same sequences."""
    rng = derived_rng("mqar-eval", int(seed), int(seq_len), int(num_pairs), int(trial), cfg.placement,
                      float(cfg.power_a), int(cfg.vocab_size), int(cfg.num_queries))
    return mqar_example(cfg, seq_len, num_pairs, rng)


def example_row(example: MQARExample, seq_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """tokens (T,) int64, targets (T,) int64 (the next id; filler after the last), loss_mask (T,) float32 (1 at the
    query keys: their targets are the answers), as data.stream.shift_and_pad returns them."""
    tokens = torch.tensor(example.tokens, dtype=torch.int64)  # (T,)
    targets = torch.full((seq_len,), FILLER_ID, dtype=torch.int64)  # (T,)
    targets[:-1] = tokens[1:]
    loss_mask = torch.zeros(seq_len, dtype=torch.float32)  # (T,)
    loss_mask[example.query_positions] = 1.0
    return tokens, targets, loss_mask


class MQARBatches:
    """BatchStream of MQAR training sequences (data.kind=mqar).

    Example i is drawn from a generator seeded by (seed, i): its pair count uniformly from cfg.num_pairs, then the
    sequence. Step n of rank r holds examples (n * world_size + r) * batch_size + j, so ranks see disjoint examples.
    Every row is a fresh sequence (new_document True). The state is the step.
    """

    def __init__(self, cfg: MQARConfig, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        check_rank(batch_size, rank, world_size)
        longest = max(min_seq_len(cfg, n) for n in cfg.num_pairs)
        if seq_len < longest:
            raise ValueError(f"data.seq_len {seq_len} is too short for data.mqar.num_pairs {list(cfg.num_pairs)}: "
                             f"{max(cfg.num_pairs)} pairs and their queries need {longest} tokens")
        self.cfg, self.seq_len, self.batch_size, self.seed = cfg, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.step = 0

    def example(self, index: int) -> MQARExample:
        rng = derived_rng("mqar-train", int(self.seed), int(index))
        return mqar_example(self.cfg, self.seq_len, rng.choice(list(self.cfg.num_pairs)), rng)

    def __iter__(self) -> MQARBatches:
        return self

    def __next__(self) -> dict[str, Tensor]:
        start = (self.step * self.world_size + self.rank) * self.batch_size
        rows = [example_row(self.example(i), self.seq_len) for i in range(start, start + self.batch_size)]
        self.step += 1
        return stack_rows(rows, [True] * self.batch_size)  # every row a fresh sequence

    def _config(self) -> dict[str, Any]:
        return {"kind": "mqar", "batch_size": self.batch_size, "world_size": self.world_size, "seq_len": self.seq_len,
                "seed": self.seed, "num_pairs": list(self.cfg.num_pairs), "placement": self.cfg.placement}

    def state_dict(self) -> dict[str, Any]:
        return {**self._config(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_config("MQARBatches", state, self._config())
        self.step = int(state["step"])


def distance_bucket(distance: int) -> int:
    """The power-of-two bucket of a distance: the largest 2^k <= distance (distances are >= 2)."""
    return 1 << (max(int(distance), 1).bit_length() - 1)


def answers_from_tokens(tokens: Sequence[int], num_pairs: int, query_positions: Sequence[int]) -> list[int]:
    """Read each query's answer off the sequence alone: the value next to its key in the pairs region. (What a
    perfect associative memory returns; the tests check it equals the generator's answers.)"""
    table = {tokens[2 * i]: tokens[2 * i + 1] for i in range(num_pairs)}
    return [table[tokens[p]] for p in query_positions]


@dataclass
class MQARDataConfig(DataConfig):
    """data.kind=mqar (conf/data/mqar.yaml): generated MQAR sequences for training; the length is data.seq_len."""

    kind: str = "mqar"
    mqar: MQARConfig = field(default_factory=MQARConfig)
    """Vocabulary, pair counts, queries and their placement."""

    def batches(self, tokenizer: Tokenizer, rank: int, world_size: int, seed: int, validation: bool,
                segment_len: int | None) -> MQARBatches:
        if self.mqar.vocab_size > tokenizer.vocab_size:
            raise ValueError(f"data.mqar.vocab_size={self.mqar.vocab_size} exceeds the vocabulary of data.tokenizer="
                             f"{self.tokenizer!r} ({tokenizer.vocab_size}), which the model is sized by")
        return MQARBatches(self.mqar, self.seq_len, self.batch_size, seed, rank, world_size)
