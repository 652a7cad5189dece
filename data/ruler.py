"""RULER-style retrieval prompts (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?"), generated for any tokenizer at token-exact lengths, like data/passkey.py's passkey.

Tasks (TASKS), after RULER's retrieval and multi-hop tracing categories:

    niah_single_repeat   one needle "One of the special magic numbers for <key> is: <value>." in the repeated filler
                         ("The grass is green. ..." over and over, the passkey's haystack)
    niah_single_varied   the same in a haystack of varied text (seeded generated sentences: no download)
    niah_multikey        the needle plus `distractors` needles with other keys; asked for the one key
    niah_multivalue      `values` needles with the same key and different values; asked for all of them
    niah_multiquery      `queries` needles with different keys; asked for the values of all the keys
    variable_tracking    a chain "VAR A = 12345." "VAR B = VAR A." ... of `hops` assignments (and `chains` - 1
                         distractor chains of other values) in the repeated filler; asked for every variable that
                         holds the value

A prompt is   <instruction>\\n<haystack with the needles inserted between its sentences>\\n<question>
and the model continues after the question; the expected strings (`answers`) are the values or variable names.
Every part is tokenized on its own and the prompt is assembled from token lists, so len(tokens) == length exactly
whatever the tokenizer. The haystack is cut to the tokens left over; the needles go in at sentence boundaries, each
at the boundary nearest a seeded depth (variable-tracking chains keep their order). Everything is a function of
(seed, task, length, trial): every model is asked the same prompts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from data.passkey import FILLER
from data.stream import derived_rng
from data.tokenizer import Tokenizer

TASKS = ("niah_single_repeat", "niah_single_varied", "niah_multikey", "niah_multivalue", "niah_multiquery",
         "variable_tracking")
SEPARATOR = "\n"
NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                    "I will quiz you about the numbers afterwards.")
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = ("What is the special magic number for {key} mentioned in the provided text? "
                 "The special magic number for {key} mentioned in the provided text is")
NIAH_QUESTION_ALL = ("What are all the special magic numbers for {key} mentioned in the provided text? "
                     "The special magic numbers for {key} mentioned in the provided text are")
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_FIRST = "VAR {name} = {value}."
VT_NEXT = "VAR {name} = VAR {previous}."
VT_QUESTION = ("Question: Find all variables that are assigned the value {value} in the text above. Answer: "
               "According to the chain(s) of variable assignment in the text above, {count} variables are assigned "
               "the value {value}, they are:")

# the varied haystack: sentences "The <adjective> <noun> <verb> <the> <adjective> <noun> <place>."
_ADJECTIVES = ("quiet", "old", "bright", "small", "heavy", "green", "distant", "narrow", "warm", "broken", "silver",
               "patient", "hollow", "early", "tired", "golden", "crooked", "gentle", "empty", "busy")
_NOUNS = ("river", "teacher", "window", "garden", "engine", "letter", "mountain", "farmer", "bridge", "lantern",
          "harbor", "violin", "market", "forest", "kettle", "sailor", "library", "meadow", "tower", "wagon")
_VERBS = ("watches", "carries", "follows", "remembers", "paints", "answers", "crosses", "repairs", "visits",
          "hides", "finds", "greets", "measures", "keeps", "opens", "sells", "warms", "guards", "counts", "leaves")
_PLACES = ("near the station", "after the rain", "in the morning", "by the old road", "before dinner",
           "under the stars", "on a slow day", "at the edge of town", "without a word", "every winter")
# keys: "<adjective>-<noun>" from lists disjoint from the haystack's words, so a key never occurs by chance
_KEY_ADJECTIVES = ("amber", "brisk", "cobalt", "dusty", "eager", "fuzzy", "glossy", "humble", "icy", "jolly",
                   "kind", "lucky", "misty", "noble", "odd", "proud", "rapid", "shy", "tidy", "vivid")
_KEY_NOUNS = ("anchor", "badger", "cactus", "dolphin", "ember", "falcon", "glacier", "hammock", "igloo", "jackal",
              "koala", "lemur", "magnet", "nectar", "otter", "pepper", "quartz", "radish", "saddle", "tulip")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class RulerSettings:
    """The knobs of the tasks (RULER's defaults where it has one)."""

    digits: int = 7
    """Digits of each value (no leading zero)."""
    distractors: int = 3
    """niah_multikey: needles with other keys besides the asked one."""
    values: int = 4
    """niah_multivalue: values of the one key."""
    queries: int = 4
    """niah_multiquery: keys asked for."""
    hops: int = 4
    """variable_tracking: assignments after the first in each chain (the answer has hops + 1 names)."""
    chains: int = 1
    """variable_tracking: chains (one asked, the others distractors with other values)."""
    name_letters: int = 5
    """variable_tracking: letters per variable name."""

    def __post_init__(self) -> None:
        for name in ("digits", "values", "queries", "chains", "name_letters"):
            if getattr(self, name) < 1:
                raise ValueError(f"ruler.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("distractors", "hops"):
            if getattr(self, name) < 0:
                raise ValueError(f"ruler.{name} must be >= 0, got {getattr(self, name)}")
        if self.distractors + 1 > len(_KEY_ADJECTIVES) * len(_KEY_NOUNS) or self.queries > 100:
            raise ValueError("ruler.distractors / ruler.queries: too many distinct keys")


@dataclass
class RulerPrompt:
    """One prompt; the model should continue `tokens` with text containing every string of `answers`."""

    task: str
    tokens: list[int]
    """The prompt, exactly the requested length."""
    answers: list[str]
    """The expected strings: the value; the values in the order they appear (multivalue) or of the asked keys
    (multiquery); the chain's variable names in assignment order (variable tracking)."""
    needle_spans: list[tuple[int, int]] = field(default_factory=list)
    """[start, end) in `tokens` of each needle (variable tracking: each assignment), in prompt order."""
    question: str = ""
    """The question's text (the prompt's last part)."""

    @property
    def length(self) -> int:
        return len(self.tokens)


def random_value(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def random_keys(rng: random.Random, count: int) -> list[str]:
    """`count` distinct "<adjective>-<noun>" keys."""
    pairs = rng.sample(range(len(_KEY_ADJECTIVES) * len(_KEY_NOUNS)), count)
    return [f"{_KEY_ADJECTIVES[p // len(_KEY_NOUNS)]}-{_KEY_NOUNS[p % len(_KEY_NOUNS)]}" for p in pairs]


def varied_sentence(rng: random.Random) -> str:
    """"The <adjective> <noun> <verb> the <adjective> <noun> <place>." (20^5 * 10 sentences)."""
    subject, verb = f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}", rng.choice(_VERBS)
    return f"The {subject} {verb} the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_PLACES)}."


def join_keys(keys: Sequence[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return keys[0] if len(keys) == 1 else f"{', '.join(keys[:-1])} and {keys[-1]}"


class RulerTemplate:
    """Builds the prompts of every task for one tokenizer (the constant parts tokenized once)."""

    def __init__(self, tokenizer: Tokenizer, settings: RulerSettings | None = None):
        self.tokenizer = tokenizer
        self.settings = settings or RulerSettings()
        self.separator = tokenizer.encode(SEPARATOR)
        self.filler_first = tokenizer.encode(FILLER)
        self.filler_next = tokenizer.encode(" " + FILLER)
        if not self.filler_next:
            raise ValueError(f"{tokenizer!r} encodes the filler to no tokens")

    def haystack(self, kind: str, count: int, rng: random.Random) -> tuple[list[int], list[int]]:
        """`count` haystack tokens and the token offsets where its sentences start (plus `count`): the places a
        needle may go. kind: repeat (the filler, boundaries every filler group) or varied (generated sentences)."""
        tokens: list[int] = []
        boundaries: list[int] = []
        while len(tokens) < count:
            boundaries.append(len(tokens))
            if kind == "repeat":
                tokens += self.filler_next if tokens else self.filler_first
            else:
                sentence = varied_sentence(rng)
                tokens += self.tokenizer.encode((" " if tokens else "") + sentence)
        return tokens[:count], [b for b in boundaries if b < count] + [count]

    def _assemble(self, task: str, length: int, instruction: str, needles: list[str], depths: list[float],
                  question: str, answers: list[str], haystack: str, rng: random.Random) -> RulerPrompt:
        """instruction \\n haystack-with-needles \\n question, exactly `length` tokens; needle i at the sentence
        boundary nearest depths[i], never before the first sentence (ties keep the needles' order)."""
        head = self.tokenizer.encode(instruction) + self.separator
        tail = self.separator + self.tokenizer.encode(question)
        encoded = [self.tokenizer.encode(" " + needle) for needle in needles]
        fixed = len(head) + len(tail) + sum(map(len, encoded))
        if length < fixed:
            raise ValueError(f"RULER {task} prompt length {length} is too short: the minimum is {fixed} tokens for "
                             "this tokenizer (instruction, needles, question, no haystack)")
        filler, boundaries = self.haystack(haystack, length - fixed, rng)
        total = len(filler)
        allowed = boundaries[1:] or boundaries  # after the first sentence: every needle " ..." follows text
        places = [min(allowed, key=lambda b: (abs(b - d * total), b)) for d in depths]
        order = sorted(range(len(needles)), key=lambda i: (places[i], i))
        tokens, spans, cursor = list(head), [None] * len(needles), 0
        for i in order:
            tokens += filler[cursor : places[i]]
            cursor = places[i]
            spans[i] = (len(tokens), len(tokens) + len(encoded[i]))
            tokens += encoded[i]
        tokens += filler[cursor:] + tail
        assert len(tokens) == length, (len(tokens), length)
        return RulerPrompt(task, tokens, answers, sorted(spans), question)

    def prompt(self, task: str, length: int, rng: random.Random) -> RulerPrompt:
        """A prompt of task `task` (TASKS) of exactly `length` tokens, its keys, values and depths drawn from rng."""
        s = self.settings
        if task == "variable_tracking":
            return self._variable_tracking(length, rng)
        if task not in TASKS:
            raise ValueError(f"unknown RULER task {task!r}; expected one of {TASKS}")
        haystack = "repeat" if task == "niah_single_repeat" else "varied"
        counts = {"niah_multikey": s.distractors + 1, "niah_multiquery": s.queries}
        keys = random_keys(rng, counts.get(task, 1))
        if task == "niah_multivalue":
            values = []
            while len(values) < s.values:  # distinct values
                value = random_value(rng, s.digits)
                values += [value] if value not in values else []
            needles = [NIAH_NEEDLE.format(key=keys[0], value=v) for v in values]
            answers, question = values, NIAH_QUESTION_ALL.format(key=keys[0])
        else:
            values = [random_value(rng, s.digits) for _ in keys]
            needles = [NIAH_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
            if task == "niah_multiquery":
                answers, question = values, NIAH_QUESTION_ALL.format(key=join_keys(keys))
            else:  # single needle, or the first of multikey's needles (the others are distractors)
                answers, question = values[:1], NIAH_QUESTION.format(key=keys[0])
        depths = [rng.random() for _ in needles]
        if task == "niah_multivalue":
            depths.sort()  # the values appear in the order of `answers`
        return self._assemble(task, length, NIAH_INSTRUCTION, needles, depths, question, answers, haystack, rng)

    def _variable_tracking(self, length: int, rng: random.Random) -> RulerPrompt:
        s = self.settings
        names: list[str] = []
        while len(names) < s.chains * (s.hops + 1):
            name = "".join(rng.choice(_LETTERS) for _ in range(s.name_letters))
            names += [name] if name not in names else []
        values: list[str] = []
        while len(values) < s.chains:
            value = random_value(rng, s.digits)
            values += [value] if value not in values else []
        needles, depths = [], []
        for c in range(s.chains):
            chain = names[c * (s.hops + 1) : (c + 1) * (s.hops + 1)]
            needles += [VT_FIRST.format(name=chain[0], value=values[c])]
            needles += [VT_NEXT.format(name=n, previous=p) for p, n in zip(chain, chain[1:])]
            depths += sorted(rng.random() for _ in chain)  # a chain's assignments in order
        answers = names[: s.hops + 1]
        question = VT_QUESTION.format(value=values[0], count=len(answers))
        return self._assemble("variable_tracking", length, VT_INSTRUCTION, needles, depths, question, answers,
                              "repeat", rng)


def ruler_trial(template: RulerTemplate, task: str, length: int, trial: int, seed: int) -> RulerPrompt:
    """Trial `trial` of (task, length): a function of (seed, task, length, trial) and the settings only."""
    return template.prompt(task, length, derived_rng("ruler", int(seed), task, int(length), int(trial)))


def score_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER's string_match_all: the share of expected strings found in the prediction (case-insensitive)."""
    text = prediction.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


def score_part(prediction: str, answers: Sequence[str]) -> float:
    """RULER's string_match_part: 1 if any expected string is found in the prediction (case-insensitive)."""
    text = prediction.lower()
    return float(any(answer.lower() in text for answer in answers))
