"""The arithmetic behind benchmark tables that README quotes: benchmarks/train_throughput.py's per-round pairing and
its pooling of several result files (the measurements themselves are not tests)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_train_throughput():
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))  # it imports benchmarks/common.py
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def run(trial: int, variant: str, step_s: float, length: int = 8192) -> dict:
    return {"trial": trial, "variant": variant, "length": length, "step_s": step_s}


def test_paired_ratios_are_taken_within_a_round_and_skip_rounds_without_the_reference():
    tt = load_train_throughput()
    runs = [run(0, "ours", 2.0), run(0, "peer", 3.0),  # 1.5x
            run(1, "ours", 4.0), run(1, "peer", 5.0),  # a slow round: 1.25x
            run(2, "ours", 1.0),  # the peer failed in round 2: no pair
            run(3, "ours", 1.0), {"trial": 3, "variant": "peer", "length": 8192, "error": ["killed"]},
            run(0, "ours", 9.0, length=32768), run(0, "peer", 9.0, length=32768)]  # another length
    assert tt.paired(runs, "ours", "peer", 8192) == [1.5, 1.25]
    assert tt.paired(runs, "ours", "peer", 32768) == [1.0]
    # the other way round: the reciprocals, round by round
    assert tt.paired(runs, "peer", "ours", 8192) == [2 / 3, 4 / 5]


def test_pool_keeps_runs_apart_by_source_and_rejects_mixed_shapes(tmp_path):
    tt = load_train_throughput()
    shape = {"batch": 2, "dim": 256, "dtype": "bfloat16"}

    def report(name: str, runs: list[dict], **changes) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps({"shape": shape | changes, "runs": runs, "started_utc": "t", "command": "c"}))
        return path

    a = report("a.json", [run(0, "infini-linear", 2.0), run(0, "peer", 3.0), run(0, "local", 1.0)])
    b = report("b.json", [run(0, "infini-linear", 1.0), run(0, "peer", 2.0), run(0, "local", 1.0)])
    pooled = tt.pool([a, b])
    rows = {row["variant"]: row for row in pooled["results"]}
    # trial 0 of a and trial 0 of b are two rounds, never paired across files
    assert rows["infini-linear"]["speed_vs_peer"] == {"median": 1.75, "min": 1.5, "max": 2.0, "rounds": 2}
    assert rows["infini-linear"]["speed_vs_local"] == {"median": 0.75, "min": 0.5, "max": 1.0, "rounds": 2}
    assert "speed_vs_peer" not in rows["peer"] and pooled["dtype"] == "bfloat16"
    with pytest.raises(SystemExit, match="one dtype and shape"):
        tt.pool([a, report("c.json", [], dtype="float32")])
