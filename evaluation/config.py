"""Typed schemas of the evaluation configs (conf/eval/), registered in Hydra's ConfigStore.

conf/eval/evaluate.yaml is the primary config; `task` is a config group whose options (conf/eval/task/*.yaml)
each extend one of the task schemas below, so a misspelt or mistyped key fails when Hydra composes the config:

    python -m evaluation task=passkey checkpoint=runs/tiny task.lengths=[1024,4096]
    python -m evaluation task=passkey_1m checkpoint=runs/tiny
    python -m evaluation task=pg19 checkpoint=runs/tiny task.max_documents=10
    python -m evaluation task=booksum_paper checkpoint=runs/big
    python -m evaluation task=memory_footprint
    python -m evaluation task=memory_probe checkpoint=runs/tiny
    python -m evaluation task=mqar checkpoint=runs/mqar task.num_pairs=[4,8,16,32]
    python -m evaluation task=ruler checkpoint=runs/tiny task.lengths=[512,2048]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from data.passkey import check_offset_settings
from models.config import DType
from models.generation import GenerationConfig
from training.config import WandbMode


@dataclass
class PasskeyTaskConfig:
    """Passkey retrieval over a length x depth grid (evaluation/passkey.py)."""

    name: str = "passkey"
    lengths: list[int] = field(default_factory=lambda: [1024, 4096, 16384])
    """Prompt lengths in tokens, instruction and question included: exact for `full` attention; for `infini` and
    `local` models each is the requested length L of one row per offset class, at P = N * round(L / N) + r (N the
    checkpoint's model.segment_len, r the class's offset; see offset_classes)."""
    depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    """Needle depths in [0, 1]: 0 start, 0.5 middle, 1 end. Ignored when depth_grid > 0."""
    depth_grid: int = 0
    """If > 0: that many evenly spaced depths from 0 to 1 (11 = every 10%)."""
    trials: int = 5
    """Prompts (different passkeys and filler offsets) per (length, depth) cell."""
    seed: int = 0
    """Seeds the prompts: the same seed gives every model the same prompts."""
    digits: int = 5
    max_new_tokens: int = 10
    """Greedy decoding steps after the question."""
    chunk_size: int = 4096
    """Tokens per forward call of the streamed prefill (memory is bounded by this, not the length)."""
    batch_size: int = 1
    """Prompts of the same length decoded together."""
    metric: str = "exact"
    """Score shown in the markdown table and the heat map: exact, substring or digit_accuracy."""
    offset_classes: list[str] = field(default_factory=lambda: ["inside", "straddles", "opens"])
    """Where the answer starts in its segment (r = P mod segment_len, q the question's tokens): inside
    (r >= q: the question is in the answer's segment), straddles (0 < r < q) and opens (r = 0: the question is
    reachable only through the memory). Each requested length is evaluated once per class listed; a class empty
    for the model's segment length (inside when segment_len <= q) is skipped with a note. Ignored for `full`."""
    offsets_per_class: int = 1
    """Offsets per class, evenly spread inside it (1: the class's middle offset; opens has only r = 0)."""

    def __post_init__(self) -> None:
        """Bad class names fail when the config is built (a training run's final evaluation: at its start)."""
        try:
            check_offset_settings(list(self.offset_classes), self.offsets_per_class)
        except ValueError as error:
            raise ValueError(f"offset_classes / offsets_per_class: {error}") from error


@dataclass
class PerplexityTaskConfig:
    """Long-document perplexity, streamed per document (evaluation/perplexity.py)."""

    name: str = "perplexity"
    source: str = "deepmind/pg19"
    """A `datasets` hub name or a local .txt/.jsonl/.parquet file or folder."""
    split: str = "test"
    text_field: str = "text"
    id_field: str | None = "short_book_title"
    """Field naming each document in the per-document JSONL (None or absent: its index)."""
    max_documents: int | None = None
    max_tokens: int | None = None
    """Truncate each document to its first max_tokens tokens (None: whole documents)."""
    chunk_size: int = 4096
    segment_len: int | None = None
    """Bucket size of the loss-by-segment table (None: the model's segment length)."""
    prepend_eos: bool = False
    """Feed the tokenizer's EOS before each document so its first token is scored too (no-op without an EOS).
    Off by default: training streams start at a document's first token, which is context only."""


def paper_generation() -> GenerationConfig:
    """The paper's BookSum decoding: sampling at temperature 0.5, top-p 0.95, 1024 steps; example i is decoded
    with seed + i, so sampling is reproducible and independent of example order."""
    return GenerationConfig(max_new_tokens=1024, do_sample=True, temperature=0.5, top_p=0.95, seed=0)


@dataclass
class SummarizationTaskConfig:
    """BookSum summarization with ROUGE (evaluation/summarization.py)."""

    name: str = "summarization"
    source: str = "abertsch/booksum-fullbooks"
    """A hub name (book level: abertsch/booksum-fullbooks, chapter level: kmfoda/booksum) or local files."""
    split: str = "test"
    level: str = "book"
    """book or chapter: which BookSum schema the source has."""
    max_examples: int | None = None
    max_input_tokens: int = 500_000
    """The document is truncated so that the whole prompt fits in this many tokens (paper: 500K)."""
    use_stemmer: bool = False
    """Porter stemming in ROUGE (SCROLLS: off)."""
    sentence_split: bool = True
    """Put one sentence per line before ROUGE-Lsum."""
    generation: GenerationConfig = field(default_factory=paper_generation)
    """Decoding settings (models.generation.GenerationConfig)."""


@dataclass
class MemoryFootprintTaskConfig:
    """Table 1 memory footprints (evaluation/memory_footprint.py). With a checkpoint its model's shape
    (layers, heads, head dim, KV heads, segment length) replaces the five shape fields below."""

    name: str = "memory_footprint"
    n_layers: int = 12
    n_heads: int = 8
    head_dim: int = 128
    n_kv_heads: int | None = None
    segment_len: int = 2048
    knn_memory: int = 65_000
    rmt_memory_tokens: int = 100
    length: int = 2048
    """Input length of the full-KV-cache row."""
    bytes_per_element: int = 4


@dataclass
class MemoryProbeTaskConfig:
    """Why a memory does or does not retrieve beyond its training length: needle share of the read weights,
    filler-to-needle ratio, reads by segment, gates, write knock-outs (evaluation/memory_probe.py). `infini` only."""

    name: str = "memory_probe"
    lengths: list[int] = field(default_factory=lambda: [512, 2048, 8192])
    """Exact prompt lengths in tokens (each length's offset class, P mod segment_len, is reported)."""
    depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    trials: int = 2
    """Prompts per (length, depth)."""
    seed: int = 0
    """Seeds the keys: the passkey evaluation's keys for the same seed, length and depth."""
    digits: int = 5
    keep_last_tokens: int = 40
    """The knock-out keeps the writes of the instruction, the needle and the last this many prompt tokens."""
    knockouts: bool = True
    """Also score the filler knock-outs (layer 0 only, layer 1 only, ..., all layers): n_layers + 1 more passes."""
    segment_curve: bool = True
    """sigma(q) . z and ||A_mem|| by segment index at the longest length."""
    chunk_size: int = 4096
    """Tokens per forward call, rounded down to whole segments."""
    batch_size: int = 8
    """Prompts of equal length run together."""


@dataclass
class WandbSettings:
    mode: WandbMode = WandbMode.disabled
    """disabled (default), offline (a local run for `wandb sync`) or online."""
    project: str = "infini-lm"
    entity: str | None = None
    name: str | None = None


@dataclass
class EvalConfig:
    """The primary evaluation config."""

    task: Any = MISSING
    """One of the task configs above (choose with task=<option of conf/eval/task/>)."""
    checkpoint: str | None = None
    """Model directory (model.safetensors + config.json), as written by training or models.checkpoint."""
    tokenizer: str | None = None
    """Override the tokenizer recorded in the checkpoint ('byte' or a local tokenizer directory)."""
    device: str = "cpu"
    dtype: DType = DType.float32
    """Weights and activations dtype: float32, bfloat16, float16 (the Infini memory stays float32)."""
    threads: int = 0
    """torch.set_num_threads; 0 leaves torch's default."""
    out_dir: str | None = None
    """Where results go; None: Hydra's run directory."""
    wandb: WandbSettings = field(default_factory=WandbSettings)


def register_configs() -> None:
    """Store every task's schema (each task's runner registers it as task/<name>_schema when its module is
    imported, evaluation/tasks.py); the yaml files under conf/eval/ extend them through their defaults lists."""
    from evaluation.tasks import discover

    discover()


ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
