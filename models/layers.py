"""Llama-style building blocks: RMSNorm, SwiGLU MLP, pre-norm decoder block.

RMSNorm and SwiGLU have a hand-written backward (fast path) beside the plain composition (the reference, used
for reduced-precision weights and by the tests that compare the two). Under autocast the fast paths run too:
RMSNorm on the float32 residual stream (its output written in autocast's dtype, as the next linear would cast it),
SwiGLU on its input and weights cast to autocast's dtype, as autocast's own linears would (tests/test_fast_paths.py
compares both with the reference under autocast). What the fast paths buy is memory, not FLOPs: on CPU every new
tensor glibc does not serve from its heap arrives as fresh pages (training/parallel.py retain_heap), so a training
step's time follows the bytes it allocates, and what autograd saves for backward is the
peak memory of back-propagation through time. Measured on the benchmark shape (benchmarks/train_throughput.py):

  RMSNorm  autograd's pow/mean/rsqrt/mul composition allocates ~3 activation-sized tensors in forward and ~5 in
           backward; the fast path 1 and 3, and saves x and 1/rms only.
  SwiGLU   autograd saves w1 x, silu(w1 x), w3 x and their product (4 hidden-sized tensors); the fast path saves
           w1 x and w3 x and recomputes silu in backward (cheap next to the three matmuls) in float32/float64; in
           bf16 it saves all four (half-size, and CPU's bf16 silu costs as much as a matmul here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from attention.infini import AttentionState


def _fast_path(x: Tensor, *weights: Tensor) -> bool:
    """The hand-written backward covers float32/float64 with weights of the same dtype."""
    return x.dtype in (torch.float32, torch.float64) and all(w.dtype == x.dtype for w in weights)


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The lower-precision dtype of an enabled autocast on x's device, else None."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / rms(x) * weight, normalised in at least float32 (as Llama does) and cast back to x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 normalises in float32, float64 stays
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """y = x * r * w with r = 1 / sqrt(mean(x^2) + eps), computed in x's dtype and written in out_dtype (under
    autocast: autocast's dtype, the rounding autocast's next linear would apply, without a separate cast pass).

    Backward, with x_hat = x * r and g the incoming gradient:
        dL/dw = sum over rows of g * x_hat
        dL/dx = r * (g * w - x_hat * mean(g * w * x_hat))
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype | None = None) -> Tensor:
        dim = x.shape[-1]
        # sum of squares as a norm: one reduction pass, no x^2 temporary
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(dim).add_(eps).rsqrt_()  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        if out_dtype is None or out_dtype == x.dtype:
            return (x * rstd).mul_(weight)
        normed = x * rstd
        return torch.mul(normed, weight, out=normed.new_empty(normed.shape, dtype=out_dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, weight, rstd = ctx.saved_tensors  # grad in out_dtype: the products below promote it to x's dtype
        dim = x.shape[-1]
        x_hat = x * rstd
        g_x_hat = grad * x_hat
        grad_weight = g_x_hat.reshape(-1, dim).sum(0) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            mean_term = (g_x_hat @ weight).unsqueeze_(-1).div_(dim)  # mean(g * w * x_hat): (..., 1)
            del g_x_hat
            grad_x = (grad * weight).sub_(x_hat.mul_(mean_term)).mul_(rstd)
        return grad_x, grad_weight, None, None


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in at least float32 (as Llama does) and cast back to x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # under autocast too: the float32 residual stream is normalised in float32 and the result written in
        # autocast's dtype, which is what the next linear (every consumer of a norm here) would cast it to
        if _fast_path(x, self.weight):
            low = _autocast_dtype(x)
            out_dtype = low if low is not None and x.dtype == torch.float32 else None
            return _RMSNormFunction.apply(x, self.weight, self.eps, out_dtype)
        return rms_norm_reference(x, self.weight, self.eps)


def swiglu_reference(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


class _SwiGLUFunction(torch.autograd.Function):
    """w2 (silu(w1 x) * w3 x), saving a = w1 x and b = w3 x, and silu(a) and h = silu(a) * b when keep_silu.

    Backward, with g the incoming gradient and g_h = g w2:
        dL/dw2 = g^T (silu(a) * b)      dL/db = g_h * silu(a)      dL/da = g_h * b * silu'(a)
        dL/dx = dL/da w1 + dL/db w3     dL/dw1 = dL/da^T x         dL/dw3 = dL/db^T x
    silu(a) and h are recomputed unless kept: SwiGLU keeps them in bf16/fp16 (half-size tensors, and on CPU the
    reduced-precision silu is the slowest elementwise op of the block, as long as a matmul (README "Performance");
    then it saves what autograd's composition saves), and recomputes them in float32/float64, where
    activation memory is the fast path's point.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, keep_silu: bool = False) -> Tensor:
        a, b = F.linear(x, w1), F.linear(x, w3)
        if keep_silu:
            silu_a = F.silu(a)
            h = silu_a * b
            ctx.save_for_backward(x, w1, w3, w2, a, b, silu_a, h)
            return F.linear(h, w2)
        ctx.save_for_backward(x, w1, w3, w2, a, b)
        return F.linear(F.silu(a).mul_(b), w2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w1, w3, w2, a, b, *kept = ctx.saved_tensors
        need_x, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:4]
        x2, a2, b2 = x.reshape(-1, x.shape[-1]), a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        g2 = grad.reshape(-1, grad.shape[-1])  # (M, dim)
        if kept:  # silu(a), h: read only (another backward of the same graph may need them)
            silu_a, h = (t.reshape(a2.shape) for t in kept)  # (M, F)
            grad_w2 = g2.T @ h if need_w2 else None  # (dim, F)
            buffer = torch.empty_like(h)  # for dL/da
        else:
            silu_a = F.silu(a2)  # (M, F)
            buffer = silu_a * b2  # h = silu(a) * b, later reused for dL/da
            grad_w2 = g2.T @ buffer if need_w2 else None  # (dim, F)
        g_h = g2 @ w2  # (M, F)
        grad_b = silu_a * g_h if kept else silu_a.mul_(g_h)  # g_h * silu(a), in a recomputed silu_a's memory
        grad_a = torch.ops.aten.silu_backward.grad_input(g_h.mul_(b2), a2, grad_input=buffer)
        grad_x = None
        if need_x:
            grad_x = (grad_a @ w1).addmm_(grad_b, w3).view_as(x)
        grad_w1 = grad_a.T @ x2 if need_w1 else None
        grad_w3 = grad_b.T @ x2 if need_w3 else None
        return grad_x, grad_w1, grad_w3, grad_w2, None


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) (Shazeer, 2020); w1 is Llama's gate_proj, w3 up_proj, w2 down_proj."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        weights = (self.w1.weight, self.w3.weight, self.w2.weight)
        if not all(type(linear) is nn.Linear for linear in (self.w1, self.w3, self.w2)):
            return self.w2(F.silu(self.w1(x)) * self.w3(x))  # wrapped projections (LoRA adapters): call them
        low = _autocast_dtype(x)
        if low is not None and x.dtype == torch.float32:
            # what autocast does to the three linears of the reference (inputs cast to its dtype, silu and the
            # product in it, output in it), as one fast-path call: the casts are recorded, so gradients come back
            # to the float32 parameters and input in float32
            with torch.autocast(x.device.type, enabled=False):
                return _SwiGLUFunction.apply(x.to(low), *(w.to(low) for w in weights), True)
        if _fast_path(x, *weights):
            return _SwiGLUFunction.apply(x, *weights, False)
        return swiglu_reference(x, *weights)


class DecoderBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, attention: nn.Module, dim: int, ffn_dim: int, norm_eps: float):
        super().__init__()
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.attention = attention
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.feed_forward = SwiGLU(dim, ffn_dim)

    def forward(self, x: Tensor, state: AttentionState | None = None, write_scale: Tensor | None = None
                ) -> tuple[Tensor, AttentionState]:
        a, state = self.attention(self.attention_norm(x), state, write_scale)
        h = x + a
        return h + self.feed_forward(self.ffn_norm(h)), state
