"""Process group, device and the wrapping of a model for training: activation checkpointing, torch.compile,
DDP or FSDP2. Applied here, outside models/, so the model code stays single-device and readable."""

from __future__ import annotations

import functools
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.transformer import Transformer
from training.config import TrainerConfig


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: no autocast

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> AbstractContextManager:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc malloc.h


def retain_heap() -> bool:
    """Keep freed memory in this process's heap (glibc): True when applied, False without glibc.

    Under glibc's defaults a block above the mmap threshold (128 KiB at first, then following the largest block freed
    so far, up to 32 MiB) is mapped on its own and unmapped at free, and the heap's free top beyond the trim threshold
    goes back to the system: every such block is fresh pages at every allocation, each page a fault and a zero fill.
    A training step allocates and frees activation-sized tensors of many sizes, so a good part of each step arrived as
    fresh pages (benchmarks/profile_step.py: ~6K faults per default-job step; benchmarks/train_throughput.py at 32K
    tokens: 240-360K per step, from the full-sequence tensors above 32 MiB, which no threshold can keep). Two settings
    keep them all: no block is mapped on its own (M_MMAP_MAX = 0: every block comes from the heap, however large) and
    the heap is never trimmed (M_TRIM_THRESHOLD = -1), so what a step frees serves the next step, and the process's
    resident set stays at its high-water mark (as a caching allocator's would). Process-wide and idempotent."""
    import ctypes
    import ctypes.util

    libc = ctypes.util.find_library("c")
    if libc is None:
        return False
    try:
        mallopt = ctypes.CDLL(libc).mallopt
    except (OSError, AttributeError):  # not glibc (macOS's libc has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1


def init_runtime(cfg: TrainerConfig) -> Runtime:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU), pick device and precision, and
    on CPU keep freed memory in the heap (trainer.retain_heap)."""
    env = os.environ
    if "RANK" not in env and int(env.get("SLURM_NTASKS", "1")) > 1:  # SLURM tasks (hydra/launcher=slurm)
        env = {"WORLD_SIZE": env["SLURM_NTASKS"], "RANK": env["SLURM_PROCID"], "LOCAL_RANK": env["SLURM_LOCALID"]}
    world_size = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but CUDA is not available")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():  # MASTER_ADDR / MASTER_PORT from torchrun or the launcher
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and use_cuda)
    if not use_cuda and cfg.retain_heap:
        retain_heap()
    return Runtime(rank, world_size, local_rank, device, torch.bfloat16 if bf16 else None)


def parallelize(model: Transformer, cfg: TrainerConfig, runtime: Runtime) -> nn.Module:
    """Activation checkpointing and compile per block, then DDP or FSDP2 under torchrun. Returns the module to
    call for training; `model` itself keeps its parameter names (checkpoints are written from it)."""
    for block in model.layers:
        if cfg.activation_checkpointing:
            # an instance attribute shadows the class's forward: the module tree and parameter names stay the same
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        if cfg.compile:
            block.compile()
    if not runtime.distributed or cfg.parallel == "none":
        return model
    if cfg.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=runtime.autocast_dtype, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def no_sync(module: nn.Module, sync: bool) -> AbstractContextManager:
    """Skip the gradient all-reduce on backward passes that are not the last of an optimizer step."""
    if sync:
        return nullcontext()
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(module)
    return nullcontext()


class _fsdp_no_sync(AbstractContextManager):  # noqa: N801 - used like a function
    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.module.set_requires_gradient_sync(False)

    def __exit__(self, *exc):
        self.module.set_requires_gradient_sync(True)
        return False


def all_reduce_sum(value: float, runtime: Runtime) -> float:
    if not runtime.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def all_gather_objects(obj, runtime: Runtime) -> list:
    if not runtime.distributed:
        return [obj]
    gathered = [None] * runtime.world_size
    dist.all_gather_object(gathered, obj)
    return gathered
