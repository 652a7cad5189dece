"""Memory probes: why an Infini-attention memory does or does not retrieve far beyond its training length.

Passkey accuracy says *whether* a model retrieves; these probes say *why not*, on the same passkey prompts at
several lengths: how much of what the memory returns at the answer comes from the needle, how that share would
shrink with more filler, how the reads themselves shrink with the number of segments written, and whether the
network could decode the key if the filler had not been written (`/work/shared/MEASUREMENTS.md` is the study
these probes turn into project code).

    results = probe_memory(model, tokenizer, lengths=[512, 2048, 8192], depths=[0.0, 0.5, 1.0], trials=2, seed=0)
    needle_share_summary(results)      # {"probe/needle_share/8192/layer1/head0": 0.71, ...}: what training logs
    write_outputs(results, out_dir)    # memory_probe.json, memory_probe.md, memory_probe.png

Definitions (N the segment length, H query heads, Hkv key/value heads, kv = h // (H / Hkv)):

Prompts. `PasskeyTemplate(tokenizer).prompt(length, depth, key)` for every requested length x depth x trial, the
key `trial_passkey(seed, length, depth, trial)` (the passkey evaluation's keys). The input is the prompt's P tokens
followed by the answer's tokens (" 12345."), fed teacher-forced in one stream, so every answer digit is scored
from the correct digits before it (the verdict greedy decoding would give for the digits).

Answer positions. The positions whose next-token prediction is a key digit: answer token j (0-based) containing a
digit is predicted at position P + j - 1 (the answer's first token " " predicts digit 1, and so on).

Read weight. For a query at position i in layer l, query head h, and a token t in the segments *before* the
query's segment (what the memory holds when i reads; t < N * floor(i / N)):

    w_t = beta_t * sigma(q_i) . sigma(k_t)

q and k are the layer's un-rotated projections (`attention.project(x)` of the attention sub-block's input x, the
block's input after its norm, captured with a forward pre-hook on `layer.attention`), sigma the rule's feature map
(`attention.rule.features`) and beta_t the rule's write strength (`attention.rule.write_strength(keys, values)`,
1 without a write gate; times the knock-out's write_scale). The memory's denominator is the sum of these terms:
for the linear rule sum_t w_t is exactly sigma(q_i) . z_{s-1} (z = sum_t beta_t sigma(k_t)), and sum_t w_t v_t is
exactly sigma(q_i) M_{s-1}, so w_t is token t's share of the read. For the delta rule z is the same sum, so w_t
is still exactly each token's term of the denominator (the key-match weight), while M stores only what was not
already retrievable, so w_t is not token t's share of the numerator. For delta_corrected each token's term of z is
also scaled by gamma_t = clip(1 - sigma(k_t) . z_{s-1} / ||sigma(k_t)||^2, 0, 1), which these weights do not
reproduce: they are the weights before that correction.

Needle share. sum of w over the needle tokens [needle_start, needle_end) / sum of w over every memory token, per
layer and head, averaged over the answer positions, depths and trials (per-depth values are kept in the JSON). An
answer position whose memory is empty (segment 0) has no share and is left out of the means. "Filler" below is
every memory token outside the needle (instruction and newlines included: a few dozen tokens against thousands).

Filler-to-needle ratio r = (mean w per filler token) / (mean w per needle token), the means over every (answer
position, token) pair of the length's prompts. If every query weighted tokens like that, the share at another
length L' would be

    predicted share(L') = n_needle / (n_needle + r * n_filler(L'))

with n_filler(L') the filler tokens in memory at the answer of a length-L' prompt (the needle fully written). A
constant r means dilution alone sets the share: the tables compare the share predicted from the shortest length
at the longest with the share measured there.

Reads by segment. For each segment s of the longest prompt (the query's own segment), the read's denominator
sigma(q) . z_{s-1} and the norm of the read ||A_mem|| = ||sigma(q) M_{s-1} / (sigma(q) z_{s-1})||, averaged over
the segment's queries, the prompts and the heads: how reads shrink (or not) with the number of segments written.
M_{s-1}, z_{s-1} are the layer's own memory, for every rule: the rule's batched update (`rule.prefix`, through
`attention.memory.segment_memories`) run on the captured keys and values, i.e. the computation the layer does.

Gates. sigmoid(gate_logit) per layer and head (`model.gates()`), and with a write gate the mean write strength
beta over the filler and over the needle tokens of the prompts, per layer and KV head.

Write knock-out. The filler's writes removed (the model's per-layer write_scale = 0; kept: the instruction and its
newline, the needle, the last `keep_last_tokens` prompt tokens and the answer) in layer 0 only, layer 1 only, ...,
in all layers, and the unmodified model; each scored teacher-forced: exact (the argmax at every answer position is
the key's digit) and digit accuracy (the share of answer positions right). The input is fed in segment-aligned
chunks (a multiple of N, at most `chunk_size` tokens), as write_scale requires.

Offset class. Per length, where the prompt ends in its segment, r = P mod N (data.passkey.offset_class): `opens`
(r = 0: the answer starts a new segment, the question is reachable only through the memory), `straddles` (0 < r <
the question's tokens) or `inside`; read every number of a length with it.

Shape legend: B prompts in a batch, T input tokens, A answer positions, L layers, H query heads, Hkv KV heads,
G = H / Hkv, S segments, N segment length, Dk feature dim, Dv value dim.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from attention.infini import InfiniAttention
from attention.memory import EPS, memory_dtype, segment_memories
from data.passkey import PasskeyTemplate, offset_class, trial_passkey
from data.tokenizer import Tokenizer
from evaluation.report import finite_or_none, write_json
from models.transformer import Transformer

log = logging.getLogger(__name__)

UNMODIFIED = "none"
"""Knock-out variant name of the unmodified model (every token written)."""
ALL_LAYERS = "all"
"""Knock-out variant name of the filler knocked out in every layer."""


def layer_variant(layer: int) -> str:
    """Knock-out variant name of the filler knocked out in one layer."""
    return f"layer{layer}"


# ---------------------------------------------------------------- prompts


@dataclass(frozen=True)
class ProbePrompt:
    """One teacher-forced passkey input and where its answer digits are predicted."""

    length: int
    """P, the prompt's tokens (the answer starts at position P)."""
    depth: float
    trial: int
    passkey: str
    tokens: list[int]
    """Prompt + answer tokens: (T,) with T = P + answer tokens."""
    needle_start: int
    needle_end: int
    answer_positions: tuple[int, ...]
    """Positions whose next-token prediction is a key digit (P + j - 1 for digit-bearing answer token j)."""
    answer_targets: tuple[int, ...]
    """The digit tokens those positions should predict."""
    keep_until: int
    """Tokens [0, keep_until) are the instruction and its newline: kept by the knock-out."""


def probe_prompts(tokenizer: Tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int,
                  digits: int = 5) -> list[ProbePrompt]:
    """The grid, ordered by length, depth, trial; the keys are the passkey evaluation's (trial_passkey)."""
    template = PasskeyTemplate(tokenizer)
    keep_until = len(template.instruction) + len(template.separator)
    prompts = []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                p = template.prompt(int(length), float(depth), trial_passkey(seed, length, depth, trial, digits))
                digit_tokens = [(j, token) for j, token in enumerate(p.answer_tokens)
                                if any(c.isdigit() for c in tokenizer.decode([token]))]
                if not digit_tokens:
                    raise ValueError(f"the answer {p.answer_tokens} of key {p.passkey} has no digit token")
                prompts.append(ProbePrompt(
                    length=len(p.tokens), depth=float(depth), trial=trial, passkey=p.passkey,
                    tokens=p.tokens + p.answer_tokens, needle_start=p.needle_start, needle_end=p.needle_end,
                    answer_positions=tuple(len(p.tokens) + j - 1 for j, _ in digit_tokens),
                    answer_targets=tuple(token for _, token in digit_tokens), keep_until=keep_until,
                ))
    return prompts


def knockout_keep(prompt: ProbePrompt, keep_last_tokens: int) -> Tensor:
    """write_scale of the filler knock-out, (T,) float32: 1 on the instruction and its newline, the needle, the last
    keep_last_tokens prompt tokens and the answer; 0 on every other token (the filler's writes removed)."""
    keep = torch.zeros(len(prompt.tokens))
    keep[: prompt.keep_until] = 1.0
    keep[prompt.needle_start : prompt.needle_end] = 1.0
    keep[max(0, prompt.length - keep_last_tokens) :] = 1.0
    return keep


# ---------------------------------------------------------------- the model, chunk by chunk


def infini_layers(model: Transformer) -> list[InfiniAttention]:
    """The model's InfiniAttention layers, in order; a clear error for `local`/`full`/`xl` models (no memory)."""
    layers = [layer.attention for layer in model.layers]
    if not all(isinstance(a, InfiniAttention) for a in layers):
        raise ValueError(f"memory_probe needs a model with a compressive memory (attention='infini'); this model "
                         f"has attention={str(model.config.attention)!r}, which keeps no memory to probe")
    return layers  # type: ignore[return-value]


def chunk_length(model: Transformer, chunk_size: int) -> int:
    """Tokens per forward call: chunk_size rounded down to whole segments (at least one)."""
    N = model.config.segment_len
    return max(N, chunk_size // N * N)


@torch.no_grad()
def teacher_forced_logits(model: Transformer, tokens: Tensor, positions: Sequence[int],
                          keep: dict[int, Tensor] | None = None, chunk_size: int = 4096) -> Tensor:
    """Logits at `positions` of a teacher-forced stream, optionally with write knock-outs.

    tokens: (B, T); keep: {layer index: write_scale (B, T)} for the layers knocked out (others write everything).
    The stream is fed in segment-aligned chunks (chunk_length), so every call starts on a segment boundary, as the
    model's write_scale requires. Returns (B, A, vocab_size).
    """
    layers = infini_layers(model)
    T = tokens.shape[1]
    scale = None
    if keep:
        scale = torch.ones(len(layers), *tokens.shape, device=tokens.device)  # (L, B, T)
        for index, layer_keep in keep.items():
            if tuple(layer_keep.shape) != tuple(tokens.shape):
                raise ValueError(f"knock-out write_scale of layer {index} is {tuple(layer_keep.shape)}, the tokens "
                                 f"{tuple(tokens.shape)}")
            scale[index] = layer_keep
    step = chunk_length(model, chunk_size)
    hidden, state = [], None
    for start in range(0, T, step):
        stop = min(T, start + step)
        h, state = model.hidden(tokens[:, start:stop], state, None if scale is None else scale[..., start:stop])
        hidden.append(h)
    h = torch.cat(hidden, dim=1)  # (B, T, dim)
    return model.logits(h[:, list(positions)])


@torch.no_grad()
def capture_inputs(model: Transformer, tokens: Tensor, positions: Sequence[int], chunk_size: int = 4096
                   ) -> tuple[Tensor, list[Tensor]]:
    """The unmodified teacher-forced pass, capturing every attention sub-block's input (the block input after its
    norm) with forward pre-hooks on `layer.attention`. Returns the logits at `positions` (B, A, vocab_size) and
    one (B, T, dim) input per layer."""
    captured: list[list[Tensor]] = [[] for _ in model.layers]

    def hook(index: int):
        return lambda _module, args: captured[index].append(args[0])

    hooks = [layer.attention.register_forward_pre_hook(hook(i)) for i, layer in enumerate(model.layers)]
    try:
        logits = teacher_forced_logits(model, tokens, positions, chunk_size=chunk_size)
    finally:
        for handle in hooks:
            handle.remove()
    return logits, [torch.cat(chunks, dim=1) for chunks in captured]


# ---------------------------------------------------------------- read weights


@torch.no_grad()
def read_weights(attention: InfiniAttention, x: Tensor, positions: Sequence[int],
                 write_scale: Tensor | None = None) -> Tensor:
    """w_t = beta_t sigma(q_i) . sigma(k_t) for the queries at `positions` over every token t of the segments
    before the query's segment (0 elsewhere), in the memory dtype.

    x: (B, T, dim) the attention sub-block's input; write_scale: (B, T) or None. Returns (B, H, A, T).
    """
    N = attention.segment_len
    dtype = memory_dtype(x.dtype)
    q, k, v = attention.project(x)
    pos = torch.as_tensor(list(positions), device=x.device)
    q, k, v = q[:, :, pos].to(dtype), k.to(dtype), v.to(dtype)  # (B, H, A, D), (B, Hkv, T, D)
    rule = attention.rule
    beta = rule.write_strength(k, v)  # (B, Hkv, T) or None
    if write_scale is not None:
        keep = write_scale.to(dtype).unsqueeze(1)  # (B, 1, T)
        beta = keep if beta is None else beta * keep
    sigma_q, sigma_k = rule.features(q), rule.features(k)  # (B, H, A, Dk), (B, Hkv, T, Dk)
    B, H, A, Dk = sigma_q.shape
    Hkv, T = sigma_k.shape[1], sigma_k.shape[2]
    w = sigma_q.view(B, Hkv, H // Hkv, A, Dk) @ sigma_k.unsqueeze(2).transpose(-1, -2)  # (B, Hkv, G, A, T)
    if beta is not None:
        w = w * beta[:, :, None, None, :]
    in_memory = torch.arange(T, device=x.device) < (pos // N * N).unsqueeze(-1)  # (A, T)
    return (w * in_memory).view(B, H, A, T)


@dataclass
class ShareStatistics:
    """Sums of one batch's read weights, per prompt, layer-free: the pieces of the needle share and the ratio."""

    needle: Tensor  # (B, H, A) sum of w over the needle tokens in memory
    filler: Tensor  # (B, H, A) sum of w over the other memory tokens
    needle_tokens: Tensor  # (B, A) needle tokens in memory
    filler_tokens: Tensor  # (B, A) other tokens in memory

    @property
    def share(self) -> Tensor:
        """Needle share per prompt, head and answer position (NaN where the memory is empty): (B, H, A)."""
        total = self.needle + self.filler
        return torch.where(total > 0, self.needle / total.clamp_min(torch.finfo(total.dtype).tiny),
                           torch.full_like(total, math.nan))


def share_statistics(w: Tensor, needle: Tensor, in_memory: Tensor) -> ShareStatistics:
    """w: (B, H, A, T) read weights (0 outside the memory); needle: (B, T) bool; in_memory: (A, T) bool."""
    needle_w = (w * needle[:, None, None, :]).sum(-1)
    needle_in_memory = needle[:, None, :] & in_memory[None]  # (B, A, T)
    n_needle = needle_in_memory.sum(-1).to(w.dtype)
    n_memory = in_memory.sum(-1).to(w.dtype).expand_as(n_needle)
    return ShareStatistics(needle_w, w.sum(-1) - needle_w, n_needle, n_memory - n_needle)


def filler_ratio(stats: Sequence[ShareStatistics]) -> Tensor:
    """r = (mean w per filler token) / (mean w per needle token) over every (answer position, token) pair of
    the batches, per head: (H,); NaN where no needle token was in memory."""
    needle_w = sum(s.needle.sum((0, 2)) for s in stats)  # (H,)
    filler_w = sum(s.filler.sum((0, 2)) for s in stats)
    n_needle = sum(float(s.needle_tokens.sum()) for s in stats)
    n_filler = sum(float(s.filler_tokens.sum()) for s in stats)
    if n_needle == 0 or n_filler == 0:
        return torch.full_like(needle_w, math.nan)
    return torch.where(needle_w > 0, (filler_w / n_filler) / (needle_w / n_needle).clamp_min(1e-300),
                       torch.full_like(needle_w, math.nan))


def predicted_share(ratio: float, needle_tokens: float, filler_tokens: float) -> float:
    """The needle share if every filler token weighed `ratio` needle tokens: n_n / (n_n + r n_f)."""
    return needle_tokens / (needle_tokens + ratio * filler_tokens)


def memory_tokens_at(length: int, answer_offsets: Sequence[int], segment_len: int) -> float:
    """Tokens in memory at the answer positions of a length-`length` prompt, averaged over the positions;
    answer_offsets are the positions minus the prompt length (-1 for the first digit of " 12345.")."""
    return sum((length + o) // segment_len * segment_len for o in answer_offsets) / len(answer_offsets)


# ---------------------------------------------------------------- results


@dataclass
class KnockoutScore:
    """Teacher-forced scores of one knock-out variant at one length."""

    exact: float
    digit_accuracy: float
    exact_by_depth: dict[float, float]
    digit_accuracy_by_depth: dict[float, float]


@dataclass
class LengthProbe:
    """Every probe of one prompt length. Matrices are [layer][head] (write strengths [layer][KV head])."""

    length: int
    offset: int
    """P mod N."""
    offset_class: str
    """opens | straddles | inside (see the module docstring)."""
    n_prompts: int
    answer_offsets: list[int]
    """Answer positions minus P (the same for every key of the byte tokenizer)."""
    needle_tokens: float
    """Mean needle length in tokens."""
    memory_tokens: float
    """Mean tokens in memory at the answer positions."""
    needle_share: list[list[float]]
    needle_share_by_depth: dict[float, list[list[float]]]
    filler_ratio: list[list[float]]
    filler_ratio_by_depth: dict[float, list[list[float]]]
    knockout: dict[str, KnockoutScore]
    """Variant (UNMODIFIED, layer<l>, ALL_LAYERS) -> scores; only UNMODIFIED when knock-outs were not run."""
    write_strength: dict[str, list[list[float]]] | None = None
    """{"filler": [layer][kv], "needle": [layer][kv]} mean beta over the prompt tokens; None without write gate."""

    @property
    def uniform_share(self) -> float:
        """The needle share a read that weighs every memory token alike would give."""
        return self.needle_tokens / self.memory_tokens if self.memory_tokens else math.nan


@dataclass
class SegmentCurve:
    """Reads by the query's segment index for one length: [layer][segment] (head means) and [layer][head][segment].
    Segment 0 reads an empty memory: 0."""

    length: int
    sigma_qz: list[list[float]]
    read_norm: list[list[float]]
    sigma_qz_by_head: list[list[list[float]]]
    read_norm_by_head: list[list[list[float]]]


@dataclass
class ProbeResults:
    """Everything probe_memory measured (see the module docstring for the definitions)."""

    lengths: list[int]
    depths: list[float]
    trials: int
    seed: int
    gates: list[list[float]]
    """sigmoid(gate_logit): [layer][head]."""
    per_length: list[LengthProbe]
    segment_curve: SegmentCurve | None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def segment_len(self) -> int:
        return int(self.settings["segment_len"])

    def at(self, length: int) -> LengthProbe:
        for probe in self.per_length:
            if probe.length == length:
                return probe
        raise KeyError(f"length {length} was not probed; probed: {self.lengths}")

    def predicted_share(self, source: int, target: int) -> list[list[float]]:
        """[layer][head] needle share predicted at `target` tokens from the ratio r measured at `source` (target
        need not have been measured)."""
        src = self.at(source)
        filler = memory_tokens_at(target, src.answer_offsets, self.segment_len) - src.needle_tokens
        return [[predicted_share(r, src.needle_tokens, filler) for r in row] for row in src.filler_ratio]

    def summary(self) -> dict[str, Any]:
        """JSON-ready: settings, gates, per length (every matrix, per depth too), predictions between every two
        lengths, the segment curve; depths as string keys, NaN as null."""

        def clean(x: Any) -> Any:
            if isinstance(x, float):
                return finite_or_none(x)
            if isinstance(x, dict):
                return {str(k): clean(v) for k, v in x.items()}
            if isinstance(x, list | tuple):
                return [clean(v) for v in x]
            return x

        per_length = {}
        for p in self.per_length:
            row = asdict(p)
            row["uniform_share"] = p.uniform_share
            per_length[str(p.length)] = row
        predictions = {str(s): {str(t): self.predicted_share(s, t) for t in self.lengths} for s in self.lengths}
        return clean({
            "task": "memory_probe",
            "lengths": self.lengths,
            "depths": self.depths,
            "trials": self.trials,
            "seed": self.seed,
            "settings": self.settings,
            "gates": self.gates,
            "per_length": per_length,
            "predicted_share": predictions,
            "segment_curve": None if self.segment_curve is None else asdict(self.segment_curve),
        })


def needle_share_summary(results: ProbeResults) -> dict[str, float]:
    """Flat metrics for a training loop's logger: probe/needle_share/<length>/layer<l>/head<h>,
    .../layer<l>/mean and probe/needle_share/<length>/mean, probe/filler_ratio/<length>/mean, and the unmodified
    model's teacher-forced probe/exact/<length>. Non-finite values (a memory still empty at the answer) are left
    out."""
    metrics: dict[str, float] = {}

    def put(key: str, value: float) -> None:
        if math.isfinite(value):
            metrics[key] = float(value)

    for p in results.per_length:
        prefix = f"probe/needle_share/{p.length}"
        for layer, row in enumerate(p.needle_share):
            for head, value in enumerate(row):
                put(f"{prefix}/layer{layer}/head{head}", value)
            put(f"{prefix}/layer{layer}/mean", _nanmean(row))
        put(f"{prefix}/mean", _nanmean([v for row in p.needle_share for v in row]))
        put(f"probe/filler_ratio/{p.length}/mean", _nanmean([v for row in p.filler_ratio for v in row]))
        put(f"probe/exact/{p.length}", p.knockout[UNMODIFIED].exact)
    return metrics


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


# ---------------------------------------------------------------- the probe


class _LengthAccumulator:
    """Per-batch pieces of one length, folded into a LengthProbe at the end."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.stats: list[list[tuple[float, ShareStatistics]]] = [[] for _ in range(n_layers)]  # per layer
        self.scores: dict[str, list[tuple[float, float, float]]] = {}  # variant -> (depth, exact, digits)
        self.beta_sums: list[dict[str, Tensor]] | None = None  # per layer {"filler"/"needle": (Hkv,)}
        self.beta_counts = {"filler": 0.0, "needle": 0.0}
        self.needle_tokens: list[int] = []
        self.answer_offsets: list[int] = []

    def add_scores(self, variant: str, batch: list[ProbePrompt], logits: Tensor) -> None:
        targets = torch.tensor([p.answer_targets for p in batch], device=logits.device)  # (B, A)
        correct = (logits.argmax(-1) == targets).float()
        for p, row in zip(batch, correct):
            self.scores.setdefault(variant, []).append((p.depth, float(row.min()), float(row.mean())))

    def add_beta(self, layer: int, beta: Tensor, needle: Tensor, prompt_mask: Tensor) -> None:
        """beta (B, Hkv, T); needle, prompt_mask (B, T) bool."""
        if self.beta_sums is None:
            self.beta_sums = [{} for _ in range(self.n_layers)]
        filler = prompt_mask & ~needle
        for kind, mask in (("needle", needle), ("filler", filler)):
            total = (beta * mask[:, None]).sum((0, 2))  # (Hkv,)
            sums = self.beta_sums[layer]
            sums[kind] = sums[kind] + total if kind in sums else total
            if layer == 0:
                self.beta_counts[kind] += float(mask.sum())

    def finish(self, length: int, segment_len: int, question_len: int, depths: Sequence[float]) -> LengthProbe:
        def share(stats: list[ShareStatistics]) -> list[float]:
            values = torch.cat([s.share.transpose(0, 1).flatten(1) for s in stats], dim=1)  # (H, B*A)
            return [_nanmean(row.tolist()) for row in values]

        def by_depth(fn) -> dict[float, list[list[float]]]:
            return {d: [fn([s for depth, s in layer if depth == d]) for layer in self.stats] for d in depths}

        def ratio(stats: list[ShareStatistics]) -> list[float]:
            return filler_ratio(stats).tolist()

        def scores(rows: list[tuple[float, float, float]]) -> KnockoutScore:
            def mean(values: list[float]) -> float:
                return sum(values) / len(values)

            return KnockoutScore(
                exact=mean([e for _, e, _ in rows]), digit_accuracy=mean([a for _, _, a in rows]),
                exact_by_depth={d: mean([e for depth, e, _ in rows if depth == d]) for d in depths},
                digit_accuracy_by_depth={d: mean([a for depth, _, a in rows if depth == d]) for d in depths})

        strength = None
        if self.beta_sums is not None:
            strength = {kind: [(sums[kind] / max(self.beta_counts[kind], 1.0)).tolist() for sums in self.beta_sums]
                        for kind in ("filler", "needle")}
        offset = length % segment_len
        return LengthProbe(
            length=length, offset=offset, offset_class=offset_class(offset, segment_len, question_len),
            n_prompts=len(self.needle_tokens), answer_offsets=self.answer_offsets,
            needle_tokens=sum(self.needle_tokens) / len(self.needle_tokens),
            memory_tokens=memory_tokens_at(length, self.answer_offsets, segment_len),
            needle_share=[share([s for _, s in layer]) for layer in self.stats],
            needle_share_by_depth=by_depth(share),
            filler_ratio=[ratio([s for _, s in layer]) for layer in self.stats],
            filler_ratio_by_depth=by_depth(ratio),
            knockout={variant: scores(rows) for variant, rows in self.scores.items()},
            write_strength=strength,
        )


class _CurveAccumulator:
    """Sums of sigma(q).z and ||A_mem|| per layer, head and segment over the prompts of one length."""

    def __init__(self):
        self.qz: list[Tensor] = []  # per layer (H, S)
        self.norm: list[Tensor] = []
        self.count: Tensor | None = None  # (S,) queries per segment over the prompts

    def add(self, layer: int, qz: Tensor, norm: Tensor, count: Tensor) -> None:
        if layer == len(self.qz):
            self.qz.append(qz)
            self.norm.append(norm)
        else:
            self.qz[layer] = self.qz[layer] + qz
            self.norm[layer] = self.norm[layer] + norm
        if layer == 0:
            self.count = count if self.count is None else self.count + count

    def finish(self, length: int) -> SegmentCurve:
        qz = [(s / self.count).tolist() for s in self.qz]  # [layer][head][segment]
        norm = [(s / self.count).tolist() for s in self.norm]

        def head_mean(rows: list[list[float]]) -> list[float]:
            return [sum(col) / len(col) for col in zip(*rows)]

        return SegmentCurve(length, [head_mean(r) for r in qz], [head_mean(r) for r in norm], qz, norm)


@torch.no_grad()
def segment_reads(attention: InfiniAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """sigma(q) . z_{s-1} and ||A_mem|| for every query of x, summed per head and segment over the batch.

    x: (B, T, dim) the attention input of a fresh stream; the memory is the layer's own (rule.prefix via
    segment_memories, with its write gate). Returns sums (H, S) and (H, S), and the query count per segment (S,).
    """
    N = attention.segment_len
    dtype = memory_dtype(x.dtype)
    q, k, v = (t.to(dtype) for t in attention.project(x))
    rule = attention.rule
    strength = rule.write_strength(k, v)  # (B, Hkv, T) or None
    B, H, T, _ = q.shape
    Hkv, S = k.shape[1], -(-T // N)
    pad = S * N - T

    def segments(t: Tensor) -> Tensor:  # (B, h, T, ...) -> (B, h, S, N, ...), zero-padded
        if pad:
            t = torch.nn.functional.pad(t, (0, 0) * (t.dim() - 3) + (0, pad))
        return t.reshape(*t.shape[:2], S, N, *t.shape[3:])

    sigma_q, sigma_k = rule.features(q), rule.features(k)  # (B, H, T, Dk), (B, Hkv, T, Dk)
    beta = None if strength is None else segments(strength.unsqueeze(-1)).squeeze(-1)
    M_prev, z_prev, _ = segment_memories(rule.empty(B, x.device, dtype), segments(sigma_k), segments(v), T // N,
                                         rule, beta)  # (B, Hkv, S, Dk, Dv), (B, Hkv, S, Dk)
    q_seg = segments(sigma_q).view(B, Hkv, H // Hkv, S, N, -1)  # (B, Hkv, G, S, N, Dk)
    qz = (q_seg @ z_prev[:, :, None, :, :, None]).squeeze(-1)  # (B, Hkv, G, S, N)
    numerator = q_seg @ M_prev.unsqueeze(2)  # (B, Hkv, G, S, N, Dv)
    norm = numerator.norm(dim=-1) / qz.clamp_min(EPS)
    valid = (torch.arange(S * N, device=x.device) < T).view(S, N)  # (S, N)
    qz, norm = (t.reshape(B, H, S, N) * valid for t in (qz, norm))
    return qz.sum((0, 3)), norm.sum((0, 3)), valid.sum(-1).to(dtype) * B


def _batches(prompts: list[ProbePrompt], batch_size: int) -> list[list[ProbePrompt]]:
    """Consecutive prompts with equal input length and answer positions, at most batch_size each."""
    batches: list[list[ProbePrompt]] = []
    for p in prompts:
        last = batches[-1] if batches else None
        if (last and len(last) < batch_size and len(last[0].tokens) == len(p.tokens)
                and last[0].answer_positions == p.answer_positions):
            last.append(p)
        else:
            batches.append([p])
    return batches


@torch.no_grad()
def probe_memory(
    model: Transformer,
    tokenizer: Tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float] = (0.0, 0.5, 1.0),
    trials: int = 2,
    seed: int = 0,
    *,
    digits: int = 5,
    keep_last_tokens: int = 40,
    knockouts: bool = True,
    segment_curve: bool = True,
    chunk_size: int = 4096,
    batch_size: int = 8,
    training_length: int | None = None,
    out_dir: str | Path | None = None,
) -> ProbeResults:
    """Run every probe of the module docstring on `model` (an `infini` model) and return the results.

    lengths: prompt lengths in tokens, exact (the offset class of each is reported, not chosen); depths in [0, 1];
    trials per (length, depth); seed fixes the keys (the passkey evaluation's). knockouts: also run the filler
    knock-outs (n_layers + 1 more teacher-forced passes per prompt); segment_curve: the reads by segment at the
    longest length. chunk_size: tokens per forward call (rounded down to whole segments); batch_size: prompts of
    equal length run together (every layer's input of a batch is kept for the read weights, B x T x dim x n_layers
    values: lower it for large models at long lengths). training_length only labels the tables ("x16"). Writes
    memory_probe.json/.md/.png when out_dir is given. The model is put in eval mode and restored.
    """
    layers = infini_layers(model)
    if not lengths or not depths:
        raise ValueError("memory_probe needs at least one length and one depth")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if keep_last_tokens < 0:
        raise ValueError(f"keep_last_tokens must be >= 0, got {keep_last_tokens}")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"needle depths must lie in [0, 1], got {list(depths)}")
    lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"lengths must be distinct, got {lengths}")
    N, n_layers = model.config.segment_len, len(layers)
    question_len = PasskeyTemplate(tokenizer).question_len
    device = model.tok_embeddings.weight.device
    longest = max(lengths)
    variants = [layer_variant(i) for i in range(n_layers)] + ([ALL_LAYERS] if n_layers > 1 else [])
    start_time = time.perf_counter()
    was_training = model.training
    model.eval()
    per_length: list[LengthProbe] = []
    curve: SegmentCurve | None = None
    try:
        for length in lengths:
            acc = _LengthAccumulator(n_layers)
            curve_acc = _CurveAccumulator() if segment_curve and length == longest else None
            prompts = probe_prompts(tokenizer, [length], depths, trials, seed, digits)
            for batch in _batches(prompts, batch_size):
                tokens = torch.tensor([p.tokens for p in batch], device=device)  # (B, T)
                positions = list(batch[0].answer_positions)
                T = tokens.shape[1]
                acc.needle_tokens.extend(p.needle_end - p.needle_start for p in batch)
                acc.answer_offsets = [i - length for i in positions]
                logits, inputs = capture_inputs(model, tokens, positions, chunk_size)  # the unmodified pass
                acc.add_scores(UNMODIFIED, batch, logits)
                needle = torch.zeros(len(batch), T, dtype=torch.bool, device=device)
                for row, p in enumerate(batch):
                    needle[row, p.needle_start : p.needle_end] = True
                prompt_mask = torch.arange(T, device=device) < length  # (T,)
                pos = torch.tensor(positions, device=device)
                in_memory = torch.arange(T, device=device) < (pos // N * N).unsqueeze(-1)  # (A, T)
                for i, attention in enumerate(layers):
                    x = inputs.pop(0)  # (B, T, dim) of layer i, freed after this layer
                    w = read_weights(attention, x, positions)  # (B, H, A, T)
                    stats = share_statistics(w, needle, in_memory)
                    for row, p in enumerate(batch):
                        acc.stats[i].append((p.depth, ShareStatistics(
                            stats.needle[row : row + 1], stats.filler[row : row + 1],
                            stats.needle_tokens[row : row + 1], stats.filler_tokens[row : row + 1])))
                    if attention.rule.write_gate is not None:
                        _, k, v = attention.project(x)
                        dtype = memory_dtype(x.dtype)
                        beta = attention.rule.write_strength(k.to(dtype), v.to(dtype))  # (B, Hkv, T)
                        acc.add_beta(i, beta, needle, prompt_mask.expand(len(batch), -1))
                    if curve_acc is not None:
                        curve_acc.add(i, *segment_reads(attention, x[:, :length]))
                    del x, w
                if knockouts:
                    keeps = torch.stack([knockout_keep(p, keep_last_tokens) for p in batch]).to(device)  # (B, T)
                    for variant in variants:
                        chosen = range(n_layers) if variant == ALL_LAYERS else [int(variant.removeprefix("layer"))]
                        logits = teacher_forced_logits(model, tokens, positions, {i: keeps for i in chosen},
                                                       chunk_size)
                        acc.add_scores(variant, batch, logits)
            probe = acc.finish(length, N, question_len, depths)
            per_length.append(probe)
            if curve_acc is not None:
                curve = curve_acc.finish(length)
            log.info("memory probe length=%d (%s): needle share %s, exact %.2f", length, probe.offset_class,
                     [[round(v, 3) for v in row] for row in probe.needle_share], probe.knockout[UNMODIFIED].exact)
    finally:
        model.train(was_training)
    cfg = model.config
    gates = model.gates()
    settings = {
        "segment_len": N, "n_layers": n_layers, "n_heads": cfg.n_heads, "n_kv_heads": layers[0].n_kv_heads,
        "memory_update": layers[0].rule.name, "feature_map": layers[0].rule.feature_map.name,
        "write_gate": layers[0].rule.write_gate is not None, "question_tokens": question_len, "digits": digits,
        "keep_last_tokens": keep_last_tokens, "knockouts": knockouts, "chunk_size": chunk_length(model, chunk_size),
        "batch_size": batch_size, "training_length": training_length,
        "seconds": time.perf_counter() - start_time,
    }
    results = ProbeResults(lengths, depths, trials, seed, gates.float().tolist() if gates is not None else [],
                           per_length, curve, settings)
    if out_dir is not None:
        write_outputs(results, out_dir)
    return results


# ---------------------------------------------------------------- reports


def _pct(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{100 * x:.1f}"


def _num(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.3g}"


def _times(length: int, base: int | None) -> str:
    return f" ({round(length / base, 1):g}x)" if base else ""


def markdown_report(results: ProbeResults) -> str:
    """memory_probe.md: prompt ends, needle share, ratio and prediction, knock-outs, gates, write strengths, reads
    by segment."""
    s = results.settings
    base = s.get("training_length")
    lines = [
        "# Memory probe",
        "",
        f"Model: {s['n_layers']} layers x {s['n_heads']} heads ({s['n_kv_heads']} KV heads), "
        f"segment {s['segment_len']}, rule {s['memory_update']}, feature map {s['feature_map']}, "
        f"write gate {'yes' if s['write_gate'] else 'no'}. "
        f"Prompts: depths {results.depths}, {results.trials} trial(s) each, seed {results.seed}; teacher-forced.",
        "",
        "## Prompt ends",
        "",
        "| length | P mod N | offset class | tokens in memory at the answer | needle tokens | uniform share (%) |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for p in results.per_length:
        lines.append(f"| {p.length}{_times(p.length, base)} | {p.offset} | {p.offset_class} | {p.memory_tokens:g} | "
                     f"{p.needle_tokens:g} | {_pct(p.uniform_share)} |")
    lengths = results.lengths
    lines += ["", "## Needle share of the read weight at the answer (%)", "",
              "Mean over answer positions, depths and trials; per depth in memory_probe.json.", "",
              "| layer | head | " + " | ".join(str(n) for n in lengths) + " |",
              "|---:|---:|" + "---:|" * len(lengths)]
    n_layers, n_heads = s["n_layers"], s["n_heads"]
    for layer in range(n_layers):
        for head in range(n_heads):
            values = " | ".join(_pct(results.at(n).needle_share[layer][head]) for n in lengths)
            lines.append(f"| {layer} | {head} | {values} |")
        means = " | ".join(_pct(_nanmean(results.at(n).needle_share[layer])) for n in lengths)
        lines.append(f"| {layer} | mean | {means} |")
    lines.append("| uniform | | " + " | ".join(_pct(results.at(n).uniform_share) for n in lengths) + " |")

    source, target = min(lengths), max(lengths)
    lines += ["", "## Filler-to-needle ratio r and the share it predicts", "",
              "r = mean read weight per filler token / per needle token; predicted share = n_needle / (n_needle + "
              "r n_filler) at the target length.", "",
              "| layer | head | " + " | ".join(f"r at {n}" for n in lengths)
              + f" | predicted at {target} ({target / source:.1f}x) from {source} / measured (%) |",
              "|---:|---:|" + "---:|" * (len(lengths) + 1)]
    predicted = results.predicted_share(source, target)
    for layer in range(n_layers):
        for head in range(n_heads):
            ratios = " | ".join(_num(results.at(n).filler_ratio[layer][head]) for n in lengths)
            measured = results.at(target).needle_share[layer][head]
            lines.append(f"| {layer} | {head} | {ratios} | {_pct(predicted[layer][head])} / {_pct(measured)} |")

    variants = list(results.per_length[0].knockout)
    if len(variants) > 1:
        names = {UNMODIFIED: "filler written", ALL_LAYERS: "all layers"}
        header = [names.get(v, f"layer {v.removeprefix('layer')}") for v in variants]
        header[1] = f"filler knocked out, {header[1]}"
        lines += ["", "## Write knock-out", "",
                  f"Teacher-forced exact match %, digit accuracy % in parentheses. Knocked out: every write but the "
                  f"instruction's, the needle's, the last {s['keep_last_tokens']} prompt tokens' and the answer's.",
                  "", "| length | " + " | ".join(header) + " |", "|---:|" + "---:|" * len(variants)]
    else:
        variants = [UNMODIFIED]
        lines += ["", "## Teacher-forced scores", "", "| length | exact (%) | digit accuracy (%) |", "|---:|---:|---:|"]
    for p in results.per_length:
        cells = [f"{_pct(p.knockout[v].exact)} ({_pct(p.knockout[v].digit_accuracy)})" for v in variants]
        if len(variants) == 1:
            cells = [_pct(p.knockout[UNMODIFIED].exact), _pct(p.knockout[UNMODIFIED].digit_accuracy)]
        multiple = _times(p.length, base)[2:-1]  # "16x" or ""
        label = f"{p.length} ({multiple + ', ' if multiple else ''}{p.offset_class})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    if results.gates:
        lines += ["", "## Gates sigmoid(beta)", "",
                  "| layer | " + " | ".join(f"head {h}" for h in range(n_heads)) + " |", "|---:|" + "---:|" * n_heads]
        lines += [f"| {layer} | " + " | ".join(f"{g:.3f}" for g in row) + " |"
                  for layer, row in enumerate(results.gates)]
    if any(p.write_strength for p in results.per_length):
        lines += ["", "## Write strength beta (mean over the prompt tokens)", "",
                  "| length | layer | KV head | filler | needle | needle / filler |", "|---:|---:|---:|---:|---:|---:|"]
        for p in results.per_length:
            assert p.write_strength is not None
            for layer, (filler, needle) in enumerate(zip(p.write_strength["filler"], p.write_strength["needle"])):
                for kv, (f, n) in enumerate(zip(filler, needle)):
                    ratio = _num(n / f if f else math.nan)
                    lines.append(f"| {p.length} | {layer} | {kv} | {f:.4f} | {n:.4f} | {ratio} |")

    c = results.segment_curve
    if c is not None:
        S = len(c.sigma_qz[0])
        shown = sorted({s_ for s_ in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024] if s_ < S} | {S - 1})
        lines += ["", f"## Reads by the query's segment at {c.length} tokens", "",
                  "sigma(q) . z (the read's denominator) and ||A_mem||, mean over the segment's queries, prompts and "
                  "heads; every segment in memory_probe.json.", "",
                  "| segment | " + " | ".join(f"layer {layer} sigma(q).z | layer {layer} norm"
                                              for layer in range(n_layers)) + " |", "|---:|" + "---:|---:|" * n_layers]
        for seg in shown:
            cells = " | ".join(f"{_num(c.sigma_qz[layer][seg])} | {_num(c.read_norm[layer][seg])}"
                               for layer in range(n_layers))
            lines.append(f"| {seg} | {cells} |")
    return "\n".join(lines) + "\n"


def figure(results: ProbeResults) -> Figure:
    """Needle share vs length per layer/head, and sigma(q).z and ||A_mem|| vs segment index per layer. A plain
    matplotlib Figure (no pyplot global state)."""
    n_layers, n_heads = results.settings["n_layers"], results.settings["n_heads"]
    panels = 1 + 2 * (results.segment_curve is not None)
    fig = Figure(figsize=(4.2 * panels, 3.6), dpi=120)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    colors = [f"C{i}" for i in range(10)]
    styles = ["-", "--", ":", "-."]
    for layer in range(n_layers):
        for head in range(n_heads):
            values = [100 * results.at(n).needle_share[layer][head] for n in results.lengths]
            ax.plot(results.lengths, values, styles[layer % len(styles)], marker="o", markersize=3,
                    color=colors[head % len(colors)], label=f"L{layer} h{head}")
    ax.plot(results.lengths, [100 * results.at(n).uniform_share for n in results.lengths], color="gray",
            linewidth=1, label="uniform")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle share of the read weight (%)")
    ax.set_ylim(0, 100)
    ax.set_title("needle share at the answer", fontsize=10)
    ax.legend(fontsize=6, ncol=max(1, n_layers))
    c = results.segment_curve
    if c is not None:
        segments = list(range(len(c.sigma_qz[0])))
        for ax, values, label in ((axes[1], c.sigma_qz, "sigma(q) . z"), (axes[2], c.read_norm, "||A_mem||")):
            for layer in range(n_layers):
                ax.plot(segments[1:], values[layer][1:], styles[layer % len(styles)], label=f"layer {layer}")
            ax.set_xscale("log", base=2)
            if label.startswith("sigma") and any(v > 0 for row in values for v in row[1:]):
                ax.set_yscale("log")  # z grows with every segment written: a power law is a line
            ax.set_xlabel("query's segment index")
            ax.set_ylabel(label)
            ax.set_title(f"{label} by segment, {c.length} tokens", fontsize=10)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_outputs(results: ProbeResults, out_dir: str | Path) -> dict[str, Path]:
    """memory_probe.json, memory_probe.md and memory_probe.png in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(out_dir / "memory_probe.json", results.summary()),
             "table": out_dir / "memory_probe.md", "figure": out_dir / "memory_probe.png"}
    paths["table"].write_text(markdown_report(results))
    figure(results).savefig(paths["figure"])
    return paths
