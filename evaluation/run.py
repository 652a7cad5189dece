"""`run(cfg)`: the evaluation a composed EvalConfig describes; `python -m evaluation` is a thin Hydra wrapper
around it, and tests call it directly with configs composed from conf/eval/.

Every task prints its table and writes its files into cfg.out_dir (default: Hydra's run directory); the
returned dict is the task's summary JSON.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from data.tokenizer import Tokenizer, load_tokenizer
from evaluation import memory_footprint, memory_probe, passkey, perplexity, summarization
from evaluation.config import DTYPES, TASKS
from evaluation.report import WandbLogger, write_json
from evaluation.rouge import RougeScorer
from models.checkpoint import CheckpointError, load_model, read_config
from models.generation import GenerationConfig
from models.transformer import Transformer
from training.stages import longest_training_length

log = logging.getLogger(__name__)


def resolve_out_dir(cfg: DictConfig) -> Path:
    """cfg.out_dir, else the directory Hydra created for this run."""
    if cfg.out_dir is not None:
        return Path(cfg.out_dir)
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ValueError("out_dir is null and no Hydra run directory exists: set out_dir=...")
    return Path(HydraConfig.get().runtime.output_dir)


def load_for_eval(cfg: DictConfig) -> tuple[Transformer, Tokenizer, dict[str, Any]]:
    """The checkpoint's model (eval mode, on cfg.device in cfg.dtype) and its tokenizer."""
    if cfg.checkpoint is None:
        raise ValueError(f"task {cfg.task.name!r} needs a model: set checkpoint=<model directory>")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype {cfg.dtype!r} is not one of {DTYPES}")
    model, meta = load_model(cfg.checkpoint, device=cfg.device, dtype=getattr(torch, cfg.dtype))
    spec = cfg.tokenizer if cfg.tokenizer is not None else meta.get("tokenizer", "byte")
    tokenizer = load_tokenizer(spec)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {spec!r} has {tokenizer.vocab_size} tokens but the model of "
                         f"{cfg.checkpoint!r} only {model.config.vocab_size}")
    return model, tokenizer, meta


def _run_passkey(cfg: DictConfig, out_dir: Path, wandb: WandbLogger) -> dict[str, Any]:
    task = cfg.task
    if task.metric not in passkey.METRICS:
        raise ValueError(f"task.metric {task.metric!r} is not one of {passkey.METRICS}")
    try:
        passkey.check_offset_settings(list(task.offset_classes), task.offsets_per_class)
    except ValueError as error:
        raise ValueError(f"task.offset_classes / task.offsets_per_class: {error}") from error
    model, tokenizer, meta = load_for_eval(cfg)
    depths = passkey.depth_grid(task.depth_grid) if task.depth_grid > 0 else list(task.depths)
    training_length = longest_training_length(meta.get("train_config", {}))  # checkpoints of train.py
    results = passkey.evaluate_passkey(
        model, tokenizer, list(task.lengths), depths, task.trials, task.seed, task.chunk_size,
        max_new_tokens=task.max_new_tokens, digits=task.digits, batch_size=task.batch_size,
        segment_len=passkey.segment_len_of(model.config), offset_classes=list(task.offset_classes),
        offsets_per_class=task.offsets_per_class, training_length=training_length,
    )
    paths = passkey.write_outputs(results, out_dir, task.metric)
    print(paths["table"].read_text())
    summary = results.summary()
    wandb.log({f"passkey/{m}": summary["metrics"][m]["mean"] for m in passkey.METRICS})
    if results.by_class:
        wandb.log({f"passkey/exact/{n}/{c}": v for n, by_class in
                   summary["metrics"]["exact"]["per_length_class"].items() for c, v in by_class.items()})
    wandb.log_image("passkey/heatmap", paths["heatmap"])
    return summary


def _run_perplexity(cfg: DictConfig, out_dir: Path, wandb: WandbLogger) -> dict[str, Any]:
    from data.text import load_documents

    task = cfg.task
    model, tokenizer, _ = load_for_eval(cfg)
    dataset = load_documents(task.source, task.split, task.text_field)
    n = len(dataset) if task.max_documents is None else min(task.max_documents, len(dataset))
    id_field = task.id_field if task.id_field in dataset.column_names else None

    def documents():
        for i in range(n):
            row = dataset[i]
            yield (str(row[id_field]) if id_field else str(i)), row[task.text_field]

    results = perplexity.evaluate_perplexity(
        model, tokenizer, documents(), task.chunk_size, task.segment_len, task.max_tokens, task.prepend_eos,
    )
    results.settings.update(source=task.source, split=task.split)
    perplexity.write_outputs(results, out_dir)
    summary = results.summary()
    print(perplexity.segment_table(results))
    print(f"perplexity {results.perplexity:.4f} over {results.n_tokens} tokens in {len(results.scores)} documents"
          + ("" if results.bits_per_byte is None else f", {results.bits_per_byte:.4f} bits per byte"))
    wandb.log({f"perplexity/{k}": summary[k] for k in ("loss", "perplexity", "bits_per_token", "bits_per_byte")
               if summary[k] is not None})
    wandb.log_image("perplexity/by_segment", out_dir / "perplexity_segments.png")
    return summary


def _run_summarization(cfg: DictConfig, out_dir: Path, wandb: WandbLogger) -> dict[str, Any]:
    from data.booksum import load_booksum

    task = cfg.task
    model, tokenizer, _ = load_for_eval(cfg)
    examples = load_booksum(task.source, task.split, task.level)
    if task.max_examples is not None:
        examples = examples[: task.max_examples]
    generation = GenerationConfig(**OmegaConf.to_container(task.generation))
    results = summarization.evaluate_summarization(
        model, tokenizer, examples, generation, task.max_input_tokens,
        RougeScorer(use_stemmer=task.use_stemmer, sentence_split=task.sentence_split),
    )
    results.settings.update(source=task.source, split=task.split, level=task.level)
    summarization.write_outputs(results, out_dir)
    print(summarization.rouge_table(results))
    summary = results.summary()
    wandb.log({f"summarization/{k}": v for k, v in summary["rouge"].items()})
    return summary


def _run_memory_footprint(cfg: DictConfig, out_dir: Path, wandb: WandbLogger) -> dict[str, Any]:
    task = cfg.task
    setting = memory_footprint.FootprintSetting(
        n_layers=task.n_layers, n_heads=task.n_heads, head_dim=task.head_dim, segment_len=task.segment_len,
        n_kv_heads=task.n_kv_heads, knn_memory=task.knn_memory, rmt_memory_tokens=task.rmt_memory_tokens,
        length=task.length,
    )
    if cfg.checkpoint is not None:  # the trained model's own shape
        if not Path(cfg.checkpoint).is_dir():
            raise CheckpointError(f"checkpoint directory {str(cfg.checkpoint)!r} does not exist")
        model_config, _ = read_config(cfg.checkpoint)
        shape = memory_footprint.FootprintSetting.from_model_config(model_config, task.length)
        setting = memory_footprint.FootprintSetting(**{**asdict(setting), **{
            k: getattr(shape, k) for k in ("n_layers", "n_heads", "head_dim", "segment_len", "n_kv_heads")}})
    table = memory_footprint.footprint_table(setting, task.bytes_per_element)
    (out_dir / "memory_footprint.md").write_text(table + "\n")
    summary = {"task": "memory_footprint", **memory_footprint.footprint_summary(setting)}
    print(table)
    wandb.log({f"memory_footprint/{k}": v for k, v in summary["elements"].items()})
    return summary


def _run_memory_probe(cfg: DictConfig, out_dir: Path, wandb: WandbLogger) -> dict[str, Any]:
    task = cfg.task
    model, tokenizer, meta = load_for_eval(cfg)
    memory_probe.infini_layers(model)  # an `infini` model, or a clear error before any work
    results = memory_probe.probe_memory(
        model, tokenizer, list(task.lengths), list(task.depths), task.trials, task.seed, digits=task.digits,
        keep_last_tokens=task.keep_last_tokens, knockouts=task.knockouts, segment_curve=task.segment_curve,
        chunk_size=task.chunk_size, batch_size=task.batch_size,
        training_length=longest_training_length(meta.get("train_config", {})),
    )
    paths = memory_probe.write_outputs(results, out_dir)
    print(paths["table"].read_text())
    wandb.log(memory_probe.needle_share_summary(results))
    wandb.log_image("probe/figure", paths["figure"])
    return results.summary()


def _run_mqar(cfg: DictConfig, out_dir: Path, wandb: WandbLogger) -> dict[str, Any]:
    from data.mqar import MQARConfig
    from evaluation import mqar

    task = cfg.task
    model, _, _ = load_for_eval(cfg)
    data = MQARConfig(vocab_size=task.vocab_size, num_pairs=list(task.num_pairs), num_queries=task.num_queries,
                      placement=task.placement, power_a=task.power_a)
    results = mqar.evaluate_mqar(model, data, list(task.seq_lens), task.examples, task.seed, task.batch_size,
                                 task.chunk_size)
    paths = mqar.write_outputs(results, out_dir, Path(str(cfg.checkpoint)).name)
    print(paths["table"].read_text())
    wandb.log({"mqar/accuracy": results.mean(), **{f"mqar/pairs/{n}": v for n, v in results.per_pairs().items()}})
    wandb.log_image("mqar/capacity", paths["plot"])
    return results.summary()


def _run_ruler(cfg: DictConfig, out_dir: Path, wandb: WandbLogger) -> dict[str, Any]:
    from data.ruler import RulerSettings
    from evaluation import ruler

    task = cfg.task
    if task.metric not in ruler.METRICS:
        raise ValueError(f"task.metric {task.metric!r} is not one of {ruler.METRICS}")
    settings = RulerSettings(**OmegaConf.to_container(task.settings))
    model, tokenizer, _ = load_for_eval(cfg)
    results = ruler.evaluate_ruler(model, tokenizer, list(task.lengths), list(task.tasks), task.trials, task.seed,
                                   settings, task.max_new_tokens, task.chunk_size, task.batch_size)
    paths = ruler.write_outputs(results, out_dir, task.metric)
    print(paths["table"].read_text())
    wandb.log({f"ruler/{t}/{n}": v for (t, n), v in results.cells(task.metric).items()})
    wandb.log_image("ruler/heatmap", paths["heatmap"])
    return results.summary()


RUNNERS = {
    "passkey": _run_passkey,
    "perplexity": _run_perplexity,
    "summarization": _run_summarization,
    "memory_footprint": _run_memory_footprint,
    "memory_probe": _run_memory_probe,
    "mqar": _run_mqar,
    "ruler": _run_ruler,
}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run cfg.task on cfg.checkpoint; write its files to the output directory; return its summary."""
    if cfg.task.name not in TASKS:
        raise ValueError(f"task.name {cfg.task.name!r} is not one of {TASKS}")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out_dir = resolve_out_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval_config.yaml").write_text(OmegaConf.to_yaml(cfg))
    wandb = WandbLogger(cfg.wandb.mode, cfg.wandb.project, cfg.wandb.name, cfg.wandb.entity,
                        OmegaConf.to_container(cfg, resolve=True), str(out_dir))
    try:
        summary = RUNNERS[cfg.task.name](cfg, out_dir, wandb)
    finally:
        wandb.finish()
    summary["checkpoint"] = cfg.checkpoint
    write_json(out_dir / f"{cfg.task.name}_summary.json", summary)
    log.info("results in %s", out_dir)
    return summary
