"""Passkey retrieval prompts (Landmark Attention's template, the one the Infini-attention paper uses).

    <INSTRUCTION>\\n<filler before>\\n<NEEDLE>\\n<filler after>\\n<QUESTION>

Lengths are token-exact for any tokenizer: each part is tokenized on its own and the prompt is assembled
from token lists, so `len(prompt.tokens) == length` whatever the tokenizer would merge across part boundaries.
The filler is "FILLER FILLER FILLER ..." (sentences joined by spaces, as in Landmark's code) cut to the number
of tokens needed; it is built by repeating the tokens of one sentence, so a 1M-token prompt takes milliseconds.
An empty filler part leaves an empty line, as in Landmark's `"\\n".join(parts)`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from data.config import DataConfig, choice
from data.stream import BatchStream, check_rank, check_state_config, derived_rng, shift_and_pad
from data.tokenizer import Tokenizer

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
SEPARATOR = "\n"


class LossOn(StrEnum):
    """Which targets of a passkey example carry loss (data.loss_on)."""

    answer = "answer"
    all = "all"


LOSS_ON = tuple(m.value for m in LossOn)
ANSWER = " {key}."  # the continuation of QUESTION, as in the needle
OFFSET_CLASSES = ("inside", "straddles", "opens")
"""Where the answer's first token (position P, right after the prompt) falls in its segment of N tokens, r = P mod N,
for a question of q tokens ending the prompt (see offset_class_ranges)."""


class AnswerOffset(StrEnum):
    """How PasskeyDataset places the answer within a segment (data.passkey_answer_offset; see PasskeyDataset)."""

    fixed = "fixed"
    uniform = "uniform"
    balanced = "balanced"


ANSWER_OFFSETS = tuple(m.value for m in AnswerOffset)


def offset_class_ranges(segment_len: int, question_len: int) -> dict[str, range]:
    """The answer offsets r = P mod N of each class in OFFSET_CLASSES, for segments of N = segment_len tokens and
    a question of q = question_len tokens that ends the prompt (it covers positions P - q .. P - 1):

        opens      r == 0       the answer opens a new segment: the question is reachable only through memory
        straddles  0 < r < q    the question crosses a segment boundary (part local, part memory)
        inside     q <= r < N   the whole question lies in the answer's segment (plain local attention)

    Why classes: segments are fixed by absolute position, so which of these a prompt tests depends only on r,
    and a model can do well at one and fail at another. A class can be empty: `inside` when N <= q.
    """
    if segment_len < 1:
        raise ValueError(f"segment_len must be >= 1, got {segment_len}")
    if question_len < 1:
        raise ValueError(f"question_len must be >= 1, got {question_len}")
    return {
        "inside": range(question_len, segment_len),
        "straddles": range(1, min(question_len, segment_len)),
        "opens": range(0, 1),
    }


def check_offset_settings(offset_classes: Sequence[str], offsets_per_class: int) -> None:
    """Reject unknown or repeated class names and offsets_per_class < 1, naming the bad values."""
    unknown = [c for c in offset_classes if c not in OFFSET_CLASSES]
    if unknown:
        raise ValueError(f"unknown passkey offset class(es) {unknown}; expected a non-empty subset of "
                         f"{list(OFFSET_CLASSES)}")
    if not offset_classes:
        raise ValueError(f"offset_classes is empty; expected a non-empty subset of {list(OFFSET_CLASSES)}")
    repeated = sorted({c for c in offset_classes if list(offset_classes).count(c) > 1})
    if repeated:
        raise ValueError(f"offset_classes lists {repeated} more than once: {list(offset_classes)}")
    if isinstance(offsets_per_class, bool) or not isinstance(offsets_per_class, int) or offsets_per_class < 1:
        raise ValueError(f"offsets_per_class must be an integer >= 1, got {offsets_per_class!r}")


def offset_class(offset: int, segment_len: int, question_len: int) -> str:
    """The class (OFFSET_CLASSES) of answer offset r = P mod segment_len."""
    for name, offsets in offset_class_ranges(segment_len, question_len).items():
        if offset % segment_len in offsets:
            return name
    raise AssertionError("the classes cover 0 .. segment_len - 1")


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
    haystack: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    """[start, end) of the filler before and of the filler after the needle (the haystack; either may be empty)."""

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

    @property
    def question_len(self) -> int:
        """Tokens of the question that ends every prompt (q of offset_class_ranges)."""
        return len(self.question)

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
        first = len(self.instruction) + len(sep)  # the first filler token
        after = len(head) + len(needle) + len(sep)  # the first token of the filler after the needle
        return PasskeyPrompt(
            tokens=tokens,
            passkey=passkey,
            answer_tokens=self.tokenizer.encode(ANSWER.format(key=passkey)),
            depth=depth,
            needle_start=len(head),
            needle_end=len(head) + len(needle),
            haystack=((first, first + before), (after, after + filler_total - before)),
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

    answer_offset: where the answer starts within its segment of segment_len tokens (r = P mod N, P the prompt
    length; classes in offset_class_ranges). "fixed": the prompt fills the sequence, so every answer of a given
    seq_len sits at the same offset (with seq_len a multiple of N and a 7-token answer, r = N - 6: the question
    lies inside the last segment). "uniform": r uniform over 0..N-1. "balanced": one of OFFSET_CLASSES with
    probability 1/3 each (opens, straddles, inside), then r uniform inside the class. The prompt is shortened by
    (P_fixed - r) mod N tokens (0..N-1) and padded after the answer, with no loss on the padding. Why: evaluation
    prompts have lengths like 2^k, so their answers open a new segment and the question is reachable only
    through the memory; a model trained on one offset never learns that case. "uniform" puts only 1/N of the
    answers on a boundary; "balanced" gives each case a third.

    haystack_scale > 1 (a training augmentation, off at 1): each example's haystack (filler) tokens are written
    into the memory with a multiplicity c drawn log-uniformly from [1, haystack_scale] (the batch's write_scale,
    which the trainer passes to the model). Under the linear rule (4) a token written with weight c adds exactly
    what c copies of it add to M and z, so a short prompt presents the memory state of a prompt with up to
    haystack_scale times its filler (the filler's phase within segments aside): the reads learn to survive the
    filler mass of long inputs without the compute of long inputs. The local attention path and the evaluation
    prompts are untouched. With a delta rule c is a stronger write, not c copies.
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
        answer_offset: str = "fixed",
        segment_len: int | None = None,
        haystack_scale: float = 1.0,
    ):
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
        if not answer_weight > 0:
            raise ValueError(f"answer_weight must be positive, got {answer_weight!r}")
        if answer_offset not in ANSWER_OFFSETS:
            raise ValueError(f"answer_offset must be one of {ANSWER_OFFSETS}, got {answer_offset!r}")
        if answer_offset != "fixed" and segment_len is None:
            raise ValueError(f"answer_offset={answer_offset!r} needs the model's segment_len (offsets are "
                             "positions within a segment)")
        if segment_len is not None and segment_len < 1:
            raise ValueError(f"segment_len must be >= 1, got {segment_len!r}")
        if not haystack_scale >= 1.0:
            raise ValueError(f"haystack_scale must be >= 1 (1: off), got {haystack_scale!r}")
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
        self.answer_offset = answer_offset
        self.segment_len = segment_len
        self.haystack_scale = float(haystack_scale)
        self.offset_ranges: list[range] = []  # "balanced": one range of offsets per class, OFFSET_CLASSES order
        if answer_offset == "balanced":
            ranges = offset_class_ranges(segment_len, self.template.question_len)
            empty = [name for name, offsets in ranges.items() if not offsets]
            if empty:
                raise ValueError(
                    f"answer_offset='balanced' needs every offset class, but with segment_len={segment_len} and "
                    f"a {self.template.question_len}-token question {empty} is empty (inside needs "
                    f"segment_len > {self.template.question_len}); use answer_offset='uniform'")
            self.offset_ranges = [ranges[name] for name in OFFSET_CLASSES]
        longest_answer = len(tokenizer.encode(ANSWER.format(key="9" * digits)))
        most_shortened = 0 if answer_offset == "fixed" else segment_len - 1
        try:
            self.prompt(0)  # fail now, with the minimum length, if seq_len is too short
            # ... and at the most shortened prompt (a key's token count varies with a BPE tokenizer: both checks)
            self.template.prompt(seq_len + 1 - longest_answer - most_shortened, 0.0, "9" * digits)
        except ValueError as error:
            if not most_shortened:
                raise
            raise ValueError(f"seq_len={seq_len} is too short for answer_offset={answer_offset!r} with "
                             f"segment_len={segment_len}: prompts are shortened by up to {most_shortened} tokens, "
                             f"and then {error}") from error

    def prompt(self, index: int) -> PasskeyPrompt:
        """The prompt of example `index` (its passkey, depth and needle position)."""
        if index < 0:
            raise IndexError(f"PasskeyDataset index must be >= 0, got {index}")
        rng = derived_rng("passkey-train", int(self.seed), int(index))
        passkey = random_passkey(rng, self.digits)
        depth = rng.choice(self.depths) if self.depths is not None else rng.uniform(*self.depth_range)
        answer_len = len(self.tokenizer.encode(ANSWER.format(key=passkey)))
        length = self.seq_len + 1 - answer_len  # the prompt that fills the sequence ("fixed")
        if self.answer_offset != "fixed":  # "fixed" draws nothing more: its examples are those of before the modes
            if self.answer_offset == "uniform":
                offset = rng.randrange(self.segment_len)
            else:
                offset = rng.choice(rng.choice(self.offset_ranges))
            length -= (length - offset) % self.segment_len
        return self.template.prompt(length, depth, passkey)

    def write_scale(self, index: int, prompt: PasskeyPrompt) -> Tensor:
        """The memory-write multiplier of example `index` (haystack_scale > 1): c on the haystack (filler) tokens,
        1 elsewhere, c drawn log-uniformly from [1, haystack_scale] per example. (T,) float32."""
        rng = derived_rng("passkey-haystack-scale", int(self.seed), int(index))
        c = math.exp(rng.uniform(0.0, math.log(self.haystack_scale)))
        scale = torch.ones(self.seq_len)
        for start, end in prompt.haystack:
            scale[start:end] = c
        return scale

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """tokens (T,) int64, targets (T,) int64, loss_mask (T,) float32 of example `index`; with
        haystack_scale > 1 also write_scale (T,) float32 (see the class docstring)."""
        prompt = self.prompt(index)
        example = prompt.tokens + prompt.answer_tokens  # (T + 1,)
        loss_from = len(prompt.tokens) if self.loss_on == "answer" else 1
        tokens, targets, loss_mask = shift_and_pad(example, self.seq_len, self.tokenizer.pad_id, loss_from)
        if self.answer_weight != 1.0:  # the answer targets are the last len(answer) positions
            loss_mask[len(prompt.tokens) - 1 : len(example) - 1] *= self.answer_weight
        row = {"tokens": tokens, "targets": targets, "loss_mask": loss_mask}
        if self.haystack_scale > 1.0:
            row["write_scale"] = self.write_scale(index, prompt)
        return row


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
        extra = {"write_scale": torch.stack([row["write_scale"] for row in rows])} if "write_scale" in rows[0] else {}
        return {
            "tokens": torch.stack([row["tokens"] for row in rows]),  # (B, T)
            "targets": torch.stack([row["targets"] for row in rows]),  # (B, T)
            "loss_mask": torch.stack([row["loss_mask"] for row in rows]),  # (B, T)
            **extra,  # write_scale (B, T): the haystack-scale augmentation
            "new_document": torch.ones(self.batch_size, dtype=torch.bool),  # (B,)
        }

    def _config(self) -> dict[str, Any]:
        seq_lens = [d.seq_len for d in self.datasets]
        config = {"kind": "passkey", "batch_size": self.batch_size, "world_size": self.world_size,
                  "seq_len": seq_lens[0] if len(seq_lens) == 1 else seq_lens, "seed": self.datasets[0].seed}
        first = self.datasets[0]
        if first.answer_offset != "fixed":  # only then: states saved before the offset modes stay loadable
            config.update(answer_offset=first.answer_offset, segment_len=first.segment_len)
        if first.haystack_scale != 1.0:
            config.update(haystack_scale=first.haystack_scale)
        return config

    def state_dict(self) -> dict[str, Any]:
        return {**self._config(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_config("PasskeyBatches", state, self._config())
        self.step = int(state["step"])


@dataclass
class PasskeyDataConfig(DataConfig):
    """data.kind=passkey: generated passkey retrieval prompts (no download), PasskeyDataset batched."""

    kind: str = "passkey"
    passkey_digits: int = 5
    passkey_depth_min: float = 0.0
    passkey_depth_max: float = 1.0
    loss_on: LossOn = LossOn.answer
    """answer (loss on the passkey tokens only) or all (every token)."""
    seq_len_mix: list[int] = field(default_factory=list)
    """Each step's sequence length is drawn uniformly from these (a length curriculum by mixture); empty: always
    seq_len. The validation stream and the evaluation's "training length" use seq_len."""
    passkey_answer_offset: AnswerOffset = AnswerOffset.fixed
    """Where the answer starts within its segment of model.segment_len tokens (r = P mod N, P the prompt length).
    fixed: the prompt fills the sequence, so every answer of a length sits at one offset (the question inside the
    answer's segment); uniform: r uniform over 0..N-1; balanced: each offset class with probability 1/3 (opens
    r = 0: the question reachable only through memory, as at evaluation lengths like 2^k; straddles 0 < r < q;
    inside r >= q; q the question's tokens, 37 bytes), r uniform inside it. uniform and balanced shorten the prompt
    by up to N-1 tokens (padding after the answer, no loss), so every training length needs N-1 tokens beyond the
    template's minimum; balanced needs N > q."""
    passkey_haystack_scale: float = 1.0
    """Training augmentation (1: off): each example's filler tokens are written into the memory with a
    multiplicity c drawn log-uniformly from [1, this] (PasskeyDataset). Under the linear rule a token written with
    weight c adds what c copies add, so short prompts present the memory states of prompts with up to this many
    times their filler. Validation batches and evaluation prompts are never scaled."""
    answer_weight: float = 1.0
    """Weight of the answer tokens in the loss (with loss_on=all: > 1 keeps them from drowning)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.loss_on = choice(LossOn, self.loss_on, "data.loss_on")
        self.passkey_answer_offset = choice(AnswerOffset, self.passkey_answer_offset, "data.passkey_answer_offset")

    def batches(self, tokenizer: Tokenizer, rank: int, world_size: int, seed: int, validation: bool,
                segment_len: int | None) -> BatchStream:
        """segment_len: the model's; needed for passkey_answer_offset other than fixed."""
        mixed = bool(self.seq_len_mix) and not validation
        datasets = []
        for length in self.seq_len_mix if mixed else [self.seq_len]:
            try:
                datasets.append(PasskeyDataset(
                    tokenizer, length, seed, self.passkey_digits, (self.passkey_depth_min, self.passkey_depth_max),
                    loss_on=self.loss_on.value, answer_weight=self.answer_weight,
                    answer_offset=self.passkey_answer_offset.value,
                    segment_len=segment_len,
                    haystack_scale=1.0 if validation else self.passkey_haystack_scale))  # validation: real memories
            except ValueError as error:  # name the config fields behind the dataset's arguments
                where = "data.seq_len_mix" if mixed else "data.seq_len"
                raise ValueError(f"passkey data with {where} length {length}, data.passkey_answer_offset="
                                 f"{self.passkey_answer_offset.value!r}, model.segment_len={segment_len}: {error}"
                                 ) from error
        return PasskeyBatches(datasets, self.batch_size, rank, world_size)
