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
from evaluation.config import (
    MemoryFootprintTaskConfig,
    MemoryProbeTaskConfig,
    PasskeyTaskConfig,
    PerplexityTaskConfig,
    SummarizationTaskConfig,
)
from evaluation.report import WandbLogger, write_json
from evaluation.rouge import RougeScorer
from evaluation.tasks import EvalContext, Report, get_task, register_task
from models.checkpoint import CheckpointError, load_model, read_config
from models.config import DType
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
    model, meta = load_model(cfg.checkpoint, device=cfg.device, dtype=DType(cfg.dtype).torch)
    spec = cfg.tokenizer if cfg.tokenizer is not None else meta.get("tokenizer", "byte")
    tokenizer = load_tokenizer(spec)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {spec!r} has {tokenizer.vocab_size} tokens but the model of "
                         f"{cfg.checkpoint!r} only {model.config.vocab_size}")
    return model, tokenizer, meta


@register_task(PasskeyTaskConfig, periodic_prefix=("passkey/", "val/passkey_"))
def passkey_task(task: PasskeyTaskConfig, ctx: EvalContext) -> Report:
    """Metrics: passkey/<metric> (mean of exact, substring, digit_accuracy), passkey/exact/<length> (offset classes
    pooled) and passkey/exact/<length>/<class>."""
    if task.metric not in passkey.METRICS:
        raise ValueError(f"task.metric {task.metric!r} is not one of {passkey.METRICS}")
    try:
        passkey.check_offset_settings(list(task.offset_classes), task.offsets_per_class)
    except ValueError as error:
        raise ValueError(f"task.offset_classes / task.offsets_per_class: {error}") from error
    depths = passkey.depth_grid(task.depth_grid) if task.depth_grid > 0 else list(task.depths)
    results = passkey.evaluate_passkey(
        ctx.model, ctx.tokenizer, list(task.lengths), depths, task.trials, task.seed, task.chunk_size,
        max_new_tokens=task.max_new_tokens, digits=task.digits, batch_size=task.batch_size,
        segment_len=passkey.segment_len_of(ctx.model.config), offset_classes=list(task.offset_classes),
        offsets_per_class=task.offsets_per_class, training_length=ctx.training_length,
    )
    summary = results.summary()
    exact = summary["metrics"]["exact"]
    metrics = {f"passkey/{m}": summary["metrics"][m]["mean"] for m in passkey.METRICS}
    metrics.update({f"passkey/exact/{n}": v for n, v in exact["per_requested_length"].items()})
    if results.by_class:
        metrics.update({f"passkey/exact/{n}/{c}": v for n, by_class in exact["per_length_class"].items()
                        for c, v in by_class.items()})
    if ctx.out_dir is None:
        return Report(summary, metrics)
    paths = passkey.write_outputs(results, ctx.out_dir, task.metric)
    name = passkey.METRIC_NAMES[task.metric]
    trained = f", longest training sequence {ctx.training_length} tokens" if ctx.training_length else ""
    text = (f"\nPasskey retrieval, {name} (%){trained}, {task.trials} trials per cell:\n\n"
            f"{passkey.markdown_table(results, task.metric)}\n")
    if results.by_class:
        text += (f"\nBy offset class, every depth pooled:\n\n{passkey.compact_table(results, task.metric)}\n\n"
                 f"{passkey.class_note(results)}\n")
    text += f"\nmean {name} {100 * results.mean(task.metric):.1f}%; outputs in {ctx.out_dir}"
    return Report(summary, metrics, {"passkey/heatmap": paths["heatmap"]}, text)


@register_task(PerplexityTaskConfig)
def perplexity_task(task: PerplexityTaskConfig, ctx: EvalContext) -> Report:
    from data.text import load_documents

    dataset = load_documents(task.source, task.split, task.text_field)
    n = len(dataset) if task.max_documents is None else min(task.max_documents, len(dataset))
    id_field = task.id_field if task.id_field in dataset.column_names else None

    def documents():
        for i in range(n):
            row = dataset[i]
            yield (str(row[id_field]) if id_field else str(i)), row[task.text_field]

    results = perplexity.evaluate_perplexity(
        ctx.model, ctx.tokenizer, documents(), task.chunk_size, task.segment_len, task.max_tokens, task.prepend_eos,
    )
    results.settings.update(source=task.source, split=task.split)
    summary = results.summary()
    metrics = {f"perplexity/{k}": summary[k] for k in ("loss", "perplexity", "bits_per_token", "bits_per_byte")
               if summary[k] is not None}
    if ctx.out_dir is None:
        return Report(summary, metrics)
    perplexity.write_outputs(results, ctx.out_dir)
    text = (perplexity.segment_table(results) + "\n"
            f"perplexity {results.perplexity:.4f} over {results.n_tokens} tokens in {len(results.scores)} documents"
            + ("" if results.bits_per_byte is None else f", {results.bits_per_byte:.4f} bits per byte"))
    return Report(summary, metrics, {"perplexity/by_segment": ctx.out_dir / "perplexity_segments.png"}, text)


@register_task(SummarizationTaskConfig)
def summarization_task(task: SummarizationTaskConfig, ctx: EvalContext) -> Report:
    from data.booksum import load_booksum

    examples = load_booksum(task.source, task.split, task.level)
    if task.max_examples is not None:
        examples = examples[: task.max_examples]
    generation = task.generation if isinstance(task.generation, GenerationConfig) else OmegaConf.to_object(
        task.generation)
    results = summarization.evaluate_summarization(
        ctx.model, ctx.tokenizer, examples, generation, task.max_input_tokens,
        RougeScorer(use_stemmer=task.use_stemmer, sentence_split=task.sentence_split),
    )
    results.settings.update(source=task.source, split=task.split, level=task.level)
    summary = results.summary()
    metrics = {f"summarization/{k}": v for k, v in summary["rouge"].items()}
    if ctx.out_dir is None:
        return Report(summary, metrics)
    summarization.write_outputs(results, ctx.out_dir)
    return Report(summary, metrics, text=summarization.rouge_table(results))


@register_task(MemoryFootprintTaskConfig, needs_model=False)
def memory_footprint_task(task: MemoryFootprintTaskConfig, ctx: EvalContext) -> Report:
    setting = memory_footprint.FootprintSetting(
        n_layers=task.n_layers, n_heads=task.n_heads, head_dim=task.head_dim, segment_len=task.segment_len,
        n_kv_heads=task.n_kv_heads, knn_memory=task.knn_memory, rmt_memory_tokens=task.rmt_memory_tokens,
        length=task.length,
    )
    model_config = ctx.model.config if ctx.model is not None else None
    if model_config is None and ctx.checkpoint is not None:  # the trained model's own shape
        if not Path(ctx.checkpoint).is_dir():
            raise CheckpointError(f"checkpoint directory {str(ctx.checkpoint)!r} does not exist")
        model_config, _ = read_config(ctx.checkpoint)
    if model_config is not None:
        shape = memory_footprint.FootprintSetting.from_model_config(model_config, task.length)
        setting = memory_footprint.FootprintSetting(**{**asdict(setting), **{
            k: getattr(shape, k) for k in ("n_layers", "n_heads", "head_dim", "segment_len", "n_kv_heads")}})
    table = memory_footprint.footprint_table(setting, task.bytes_per_element)
    summary = {"task": "memory_footprint", **memory_footprint.footprint_summary(setting)}
    metrics = {f"memory_footprint/{k}": v for k, v in summary["elements"].items()}
    if ctx.out_dir is not None:
        (ctx.out_dir / "memory_footprint.md").write_text(table + "\n")
    return Report(summary, metrics, text=table)


@register_task(MemoryProbeTaskConfig, infini_only=True)
def memory_probe_task(task: MemoryProbeTaskConfig, ctx: EvalContext) -> Report:
    """Metrics: probe/needle_share/..., probe/filler_ratio/..., probe/exact/<length> (needle_share_summary)."""
    memory_probe.infini_layers(ctx.model)  # an `infini` model, or a clear error before any work
    results = memory_probe.probe_memory(
        ctx.model, ctx.tokenizer, list(task.lengths), list(task.depths), task.trials, task.seed, digits=task.digits,
        keep_last_tokens=task.keep_last_tokens, knockouts=task.knockouts, segment_curve=task.segment_curve,
        chunk_size=task.chunk_size, batch_size=task.batch_size, training_length=ctx.training_length,
    )
    metrics = memory_probe.needle_share_summary(results)
    if ctx.out_dir is None:
        return Report(results.summary(), metrics)
    paths = memory_probe.write_outputs(results, ctx.out_dir)
    text = (paths["table"].read_text()
            + f"\nMemory probe (needle share of the read weight, write knock-outs): {paths['table']}")
    return Report(results.summary(), metrics, {"probe/memory_probe": paths["figure"]}, text)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run cfg.task on cfg.checkpoint; write its files to the output directory; return its summary."""
    task = get_task(cfg.task.name)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    context = EvalContext(checkpoint=cfg.checkpoint)
    if task.needs_model:
        context.model, context.tokenizer, meta = load_for_eval(cfg)
        context.training_length = longest_training_length(meta.get("train_config", {}))  # train.py's checkpoints
    out_dir = resolve_out_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval_config.yaml").write_text(OmegaConf.to_yaml(cfg))
    wandb = WandbLogger(cfg.wandb.mode, cfg.wandb.project, cfg.wandb.name, cfg.wandb.entity,
                        OmegaConf.to_container(cfg, resolve=True), str(out_dir))
    context.out_dir = out_dir
    try:
        report = task.run(cfg.task, context)
        print(report.text)
        wandb.log(report.metrics)
        for key, path in report.images.items():
            wandb.log_image(key, path)
    finally:
        wandb.finish()
    summary = report.summary
    summary["checkpoint"] = cfg.checkpoint
    write_json(out_dir / f"{cfg.task.name}_summary.json", summary)
    log.info("results in %s", out_dir)
    return summary
