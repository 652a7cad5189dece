"""Causal dot-product attention kernels, swappable behind one function.

    causal_attention(q, k, v, backend) -> out
    q: (B, H, Tq, D), k and v: (B, Hkv, Tk, D) with Tq <= Tk, H a multiple of Hkv (grouped-query attention:
    query head h reads key/value head h // (H // Hkv)). Queries are the *last* Tq positions of the keys
    (bottom-right causal alignment): query i sees keys 0 .. Tk - Tq + i. Extra leading dims before H are
    allowed for `eager` and `sdpa` (used for segments).

Backends: `eager` (explicit softmax; the reference), `sdpa` (torch.nn.functional.scaled_dot_product_attention),
`flash` (flash-attn 2, CUDA and fp16/bf16 only), `auto` (flash where it applies, else sdpa). The choice never
changes results beyond float tolerance; tests compare sdpa with eager. Under reduced precision on CPU, `sdpa` picks
its kernel's dtype by the number of keys (CPU_BF16_MIN_KEYS), so there a short and a long call (e.g. a decoding step
early in a segment and the whole segment's forward) agree to bf16's rounding, as on GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "sdpa", "eager", "flash")

try:  # optional GPU extra
    from flash_attn import flash_attn_func  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None


def flash_available() -> bool:
    return flash_attn_func is not None and torch.cuda.is_available()


def _bottom_right_mask(tq: int, tk: int, device: torch.device) -> Tensor:
    """(Tq, Tk) bool, True where attention is allowed."""
    rows = torch.arange(tq, device=device).unsqueeze(1) + (tk - tq)
    return torch.arange(tk, device=device).unsqueeze(0) <= rows


def eager_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Reference: softmax(q k^T / sqrt(D) + causal mask) v, computed explicitly."""
    groups = q.shape[-3] // k.shape[-3]
    k = k.repeat_interleave(groups, dim=-3)  # (..., H, Tk, D)
    v = v.repeat_interleave(groups, dim=-3)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (..., H, Tq, Tk)
    mask = _bottom_right_mask(q.shape[-2], k.shape[-2], q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    probabilities = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    return probabilities.to(q.dtype) @ v


# On CPU, PyTorch's bf16 SDPA kernel is slower than its float32 one for short segments and faster for long ones
# (benchmarks/attention_kernels.py, forward + backward, 2 threads, 2026-12-01: 0.22x at the default job's 64 keys x
# head dim 32, 0.37-0.66x at 64-128 keys, 0.98x / 1.34x at 256 keys with head dim 64 / 128, 1.09-2.40x from 512
# keys; its backward is the slow part). Reduced precision on CPU therefore runs in float32 below this many keys and
# in bf16 from it.
CPU_BF16_MIN_KEYS = 512


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Reduced precision on CPU (bf16 / fp16 inputs, or CPU autocast) runs the kernel in bf16 when that precision is
    bf16 and there are at least CPU_BF16_MIN_KEYS keys, else in float32; the result has q's dtype."""
    if q.device.type == "cpu":
        low = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else (
            torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        if low is not None:
            run = torch.bfloat16 if low == torch.bfloat16 and k.shape[-2] >= CPU_BF16_MIN_KEYS else torch.float32
            with torch.autocast("cpu", enabled=False):
                return _sdpa(q.to(run), k.to(run), v.to(run)).to(q.dtype)
    return _sdpa(q, k, v)


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    lead = q.shape[:-3]
    # fold extra leading dims (segments) into the batch: SDPA's fused CPU/CUDA kernels take 4-D inputs only and
    # fall back to the slow math path otherwise (~45x slower on CPU here)
    q, k, v = (x.reshape(-1, *x.shape[-3:]) for x in (q, k, v))  # (B', h, T, D)
    tq, tk = q.shape[-2], k.shape[-2]
    gqa = q.shape[-3] != k.shape[-3]
    if tq == tk:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif tq == 1:  # one new query sees every key
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    else:
        mask = _bottom_right_mask(tq, tk, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out.reshape(*lead, *out.shape[-3:])


def flash_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    if flash_attn_func is None:
        raise RuntimeError("attention backend 'flash' needs the flash-attn package: pip install -e '.[gpu]'")
    lead = q.shape[:-3]
    # flash-attn wants (batch, time, heads, dim); its causal mask is bottom-right aligned (flash-attn >= 2.1)
    q_ = q.reshape(-1, *q.shape[-3:]).transpose(1, 2)
    k_ = k.reshape(-1, *k.shape[-3:]).transpose(1, 2)
    v_ = v.reshape(-1, *v.shape[-3:]).transpose(1, 2)
    out = flash_attn_func(q_, k_, v_, causal=True)  # (B', Tq, H, D)
    return out.transpose(1, 2).reshape(*lead, *q.shape[-3:])  # (..., H, Tq, D)


def resolve_backend(backend: str, q: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        use_flash = flash_available() and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        return "flash" if use_flash else "sdpa"
    return backend


def causal_attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "auto") -> Tensor:
    """Bottom-right-aligned causal attention with grouped-query heads; see the module docstring."""
    backend = resolve_backend(backend, q)
    if backend == "flash":
        return flash_attention(q, k, v)
    if backend == "sdpa":
        return sdpa_attention(q, k, v)
    return eager_attention(q, k, v)
