"""Tests of data/: tokenizers, passkey prompts, document windows, BookSum, and the BatchStream contract.

Everything runs on files the tests write into tmp_path; nothing is downloaded. The Hugging Face tokenizer
under test is a tiny byte-level BPE trained here on a few sentences.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from data import (
    BATCH_KEYS,
    FILLER,
    INSTRUCTION,
    NEEDLE,
    QUESTION,
    SUMMARY_SEPARATOR,
    BatchStream,
    ByteTokenizer,
    DocumentWindows,
    HFTokenizer,
    MissingFieldError,
    PasskeyBatches,
    PasskeyDataset,
    PasskeyTemplate,
    SummarizationBatches,
    SummarizationExample,
    Tokenizer,
    load_booksum,
    load_documents,
    load_tokenizer,
    passkey_prompt,
    passkey_trials,
    random_passkey,
    summarization_prompt,
    summarization_row,
)
from data.text import is_local_source

TRAINING_TEXT = [
    INSTRUCTION,
    FILLER,
    NEEDLE.format(key="12345"),
    QUESTION + " 67890.",
    "Once upon a time there was a summary of a book.",
]


def save_tiny_hf_tokenizer(directory: Path, eos: str | None = "<eos>", pad: str | None = "<pad>") -> Path:
    """A byte-level BPE (lossless on any text) trained on a few sentences, saved like save_pretrained does."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    specials = [token for token in (pad, eos) if token is not None]
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(TRAINING_TEXT, trainer)
    options = {key: value for key, value in (("eos_token", eos), ("pad_token", pad)) if value is not None}
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **options).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_hf_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="module")
def hf_tokenizer(hf_dir: Path) -> HFTokenizer:
    return HFTokenizer(hf_dir)


@pytest.fixture(params=["byte", "hf"])
def tokenizer(request: pytest.FixtureRequest, hf_dir: Path) -> Tokenizer:
    return load_tokenizer("byte" if request.param == "byte" else str(hf_dir))


class CharTokenizer:
    """One token per character (id = code point + 2), EOS 1, pad 0; counts encode calls."""

    vocab_size = 0x3000
    eos_id: int | None = 1
    pad_id = 0

    def __init__(self) -> None:
        self.encode_calls = 0

    def encode(self, text: str) -> list[int]:
        self.encode_calls += 1
        return [ord(char) + 2 for char in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join("<eos>" if i == 1 else "<pad>" if i == 0 else chr(i - 2) for i in ids)


def take(stream: BatchStream, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(stream) for _ in range(n)]


def assert_batches_equal(first: list[dict[str, torch.Tensor]], second: list[dict[str, torch.Tensor]]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert set(a) == set(b) == set(BATCH_KEYS)
        for key in BATCH_KEYS:
            assert a[key].dtype == b[key].dtype
            assert torch.equal(a[key], b[key]), key


def check_resume(make_stream, before: int = 3, after: int = 2) -> None:
    """Take `before` batches, save; `after` more from the original equal `after` from a fresh stream loaded with
    the (JSON round-tripped) state."""
    stream = make_stream()
    take(stream, before)
    state = json.loads(json.dumps(stream.state_dict()))
    expected = take(stream, after)
    resumed = make_stream()
    resumed.load_state_dict(state)
    assert_batches_equal(take(resumed, after), expected)
    fresh_first = take(make_stream(), 1)[0]
    assert not torch.equal(fresh_first["tokens"], expected[0]["tokens"])  # resume did not just restart


def check_batch_layout(batch: dict[str, torch.Tensor], batch_size: int, seq_len: int) -> None:
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (batch_size, seq_len)
    assert batch["targets"].dtype == torch.int64 and batch["targets"].shape == (batch_size, seq_len)
    assert batch["loss_mask"].dtype == torch.float32 and batch["loss_mask"].shape == (batch_size, seq_len)
    assert batch["new_document"].dtype == torch.bool and batch["new_document"].shape == (batch_size,)


# ----------------------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_encodes_utf8_and_decodes_with_replacement() -> None:
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (256, None, 0)
    assert tok.encode("hé!") == [104, 195, 169, 33]
    assert tok.decode([104, 195, 169, 33]) == "hé!"
    assert tok.decode([104, 195]) == "h\ufffd"  # a cut multi-byte character does not raise
    with pytest.raises(ValueError, match="256"):
        tok.decode([104, 256])


def test_hf_tokenizer_from_local_directory(hf_dir: Path) -> None:
    tok = load_tokenizer(str(hf_dir))
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    backend = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = backend["model"]["vocab"]
    assert tok.vocab_size == len(vocab) == 320
    assert tok.eos_id == vocab["<eos>"] and tok.pad_id == vocab["<pad>"]
    assert tok.bos_id is None
    text = "The grass is green.\nPass key 90210, wörld ✓"
    ids = tok.encode(text)
    assert tok.eos_id not in ids and tok.pad_id not in ids  # no special tokens added
    assert tok.decode(ids) == text  # byte-level BPE is lossless
    assert len(tok.encode("The grass is green.")) < len("The grass is green.")  # merges learnt


def test_hf_tokenizer_pad_falls_back_to_eos_then_zero(tmp_path: Path) -> None:
    eos_only = HFTokenizer(save_tiny_hf_tokenizer(tmp_path / "eos_only", pad=None))
    assert eos_only.pad_id == eos_only.eos_id == 0  # "<eos>" is the only special token: id 0
    neither = HFTokenizer(save_tiny_hf_tokenizer(tmp_path / "neither", eos=None, pad=None))
    assert neither.eos_id is None and neither.pad_id == 0


def test_load_tokenizer_errors_name_the_path(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        load_tokenizer(str(missing))
    a_file = tmp_path / "tokenizer.json"
    a_file.write_text("{}")
    with pytest.raises(NotADirectoryError, match="tokenizer.json"):
        load_tokenizer(str(a_file))


# ----------------------------------------------------------------------------------------------- passkey


def test_byte_prompt_is_exactly_the_landmark_text() -> None:
    """An independent construction of the template as text: for bytes, tokens and characters coincide."""
    tok = ByteTokenizer()
    key = "48213"
    needle = NEEDLE.format(key=key)
    fixed = len(INSTRUCTION) + len(needle) + len(QUESTION) + 4
    filler_text = " ".join([FILLER] * 10)
    for filler_total, depth in [(0, 0.5), (1, 0.0), (1, 1.0), (250, 0.25), (333, 0.9)]:
        before = round(depth * filler_total)
        expected = "\n".join(
            [INSTRUCTION, filler_text[:before], needle, filler_text[: filler_total - before], QUESTION]
        )
        prompt = passkey_prompt(tok, fixed + filler_total, depth, key)
        assert tok.decode(prompt.tokens) == expected
        assert prompt.needle_start == len(INSTRUCTION) + 1 + before + 1
        assert prompt.needle_end == prompt.needle_start + len(needle)
        assert prompt.answer_tokens == list(b" 48213.")


@pytest.mark.parametrize("extra", [0, 1, 7, 250, 3001])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_prompt_length_is_token_exact(tokenizer: Tokenizer, extra: int, depth: float) -> None:
    template = PasskeyTemplate(tokenizer)
    key = "70345"
    length = template.fixed_length(key) + extra
    prompt = passkey_prompt(tokenizer, length, depth, key)
    needle = tokenizer.encode(NEEDLE.format(key=key))
    assert len(prompt.tokens) == length
    assert prompt.tokens[prompt.needle_start : prompt.needle_end] == needle
    assert prompt.tokens[: len(template.instruction)] == tokenizer.encode(INSTRUCTION)
    assert prompt.tokens[-len(template.question) :] == tokenizer.encode(QUESTION)
    assert prompt.answer_tokens == tokenizer.encode(" " + key + ".")
    text = tokenizer.decode(prompt.tokens)
    assert text.startswith(INSTRUCTION + "\n")
    assert "\n" + NEEDLE.format(key=key) + "\n" in text
    assert text.endswith("\n" + QUESTION)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.77, 1.0])
def test_needle_lands_at_requested_depth(tokenizer: Tokenizer, depth: float) -> None:
    template = PasskeyTemplate(tokenizer)
    key = "11111"
    length = 2000
    filler_total = length - template.fixed_length(key)
    prompt = passkey_prompt(tokenizer, length, depth, key)
    newline = len(template.separator)
    before = prompt.needle_start - len(template.instruction) - 2 * newline  # filler tokens before the needle
    assert abs(before - depth * filler_total) <= template.filler_period  # the specified tolerance
    assert before == round(depth * filler_total)  # and what is implemented: exact rounding
    after = length - prompt.needle_end - 2 * newline - len(template.question)
    assert before + after == filler_total
    if depth == 0.0:
        assert prompt.needle_start == len(template.instruction) + 2 * newline
    if depth == 1.0:
        assert prompt.needle_end == length - len(template.question) - 2 * newline


def test_prompt_too_short_names_the_minimum(tokenizer: Tokenizer) -> None:
    minimum = PasskeyTemplate(tokenizer).fixed_length("12345")
    assert len(passkey_prompt(tokenizer, minimum, 0.5, "12345").tokens) == minimum
    with pytest.raises(ValueError, match=f"minimum is {minimum} tokens"):
        passkey_prompt(tokenizer, minimum - 1, 0.5, "12345")
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tokenizer, minimum + 10, 1.5, "12345")


def test_million_token_prompt_builds_quickly() -> None:
    tok = ByteTokenizer()
    start = time.perf_counter()
    prompt = passkey_prompt(tok, 1_048_576, 0.5, "99999")
    elapsed = time.perf_counter() - start
    assert len(prompt.tokens) == 1_048_576
    assert elapsed < 2.0, f"1M-token prompt took {elapsed:.2f} s"
    assert tok.decode(prompt.tokens[prompt.needle_start : prompt.needle_end]) == NEEDLE.format(key="99999")
    filler_total = 1_048_576 - PasskeyTemplate(tok).fixed_length("99999")
    assert prompt.needle_start == len(INSTRUCTION) + 2 + round(0.5 * filler_total)
    # the filler just before the needle continues the space-joined sentences
    tail = tok.decode(prompt.tokens[prompt.needle_start - 1 - 300 : prompt.needle_start - 1])
    assert tail in " ".join([FILLER] * 6)


def test_random_passkey_has_exact_digits_and_no_leading_zero() -> None:
    rng = random.Random(0)
    for digits in (1, 2, 5, 9):
        keys = [random_passkey(rng, digits) for _ in range(300)]
        assert all(len(key) == digits and key.isdigit() and key[0] != "0" for key in keys)
    assert {random_passkey(rng, 1) for _ in range(500)} == set("123456789")
    with pytest.raises(ValueError, match="digits"):
        random_passkey(rng, 0)


def test_passkey_trials_are_seeded_and_tokenizer_independent(hf_tokenizer: HFTokenizer) -> None:
    byte = ByteTokenizer()
    lengths, depths = [400, 700], [0.0, 0.5, 1.0]
    first = passkey_trials(byte, lengths, depths, trials=3, seed=7)
    again = passkey_trials(byte, lengths, depths, trials=3, seed=7)
    assert len(first) == 2 * 3 * 3
    assert [(p.length, p.depth) for p in first[:4]] == [(400, 0.0)] * 3 + [(400, 0.5)]  # length, depth, trial
    assert [p.tokens for p in first] == [p.tokens for p in again]
    assert [p.passkey for p in first] == [p.passkey for p in again]
    other_seed = passkey_trials(byte, lengths, depths, trials=3, seed=8)
    assert sum(a.passkey != b.passkey for a, b in zip(first, other_seed)) >= 15
    with_hf = passkey_trials(hf_tokenizer, lengths, depths, trials=3, seed=7)
    assert [p.passkey for p in with_hf] == [p.passkey for p in first]
    assert all(len(p.tokens) == p.length for p in with_hf)
    assert len({p.passkey for p in first}) >= 15  # keys vary across trials, depths and lengths


def test_passkey_dataset_examples_are_deterministic_with_exact_masks() -> None:
    tok = ByteTokenizer()
    dataset = PasskeyDataset(tok, seq_len=300, seed=3)
    example = dataset[5]
    assert torch.equal(example["tokens"], PasskeyDataset(tok, seq_len=300, seed=3)[5]["tokens"])
    prompt = dataset.prompt(5)
    assert len(prompt.tokens) == 300 + 1 - 7  # " " + 5 digits + "."
    full = prompt.tokens + prompt.answer_tokens
    assert example["tokens"].tolist() == full[:-1]
    assert example["targets"].tolist() == full[1:]
    assert example["loss_mask"].tolist() == [0.0] * 293 + [1.0] * 7
    assert tok.decode(example["targets"][-7:].tolist()) == " " + prompt.passkey + "."
    assert tok.decode(example["tokens"][:294].tolist()).endswith("\n" + QUESTION)  # the first masked target's
    assert tok.decode(example["tokens"][293:].tolist()) == "s " + prompt.passkey  # input ends the question
    everywhere = PasskeyDataset(tok, seq_len=300, seed=3, loss_on="all")[5]
    assert everywhere["loss_mask"].tolist() == [1.0] * 300
    assert torch.equal(everywhere["tokens"], example["tokens"])
    keys_seed3 = [dataset.prompt(i).passkey for i in range(10)]
    keys_seed4 = [PasskeyDataset(tok, seq_len=300, seed=4).prompt(i).passkey for i in range(10)]
    assert keys_seed3 != keys_seed4 and len(set(keys_seed3)) == 10
    grid = PasskeyDataset(tok, seq_len=300, seed=3, depths=[0.0, 1.0])
    assert {grid.prompt(i).depth for i in range(30)} == {0.0, 1.0}
    with pytest.raises(ValueError, match="minimum is"):
        PasskeyDataset(tok, seq_len=100, seed=3)


def test_passkey_dataset_mask_with_hf_tokenizer(hf_tokenizer: HFTokenizer) -> None:
    dataset = PasskeyDataset(hf_tokenizer, seq_len=256, seed=0)
    for index in range(5):
        example, prompt = dataset[index], dataset.prompt(index)
        answer = prompt.answer_tokens
        mask = example["loss_mask"]
        assert mask.tolist() == [0.0] * (256 - len(answer)) + [1.0] * len(answer)
        assert example["targets"][mask.bool()].tolist() == answer
        assert len(prompt.tokens) + len(answer) == 257


def test_passkey_batches_resume_and_rank_split() -> None:
    dataset = PasskeyDataset(ByteTokenizer(), seq_len=256, seed=1)
    check_resume(lambda: PasskeyBatches(dataset, batch_size=2))
    single = PasskeyBatches(dataset, batch_size=2)
    assert isinstance(single, BatchStream)
    batch = next(single)
    check_batch_layout(batch, 2, 256)
    assert batch["new_document"].tolist() == [True, True]
    ranks = [PasskeyBatches(dataset, batch_size=2, rank=r, world_size=3) for r in range(3)]
    steps = [take(stream, 2) for stream in ranks]  # steps[r][n]
    for step in range(2):
        for rank in range(3):
            for row in range(2):
                index = (step * 3 + rank) * 2 + row
                assert torch.equal(steps[rank][step]["tokens"][row], dataset[index]["tokens"])
    # one process with world_size=1 and a 6-row batch sees the three ranks' rows, in rank order
    whole = next(PasskeyBatches(dataset, batch_size=6))
    assert torch.equal(whole["tokens"], torch.cat([steps[r][0]["tokens"] for r in range(3)]))
    rows = {tuple(steps[r][n]["tokens"][b].tolist()) for r in range(3) for n in range(2) for b in range(2)}
    assert len(rows) == 12  # disjoint examples
    mismatched = PasskeyBatches(dataset, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        mismatched.load_state_dict(single.state_dict())


# ----------------------------------------------------------------------------------------------- documents


def test_document_windows_exact_small_case() -> None:
    tok = CharTokenizer()
    e, p = 1, 0  # EOS and padding ids

    def ids(text: str) -> list[int]:
        return [ord(c) + 2 for c in text]

    docs = ["abcdefg", "hij", "klmnopqrstu", "vw"]
    stream = DocumentWindows(docs, tok, seq_len=3, batch_size=2, shuffle=False)
    # row 0 reads documents 0, 2; row 1 reads 1, 3; then each row starts its next epoch
    expected = [
        # (row 0 tokens, targets, mask, new), (row 1 ...)
        ((ids("abc"), ids("bcd"), [1, 1, 1], True), (ids("hij"), ids("ij") + [e], [1, 1, 1], True)),
        ((ids("def"), ids("efg"), [1, 1, 1], False), (ids("vw") + [p], ids("w") + [e, p], [1, 1, 0], True)),
        ((ids("g") + [p, p], [e, p, p], [1, 0, 0], False), (ids("hij"), ids("ij") + [e], [1, 1, 1], True)),
        ((ids("klm"), ids("lmn"), [1, 1, 1], True), (ids("vw") + [p], ids("w") + [e, p], [1, 1, 0], True)),
        ((ids("nop"), ids("opq"), [1, 1, 1], False), (ids("hij"), ids("ij") + [e], [1, 1, 1], True)),
    ]
    for step, rows in enumerate(expected):
        batch = next(stream)
        check_batch_layout(batch, 2, 3)
        for row, (tokens, targets, mask, new) in enumerate(rows):
            assert batch["tokens"][row].tolist() == tokens, (step, row)
            assert batch["targets"][row].tolist() == targets, (step, row)
            assert batch["loss_mask"][row].tolist() == mask, (step, row)
            assert bool(batch["new_document"][row]) is new, (step, row)


def make_corpus(count: int, seed: int = 0) -> list[str]:
    """Documents whose characters identify them: document i uses code points 0x100 + 64 i ... + 63.
    Lengths 0 .. 40 (an empty one and a one-character one included)."""
    rng = random.Random(seed)
    lengths = [0, 1] + [rng.randint(2, 40) for _ in range(count - 2)]
    return ["".join(chr(0x100 + 64 * i + rng.randrange(64)) for _ in range(n)) for i, n in enumerate(lengths)]


def document_of(token: int) -> int:
    return (token - 2 - 0x100) // 64


def run_epoch(stream: DocumentWindows) -> list[list[tuple[list[int], bool]]]:
    """Every row's windows of epoch 0 as (real tokens = inputs + last target, new_document), in order."""
    per_row: list[list[tuple[list[int], bool]]] = [[] for _ in range(stream.batch_size)]
    done = [False] * stream.batch_size
    while not all(done):
        batch = next(stream)
        cursors = stream.state_dict()["rows"]  # after a batch: [epoch of the emitted window, ...]
        for row in range(stream.batch_size):
            if cursors[row][0] > 0:
                done[row] = True
                continue
            n = int(batch["loss_mask"][row].sum())
            mask = batch["loss_mask"][row].tolist()
            assert mask == [1.0] * n + [0.0] * (stream.seq_len - n)  # padding only at the end
            tokens, targets = batch["tokens"][row].tolist(), batch["targets"][row].tolist()
            assert tokens[1:n] == targets[: n - 1]  # targets are the inputs shifted by one
            assert all(t == stream.tokenizer.pad_id for t in tokens[n:] + targets[n:])
            per_row[row].append((tokens[:n] + [targets[n - 1]], bool(batch["new_document"][row])))
    return per_row


def rebuild_documents(windows: list[tuple[list[int], bool]]) -> list[tuple[list[int], int]]:
    """Concatenate a row's windows back into (document, number of windows); consecutive windows of a document
    share one token."""
    documents: list[tuple[list[int], int]] = []
    for real, new in windows:
        if new:
            documents.append((list(real), 1))
        else:
            tokens, count = documents[-1]
            assert tokens[-1] == real[0]  # overlap by exactly one token
            documents[-1] = (tokens + real[1:], count + 1)
    return documents


def test_document_windows_cover_every_target_once_per_epoch() -> None:
    tok = CharTokenizer()
    docs = make_corpus(23)
    seq_len = 8
    per_row = run_epoch(DocumentWindows(docs, tok, seq_len=seq_len, batch_size=3, seed=5))
    assert all(windows[0][1] for windows in per_row)  # every row starts with a new document
    rebuilt = [doc for windows in per_row for doc in rebuild_documents(windows)]
    expected = [tok.encode(doc) + [1] for doc in docs if len(doc) >= 1]  # "" + EOS has no target: skipped
    assert sorted(tokens for tokens, _ in rebuilt) == sorted(expected)  # each document once, whole
    assert sum(len(tokens) - 1 for tokens, _ in rebuilt) == sum(len(doc) for doc in docs)  # targets: once each
    for tokens, windows in rebuilt:  # new_document only on first windows, all windows full but the last
        assert windows == -(-(len(tokens) - 1) // seq_len)
    for windows in per_row:
        for real, _ in windows:  # windows never mix documents
            assert len({document_of(t) for t in real if t != 1}) == 1
    in_order = run_epoch(DocumentWindows(docs, tok, seq_len=seq_len, batch_size=3, shuffle=False))
    rows_in_order = [[document_of(t[0]) for t, _ in rebuild_documents(w)] for w in in_order]
    assert rows_in_order == [[i for i in range(r, 23, 3) if docs[i]] for r in range(3)]  # row r: r, r+3, ...
    rows_shuffled = [[document_of(t[0]) for t, _ in rebuild_documents(w)] for w in per_row]
    assert rows_shuffled != rows_in_order


def test_document_windows_ranks_and_rows_get_disjoint_documents() -> None:
    tok = CharTokenizer()
    docs = make_corpus(30, seed=1)
    seen: list[set[int]] = []
    for rank in range(2):
        stream = DocumentWindows(docs, tok, seq_len=6, batch_size=2, rank=rank, world_size=2, seed=9)
        for windows in run_epoch(stream):
            seen.append({document_of(real[0]) for real, new in windows if new})
    assert sum(len(s) for s in seen) == len(set().union(*seen))  # no document in two rows or ranks
    assert set().union(*seen) == {i for i, doc in enumerate(docs) if doc}  # together: the whole corpus


def test_document_windows_resume_tokenize_lazily_and_reshuffle() -> None:
    docs = make_corpus(12, seed=2)
    check_resume(lambda: DocumentWindows(docs, CharTokenizer(), seq_len=5, batch_size=2, seed=4), before=9, after=6)
    tok = CharTokenizer()
    stream = DocumentWindows(docs, tok, seq_len=1000, batch_size=2, seed=4)
    assert isinstance(stream, BatchStream)
    next(stream)
    assert tok.encode_calls == 2  # one document per row, not the corpus
    epoch0 = [stream.document_index(r, 0, k) for r in range(2) for k in range(6)]
    epoch1 = [stream.document_index(r, 1, k) for r in range(2) for k in range(6)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))  # each epoch is a permutation
    assert epoch0 != epoch1  # reshuffled
    assert stream.document_index(0, 0, 6) is None  # 12 documents / 2 rows: 6 each
    for _ in range(6):  # 7 windows: each row had at most 6 documents in epoch 0
        next(stream)
    assert [cursor[0] for cursor in stream.state_dict()["rows"]] == [1, 1]  # rows moved on to epoch 1
    other_rank = DocumentWindows(docs, CharTokenizer(), seq_len=5, batch_size=2, rank=1, world_size=2, seed=4)
    with pytest.raises(ValueError, match="rank"):
        other_rank.load_state_dict(DocumentWindows(docs, tok, 5, 2, rank=0, world_size=2, seed=4).state_dict())


def test_document_windows_need_enough_documents() -> None:
    with pytest.raises(ValueError, match="at least world_size \\* batch_size = 4 documents"):
        DocumentWindows(["a", "b", "c"], CharTokenizer(), seq_len=4, batch_size=2, world_size=2)


# ----------------------------------------------------------------------------------------------- loading


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_load_documents_from_txt_jsonl_parquet(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    books = tmp_path / "books"
    books.mkdir()
    texts = ["First book.\nSecond line.\n\nNew paragraph.\n", "Second book, one line."]
    for name, text in zip(["a.txt", "b.txt"], texts):
        (books / name).write_text(text)
    (books / "README.md").write_text("not a document")
    (books / ".hidden.txt").write_text("skipped")
    docs = load_documents(str(books), cache_dir=cache)
    assert docs["text"] == texts  # one document per file, sorted by path, newlines kept
    lines = load_documents(str(books / "a.txt"), cache_dir=cache, txt_sample_by="line")
    assert lines["text"] == ["First book.", "Second line.", "", "New paragraph."]

    rows = [{"text": "alpha beta", "title": "A"}, {"text": "gamma", "title": "B"}]
    jsonl = write_jsonl(tmp_path / "pg" / "shard.jsonl", rows)
    from_jsonl = load_documents(str(jsonl), cache_dir=cache)
    assert from_jsonl["text"] == ["alpha beta", "gamma"] and from_jsonl["title"] == ["A", "B"]
    assert load_documents(str(tmp_path / "pg" / "*.jsonl"), cache_dir=cache)["text"] == ["alpha beta", "gamma"]

    pyarrow_parquet = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    table = pyarrow.table({"text": ["one", "two", "three"], "short_book_title": ["x", "y", "z"]})
    pyarrow_parquet.write_table(table, str(tmp_path / "train-00000-of-00001.parquet"))
    parquet = load_documents(str(tmp_path / "train-00000-of-00001.parquet"), cache_dir=cache)
    assert parquet["text"] == ["one", "two", "three"]

    # windows over a loaded dataset read its text field
    stream = DocumentWindows(parquet, ByteTokenizer(), seq_len=8, batch_size=1, shuffle=False)
    assert bytes(next(stream)["tokens"][0][:2].tolist()) == b"on"


def test_load_documents_picks_the_split(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    pg19 = tmp_path / "pg19"
    for split, text in [("train", "training book"), ("validation", "validation book"), ("test", "test book")]:
        (pg19 / split).mkdir(parents=True)
        (pg19 / split / "1.txt").write_text(text)
    assert load_documents(str(pg19), "validation", cache_dir=cache)["text"] == ["validation book"]
    assert load_documents(str(pg19), "test", cache_dir=cache)["text"] == ["test book"]
    named = tmp_path / "named"
    write_jsonl(named / "train.jsonl", [{"text": "t"}])
    write_jsonl(named / "validation.jsonl", [{"text": "v"}])
    assert load_documents(str(named), "validation", cache_dir=cache)["text"] == ["v"]
    write_jsonl(named / "train.jsonl", [{"text": "t0"}, {"text": "t1"}, {"text": "t2"}])
    assert load_documents(str(named), "train[1:]", cache_dir=cache)["text"] == ["t1", "t2"]  # sliced split
    with pytest.raises(FileNotFoundError, match="none for split 'test'"):
        load_documents(str(named), "test", cache_dir=cache)


def test_load_documents_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "books.jsonl"
    with pytest.raises(FileNotFoundError, match="nowhere/books.jsonl"):
        load_documents(str(missing))
    with pytest.raises(FileNotFoundError, match="no files match"):
        load_documents(str(tmp_path / "*.parquet"))
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"content": "x", "title": "t"}])
    with pytest.raises(MissingFieldError, match=r"no field 'text'.*\['content', 'title'\]"):
        load_documents(str(wrong), cache_dir=str(tmp_path / "cache"))
    mixed = tmp_path / "mixed"
    write_jsonl(mixed / "a.jsonl", [{"text": "x"}])
    (mixed / "b.txt").write_text("y")
    with pytest.raises(ValueError, match="mixes file types"):
        load_documents(str(mixed))
    assert not is_local_source("deepmind/pg19") and is_local_source("./pg19") and is_local_source("x.parquet")


# ----------------------------------------------------------------------------------------------- booksum


def test_load_booksum_book_level_groups_references(tmp_path: Path) -> None:
    rows = [
        {"bid": 101, "source": "cliffnotes", "title": "Emma", "summary": "Emma meddles.", "book": "EMMA TEXT"},
        {"bid": 101, "source": "sparknotes", "title": "Emma", "summary": "Matchmaking.", "book": "EMMA TEXT"},
        {"bid": 202, "source": "gradesaver", "title": "Dracula", "summary": "A count.", "book": "DRACULA"},
        {"bid": 303, "source": "gradesaver", "title": "Blank", "summary": "", "book": "NO SUMMARY"},
    ]
    path = write_jsonl(tmp_path / "test.jsonl", rows)
    examples = load_booksum(str(path), "test", "book", cache_dir=str(tmp_path / "cache"))
    assert examples == [
        SummarizationExample("101", "EMMA TEXT", ["Emma meddles.", "Matchmaking."]),
        SummarizationExample("202", "DRACULA", ["A count."]),
    ]
    without_book = write_jsonl(tmp_path / "bad" / "test.jsonl", [{"bid": 1, "summary": "s", "text": "t"}])
    with pytest.raises(MissingFieldError, match=r"no field 'book'.*\['bid', 'summary', 'text'\]"):
        load_booksum(str(without_book), "test", "book", cache_dir=str(tmp_path / "cache"))


def test_load_booksum_chapter_level(tmp_path: Path) -> None:
    def row(book_id: str, source: str, chapter: str, summary: str) -> dict:
        return {"bid": 7, "book_id": book_id, "source": source, "summary_id": book_id.split(".")[-1],
                "chapter": chapter, "summary_text": summary, "is_aggregate": False}

    rows = [
        row("Emma.chapter 1", "sparknotes", "Chapter one text.", "Emma is introduced."),
        row("Emma.chapter 2", "sparknotes", "Chapter two text.", "Harriet appears."),
        row("Emma.chapter 1", "gradesaver", "Chapter one text.", "We meet Emma."),
        row("Emma.chapter 1", "cliffnotes", "Chapter one text.", "Emma is introduced."),  # duplicate text
    ]
    path = write_jsonl(tmp_path / "chapters" / "train.jsonl", rows)
    examples = load_booksum(str(tmp_path / "chapters"), "train", "chapter", cache_dir=str(tmp_path / "cache"))
    assert examples == [
        SummarizationExample("Emma.chapter 1", "Chapter one text.", ["Emma is introduced.", "We meet Emma."]),
        SummarizationExample("Emma.chapter 2", "Chapter two text.", ["Harriet appears."]),
    ]
    no_summary = write_jsonl(tmp_path / "x.jsonl", [{"chapter": "c", "summary": "s"}])
    with pytest.raises(MissingFieldError, match=r"no field 'summary_text'.*\['chapter', 'summary'\]"):
        load_booksum(str(no_summary), "train", "chapter", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="level"):
        load_booksum(str(path), "train", "paragraph")


def test_summarization_prompt_truncates_the_document_but_keeps_the_separator() -> None:
    tok = ByteTokenizer()
    separator = list(SUMMARY_SEPARATOR.encode())
    assert summarization_prompt(tok, "abcdef", 100) == list(b"abcdef") + separator
    assert summarization_prompt(tok, "abcdef", len(separator) + 3) == list(b"abc") + separator
    with pytest.raises(ValueError, match=f"separator's {len(separator)} tokens"):
        summarization_prompt(tok, "abcdef", len(separator))


def test_summarization_loss_mask_covers_summary_tokens_only(hf_tokenizer: HFTokenizer) -> None:
    tok = ByteTokenizer()
    document, summary = "Once upon a time.", "A tale."
    tokens, targets, mask = summarization_row(tok, document, summary, seq_len=64, max_input_tokens=40)
    prompt_len = len(document) + len(SUMMARY_SEPARATOR)  # 28: no truncation needed
    assert mask.tolist() == [0.0] * (prompt_len - 1) + [1.0] * len(summary) + [0.0] * (64 - prompt_len - 6)
    assert bytes(targets[mask.bool()].tolist()) == b"A tale."
    assert bytes(tokens[: prompt_len + 6].tolist()) == (document + SUMMARY_SEPARATOR + "A tale").encode()
    assert tokens[prompt_len + 6 :].eq(0).all() and targets[prompt_len + 7 - 1 :].eq(0).all()
    # truncated summary: the mask runs to the end of the row
    _, targets, mask = summarization_row(tok, document, summary * 10, seq_len=32, max_input_tokens=30)
    assert mask.tolist() == [0.0] * 27 + [1.0] * 5
    assert bytes(targets[27:].tolist()) == b"A tal"
    # a tokenizer with EOS: the summary then EOS are the only targets with loss
    tokens, targets, mask = summarization_row(hf_tokenizer, document, summary, seq_len=64, max_input_tokens=40)
    expected = hf_tokenizer.encode(summary) + [hf_tokenizer.eos_id]
    assert targets[mask.bool()].tolist() == expected
    prompt = summarization_prompt(hf_tokenizer, document, 40)
    first = len(prompt) - 1
    assert mask.nonzero().flatten().tolist() == list(range(first, first + len(expected)))
    assert tokens[: len(prompt)].tolist() == prompt


def test_summarization_batches_resume_and_rank_split() -> None:
    examples = [SummarizationExample(str(i), f"document {i}", [f"summary {i}a", f"summary {i}b"]) for i in range(4)]
    tok = ByteTokenizer()
    check_resume(lambda: SummarizationBatches(examples, tok, seq_len=48, batch_size=2, max_input_tokens=30, seed=3))
    seen = []
    for rank in range(2):
        stream = SummarizationBatches(examples, tok, 48, 2, 30, rank=rank, world_size=2, seed=3)
        assert isinstance(stream, BatchStream)
        for batch in take(stream, 2):  # 2 steps x 2 ranks x 2 rows = the 8 (document, summary) items
            check_batch_layout(batch, 2, 48)
            assert batch["new_document"].tolist() == [True, True]
            for row in range(2):
                summary = bytes(batch["targets"][row][batch["loss_mask"][row].bool()].tolist()).decode()
                first_target = int(batch["loss_mask"][row].nonzero()[0])  # the prompt's last token is input there
                prompt = bytes(batch["tokens"][row][: first_target + 1].tolist()).decode()
                assert prompt.startswith("document " + summary[8]) and prompt.endswith(SUMMARY_SEPARATOR)
                seen.append(summary)
    assert sorted(seen) == sorted(f"summary {i}{r}" for i in range(4) for r in "ab")  # disjoint and complete
    with pytest.raises(ValueError, match="max_input_tokens"):
        SummarizationBatches(examples, tok, seq_len=16, batch_size=1, max_input_tokens=17)


def test_passkey_dataset_answer_weight_scales_only_the_answer_targets():
    tokenizer = ByteTokenizer()
    plain = PasskeyDataset(tokenizer, 512, seed=3, loss_on="all")
    weighted = PasskeyDataset(tokenizer, 512, seed=3, loss_on="all", answer_weight=20.0)
    n_answer = len(weighted.prompt(0).answer_tokens)
    mask = weighted[0]["loss_mask"]
    assert torch.equal(weighted[0]["tokens"], plain[0]["tokens"])
    assert mask[-n_answer:].tolist() == [20.0] * n_answer
    assert torch.equal(mask[:-n_answer], plain[0]["loss_mask"][:-n_answer])
    answer_only = PasskeyDataset(tokenizer, 512, seed=3, loss_on="answer", answer_weight=2.0)[0]["loss_mask"]
    assert answer_only.sum() == 2.0 * n_answer and answer_only[:-n_answer].sum() == 0
    with pytest.raises(ValueError, match="answer_weight must be positive"):
        PasskeyDataset(tokenizer, 512, seed=3, answer_weight=0.0)


def test_passkey_length_mix_is_per_step_identical_across_ranks_and_resumable():
    tokenizer = ByteTokenizer()
    datasets = [PasskeyDataset(tokenizer, length, seed=5) for length in (256, 320, 384)]
    ranks = [PasskeyBatches(datasets, batch_size=2, rank=r, world_size=2) for r in range(2)]
    lengths = [[next(stream)["tokens"].shape[1] for _ in range(30)] for stream in ranks]
    assert lengths[0] == lengths[1]  # every rank runs the same length at the same step
    assert set(lengths[0]) == {256, 320, 384}
    assert lengths[0] == [ranks[0].dataset_at(step).seq_len for step in range(30)]
    single = PasskeyBatches(datasets[1], batch_size=2)
    assert {next(single)["tokens"].shape[1] for _ in range(5)} == {320}
    stream = PasskeyBatches(datasets, batch_size=2)
    for _ in range(4):
        next(stream)
    state = json.loads(json.dumps(stream.state_dict()))
    expected = [next(stream) for _ in range(3)]
    resumed = PasskeyBatches(datasets, batch_size=2)
    resumed.load_state_dict(state)
    for batch, again in zip(expected, (next(resumed) for _ in range(3))):
        assert all(torch.equal(batch[k], again[k]) for k in batch)
    with pytest.raises(ValueError, match="different configuration"):
        PasskeyBatches(datasets[:2], batch_size=2).load_state_dict(state)


def test_passkey_uniform_answer_offset_moves_the_answer_across_segment_offsets():
    tokenizer = ByteTokenizer()
    plain = PasskeyDataset(tokenizer, 512, seed=2)
    jittered = PasskeyDataset(tokenizer, 512, seed=2, answer_offset="uniform", segment_len=64)
    ends = set()
    for i in range(800):
        prompt, example = jittered.prompt(i), jittered[i]
        n = len(prompt.tokens)
        assert 512 + 1 - 7 - 63 <= n <= 512 + 1 - 7
        assert prompt.passkey == plain.prompt(i).passkey and prompt.depth == plain.prompt(i).depth
        answer = example["loss_mask"].nonzero().flatten().tolist()
        assert answer == list(range(n - 1, n + 6))  # the 7 answer targets, right after the prompt
        assert tokenizer.decode(example["targets"][n - 1 : n + 6].tolist()) == f" {prompt.passkey}."
        assert example["tokens"][n + 6 :].eq(0).all()  # padding after the answer
        ends.add(n % 64)
    assert len(ends) == 64  # the answer starts at every offset of a 64-token segment, boundary included
    with pytest.raises(ValueError, match="minimum"):
        PasskeyDataset(tokenizer, 260, seed=2, answer_offset="uniform", segment_len=64)
