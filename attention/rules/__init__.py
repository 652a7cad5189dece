"""Memory rules: how an Infini-attention layer writes its compressive memory, behind one interface.

A rule owns everything about the memory that a research variant may change, and nothing else:
    feature map sigma        (attention/feature_maps.py; `elu` is the paper's ELU + 1)
    the empty state          M_0 = 0, z_0 = 0 of shape (B, Hkv, Dk, Dv), (B, Hkv, Dk)
    the batched update       every segment's state before it is written, in the augmented form [M | z]
                             (a parallel prefix sum where the rule allows it, else a scan over segments)
    a per-token write gate   optional: beta_t = sigmoid(w . [k_t; v_t] + b) per KV head scales token t's write
    a naive reference        one token's write, written straight from the equations (tests compare against it)
Retrieval (3) is the same for every rule, A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1}), so the layer does it.

The layer asks its rule; it never branches on the rule's name. Rules register themselves by name: a new rule is
one module in this package (a MemoryRule subclass decorated with @register_rule) plus a YAML in conf/attention/.

Shape legend: B batch, Hkv key/value heads, S segments, N segment length, P tokens, D head dim, Dk feature dim
(= D for `elu`), Dv value dim (= D).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import ClassVar

import torch
from torch import Tensor, nn

from attention.feature_maps import FeatureMap, build_feature_map
from attention.memory import Memory

RULES: dict[str, type[MemoryRule]] = {}


def register_rule(cls: type[MemoryRule]) -> type[MemoryRule]:
    """Class decorator: make a rule available as ModelConfig.memory_update=<cls.name>."""
    if cls.name in RULES and RULES[cls.name] is not cls:
        raise ValueError(f"two memory rules are named {cls.name!r}: {RULES[cls.name]} and {cls}")
    RULES[cls.name] = cls
    return cls


def rule_names() -> tuple[str, ...]:
    """Every registered rule (the modules of this package are imported on first use)."""
    _discover()
    return tuple(RULES)


def build_rule(name: str, n_kv_heads: int, head_dim: int, feature_map: str = "elu", write_gate: bool = False,
               write_gate_init: float = 4.0) -> MemoryRule:
    _discover()
    if name not in RULES:
        raise ValueError(f"unknown memory_update {name!r}; expected one of {tuple(RULES)}")
    return RULES[name](n_kv_heads, head_dim, feature_map, write_gate, write_gate_init)


_discovered = False


def _discover() -> None:
    global _discovered
    if not _discovered:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _discovered = True


class WriteGate(nn.Module):
    """beta_t = sigmoid(w_h . [k_t; v_t] + b_h) per token and key/value head: how strongly token t is written.

    Computed from the un-rotated key and value the layer already has (so the streaming cache needs nothing
    more). Starts nearly open (w = 0, b = write_gate_init: beta = 0.98 for 4.0), i.e. at the paper's rule, and
    learns to write some tokens less: at long lengths the filler's accumulated writes are what dilutes a
    normalised read (README, "what fails").
    """

    def __init__(self, n_kv_heads: int, head_dim: int, init: float):
        super().__init__()
        self.init = init
        self.weight = nn.Parameter(torch.empty(n_kv_heads, 2 * head_dim))  # [w_k | w_v] per KV head
        self.bias = nn.Parameter(torch.empty(n_kv_heads))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.zero_()
        self.bias.fill_(self.init)

    def forward(self, keys: Tensor, values: Tensor) -> Tensor:
        """keys, values: (B, Hkv, P, D) -> beta (B, Hkv, P)."""
        D = keys.shape[-1]
        w = self.weight.to(keys.dtype)
        logit = (keys @ w[:, :D, None]).squeeze(-1) + (values @ w[:, D:, None]).squeeze(-1)  # (B, Hkv, P)
        return torch.sigmoid(logit + self.bias.to(keys.dtype)[:, None])

    def reference(self, key: Tensor, value: Tensor, kv_head: int) -> Tensor:
        """One token's beta, written out: key, value (D,) -> scalar."""
        w, b = self.weight[kv_head], self.bias[kv_head]
        return torch.sigmoid((torch.cat([key, value]) * w.to(key.dtype)).sum() + b.to(key.dtype))


class MemoryRule(nn.Module):
    """One layer's memory rule (see the module docstring). Subclasses set `name` and implement `prefix` and
    `reference_write`."""

    name: ClassVar[str]

    def __init__(self, n_kv_heads: int, head_dim: int, feature_map: str = "elu", write_gate: bool = False,
                 write_gate_init: float = 4.0):
        super().__init__()
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.feature_map: FeatureMap = build_feature_map(feature_map, head_dim)
        self.write_gate = WriteGate(n_kv_heads, head_dim, write_gate_init) if write_gate else None

    @property
    def key_dim(self) -> int:
        """Dk: rows of M (the feature map's output dimension)."""
        return self.feature_map.out_dim

    def reset_parameters(self) -> None:
        if self.write_gate is not None:
            self.write_gate.reset_parameters()

    def empty(self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Memory:
        """M_0 = 0, z_0 = 0: (B, Hkv, Dk, Dv) and (B, Hkv, Dk), in at least float32."""
        return Memory.empty(batch, self.n_kv_heads, self.key_dim, self.head_dim, device, dtype)

    def features(self, x: Tensor) -> Tensor:
        """sigma(x): (..., D) -> (..., Dk), a new contiguous tensor."""
        return self.feature_map(x)

    def write_strength(self, keys: Tensor, values: Tensor) -> Tensor | None:
        """Per-token write strength beta (B, Hkv, P) from un-rotated keys and values, or None (all 1)."""
        return None if self.write_gate is None else self.write_gate(keys, values)

    def prefix(self, state: Tensor, sigma_k: Tensor, values_aug: Tensor, strength: Tensor | None
               ) -> tuple[Tensor, Tensor]:
        """The state before each of S complete segments, and after the last, in the augmented form.

        state: [M | z] (B, Hkv, Dk, Dv + 1) before the first segment; sigma_k: (B, Hkv, S, N, Dk);
        values_aug: [V | 1] (B, Hkv, S, N, Dv + 1); strength: beta (B, Hkv, S, N) or None.
        Returns prev (B, Hkv, S, Dk, Dv + 1), prev[:, :, s] the state *before* segment s (retrieval precedes the
        update), and the state after segment S - 1.
        """
        raise NotImplementedError

    def reference_write(self, M: Tensor, z: Tensor, M_prev: Tensor, z_prev: Tensor, sigma_k: Tensor, value: Tensor,
                        strength: Tensor) -> tuple[Tensor, Tensor]:
        """One token's write, naive: M (Dk, Dv), z (Dk,) accumulate the segment's writes; M_prev, z_prev are the
        state before the segment (what every write of the segment reads); sigma_k (Dk,), value (Dv,), strength
        a scalar (1 without a write gate). Returns the new (M, z)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, feature_map={self.feature_map.name!r}, write_gate={self.write_gate is not None}"


rule_names()  # register the rules of this package now, so RULES is complete for anyone who imports it
