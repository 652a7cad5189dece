"""Passkey retrieval prompts (Landmark Attention's template, the one the Infini-attention paper uses).

    <INSTRUCTION>\\n<filler before>\\n<NEEDLE>\\n<filler after>\\n<QUESTION>

Lengths are token-exact for any tokenizer: each part is tokenized on its own and the prompt is assembled
from token lists, so `len(prompt.tokens) == length` whatever the tokenizer would merge across part boundaries.
The filler is "FILLER FILLER FILLER ..." (sentences joined by spaces, as in Landmark's code) cut to the number
of tokens needed; it is built by repeating the tokens of one sentence, so a 1M-token prompt takes milliseconds.
An empty filler part leaves an empty line, as in Landmark's `"\\n".join(parts)`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from data.stream import check_rank, check_state_config, derived_rng, shift_and_pad
from data.tokenizer import Tokenizer

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
SEPARATOR = "\n"
LOSS_ON = ("answer", "all")
ANSWER = " {key}."  # the continuation of QUESTION, as in the needle


@dataclass
class PasskeyPrompt:
    """One passkey prompt; the model should continue `tokens` with `answer_tokens`."""

    tokens: list[int]
    """The prompt, exactly the requested length, instruction and question included."""
    passkey: str
    answer_tokens: list[int]
    """Tokens of " {passkey}." (ANSWER): what greedy decoding after the question should produce. The period
    ends the answer as it ends the needle's "The pass key is {key}."; a model trained on it stops after the key
    instead of running on with digits (the exact score reads the first integer of the decoded text)."""
    depth: float
    """Requested fraction of the filler placed before the needle (0: right after the instruction)."""
    needle_start: int
    """Index in `tokens` of the first needle token."""
    needle_end: int
    """Index in `tokens` one past the last needle token (exclusive)."""

    @property
    def length(self) -> int:
        return len(self.tokens)


class PasskeyTemplate:
    """The constant parts of the template, tokenized once per tokenizer; builds prompts of any key/length."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.instruction = tokenizer.encode(INSTRUCTION)
        self.separator = tokenizer.encode(SEPARATOR)
        self.question = tokenizer.encode(QUESTION)
        self.filler_first = tokenizer.encode(FILLER)  # the filler's first sentence group
        self.filler_next = tokenizer.encode(" " + FILLER)  # every following one, space-joined
        if not self.filler_next:
            raise ValueError(f"{tokenizer!r} encodes the filler to no tokens")

    @property
    def filler_period(self) -> int:
        """Tokens per repetition of the filler: the resolution of the needle depth."""
        return len(self.filler_next)

    def filler(self, count: int) -> list[int]:
        """The first `count` tokens of "FILLER FILLER ...", built by repetition."""
        if count <= len(self.filler_first):
            return self.filler_first[:count]
        rest = count - len(self.filler_first)
        repeats = -(-rest // len(self.filler_next))
        return self.filler_first + (self.filler_next * repeats)[:rest]

    def fixed_length(self, passkey: str) -> int:
        """Tokens of the prompt without filler: the minimum length for this key."""
        return self._fixed_length(self.tokenizer.encode(NEEDLE.format(key=passkey)))

    def _fixed_length(self, needle: Sequence[int]) -> int:
        return len(self.instruction) + len(needle) + len(self.question) + 4 * len(self.separator)

    def prompt(self, length: int, depth: float, passkey: str) -> PasskeyPrompt:
        """A prompt of exactly `length` tokens whose needle follows round(depth * filler tokens) filler tokens."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must lie in [0, 1], got {depth}")
        if not passkey:
            raise ValueError("passkey must be a non-empty string")
        needle = self.tokenizer.encode(NEEDLE.format(key=passkey))
        fixed = self._fixed_length(needle)
        if length < fixed:
            raise ValueError(
                f"passkey prompt length {length} is too short: the minimum is {fixed} tokens for this "
                f"tokenizer and a {len(passkey)}-character key (instruction, needle, question, newlines, no filler)"
            )
        filler_total = length - fixed
        before = round(depth * filler_total)
        sep = self.separator
        head = self.instruction + sep + self.filler(before) + sep  # everything before the needle
        tokens = head + needle + sep + self.filler(filler_total - before) + sep + self.question
        assert len(tokens) == length, (len(tokens), length)
        return PasskeyPrompt(
            tokens=tokens,
            passkey=passkey,
            answer_tokens=self.tokenizer.encode(ANSWER.format(key=passkey)),
            depth=depth,
            needle_start=len(head),
            needle_end=len(head) + len(needle),
        )


def passkey_prompt(tokenizer: Tokenizer, length: int, depth: float, passkey: str) -> PasskeyPrompt:
    """A token-exact passkey prompt (see the module docstring); build a PasskeyTemplate to make many."""
    return PasskeyTemplate(tokenizer).prompt(length, depth, passkey)


def random_passkey(rng: random.Random, digits: int = 5) -> str:
    """A `digits`-digit key without a leading zero, so its integer reading has all `digits` digits."""
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def trial_passkey(seed: int, length: int, depth: float, trial: int, digits: int = 5) -> str:
    """The key of one evaluation trial: a function of (seed, length, depth, trial) only, never of the
    tokenizer or model, so every model is quizzed on the same keys."""
    rng = derived_rng("passkey-trial", int(seed), int(length), float(depth), int(trial))
    return random_passkey(rng, digits)


def iter_passkey_trials(
    tokenizer: Tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    seed: int,
    digits: int = 5,
) -> Iterator[PasskeyPrompt]:
    """passkey_trials one prompt at a time (a grid up to 1M tokens does not fit in memory as a list)."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    template = PasskeyTemplate(tokenizer)
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                yield template.prompt(length, depth, trial_passkey(seed, length, depth, trial, digits))


def passkey_trials(
    tokenizer: Tokenizer, lengths: list[int], depths: list[float], trials: int, seed: int, digits: int = 5
) -> list[PasskeyPrompt]:
    """The evaluation grid, ordered by length, then depth, then trial; identical across calls and models."""
    return list(iter_passkey_trials(tokenizer, lengths, depths, trials, seed, digits))


class PasskeyDataset(Dataset):
    """Endless map-style passkey training data: example i is a function of (seed, i) only.

    Example i is the prompt of length seq_len + 1 - len(answer) followed by the answer tokens, so the answer
    is the last thing predicted; tokens = example[:-1], targets = example[1:]. loss_on="answer" puts the loss
    on the answer targets only (the fine-tuning recipe), "all" on every target. answer_weight multiplies the
    answer targets' loss_mask: with loss_on="all" the text around the needle trains the memory (filler repeats
    across segments, so predicting it needs the memory) while the answer keeps a real share of the gradient.
    The depth is drawn uniformly from `depth_range`, or from the grid `depths` when given.

    length_jitter: each prompt is shorter by a random 0..length_jitter tokens (padding after the answer, no
    loss). Why: evaluation prompts have lengths like 2^k, multiples of the segment length, so the answer starts
    a new segment and the question is reachable only through the memory. Without jitter every training answer
    sits at the same offset, right after the question in the same segment, and a model never learns to answer
    from memory alone at a segment boundary. A jitter of one segment length covers every offset.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        seq_len: int,
        seed: int,
        digits: int = 5,
        depth_range: tuple[float, float] = (0.0, 1.0),
        depths: Sequence[float] | None = None,
        loss_on: str = "answer",
        answer_weight: float = 1.0,
        length_jitter: int = 0,
    ):
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
        if not answer_weight > 0:
            raise ValueError(f"answer_weight must be positive, got {answer_weight!r}")
        if length_jitter < 0:
            raise ValueError(f"length_jitter must be >= 0, got {length_jitter!r}")
        low, high = depth_range
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"depth_range must satisfy 0 <= low <= high <= 1, got {depth_range}")
        if depths is not None and (not depths or any(not 0.0 <= d <= 1.0 for d in depths)):
            raise ValueError(f"depths must be a non-empty list of values in [0, 1], got {depths}")
        self.template = PasskeyTemplate(tokenizer)
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.seed = seed
        self.digits = digits
        self.depth_range = (low, high)
        self.depths = list(depths) if depths is not None else None
        self.loss_on = loss_on
        self.answer_weight = answer_weight
        self.length_jitter = length_jitter
        self.prompt(0)  # fail now, with the minimum length, if seq_len is too short
        longest_answer = len(tokenizer.encode(ANSWER.format(key="9" * digits)))
        # ... and with the jitter (a key's token count varies with a BPE tokenizer, hence both checks)
        self.template.prompt(seq_len + 1 - longest_answer - length_jitter, 0.0, "9" * digits)

    def prompt(self, index: int) -> PasskeyPrompt:
        """The prompt of example `index` (its passkey, depth and needle position)."""
        if index < 0:
            raise IndexError(f"PasskeyDataset index must be >= 0, got {index}")
        rng = derived_rng("passkey-train", int(self.seed), int(index))
        passkey = random_passkey(rng, self.digits)
        depth = rng.choice(self.depths) if self.depths is not None else rng.uniform(*self.depth_range)
        answer_len = len(self.tokenizer.encode(ANSWER.format(key=passkey)))
        shorter = rng.randrange(self.length_jitter + 1) if self.length_jitter else 0
        return self.template.prompt(self.seq_len + 1 - answer_len - shorter, depth, passkey)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """tokens (T,) int64, targets (T,) int64, loss_mask (T,) float32 of example `index`."""
        prompt = self.prompt(index)
        example = prompt.tokens + prompt.answer_tokens  # (T + 1,)
        loss_from = len(prompt.tokens) if self.loss_on == "answer" else 1
        tokens, targets, loss_mask = shift_and_pad(example, self.seq_len, self.tokenizer.pad_id, loss_from)
        if self.answer_weight != 1.0:  # the answer targets are the last len(answer) positions
            loss_mask[len(prompt.tokens) - 1 : len(example) - 1] *= self.answer_weight
        return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask}


class PasskeyBatches:
    """BatchStream over one PasskeyDataset, or a mixture of them with different seq_len.

    Step n of rank r holds examples (n*world_size + r)*batch_size + j, so ranks see disjoint examples and one
    process with world_size=1 sees them all in order. With several datasets, step n draws its dataset (so its
    sequence length) from a generator seeded by (seed, n): identical on every rank and after a resume. Short
    sequences put the needle a segment or two before the question, which bootstraps retrieval through the
    memory; long ones teach it to survive filler. Every row is a fresh prompt, so new_document is always True.
    The state is the step, identical on every rank.
    """

    def __init__(self, dataset: PasskeyDataset | Sequence[PasskeyDataset], batch_size: int, rank: int = 0,
                 world_size: int = 1):
        check_rank(batch_size, rank, world_size)
        self.datasets = [dataset] if isinstance(dataset, PasskeyDataset) else list(dataset)
        if not self.datasets:
            raise ValueError("PasskeyBatches needs at least one dataset")
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.step = 0

    def example_indices(self, step: int) -> range:
        """Dataset indices of this rank's rows at `step`."""
        start = (step * self.world_size + self.rank) * self.batch_size
        return range(start, start + self.batch_size)

    def dataset_at(self, step: int) -> PasskeyDataset:
        """The dataset (sequence length) of `step`."""
        if len(self.datasets) == 1:
            return self.datasets[0]
        return self.datasets[derived_rng("passkey-length", self.datasets[0].seed, step).randrange(len(self.datasets))]

    def __iter__(self) -> PasskeyBatches:
        return self

    def __next__(self) -> dict[str, Tensor]:
        dataset = self.dataset_at(self.step)
        rows = [dataset[i] for i in self.example_indices(self.step)]
        self.step += 1
        return {
            "tokens": torch.stack([row["tokens"] for row in rows]),  # (B, T)
            "targets": torch.stack([row["targets"] for row in rows]),  # (B, T)
            "loss_mask": torch.stack([row["loss_mask"] for row in rows]),  # (B, T)
            "new_document": torch.ones(self.batch_size, dtype=torch.bool),  # (B,)
        }

    def _config(self) -> dict[str, Any]:
        seq_lens = [d.seq_len for d in self.datasets]
        return {"kind": "passkey", "batch_size": self.batch_size, "world_size": self.world_size,
                "seq_len": seq_lens[0] if len(seq_lens) == 1 else seq_lens, "seed": self.datasets[0].seed}

    def state_dict(self) -> dict[str, Any]:
        return {**self._config(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_config("PasskeyBatches", state, self._config())
        self.step = int(state["step"])
