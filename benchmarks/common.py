"""Process and machine facts the benchmark scripts record (Linux /proc and getrusage). Imported by the scripts in
this folder, which run as `python benchmarks/<script>.py` (so this folder is on sys.path)."""

from __future__ import annotations

import platform
import resource
import time
from contextlib import AbstractContextManager

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # --dtype -> the torch dtype's name (what the JSON records)


def autocast(dtype: str, device_type: str = "cpu") -> AbstractContextManager:
    """The training precision `--dtype` names, as train.py applies it (training/parallel.py Runtime.autocast):
    fp32 -> no autocast; bf16 -> torch.autocast(device_type, bfloat16) around the forward, parameters (and so
    gradients and optimizer state) stay float32. The model's memory path keeps M and z float32 under autocast."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    import torch

    from training.parallel import Runtime  # the workers put the repository root on sys.path first

    return Runtime(0, 1, 0, torch.device(device_type), torch.bfloat16 if dtype == "bf16" else None).autocast()


def rss_mib() -> float:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def train_variant(root, experiment: str, variant: str, run_dir, overrides: list[str]) -> float:
    """`python train.py experiment=<experiment> attention=<variant>` in a subprocess whose run directory is run_dir
    (fresh: resume off); returns its wall time in seconds. The experiment scripts compare memories this way."""
    import subprocess
    import sys

    command = [sys.executable, "train.py", f"experiment={experiment}", f"attention={variant}",
               f"hydra.run.dir={run_dir}", "trainer.progress=false", "trainer.resume=none", *overrides]
    start = time.perf_counter()
    subprocess.run(command, cwd=root, check=True)
    return time.perf_counter() - start


def matmul_peak(threads: int, dtype: str, sizes=(1024, 2048, 3072, 4096), repeats: int = 5) -> dict:
    """This machine's matmul ceiling: the best torch.mm rate over square sizes (GFLOP/s), on tensors of `dtype` (a
    DTYPES key: fp32 or bf16), on `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    torch_dtype = getattr(torch, DTYPES[dtype])
    rates = {}
    for n in sizes:
        a, b = torch.randn(n, n, dtype=torch_dtype), torch.randn(n, n, dtype=torch_dtype)
        out = torch.empty(n, n, dtype=torch_dtype)
        torch.mm(a, b, out=out)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - start)
        rates[n] = 2 * n**3 / best / 1e9
    return {"gflops": max(rates.values()), "by_size": rates}
