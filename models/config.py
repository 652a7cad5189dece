"""Typed, validated model configuration. Also the schema Hydra composes `model` configs against."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch

from attention.feature_maps import FEATURE_MAPS
from attention.rules import rule_names


class AttentionKind(StrEnum):
    """ModelConfig.attention (see the field)."""

    infini = "infini"
    full = "full"
    local = "local"
    xl = "xl"


class AttentionBackend(StrEnum):
    """ModelConfig.attention_backend (see the field)."""

    auto = "auto"
    sdpa = "sdpa"
    eager = "eager"
    flash = "flash"


class RopeScaling(StrEnum):
    """ModelConfig.rope_scaling (see the field; models/rope.py implements them)."""

    none = "none"
    linear = "linear"
    ntk = "ntk"
    yarn = "yarn"
    llama3 = "llama3"


class DType(StrEnum):
    """Weight / compute dtypes by name (evaluation's `dtype`, the HF import/export and generation CLIs)."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float64 = "float64"

    @property
    def torch(self) -> torch.dtype:
        return getattr(torch, self.value)


ATTENTION_KINDS = tuple(m.value for m in AttentionKind)
ATTENTION_BACKENDS = tuple(m.value for m in AttentionBackend)
ROPE_SCALINGS = tuple(m.value for m in RopeScaling)


@dataclass
class ModelConfig:
    """A Llama-style decoder (pre-norm RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases) whose
    attention is `infini`, `full`, `local` or `xl`."""

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
    attention: AttentionKind = AttentionKind.infini
    """infini: local attention + compressive memory + gate; full: causal attention over the whole stream
    (baseline); local: attention inside each segment only, no memory (ablation); xl: Transformer-XL-like, attention
    inside each segment and over the whole previous segment, gradient stopped at the previous segment (baseline)."""
    memory_update: str = "linear"
    """Memory write rule of `infini` (attention/rules/): linear (eq. 4, the paper's default) or delta (eq. 5); research
    variants: delta_corrected (eq. 5 with the associative recurrent memory transformer's z correction)."""
    memory_feature_map: str = "elu"
    """sigma of the memory (attention/feature_maps.py): elu (ELU + 1, the paper's) or dpfp (a research variant:
    sparser features of dimension 6 x head_dim, L2-normalised)."""
    memory_write_gate: bool = False
    """A research variant: a learned per-token write strength beta_t = sigmoid(w . [k_t; v_t] + b) per KV head
    scales each token's write (M and z alike). False: the paper's layer, every token written with weight 1."""
    memory_write_gate_init: float = 4.0
    """Initial bias b of the write gate (weights start at 0): sigmoid(4) = 0.98, nearly the paper's rule."""
    segment_len: int = 2048
    """N: tokens per segment for `infini`, `local` and `xl` (ignored by `full`)."""
    gate_init: float = 0.0
    """Initial gate logit beta of every head; sigmoid(0) = 0.5 mixes memory and local attention equally, so
    both paths get gradient from the first step. Large negative values start at the local-only network."""
    attention_backend: AttentionBackend = AttentionBackend.auto
    """Local attention kernel: auto (flash-attn on CUDA when installed, else sdpa), sdpa, eager, flash."""
    init_std: float = 0.02
    """Std of the normal initialisation of linear and embedding weights."""

    # RoPE context extension (models/rope.py). RoPE acts only on the local dot-product path, whose positions
    # restart at 0 in every segment, so with `infini`/`local` these knobs matter when segment_len exceeds the
    # context the RoPE was trained at; with `full` attention they matter for any stream longer than it.
    rope_scaling: RopeScaling = RopeScaling.none
    """none; linear (position interpolation, Chen et al. 2023: every frequency divided by the factor); ntk
    (NTK-aware: theta multiplied by factor^(D/(D-2)), high frequencies almost untouched); yarn (Peng et al.
    2023: NTK-by-parts interpolation plus an attention temperature); llama3 (Llama 3.1's
    wavelength-dependent interpolation, as Hugging Face's rope_type "llama3")."""
    rope_scaling_factor: float = 1.0
    """s = target context / original context. Must stay 1.0 with rope_scaling none."""
    rope_original_max_position_embeddings: int | None = None
    """Context length the RoPE was trained at (Hugging Face's original_max_position_embeddings); required by
    yarn and llama3, unused by the others."""
    rope_low_freq_factor: float = 1.0
    """llama3: wavelengths above original / low_freq_factor are interpolated by the full factor."""
    rope_high_freq_factor: float = 4.0
    """llama3: wavelengths below original / high_freq_factor are kept; in between, a smooth blend."""
    rope_yarn_beta_fast: float = 32.0
    """yarn: dimensions rotating more than beta_fast times over the original context are not interpolated."""
    rope_yarn_beta_slow: float = 1.0
    """yarn: dimensions rotating fewer than beta_slow times over the original context are fully interpolated."""
    rope_attention_factor: float | None = None
    """yarn: multiplier of cos and sin (so attention logits scale by its square). None: 0.1 ln(s) + 1, the
    YaRN paper's choice."""

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
            ("memory_update", rule_names()),  # registries: a rule or feature map added at run time is a choice too
            ("memory_feature_map", tuple(FEATURE_MAPS)),
            ("attention_backend", ATTENTION_BACKENDS),
            ("rope_scaling", ROPE_SCALINGS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name}={str(getattr(self, name))!r} is not one of {allowed}")
        self.attention = AttentionKind(self.attention)
        self.attention_backend = AttentionBackend(self.attention_backend)
        self.rope_scaling = RopeScaling(self.rope_scaling)
        for name in ("norm_eps", "rope_theta", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)!r}")
        self._validate_rope_scaling()

    def _validate_rope_scaling(self) -> None:
        for name in ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                     "rope_yarn_beta_fast", "rope_yarn_beta_slow"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {value!r}")
        original = self.rope_original_max_position_embeddings
        if original is not None and (isinstance(original, bool) or not isinstance(original, int) or original <= 0):
            raise ValueError(
                f"ModelConfig.rope_original_max_position_embeddings must be a positive integer or None, got "
                f"{original!r}"
            )
        if self.rope_scaling == "none" and self.rope_scaling_factor != 1.0:
            raise ValueError(
                f"ModelConfig.rope_scaling_factor={self.rope_scaling_factor} has no effect with rope_scaling='none'"
                "; choose linear, ntk, yarn or llama3"
            )
        if self.rope_scaling in ("yarn", "llama3") and original is None:
            raise ValueError(
                f"ModelConfig.rope_scaling={self.rope_scaling.value!r} needs rope_original_max_position_embeddings "
                "(the context length the RoPE was trained at)"
            )
        if self.rope_scaling == "llama3" and not self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ValueError(
                f"ModelConfig.rope_low_freq_factor={self.rope_low_freq_factor} must be below "
                f"rope_high_freq_factor={self.rope_high_freq_factor}"
            )
        if self.rope_scaling == "yarn" and not self.rope_yarn_beta_slow < self.rope_yarn_beta_fast:
            raise ValueError(
                f"ModelConfig.rope_yarn_beta_slow={self.rope_yarn_beta_slow} must be below "
                f"rope_yarn_beta_fast={self.rope_yarn_beta_fast}"
            )
        if self.rope_attention_factor is not None:
            if self.rope_scaling != "yarn":
                raise ValueError("ModelConfig.rope_attention_factor is only used by rope_scaling='yarn'")
            if not self.rope_attention_factor > 0:
                raise ValueError(
                    f"ModelConfig.rope_attention_factor must be positive, got {self.rope_attention_factor!r}"
                )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads
