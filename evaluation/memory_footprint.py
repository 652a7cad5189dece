"""Memory (cache) footprint of long-context models: the formulas of Table 1 of the Infini-attention paper.

Counts are numbers of stored elements (floats), not bytes, as in the paper. With l layers, H heads, head dims
d_key and d_value, segment length N, model width d_model:

    Infini-Transformer        d_key x (d_value + 1) x H x l              M (d_key x d_value) and z (d_key) per head
    Transformer-XL            (d_key + d_value) x H x N x l              keys and values of the previous segment
    Memorizing Transformers   (d_key + d_value) x H x (N x l + K)        the XL cache plus a kNN memory of K
                                                                          key/value pairs at one layer
    RMT                       d_model x p x l x 2                        p memory tokens read and written per layer
    full KV cache at length T (d_key + d_value) x H_kv x T x l           plain attention over the whole input

For the paper's Table 2 setting (l=12, H=8, d_key=d_value=128, N=2048) these give 1,585,152 ("1.6M"),
50,331,648 ("50M"), 183,451,648 ("183M") and 2,457,600 ("2.5M"). Two constants are not stated next to the
table and are chosen here because they reproduce its numbers: the kNN memory holds K = 65,000 entries (the
paper's "65K"; 65,536 would give 184.5M) and RMT uses p = 100 memory tokens (d_model = H x d_value = 1024).

    python -m evaluation.memory_footprint                       # the paper's setting
    python -m evaluation.memory_footprint --layers 4 --heads 4 --head-dim 64 --segment-len 1024 --length 1048576
    python -m evaluation task=memory_footprint checkpoint=runs/x  # the same, for a trained model's config
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from models.config import ModelConfig

PAPER_KNN_MEMORY = 65_000
PAPER_RMT_MEMORY_TOKENS = 100


@dataclass(frozen=True)
class FootprintSetting:
    """The shape the formulas need. head_dim is d_key = d_value (as in the paper and in our models)."""

    n_layers: int = 12
    n_heads: int = 8
    head_dim: int = 128
    segment_len: int = 2048
    n_kv_heads: int | None = None
    """Key/value heads of the full KV cache (grouped-query attention). None: n_heads."""
    knn_memory: int = PAPER_KNN_MEMORY
    """K: entries of the Memorizing Transformers kNN memory (at one layer)."""
    rmt_memory_tokens: int = PAPER_RMT_MEMORY_TOKENS
    """p: RMT memory tokens."""
    length: int = 2048
    """T: input length for the full KV cache row."""

    @staticmethod
    def from_model_config(config: ModelConfig, length: int | None = None) -> FootprintSetting:
        """The setting of one of our models (its segment length; `length` defaults to one segment)."""
        return FootprintSetting(
            n_layers=config.n_layers,
            n_heads=config.n_heads,
            head_dim=config.head_dim,
            segment_len=config.segment_len,
            n_kv_heads=config.n_kv_heads,
            length=config.segment_len if length is None else length,
        )


def infini_footprint(s: FootprintSetting) -> int:
    """d_key x (d_value + 1) x H x l. Our models keep one memory per KV head, so with grouped-query attention
    the real count is smaller (see `footprints`); the paper's formula uses H."""
    return s.head_dim * (s.head_dim + 1) * s.n_heads * s.n_layers


def transformer_xl_footprint(s: FootprintSetting) -> int:
    """(d_key + d_value) x H x N x l."""
    return 2 * s.head_dim * s.n_heads * s.segment_len * s.n_layers


def memorizing_transformer_footprint(s: FootprintSetting) -> int:
    """The Transformer-XL cache plus (d_key + d_value) x H x K for the kNN memory at one layer."""
    return transformer_xl_footprint(s) + 2 * s.head_dim * s.n_heads * s.knn_memory


def rmt_footprint(s: FootprintSetting) -> int:
    """d_model x p x l x 2 (memory tokens read and written in every layer)."""
    return s.head_dim * s.n_heads * s.rmt_memory_tokens * s.n_layers * 2


def full_kv_cache_footprint(s: FootprintSetting) -> int:
    """(d_key + d_value) x H_kv x T x l: what `full` attention stores after T tokens."""
    kv_heads = s.n_heads if s.n_kv_heads is None else s.n_kv_heads
    return 2 * s.head_dim * kv_heads * s.length * s.n_layers


def xl_ours_footprint(s: FootprintSetting) -> int:
    """(d_key + d_value) x H_kv x (2N - 1) x l: what our `xl` attention stores at most, the previous segment's
    keys/values (Transformer-XL's cache) plus an unfinished segment's, per key/value head."""
    kv_heads = s.n_heads if s.n_kv_heads is None else s.n_kv_heads
    return 2 * s.head_dim * kv_heads * (2 * s.segment_len - 1) * s.n_layers


def footprints(s: FootprintSetting) -> dict[str, int]:
    """Every row of the table, in stored elements. `infini (ours, per KV head)` counts what our implementation
    stores: one (M, z) per key/value head, plus at most one unfinished segment of keys/values per layer; `xl
    (ours ...)` the previous segment's and at most one unfinished segment's keys/values per layer."""
    kv_heads = s.n_heads if s.n_kv_heads is None else s.n_kv_heads
    ours = s.head_dim * (s.head_dim + 1) * kv_heads * s.n_layers
    ours_with_cache = ours + 2 * s.head_dim * kv_heads * (s.segment_len - 1) * s.n_layers
    return {
        "Infini-Transformer": infini_footprint(s),
        "Transformer-XL": transformer_xl_footprint(s),
        "Memorizing Transformers": memorizing_transformer_footprint(s),
        "RMT": rmt_footprint(s),
        f"full KV cache at {s.length} tokens": full_kv_cache_footprint(s),
        "infini (ours: memory only, per KV head)": ours,
        "infini (ours: memory + worst-case segment cache)": ours_with_cache,
        "xl (ours: previous + worst-case unfinished segment, per KV head)": xl_ours_footprint(s),
    }


def human_count(n: int) -> str:
    """The paper's style: 1,585,152 -> '1.6M', 50,331,648 -> '50M', 2,457,600 -> '2.5M'."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            value = n / scale
            return f"{value:.1f}{suffix}" if value < 10 else f"{value:.0f}{suffix}"
    return str(n)


def footprint_table(s: FootprintSetting, bytes_per_element: int = 4) -> str:
    """A markdown table: model, elements (exact and rounded), bytes, ratio to Infini-Transformer."""
    rows = footprints(s)
    infini = rows["Infini-Transformer"]
    lines = [
        f"Setting: l={s.n_layers}, H={s.n_heads}, d_key=d_value={s.head_dim}, N={s.segment_len}, "
        f"K={s.knn_memory}, p={s.rmt_memory_tokens}, T={s.length}",
        "",
        f"| model | elements | rounded | MiB at {bytes_per_element} B/element | x Infini |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, count in rows.items():
        mib = count * bytes_per_element / 2**20
        lines.append(f"| {name} | {count:,} | {human_count(count)} | {mib:,.1f} | {count / infini:,.1f} |")
    return "\n".join(lines)


def footprint_summary(s: FootprintSetting) -> dict[str, object]:
    """JSON-ready: the setting and every footprint."""
    return {"setting": asdict(s), "elements": footprints(s)}


def main(argv: list[str] | None = None) -> None:
    defaults = FootprintSetting()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=defaults.n_layers)
    parser.add_argument("--heads", type=int, default=defaults.n_heads)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=defaults.head_dim)
    parser.add_argument("--segment-len", type=int, default=defaults.segment_len)
    parser.add_argument("--knn-memory", type=int, default=defaults.knn_memory)
    parser.add_argument("--rmt-memory-tokens", type=int, default=defaults.rmt_memory_tokens)
    parser.add_argument("--length", type=int, default=defaults.length)
    parser.add_argument("--bytes-per-element", type=int, default=4)
    args = parser.parse_args(argv)
    setting = FootprintSetting(
        n_layers=args.layers, n_heads=args.heads, head_dim=args.head_dim, segment_len=args.segment_len,
        n_kv_heads=args.kv_heads, knn_memory=args.knn_memory, rmt_memory_tokens=args.rmt_memory_tokens,
        length=args.length,
    )
    print(footprint_table(setting, args.bytes_per_element))


if __name__ == "__main__":
    main()
