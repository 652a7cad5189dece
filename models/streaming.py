"""Feeding a long input through a model in chunks, written once.

Every long input runs through the same loop: consecutive spans of at most chunk_size positions, the streaming
state returned by one span passed into the next. The callers differ only in what a span does: Transformer.hidden
(the CPU allocator chunks below), prefill (models/generation.py: keep the last position), score_document
(evaluation/perplexity.py: token losses) and the training step (train.py forward_backward: loss, backward, detach:
truncated back-propagation through time).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from models.config import ModelConfig

S = TypeVar("S")
O = TypeVar("O")  # noqa: E741

# On CPU, Transformer.hidden feeds long segmented inputs through the stack in chunks of whole segments whose
# largest activation stays under this many bytes. glibc serves blocks above its mmap threshold (adaptive, at most
# 32 MiB on 64-bit Linux) with fresh mappings, so every activation of a 32K-token batch was fresh pages faulted in
# and unmapped again; chunks of blocks that the heap can reuse ran a 32K-token training step (benchmark shape) in
# ~25 s instead of ~45 s. The numbers are those of one pass over the whole input: chunking a stream changes
# nothing (the chunking-invariance tests), it only trades the parallel prefix sum across all segments for a few
# sequential chunks. Not used for `full` attention (each chunk would re-read the whole growing key cache) nor on
# accelerators (caching allocators, and wide batched kernels want the whole input). Under train.py's kept heap
# (training/parallel.py retain_heap: no block is mapped on its own) the faults are gone either way, and one pass was
# no faster at 32K while it held more memory (README "Performance"), so the chunks apply there too.
CPU_CHUNK_BYTES = 32 * 2**20


def stream(step: Callable[[slice, S], tuple[O, S]], length: int, chunk_size: int, state: S) -> tuple[list[O], S]:
    """Run step(span, state) -> (output, state) over consecutive spans of at most chunk_size of 0..length-1,
    threading the state; returns every span's output and the final state."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    outputs = []
    for start in range(0, length, chunk_size):
        output, state = step(slice(start, min(start + chunk_size, length)), state)
        outputs.append(output)
    return outputs, state


def cpu_chunk_len(config: ModelConfig, tokens: Tensor, element_size: int) -> int | None:
    """Tokens per chunk for Transformer.hidden on `tokens` (B, T) (a multiple of segment_len), or None to run the
    input in one pass; see CPU_CHUNK_BYTES. element_size: bytes per activation element."""
    if config.attention == "full" or tokens.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    B, T = tokens.shape
    width = max(config.dim, config.ffn_dim, config.n_heads * (config.head_dim + 1))  # widest activation per token
    bytes_per_segment = B * config.segment_len * width * element_size
    most = max(1, CPU_CHUNK_BYTES // bytes_per_segment)  # segments per chunk at most
    segments = -(-T // config.segment_len)
    if segments <= most:
        return None
    return -(-segments // -(-segments // most)) * config.segment_len  # chunks of (nearly) equal length
