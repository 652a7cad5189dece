"""Corpus builder: splits by a stable hash of the relative path (disjoint, unmoved by other files, independent of
where the directory lies), the document loader reads them, the default corpus is the standard library."""

import hashlib
import json
from pathlib import Path

import pytest

from data.corpus import CorpusConfig, build_corpus, corpus_files, default_source, hash_fraction, main, split_of
from data.text import DocumentWindows, load_documents
from data.tokenizer import ByteTokenizer

FRACTIONS = dict(validation_fraction=0.2, test_fraction=0.2)


def make_tree(root: Path, n: int = 40) -> dict[str, str]:
    """n .py files in nested folders plus files the builder must skip; returns {relative path: text} of the kept."""
    kept = {}
    for i in range(n):
        relative = f"pkg{i % 3}/sub{i % 2}/module_{i}.py"
        text = f"# module {i}\n" + "".join(f"def f{j}():\n    return {i * j}\n" for j in range(i % 5 + 1))
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
        kept[relative] = text
    for skipped in ("site-packages/x.py", "__pycache__/y.py", "test/test_z.py", ".hidden/a.py", "notes.txt",
                    "pkg0/.secret.py", "empty.py"):
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        (root / skipped).write_text("" if skipped == "empty.py" else "print('skip me')\n")
    (root / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))  # not UTF-8: skipped, listed
    return kept


def read_split(out: Path, split: str) -> dict[str, str]:
    return {row["path"]: row["text"] for row in map(json.loads, (out / f"{split}.jsonl").read_text().splitlines())}


def test_split_is_by_the_hash_of_the_relative_path_and_disjoint(tmp_path):
    kept = make_tree(tmp_path / "src")
    manifest = build_corpus(tmp_path / "out", CorpusConfig(source=str(tmp_path / "src"), **FRACTIONS))
    splits = {split: read_split(tmp_path / "out", split) for split in ("train", "validation", "test")}
    assert sum(map(len, splits.values())) == len(kept)
    assert {p: t for rows in splits.values() for p, t in rows.items()} == kept  # every kept file once, verbatim
    for split, rows in splits.items():
        assert rows, split
        assert manifest["splits"][split] == {"files": len(rows), "chars": sum(map(len, rows.values()))}
        for path in rows:  # recomputed here from the definition
            u = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") / 2**64
            assert split == ("test" if u < 0.2 else "validation" if u < 0.4 else "train")
    assert manifest["skipped_not_utf8"] == ["latin1.py"]
    # pinned: the same on every machine and Python version (sha256, not hash())
    assert hash_fraction("os.py") == pytest.approx(0.850948727781281, abs=1e-12)
    assert split_of("os.py", 0.05, 0.05) == "train" and split_of("json/decoder.py", 0.2, 0.05) == "validation"


def test_split_is_stable_across_runs_locations_and_added_files(tmp_path):
    make_tree(tmp_path / "a")
    build_corpus(tmp_path / "out1", CorpusConfig(source=str(tmp_path / "a"), **FRACTIONS))
    build_corpus(tmp_path / "out2", CorpusConfig(source=str(tmp_path / "a"), **FRACTIONS))
    for split in ("train", "validation", "test"):
        first, second = (tmp_path / "out1" / f"{split}.jsonl"), (tmp_path / "out2" / f"{split}.jsonl")
        assert first.read_bytes() == second.read_bytes()
    (tmp_path / "a").rename(tmp_path / "moved")  # another location, more files
    for i in range(40, 60):
        (tmp_path / "moved" / f"extra_{i}.py").write_text(f"x = {i}\n")
    build_corpus(tmp_path / "out3", CorpusConfig(source=str(tmp_path / "moved"), **FRACTIONS))
    for split in ("train", "validation", "test"):
        before, after = read_split(tmp_path / "out1", split), read_split(tmp_path / "out3", split)
        assert before.items() <= after.items()  # no old file moved to another split


def test_the_document_loader_reads_the_splits(tmp_path):
    kept = make_tree(tmp_path / "src")
    build_corpus(tmp_path / "out", CorpusConfig(source=str(tmp_path / "src"), **FRACTIONS))
    documents = load_documents(str(tmp_path / "out"), "validation")
    assert sorted(documents["path"]) == sorted(read_split(tmp_path / "out", "validation"))
    windows = DocumentWindows(documents, ByteTokenizer(), seq_len=16, batch_size=2, shuffle=False)
    batch = next(windows)
    first = documents[0]["text"].encode()
    assert batch["tokens"][0].tolist() == list(first[:16]) and batch["new_document"].all()
    assert all(text in kept.values() for text in documents["text"])


def test_default_source_is_the_standard_library():
    files = corpus_files(default_source(), [".py"], CorpusConfig().exclude)
    assert {"os.py", "json/decoder.py", "collections/__init__.py"} <= set(files)
    assert not any(p.startswith(("test/", "site-packages/")) or "/__pycache__/" in p for p in files)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        build_corpus(tmp_path / "o", CorpusConfig(source=str(tmp_path / "missing")))
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match=r"got no file of the 1 read"):
        build_corpus(tmp_path / "o", CorpusConfig(source=str(tmp_path / "one")))
    with pytest.raises(ValueError, match="validation_fraction \\+ test_fraction must be < 1"):
        CorpusConfig(validation_fraction=0.5, test_fraction=0.5)


def test_command_line(tmp_path, capsys):
    make_tree(tmp_path / "src")
    main([str(tmp_path / "out"), "--source", str(tmp_path / "src"), "--validation-fraction", "0.2",
          "--test-fraction", "0.2"])
    printed = capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert f"train: {manifest['splits']['train']['files']} files" in printed
    assert manifest["config"]["exclude"] == CorpusConfig().exclude
