"""Decoder-only Transformer LM whose attention is Infini-attention, full, segment-local or Transformer-XL-like.

    model = Transformer(ModelConfig(...))
    out = model(tokens)                       # tokens (B, T) -> out.logits (B, T, vocab_size)
    out2 = model(more_tokens, state=out.state)  # continue the same stream

The streaming state is explicit (a tuple with one AttentionState per layer) and never stored on the module.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from attention.infini import CausalSelfAttention, InfiniAttention
from attention.xl import TransformerXLAttention
from models.config import ModelConfig
from models.layers import DecoderBlock, RMSNorm
from models.rope import RotaryEmbedding
from models.state import ModelState, detach_state, map_state  # noqa: F401  (re-exported)
from models.streaming import cpu_chunk_len, stream


class TransformerOutput(NamedTuple):
    logits: Tensor  # (B, T, vocab_size); (n_selected, vocab_size) with forward's logits_at
    state: ModelState  # one AttentionState per layer


def build_attention(cfg: ModelConfig, rope: RotaryEmbedding) -> CausalSelfAttention:
    """The attention kind is configuration; every kind has the interface (x, state) -> (y, state)."""
    if cfg.attention == "infini":
        return InfiniAttention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.segment_len, rope,
                               cfg.memory_update, cfg.gate_init, cfg.attention_backend, cfg.memory_feature_map,
                               cfg.memory_write_gate, cfg.memory_write_gate_init)
    if cfg.attention == "xl":
        return TransformerXLAttention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.segment_len, rope,
                                      cfg.attention_backend)
    segment_len = None if cfg.attention == "full" else cfg.segment_len
    return CausalSelfAttention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, segment_len, rope, cfg.attention_backend)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.rope = RotaryEmbedding.from_config(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(
            DecoderBlock(build_attention(config, self.rope), config.dim, config.ffn_dim, config.norm_eps)
            for _ in range(config.n_layers)
        )
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights; residual output projections (wo, w2) scaled by 1/sqrt(2 n_layers)
        (GPT-2); norms at 1; gate logits at gate_init; memory-rule parameters as the rule says. Callable again
        after meta-device construction."""
        for name, module in self.named_modules():
            self.init_module(name, module)
        if self.config.tie_embeddings:  # the loop above re-initialised the shared matrix as a Linear
            nn.init.normal_(self.tok_embeddings.weight, std=self.config.init_std)

    @torch.no_grad()
    def init_module(self, name: str, module: nn.Module) -> None:
        """Initialise what init_weights initialises in `module` (named `name` in this model): the transformers
        wrapper (models/hf_model.py) initialises a loaded checkpoint's missing tensors with it."""
        std = self.config.init_std
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.Linear):
            is_residual = name.endswith(("attention.wo", "feed_forward.w2"))
            nn.init.normal_(module.weight, std=std / math.sqrt(2 * self.config.n_layers) if is_residual else std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, InfiniAttention):
            nn.init.constant_(module.gate_logit, module.gate_init)
            module.rule.reset_parameters()

    def empty_state(self, batch: int, device: torch.device | None = None) -> ModelState:
        dtype = self.tok_embeddings.weight.dtype
        device = device or self.tok_embeddings.weight.device
        return tuple(layer.attention.empty_state(batch, device, dtype) for layer in self.layers)

    def hidden(self, tokens: Tensor, state: ModelState | None = None, write_scale: Tensor | None = None
               ) -> tuple[Tensor, ModelState]:
        """The decoder stack without the output projection: tokens (B, T) -> final hidden states (B, T, dim),
        before the final norm, and the new state. Prefill projects only the last position; a chunked loss
        projects a slice at a time. write_scale: see forward."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, time), got shape {tuple(tokens.shape)}")
        if state is not None and len(state) != len(self.layers):
            raise ValueError(f"state has {len(state)} layers, the model {len(self.layers)}")
        if write_scale is not None:
            if write_scale.dim() == 2:
                write_scale = write_scale.unsqueeze(0).expand(len(self.layers), -1, -1)
            if tuple(write_scale.shape) != (len(self.layers), *tokens.shape):
                raise ValueError(f"write_scale must be (batch, time) = {tuple(tokens.shape)} or (layers, batch, time) "
                                 f"= {(len(self.layers), *tokens.shape)}, got {tuple(write_scale.shape)}")
        chunk = self._cpu_chunk_len(tokens)
        if chunk is None:
            return self._hidden(tokens, state, write_scale)

        def step(span: slice, state: ModelState | None) -> tuple[Tensor, ModelState]:
            # chunks of whole segments: write_scale stays valid
            return self._hidden(tokens[:, span], state, None if write_scale is None else write_scale[..., span])

        hidden, state = stream(step, tokens.shape[1], chunk, state)
        return torch.cat(hidden, dim=1), state

    def _hidden(self, tokens: Tensor, state: ModelState | None, write_scale: Tensor | None = None
                ) -> tuple[Tensor, ModelState]:
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        new_state = []
        for i, layer in enumerate(self.layers):
            h, layer_state = layer(h, None if state is None else state[i],
                                   None if write_scale is None else write_scale[i])
            new_state.append(layer_state)
        return h, tuple(new_state)

    def _cpu_chunk_len(self, tokens: Tensor) -> int | None:
        """Tokens per chunk for hidden(), or None for one pass (models/streaming.py cpu_chunk_len)."""
        return cpu_chunk_len(self.config, tokens, self.tok_embeddings.weight.element_size())

    def logits(self, h: Tensor) -> Tensor:
        """Hidden states (..., dim) -> logits (..., vocab_size)."""
        return self.output(self.norm(h))

    def forward(self, tokens: Tensor, state: ModelState | None = None, write_scale: Tensor | None = None,
                logits_at: Tensor | None = None) -> TransformerOutput:
        """tokens: (B, T) int64. state: None for a fresh stream, else the state returned by the previous call.
        write_scale (`infini` only): None, or a multiplier of each token's memory write, (B, T) for every layer or
        (n_layers, B, T) per layer; 0 removes a token's write (probes' knock-outs), c > 1 writes it as c copies
        (training augmentation). The call must start on a segment boundary (a fresh stream or whole segments so
        far). logits_at: None (logits (B, T, V)), or a bool (B, T) selecting the positions whose logits are
        computed, returned as (n_selected, V) in row-major order: training with the loss on a few tokens (passkey
        answers) skips the output layer and its softmax everywhere else."""
        h, new_state = self.hidden(tokens, state, write_scale)
        if logits_at is not None:
            if logits_at.shape != tokens.shape or logits_at.dtype != torch.bool:
                raise ValueError(f"logits_at must be a bool tensor of the tokens' shape {tuple(tokens.shape)}, got "
                                 f"{logits_at.dtype} {tuple(logits_at.shape)}")
            h = h[logits_at]  # (n_selected, dim)
        return TransformerOutput(self.logits(h), new_state)

    def gates(self) -> Tensor | None:
        """sigmoid(beta): (n_layers, n_heads) share of memory in each head's output, or None without memory."""
        logits = [layer.attention.gate_logit for layer in self.layers if isinstance(layer.attention, InfiniAttention)]
        return torch.sigmoid(torch.stack(logits)).detach() if logits else None
