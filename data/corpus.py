"""Real long documents with no download: a directory of text files -> train / validation / test JSONL splits for the
document loader (data/text.py: load_documents(out_dir, split) reads <out_dir>/<split>.jsonl, field "text").

Default corpus: the Python standard library's own sources (sysconfig's "stdlib" path of the running interpreter),
long files nobody here wrote, with dependencies across thousands of tokens (imports, names and classes defined far
earlier). Any directory works (--source).

A file's split is a function of its path relative to the source directory only: u = the first 8 bytes of
sha256(relative POSIX path) as a fraction of 2^64; test if u < test_fraction, validation if u < test_fraction +
validation_fraction, else train. So the split is stable across machines, runs and file-system order, disjoint by
construction, and adding or removing files never moves another file between splits.

    python -m data.corpus corpora/stdlib                     # the standard library's .py files
    python -m data.corpus corpora/notes --source ~/notes --suffix .md --suffix .txt

Writes <out>/train.jsonl, validation.jsonl, test.jsonl (rows {"path", "text"} sorted by path) and manifest.json
(source, interpreter version, fractions, per-split file and character counts, files skipped as not UTF-8).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sysconfig
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SPLITS = ("train", "validation", "test")


@dataclass
class CorpusConfig:
    source: str | None = None
    """Directory of text files; None: the running interpreter's standard library (sysconfig "stdlib")."""
    suffixes: list[str] = field(default_factory=lambda: [".py"])
    """File name endings to read (case-sensitive)."""
    exclude: list[str] = field(default_factory=lambda: ["site-packages", "dist-packages", "__pycache__", "test",
                                                        "tests"])
    """Directory names skipped anywhere below the source (with hidden ones). The stdlib's test suite is half of it
    and mostly short files: excluded by default."""
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    min_chars: int = 1
    """Files with fewer characters are skipped (empty __init__.py files)."""

    def __post_init__(self) -> None:
        for name in ("validation_fraction", "test_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"corpus {name} must lie in (0, 1), got {getattr(self, name)}")
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError(f"corpus validation_fraction + test_fraction must be < 1, got "
                             f"{self.validation_fraction} + {self.test_fraction}")
        if not self.suffixes:
            raise ValueError("corpus suffixes is empty: name at least one file ending, e.g. .py")


def default_source() -> Path:
    """The standard library directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def hash_fraction(relative_path: str) -> float:
    """sha256 of the relative POSIX path, first 8 bytes, as a fraction in [0, 1)."""
    return int.from_bytes(hashlib.sha256(relative_path.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(relative_path: str, validation_fraction: float, test_fraction: float) -> str:
    """The split of a file, by its path relative to the corpus root (module docstring)."""
    u = hash_fraction(relative_path)
    return "test" if u < test_fraction else "validation" if u < test_fraction + validation_fraction else "train"


def corpus_files(source: Path, suffixes: Sequence[str], exclude: Sequence[str]) -> list[str]:
    """Relative POSIX paths of the files to read, sorted: matching suffixes, no excluded or hidden directory or
    file on the way."""
    if not source.is_dir():
        raise NotADirectoryError(f"corpus source {str(source)!r} is not a directory")
    found = []
    for directory, subdirectories, names in os.walk(source):
        # prune hidden and excluded directories before descending (the stdlib's test/ is half its files)
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".") and d not in exclude]
        relative = Path(directory).relative_to(source)
        found += [(relative / name).as_posix() for name in names
                  if not name.startswith(".") and name.endswith(tuple(suffixes))
                  and (Path(directory) / name).is_file()]
    return sorted(found)


def build_corpus(out_dir: str | Path, cfg: CorpusConfig | None = None) -> dict[str, Any]:
    """Write the three splits and manifest.json into out_dir; return the manifest."""
    cfg = cfg or CorpusConfig()
    source = Path(cfg.source).expanduser() if cfg.source is not None else default_source()
    files = corpus_files(source, cfg.suffixes, cfg.exclude)
    rows: dict[str, list[dict[str, str]]] = {split: [] for split in SPLITS}
    skipped: list[str] = []
    for relative in files:
        try:
            text = (source / relative).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            skipped.append(relative)
            continue
        if len(text) >= cfg.min_chars:
            rows[split_of(relative, cfg.validation_fraction, cfg.test_fraction)].append({"path": relative,
                                                                                         "text": text})
    empty = [split for split in SPLITS if not rows[split]]
    if empty:
        raise ValueError(f"corpus {str(source)!r}: split(s) {empty} got no file of the {sum(map(len, rows.values()))} "
                         f"read (suffixes {cfg.suffixes}); use a larger directory or larger fractions")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        with (out / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for row in rows[split]:
                f.write(json.dumps(row) + "\n")
    manifest = {
        "source": str(source),
        "python": platform.python_version() if cfg.source is None else None,
        "config": asdict(cfg),
        "splits": {split: {"files": len(rows[split]), "chars": sum(len(r["text"]) for r in rows[split])}
                   for split in SPLITS},
        "skipped_not_utf8": skipped,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="where train/validation/test.jsonl and manifest.json go")
    parser.add_argument("--source", default=None, help="directory of text files (default: the Python stdlib)")
    parser.add_argument("--suffix", action="append", dest="suffixes", help="file ending to read (repeatable; "
                        "default .py)")
    parser.add_argument("--exclude", action="append", help="directory name to skip (repeatable; replaces the "
                        "default site-packages, dist-packages, __pycache__, test, tests)")
    parser.add_argument("--validation-fraction", type=float, default=0.05)
    parser.add_argument("--test-fraction", type=float, default=0.05)
    args = parser.parse_args(argv)
    defaults = CorpusConfig()
    cfg = CorpusConfig(source=args.source, suffixes=args.suffixes or defaults.suffixes,
                       exclude=args.exclude if args.exclude is not None else defaults.exclude,
                       validation_fraction=args.validation_fraction, test_fraction=args.test_fraction)
    manifest = build_corpus(args.out_dir, cfg)
    for split, counts in manifest["splits"].items():
        print(f"{split}: {counts['files']} files, {counts['chars']} characters")
    print(f"wrote {args.out_dir} (source {manifest['source']})")


if __name__ == "__main__":
    main()
