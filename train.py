"""Train an Infini-Transformer.

    python train.py                                   # the default job: a tiny passkey model on CPU, then eval
    python train.py experiment=pg19_paper             # the paper's PG19 setup (needs GPUs and the dataset)
    torchrun --nproc_per_node 8 train.py experiment=pg19_paper trainer.parallel=fsdp
    python train.py -m model.memory_update=linear,delta   # a Hydra multirun sweep

`train(cfg)` is the loop (tests call it directly); `main` is the thin Hydra wrapper. The configuration schema is
in training/config.py, the YAML in conf/.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from data.tokenizer import Tokenizer, load_tokenizer
from evaluation.tasks import Report, Task
from models.state import ModelState, detach_state, flatten_state, reset_rows, state_metrics, unflatten_state
from models.streaming import stream
from models.transformer import Transformer
from training.checkpointing import Checkpointer, CheckpointError, NonFiniteError
from training.config import TrainConfig, TrainerConfig, register_configs
from training.data import build_data
from training.lora import apply_lora, lora_summary
from training.metrics import MetricsLogger
from training.optim import build_optimizer, build_scheduler
from training.parallel import Runtime, all_gather_objects, all_reduce_sum, init_runtime, no_sync, parallelize
from training.run_dir import lock_run_directory, register_resolvers
from training.stages import Curriculum, Stage, longest_training_length, resolve_stages

register_configs()
register_resolvers()


class NonFiniteLossError(NonFiniteError):
    """The loss or the gradient norm became NaN/inf; the run stops before the optimizer step."""


# ----------------------------------------------------------------------------------------------- one optimizer step


def forward_backward(module: nn.Module, batch: dict[str, Tensor], state: ModelState | None, runtime: Runtime,
                     cfg: TrainerConfig, segment_len: int, scale: float, sync: bool) -> tuple[float, ModelState]:
    """Loss and gradients of one batch: back-propagation through time over its segments, truncated every
    cfg.tbptt_segments segments (the memory is detached there and backward runs per chunk). The summed token
    loss is multiplied by `scale` before backward. Returns (summed token loss, final state, detached)."""
    tokens, targets, mask = (batch[k].to(runtime.device) for k in ("tokens", "targets", "loss_mask"))
    write_scale = batch["write_scale"].to(runtime.device) if "write_scale" in batch else None  # (B, T) or None
    T = tokens.shape[1]
    chunk = cfg.tbptt_segments * segment_len if cfg.tbptt_segments > 0 else T

    sparse = bool(mask.count_nonzero() * 2 < mask.numel())  # loss on a few tokens (passkey answers)

    def step(span: slice, state: ModelState | None) -> tuple[float, ModelState]:
        with no_sync(module, sync and span.stop == T):  # gradients synchronise on the last chunk's backward
            # logits only where the loss is (sparse masks): the same loss and gradients, no output layer elsewhere
            at = mask[:, span] != 0 if sparse else None  # (B, chunk) bool
            with runtime.autocast():
                out = module(tokens[:, span], state, None if write_scale is None else write_scale[:, span], at)
            chunk_targets, chunk_mask = (targets[:, span], mask[:, span]) if at is None else (
                targets[:, span][at], mask[:, span][at])
            token_loss = F.cross_entropy(out.logits.float().flatten(0, -2), chunk_targets.flatten(),
                                         reduction="none")  # (B*chunk,) or (n_selected,)
            loss = (token_loss * chunk_mask.flatten()).sum()
            (loss * scale).backward()
        return loss.item(), detach_state(out.state)

    losses, state = stream(step, T, chunk, state)
    return sum(losses), state


@torch.no_grad()
def validation_loss(module: nn.Module, batches: list[dict[str, Tensor]], runtime: Runtime) -> float:
    loss_sum, count = 0.0, 0.0
    for batch in batches:
        tokens, targets, mask = (batch[k].to(runtime.device) for k in ("tokens", "targets", "loss_mask"))
        with runtime.autocast():
            logits = module(tokens).logits
        token_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        loss_sum += float((token_loss * mask.flatten()).sum())
        count += float(mask.sum())
    return all_reduce_sum(loss_sum, runtime) / max(all_reduce_sum(count, runtime), 1.0)


# ------------------------------------------------------------------------------------------------------ the loop


class InterruptedBySignalError(Exception):
    """A SIGTERM / SIGUSR1 arrived while StopRequest.immediate was set (the final evaluation)."""


class StopRequest:
    """SIGTERM / SIGUSR1 (cluster preemption): finish the current step, checkpoint, exit cleanly. With `immediate`
    set (after the last checkpoint, during the final evaluation) the handler raises InterruptedBySignalError at
    once: there is nothing left to save, and an evaluation can outlast a preemption's grace period."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.immediate = False
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some launchers): no handler
                pass

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        if self.immediate:
            raise InterruptedBySignalError(signum)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_train_config(cfg: DictConfig | TrainConfig) -> tuple[TrainConfig, dict[str, Any]]:
    """Typed config (ModelConfig validated) and its resolved plain-dict form (stored in checkpoints)."""
    if isinstance(cfg, TrainConfig):
        cfg = OmegaConf.structured(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    typed = OmegaConf.to_object(cfg)
    return typed, plain


def validate(cfg: TrainConfig, tokenizer: Tokenizer, stages: list[Stage]) -> None:
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                         f"({tokenizer.vocab_size}, data.tokenizer={cfg.data.tokenizer!r})")
    scaled = [where for where, data in [("data", cfg.data), *((f"{s.label}.data", s.data) for s in stages)]
              if data.kind == "passkey" and data.passkey_haystack_scale != 1.0]
    if scaled and cfg.model.attention != "infini":
        raise ValueError(f"{scaled[0]}.passkey_haystack_scale scales memory writes: model.attention="
                         f"{str(cfg.model.attention)!r} keeps no memory (use 1.0)")
    t = cfg.trainer
    if t.max_steps <= 0 or t.grad_accum <= 0 or t.tbptt_segments < 0:
        raise ValueError("trainer.max_steps and trainer.grad_accum must be positive, trainer.tbptt_segments >= 0")
    if t.carry_state:
        if cfg.model.attention == "full":
            raise ValueError("trainer.carry_state needs a bounded state: not available for model.attention=full")
        for where, data in [("data", cfg.data), *((f"{s.label}.data", s.data) for s in stages)]:
            if data.seq_len % cfg.model.segment_len:
                raise ValueError(f"trainer.carry_state needs {where}.seq_len ({data.seq_len}) to be a multiple of "
                                 f"model.segment_len ({cfg.model.segment_len})")


def load_initial_weights(model: Transformer, path: str) -> None:
    """trainer.init_from: our model directory, or a Hugging Face Llama directory converted on the fly (its
    architecture must match model.*; the error names the fields that differ)."""
    from dataclasses import asdict

    from models.checkpoint import CONFIG, read_weights

    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"trainer.init_from={path!r}: no such directory")
    config_file = directory / CONFIG
    if config_file.is_file() and "model" in json.loads(config_file.read_text()):
        model.load_state_dict(read_weights(model, directory))
        return
    from models.hf import from_hf

    converted = from_hf(directory, overrides=asdict(model.config))
    model.load_state_dict(converted.state_dict())


def train(config: DictConfig | TrainConfig) -> dict[str, Any]:
    """Train (and evaluate) as `config` says. Returns a summary: final step, losses, checkpoint, passkey results.
    The run directory is locked for the whole run (training/run_dir.py): a second run into it stops at once."""
    cfg, plain_config = to_train_config(config)
    stages = resolve_stages(cfg)  # every stage's overrides checked now, before anything runs
    eval_tasks = resolve_eval_tasks(cfg)  # and every evaluation task's fields
    runtime = init_runtime(cfg.trainer)
    seed_everything(cfg.trainer.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    validate(cfg, tokenizer, stages)
    lock = lock_run_directory(cfg.trainer.run_dir, runtime)  # before anything is written there
    try:
        return train_locked(cfg, plain_config, stages, eval_tasks, runtime, tokenizer)
    finally:
        if lock is not None:
            lock.release()


def train_locked(cfg: TrainConfig, plain_config: dict[str, Any], stages: list[Stage],
                 eval_tasks: dict[str, list[tuple[str, Task, Any]]], runtime: Runtime,
                 tokenizer: Tokenizer) -> dict[str, Any]:
    """The body of train(), run while this process holds the run directory's lock."""
    run_dir = Path(cfg.trainer.run_dir)
    training_length = longest_training_length(plain_config)  # evaluations report multiples of it

    model = Transformer(cfg.model)
    if cfg.trainer.init_from is not None:
        load_initial_weights(model, cfg.trainer.init_from)
    if cfg.lora.enabled:  # adapters on the loaded weights; only they and lora.train_fully train
        apply_lora(model, cfg.lora)
        if runtime.is_main:
            print(lora_summary(model), flush=True)
    model = model.to(runtime.device)
    module = parallelize(model, cfg.trainer, runtime)
    optimizer = build_optimizer(model, cfg.optim)
    curriculum = Curriculum(stages, cfg.trainer.max_steps)  # the stages' actual boundaries (some may end early)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.max_steps, [(s.steps, s.optim) for s in stages],
                                curriculum)

    def stream(of: Stage | None, validation: bool = False):
        """The training (or validation) stream of stage `of` (None: no trainer.stages, data.* as given)."""
        return build_data(cfg.data if of is None else of.data, tokenizer, runtime.rank, runtime.world_size,
                          validation=validation, segment_len=cfg.model.segment_len)

    def validation_batches(of: Stage | None):
        """The validation batches of stage `of` (its data, a disjoint seed), or None without periodic evaluation."""
        if cfg.trainer.eval_every <= 0:
            return None
        val_stream = stream(of, validation=True)
        return [next(val_stream) for _ in range(cfg.trainer.eval_batches)]

    step = 0
    carried: ModelState | None = None
    checkpointer = Checkpointer(run_dir, module, model, optimizer, scheduler, runtime, keep_last=cfg.trainer.keep_last,
                                tokenizer=cfg.data.tokenizer, train_config=plain_config)  # removes leftovers
    resume_from = checkpointer.resolve(cfg.trainer.resume)
    trainer_state = checkpointer.load(resume_from) if resume_from else None
    if trainer_state is not None:
        step = trainer_state["step"]
        recorded_starts = trainer_state.get("stage_starts")
        if stages and recorded_starts and curriculum.could_have_run(recorded_starts):
            curriculum.load_state_dict({"starts": recorded_starts})  # stages that ended early ended there
        # (starts these stages cannot have produced: the stages changed; the check below names the mismatch)
    # the stage of the next step; a checkpoint records the stage whose stream it saved: at a stage's first step,
    # the new stage's (the loop switches streams right after a stage's last step, before checkpointing)
    stage = curriculum.stage_at(step) if stages else None
    data = stream(stage)
    if trainer_state is not None:
        recorded = trainer_state.get("stage")
        if recorded != (stage.index if stage else None):
            raise CheckpointError(
                f"{resume_from} was written at step {step} in stage {recorded} of trainer.stages, but this run's "
                f"trainer.stages put step {step} in {stage.label if stage else 'no stage (trainer.stages empty)'}: "
                "the stages changed since the checkpoint; restore them or start a new run directory"
            )
        checkpointer.check_config(trainer_state, list(cfg.trainer.resume_changes))  # refuses or lists the changes
        data_states = trainer_state["data"]
        if len(data_states) != runtime.world_size:
            raise CheckpointError(f"{resume_from} was written by {len(data_states)} processes, this run has "
                                  f"{runtime.world_size}: the data positions cannot be matched")
        data.load_state_dict(data_states[runtime.rank])
        if trainer_state["carry"]:
            carried = unflatten_state(trainer_state["carry"], f"rank{runtime.rank}/", cfg.model.n_layers,
                                      runtime.device)
    checkpointer.begin(resume_from)  # later checkpoints of this directory to a branch; metrics.jsonl cut back

    logger = MetricsLogger(cfg.logger, run_dir, plain_config, runtime.is_main, cfg.name)
    stop = StopRequest()
    summary: dict[str, Any] = {"run_dir": str(run_dir), "resumed_from": str(resume_from) if resume_from else None,
                               "losses": {}}
    val_batches = validation_batches(stage)

    def checkpoint(at_step: int) -> Path | None:
        carry = None
        if carried is not None:
            carry = {}
            for rank, tensors in enumerate(all_gather_objects(flatten_state(carried, ""), runtime)):
                carry.update({f"rank{rank}/{k}": v for k, v in tensors.items()})
        return checkpointer.save(
            at_step, all_gather_objects(data.state_dict(), runtime),
            {"name": cfg.name, "loss": summary["losses"].get(at_step),
             **({"stage": stage.index, "stage_name": stage.name, "stage_starts": curriculum.starts} if stage else {})},
            carry,
        )

    progress = None
    if cfg.trainer.progress and runtime.is_main:
        from tqdm import tqdm

        progress = tqdm(total=cfg.trainer.max_steps, initial=step, desc="train", dynamic_ncols=True)

    def announce(of: Stage) -> None:
        """One line at a stage start (and at the run's start or resume), and the stage in the progress bar."""
        if not runtime.is_main:
            return
        mix = f" (mix {of.data.seq_len_mix})" if of.data.seq_len_mix else ""
        start, length = curriculum.span(of.index)
        until = f" (or until {' '.join(map(str, of.advance_when))})" if of.advance_when else ""
        line = (f"{of.label}: steps {start + 1}-{start + length}{until} of {cfg.trainer.max_steps}, seq_len "
                f"{of.data.seq_len}"
                f"{mix}, batch_size {of.data.batch_size}, lr {of.optim.lr}, warmup {of.optim.warmup_steps}, "
                f"schedule {of.optim.schedule}")
        if progress is not None:
            progress.set_description(f"train {of.name}")
            progress.write(line)
        else:
            print(line, flush=True)

    if stage is not None:
        announce(stage)
    last_state: ModelState | None = None
    tokens_seen, window_start = 0, time.perf_counter()
    try:
        while step < cfg.trainer.max_steps:
            batches = [next(data) for _ in range(cfg.trainer.grad_accum)]
            n_targets = all_reduce_sum(sum(float(b["loss_mask"].sum()) for b in batches), runtime)
            if n_targets == 0:
                raise ValueError(f"step {step}: no target token has loss_mask 1 in this step's batches")
            scale = runtime.world_size / n_targets  # DDP averages gradients over ranks: undo, then divide by tokens
            loss_sum = 0.0
            for i, batch in enumerate(batches):
                state_in = reset_rows(carried, batch["new_document"]) if cfg.trainer.carry_state else None
                batch_loss, last_state = forward_backward(module, batch, state_in, runtime, cfg.trainer,
                                                          cfg.model.segment_len, scale,
                                                          sync=i == len(batches) - 1)
                loss_sum += batch_loss
                carried = last_state if cfg.trainer.carry_state else None
            loss = all_reduce_sum(loss_sum, runtime) / n_targets
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise NonFiniteLossError(f"step {step}: loss={loss}, grad_norm={grad_norm}; stopping before the "
                                         f"optimizer step. {checkpointer.newest()}")
            optimizer.step()
            lr = scheduler.get_last_lr()[0]  # this step's lr (get_last_lr after scheduler.step: the next step's)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            summary["losses"][step] = loss
            tokens_seen += sum(b["tokens"].numel() for b in batches) * runtime.world_size

            if step % cfg.trainer.log_every == 0 or step == cfg.trainer.max_steps:
                elapsed = time.perf_counter() - window_start
                metrics = {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": lr,
                           **({"train/stage": stage.index} if stage else {}),
                           "train/tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                           **state_metrics(model, last_state)}
                logger.log(metrics, step)
                if progress is not None:
                    progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{metrics['train/tokens_per_s']:.0f}")
                tokens_seen, window_start = 0, time.perf_counter()
            if progress is not None:
                progress.update(1)
            if val_batches is not None and step % cfg.trainer.eval_every == 0:
                record = periodic_eval(cfg, model, module, val_batches, tokenizer, runtime, training_length,
                                       eval_tasks["periodic"])
                logger.log(record, step)
                if stage is not None and stage.should_advance(record):
                    curriculum.advance(stage.index, step)  # the next stage starts now; the last one gets the steps
                    scheduler.last_epoch = step - 1
                    scheduler.step()  # the next step's lr, from the new boundaries
                    if runtime.is_main:
                        metric, op, value = stage.advance_when
                        line = (f"{stage.label} ends at step {step}: {metric}={record[metric]:.4g} {op} {value:g}; "
                                f"{curriculum.max_steps - curriculum.starts[-1]} steps for the last stage")
                        if progress is not None:
                            progress.write(line)
                        else:
                            print(line, flush=True)
            if stage is not None and step < cfg.trainer.max_steps and curriculum.index_at(step) != stage.index:
                # a stage ends: the next stage's stream, before a checkpoint at this step records it
                stage = curriculum.stage_at(step)
                data = stream(stage)
                val_batches = validation_batches(stage)
                carried = None  # the memory of the previous stage's rows (its batch size, its sequences)
                announce(stage)

            requested = all_reduce_sum(float(stop.signal is not None), runtime) > 0
            if (cfg.trainer.ckpt_every > 0 and step % cfg.trainer.ckpt_every == 0) or requested \
                    or step == cfg.trainer.max_steps:
                summary["checkpoint"] = str(checkpoint(step))
            if requested:
                summary["stopped_by_signal"] = True
                break
        summary["step"] = step
        stop.immediate = True  # the last checkpoint is written: a signal now ends the final evaluation at once
        try:
            if stop.signal is not None:  # arrived earlier: no final evaluation
                raise InterruptedBySignalError(stop.signal)
            if step == cfg.trainer.max_steps:
                summary.update(final_eval(model, tokenizer, run_dir, runtime, logger, step, training_length,
                                          eval_tasks["final"]))
        except InterruptedBySignalError as request:
            summary["stopped_by_signal"] = True
            if runtime.is_main and step == cfg.trainer.max_steps:
                print(f"signal {request.args[0]} before or during the final evaluation: stopped; the checkpoint of "
                      f"step {step} is complete, rerun with trainer.resume=auto to evaluate it", flush=True)
    finally:
        stop.restore()
        if progress is not None:
            progress.close()
        logger.finish()
    return summary


def resolve_eval_tasks(cfg: TrainConfig) -> dict[str, list[tuple[str, Task, Any]]]:
    """evaluation.periodic / evaluation.final as (label, task, typed task config), every entry checked now."""
    from evaluation.tasks import task_config

    resolved = {}
    for when in ("periodic", "final"):
        resolved[when] = []
        for i, entry in enumerate(getattr(cfg.evaluation, when)):
            entry = dict(entry)
            label = str(entry.pop("label", entry.get("task", "")))
            task, task_cfg = task_config(entry, f"evaluation.{when}[{i}]")
            resolved[when].append((label, task, task_cfg))
    return resolved


def run_eval_task(task: Task, task_cfg: Any, model: Transformer, tokenizer: Tokenizer, out_dir: Path | None,
                  training_length: int | None) -> Report | None:
    """One task on the model in training (eval mode, restored after); None when it does not apply to the model."""
    from evaluation.tasks import EvalContext

    if task.infini_only and model.config.attention != "infini":
        return None
    was_training = model.training
    model.eval()
    try:
        return task.run(task_cfg, EvalContext(model, tokenizer, out_dir, training_length))
    finally:
        model.train(was_training)


def periodic_eval(cfg: TrainConfig, model: Transformer, module: nn.Module, val_batches, tokenizer: Tokenizer,
                  runtime: Runtime, training_length: int | None, tasks: list) -> dict[str, float]:
    """Validation loss and perplexity, then the evaluation.periodic tasks' metrics (Task.periodic_name)."""
    loss = validation_loss(module, val_batches, runtime)
    metrics = {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0))}
    for _, task, task_cfg in tasks:
        report = run_eval_task(task, task_cfg, model, tokenizer, None, training_length)
        if report is not None:
            metrics.update({task.periodic_name(k): v for k, v in report.metrics.items()})
    return metrics


def final_eval(model: Transformer, tokenizer: Tokenizer, run_dir: Path, runtime: Runtime, logger: MetricsLogger,
               step: int, training_length: int | None, tasks: list) -> dict[str, Any]:
    """The evaluation.final tasks: tables printed, files in <run_dir>/<label>, metrics logged at `step` (rank 0).
    Returns {label: the task's summary}."""
    summaries = {}
    for label, task, task_cfg in tasks:
        out_dir = run_dir / label if runtime.is_main else None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
        report = run_eval_task(task, task_cfg, model, tokenizer, out_dir, training_length)
        if report is None:
            continue
        summaries[label] = report.summary
        if runtime.is_main:
            print(report.text, flush=True)
            logger.log(report.metrics, step)
            for key, path in report.images.items():
                if Path(path).is_file():
                    logger.log_image(key, Path(path), step)
    return summaries


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = train(cfg)
    finally:
        # after train() has released the DDP/FSDP module: a DDP reducer outliving the group would free the gloo
        # group itself at exit, joining gloo's threads while holding the GIL they wait for (a deadlock, torch 2.13)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    losses = summary["losses"]
    return losses[max(losses)] if losses else None  # the objective a Hydra sweeper minimises


if __name__ == "__main__":
    main()
