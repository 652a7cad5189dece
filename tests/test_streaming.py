"""Streamed corpora (data/streaming.py, data.streaming=true): the same batches as the indexed DocumentWindows where
the two take documents in the same order (one row per rank), exact resume of the stream position (mid-document,
across an epoch, through JSON as in a checkpoint), disjoint ranks, and a training run that resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

import train
from data.streaming import StreamedDocumentWindows, load_document_stream
from data.text import DocumentWindows, MissingFieldError, load_documents
from data.tokenizer import ByteTokenizer

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture
def corpus(tmp_path) -> Path:
    """7 documents of growing length in train.jsonl (and 3 in validation.jsonl)."""
    for split, n in (("train", 7), ("validation", 3)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": f"{split} document {i}: " + "lorem ipsum " * (2 * i)}) + "\n")
    return tmp_path


def stream(corpus: Path, batch_size: int, rank: int = 0, world_size: int = 1) -> StreamedDocumentWindows:
    documents = load_document_stream(str(corpus), "train", cache_dir=str(corpus / "cache"))
    return StreamedDocumentWindows(documents, ByteTokenizer(), 16, batch_size, rank, world_size)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_streamed_equals_indexed_batches(corpus):
    indexed = DocumentWindows(load_documents(str(corpus), "train", cache_dir=str(corpus / "cache")), ByteTokenizer(),
                              16, 1, shuffle=False)
    streamed = stream(corpus, 1)
    for step in range(40):  # several epochs of the 7 documents
        assert same(next(indexed), next(streamed)), step


@pytest.mark.parametrize("stop", [1, 6, 13])
def test_resume_is_exact(corpus, stop):
    reference = stream(corpus, 3)
    expected = [next(reference) for _ in range(24)]
    first = stream(corpus, 3)
    for _ in range(stop):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # as the trainer stores it
    resumed = stream(corpus, 3)
    resumed.load_state_dict(state)
    for step in range(stop, 24):
        assert same(next(resumed), expected[step]), step


def test_rows_take_each_document_once_per_epoch_and_ranks_are_disjoint(corpus):
    def documents_seen(s: StreamedDocumentWindows, steps: int) -> list[str]:
        starts = []
        for _ in range(steps):
            batch = next(s)
            for row in range(s.batch_size):
                if batch["new_document"][row]:
                    starts.append(bytes(batch["tokens"][row, :20].tolist()).decode().split(":")[0])
        return starts

    one_epoch = documents_seen(stream(corpus, 2), 4)  # 2 rows take the first documents in stream order
    assert one_epoch[:2] == ["train document 0", "train document 1"]
    rank0, rank1 = (documents_seen(stream(corpus, 1, rank, 2), 4) for rank in (0, 1))
    assert rank0[:2] == ["train document 0", "train document 2"] and rank1[:2] == ["train document 1",
                                                                                    "train document 3"]


def test_bad_input_is_named(corpus):
    with pytest.raises(MissingFieldError, match="no field 'body'"):
        documents = load_document_stream(str(corpus), "train", cache_dir=str(corpus / "cache"))
        next(StreamedDocumentWindows(documents, ByteTokenizer(), 16, 1, text_field="body"))
    with pytest.raises(TypeError, match="IterableDataset"):
        StreamedDocumentWindows(["a", "b"], ByteTokenizer(), 16, 1)


def test_training_with_a_streamed_corpus_resumes_exactly(corpus, tmp_path):
    extra = ["data=pg19", f"data.source={corpus}", "data.streaming=true", "data.seq_len=64",
             "model.segment_len=32", "trainer.carry_state=true", "trainer.max_steps=6"]

    def run(run_dir: Path, *more: str):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return train.train(compose("train", overrides=["name=test", "debug=smoke", f"trainer.run_dir={run_dir}",
                                                           *extra, *more]))

    full = run(tmp_path / "full")
    run(tmp_path / "run", "trainer.ckpt_every=3")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000006")
    resumed = run(tmp_path / "run")
    assert resumed["resumed_from"].endswith("step_00000003")
    assert [resumed["losses"][s] for s in (4, 5, 6)] == [full["losses"][s] for s in (4, 5, 6)]
    with pytest.raises(ConfigCompositionException, match="data.streaming"):  # a field of the text kind only
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            compose("train", overrides=["debug=smoke", "data=booksum", "data.streaming=true"])
