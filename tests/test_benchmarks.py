"""The arithmetic behind benchmark tables that README quotes: benchmarks/train_throughput.py's per-round pairing and
its pooling of several result files, benchmarks/attention_kernels.py's FLOP count and summary (the measurements
themselves are not tests)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str = "train_throughput"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
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
    tt = load_benchmark()
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
    tt = load_benchmark()
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


def test_attention_kernels_counts_causal_flops_and_summarises_medians_against_sdpa_fp32():
    ak = load_benchmark("attention_kernels")
    # 1 segment, 1 head, N = 4, D = 2: 10 visible (query, key) pairs, 2 products of 2 x D FLOPs each = 80 forward
    assert ak.causal_flops(1, 1, 4, 2) == (80.0, 200.0)
    assert ak.cases()["bench32k"] == (22, 4, 512, 64) and ak.cases()["n2048_d128"] == (5, 4, 2048, 128)

    def timed(trial: int, kernel: str, forward_s: float, backward_s: float) -> dict:
        return {"case": "n1024_d64", "kernel": kernel, "trial": trial, "forward_s": forward_s, "backward_s": backward_s}

    runs = [timed(0, "sdpa_fp32", 0.1, 0.3), timed(1, "sdpa_fp32", 0.2, 0.4), timed(2, "sdpa_fp32", 0.1, 0.1),
            timed(0, "sdpa_bf16", 0.05, 0.15), timed(1, "sdpa_bf16", 0.1, 0.2), timed(2, "sdpa_bf16", 0.1, 0.3),
            {"case": "n1024_d64", "kernel": "eager_fp32", "trial": 0, "error": ["killed"]}]
    rows = {row["kernel"]: row for row in ak.summarise(runs, {"float32": 100.0, "bfloat16": 400.0})}
    assert set(rows) == {"sdpa_fp32", "sdpa_bf16"}  # a failed kernel has no row
    fp32, bf16 = rows["sdpa_fp32"], rows["sdpa_bf16"]
    assert fp32["trials"] == 3
    assert fp32["forward_ms"] == pytest.approx(100) and fp32["backward_ms"] == pytest.approx(300)
    assert fp32["total_ms"] == pytest.approx(400) and bf16["total_ms"] == pytest.approx(300)  # medians of the sums
    flops = sum(ak.causal_flops(11, 4, 1024, 64))
    assert fp32["causal_gflops"] == pytest.approx(flops / 0.4 / 1e9)
    assert fp32["fraction_of_matmul_peak"] == pytest.approx(flops / 0.4 / 1e9 / 100)
    assert bf16["fraction_of_matmul_peak"] == pytest.approx(flops / 0.3 / 1e9 / 400)  # against the bf16 peak
    assert bf16["speed_vs_sdpa_fp32"] == pytest.approx(4 / 3) and fp32["speed_vs_sdpa_fp32"] == 1.0
