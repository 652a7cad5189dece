"""Shared test settings.

Tests run tiny models, where a second intra-op thread buys little and oversubscribes the machine as soon as
anything else runs (two-process DDP tests, a parallel job): then OpenMP spin-waits made the same tests up to
40x slower. One thread keeps the suite's time predictable.
"""

import torch

torch.set_num_threads(1)
