"""Process and machine facts the benchmark scripts record (Linux /proc and getrusage). Imported by the scripts in
this folder, which run as `python benchmarks/<script>.py` (so this folder is on sys.path)."""

from __future__ import annotations

import platform
import resource


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
    import time

    command = [sys.executable, "train.py", f"experiment={experiment}", f"attention={variant}",
               f"hydra.run.dir={run_dir}", "trainer.progress=false", "trainer.resume=none", *overrides]
    start = time.perf_counter()
    subprocess.run(command, cwd=root, check=True)
    return time.perf_counter() - start
