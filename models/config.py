"""Typed, validated model configuration. Also the schema Hydra composes `model` configs against."""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION_KINDS = ("infini", "full", "local")
MEMORY_UPDATES = ("linear", "delta")
ATTENTION_BACKENDS = ("auto", "sdpa", "eager", "flash")


@dataclass
class ModelConfig:
    """A Llama-style decoder (pre-norm RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases) whose
    attention is `infini`, `full` or `local`."""

    vocab_size: int = 256
    """Vocabulary size (256 for the byte-level tokenizer)."""
    dim: int = 256
    """Residual stream width."""
    n_layers: int = 4
    n_heads: int = 4
    """Query heads; head_dim = dim / n_heads."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; must divide n_heads. None: n_heads (multi-head)."""
    ffn_dim: int | None = None
    """SwiGLU hidden width. None: 8/3 * dim rounded up to a multiple of 64 (Llama's rule)."""
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    """Share the token embedding matrix with the output projection."""
    attention: str = "infini"
    """infini: local attention + compressive memory + gate; full: causal attention over the whole stream
    (baseline); local: attention inside each segment only, no memory (ablation)."""
    memory_update: str = "linear"
    """Memory write rule of `infini`: linear (eq. 4) or delta (eq. 5)."""
    segment_len: int = 2048
    """N: tokens per segment for `infini` and `local` (ignored by `full`)."""
    gate_init: float = 0.0
    """Initial gate logit beta of every head; sigmoid(0) = 0.5 mixes memory and local attention equally, so
    both paths get gradient from the first step. Large negative values start at the local-only network."""
    attention_backend: str = "auto"
    """Local attention kernel: auto (flash-attn on CUDA when installed, else sdpa), sdpa, eager, flash."""
    init_std: float = 0.02
    """Std of the normal initialisation of linear and embedding weights."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = 64 * -(-8 * self.dim // (3 * 64))
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "segment_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"ModelConfig.n_heads={self.n_heads} must divide ModelConfig.dim={self.dim}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"ModelConfig.dim / n_heads = {self.dim // self.n_heads} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide ModelConfig.n_heads={self.n_heads}"
            )
        for name, allowed in (
            ("attention", ATTENTION_KINDS),
            ("memory_update", MEMORY_UPDATES),
            ("attention_backend", ATTENTION_BACKENDS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is not one of {allowed}")
        for name in ("norm_eps", "rope_theta", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads
