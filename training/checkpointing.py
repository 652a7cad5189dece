"""Training checkpoints: written atomically, loaded without unpickling, resumed exactly.

<run_dir>/checkpoints/step_00000500/
    model.safetensors, config.json     the model directory (models.checkpoint): evaluation and generation load it
    optimizer.safetensors              every tensor of the optimizer state, keyed "<param name>/<state key>"
    rng.safetensors                    torch CPU (and CUDA) generator states
    carry.safetensors                  the memory carried across steps (trainer.carry_state), every rank's
    trainer_state.json                 step, scheduler, optimizer hyper-parameters and scalars, data stream
                                       position of every rank, Python/NumPy RNG states, W&B run id

`Checkpointer` is built once per run (run directory, keep_last, rank) and owns everything that touches
<run_dir>/checkpoints:

- writes are atomic (models.checkpoint.atomic_directory): a hidden temporary directory renamed into place when
  every file is fsynced, then the parent fsynced; a crash mid-write leaves no half checkpoint under a `step_*`
  name, and start-up removes what it left (`.tmp-*`, `.old-*`);
- a checkpoint whose parameters are not all finite is never written (NonFiniteError), so every checkpoint is one a
  run can continue from, and the NaN stop can name the newest one with its step and loss;
- rotation (keep_last) only removes checkpoints older than the one just written, never that one;
- one line of checkpoints per run directory: a run that starts before the newest checkpoint (an explicit
  trainer.resume=<earlier step>, or trainer.resume=none) first moves the later checkpoints aside to
  <run_dir>/branches/<time>_after_step_XXXXXXXX/ (kept, with their part of metrics.jsonl; trainer.resume=auto never
  picks them), and metrics.jsonl is cut back to what it held when the resumed checkpoint was written, so a resumed
  run logs no step twice;
- resume compares the checkpoint's resolved config with this run's (check_config): changes that only affect how the
  run is observed or how long it lasts (SAFE_CHANGES) are listed and applied; any other change is refused unless
  trainer.resume_changes names it.

Model and optimizer state go through torch.distributed.checkpoint's state-dict helpers, which gather FSDP shards
into full tensors (and strip DDP/compile wrappers from names), so a checkpoint is the same file whatever the
parallelism it was written with.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from models.checkpoint import (
    TMP_PREFIX,
    CheckpointError,
    atomic_directory,
    fsync_directory,
    read_config,
    read_weights,
    remove_leftovers,
    save_model,
)
from models.transformer import Transformer
from training.parallel import Runtime, all_reduce_sum

PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
CARRY = "carry.safetensors"
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
BRANCHES = "branches"
METRICS = "metrics.jsonl"  # training/metrics.py writes it; resume cuts it back to the checkpoint's
SAFE_CHANGES = (
    "trainer.max_steps", "trainer.log_every", "trainer.eval_every", "trainer.eval_batches", "trainer.ckpt_every",
    "trainer.keep_last", "trainer.progress", "trainer.resume", "trainer.resume_changes", "trainer.run_dir",
    "trainer.init_from", "trainer.activation_checkpointing", "evaluation", "logger", "name",
)
"""Config keys (or key prefixes) that may differ from the resumed checkpoint's config without being named in
trainer.resume_changes: how long the run lasts, how it is observed (logging, evaluation, checkpoint cadence), where
it writes, and activation checkpointing (the same gradients, recomputed). Every other change (model, data, optim,
seeds, precision, parallelism, stages...) changes what is trained and is refused unless named."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or parameter; nothing non-finite was checkpointed."""


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name[len(PREFIX):])


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories of interrupted writes are ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=step_of)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state dict -> (tensors for safetensors, the JSON-serialisable rest)."""
    tensors, scalars = {}, {}
    for param_name, param_state in state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(param_name, {})[key] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        param_name, _, name = key.rpartition("/")
        state.setdefault(param_name, {})[name] = value
    for param_name, scalars in rest["scalars"].items():
        state.setdefault(param_name, {}).update(scalars)
    return {"state": state, "param_groups": rest["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _set_rng_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = rest["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = rest["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a training checkpoint: no {TRAINER_STATE}")
    try:
        return json.loads(state_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{state_file} is corrupt: {error}") from error


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}; lists stay values (e.g. trainer.stages as a whole)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _matches(key: str, patterns: list[str] | tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs between two resolved configs: key -> (saved, current); a key only
    one of them has is compared with "<absent>"."""
    old, new = flatten_config(saved), flatten_config(current)
    return {key: (old.get(key, "<absent>"), new.get(key, "<absent>")) for key in sorted(set(old) | set(new))
            if old.get(key, "<absent>") != new.get(key, "<absent>")}


def _nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters with a NaN or inf in this rank's part (an FSDP shard or the whole tensor)."""
    bad = []
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if not bool(torch.isfinite(local.detach()).all()):
            bad.append(name)
    return bad


class Checkpointer:
    """The checkpoints of one run directory (see the module docstring). Built once per run, on every rank; the
    collective parts (save's gathering of FSDP shards, the finiteness check) run on every rank, files are written
    by rank 0 only.

    module: what training calls (DDP/FSDP wrapper or the model); model: the raw Transformer (names, config);
    tokenizer and train_config go into each checkpoint's config.json (evaluation and resume read them)."""

    def __init__(self, run_dir: str | Path, module: torch.nn.Module, model: Transformer,
                 optimizer: torch.optim.Optimizer, scheduler: Any, runtime: Runtime, *, keep_last: int,
                 tokenizer: str, train_config: dict[str, Any]):
        self.run_dir = Path(run_dir)
        self.root = checkpoint_root(run_dir)
        self.module, self.model, self.optimizer, self.scheduler = module, model, optimizer, scheduler
        self.runtime = runtime
        self.keep_last = keep_last
        self.tokenizer = tokenizer
        self.train_config = train_config
        # the optimizer settings of this run's config, before a checkpoint's replace them (check_config restores
        # them when optim.* changes are accepted)
        self._fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        self._fresh_base_lrs = list(getattr(scheduler, "base_lrs", []))
        if runtime.is_main:  # under the run directory's lock: nobody else writes here
            for line in remove_leftovers(self.root):
                self._say(f"{self.root}: {line}")

    def _say(self, line: str) -> None:
        if self.runtime.is_main:
            print(line, flush=True)

    # ------------------------------------------------------------------------------------------- resume

    def resolve(self, resume: str) -> Path | None:
        """trainer.resume -> the checkpoint to resume from: auto (the newest in this run directory, None if there
        is none), none, or a checkpoint directory."""
        if resume == "none":
            return None
        if resume == "auto":
            return latest_checkpoint(self.run_dir)
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"trainer.resume={resume!r}: no such checkpoint directory")
        return path

    def begin(self, resume_from: Path | None) -> None:
        """Make this run's line of checkpoints the only one under <run_dir>/checkpoints (rank 0): checkpoints later
        than where the run starts move to a branch, and metrics.jsonl is cut back to the resumed checkpoint's."""
        if not self.runtime.is_main:
            return
        start = int(read_trainer_state(resume_from)["step"]) if resume_from is not None else 0
        later = [p for p in list_checkpoints(self.run_dir) if step_of(p) > start]
        metrics = self.run_dir / METRICS
        keep = None  # bytes of metrics.jsonl this run continues from; None: leave it as it is
        if resume_from is None:
            keep = 0
        elif resume_from.resolve().parent == self.root.resolve():
            keep = read_trainer_state(resume_from).get("metrics_bytes")
        tail = b""
        if keep is not None and metrics.is_file() and metrics.stat().st_size > keep:
            with open(metrics, "rb") as f:
                f.seek(keep)
                tail = f.read()
        if later:
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            branch = self.run_dir / BRANCHES / f"{stamp}_after_{PREFIX}{start:08d}"
            (branch / "checkpoints").mkdir(parents=True)
            for path in later:
                path.rename(branch / "checkpoints" / path.name)
            if tail:
                (branch / METRICS).write_bytes(tail)
            fsync_directory(branch / "checkpoints")
            fsync_directory(self.root)
            where = f"step {start}" if resume_from is not None else "scratch (trainer.resume=none)"
            self._say(
                f"This run starts from {where}, before the newest checkpoints of {self.run_dir}: moved "
                f"{', '.join(p.name for p in later)} (and their metrics) aside to {branch} (kept; resume=auto does "
                f"not pick them; to continue that line: trainer.resume={branch / 'checkpoints' / later[-1].name})"
            )
        if tail:
            with open(metrics, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())

    def load(self, path: str | Path) -> dict[str, Any]:
        """Restore model, optimizer, scheduler and RNG states from `path`; return the trainer state (step, data
        positions, ...; "carry": the carried-state tensors if any; "train_config": the checkpoint's resolved
        config, None if it has none). Every file is read and checked before anything is modified."""
        path = Path(path)
        state = read_trainer_state(path)
        weights = read_weights(self.model, path)
        saved_config = read_config(path)[1].get("train_config")
        try:
            optim_tensors = load_file(str(path / OPTIMIZER))
            rng_tensors = load_file(str(path / RNG))
            carry = load_file(str(path / CARRY)) if (path / CARRY).is_file() else {}
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path}: optimizer or RNG state is missing or corrupt: {error}") from error
        try:
            optim_state = _join_optimizer_state(optim_tensors, state["optimizer"])
            set_model_state_dict(self.module, weights, options=FULL)
            set_optimizer_state_dict(self.module, self.optimizer, optim_state, options=FULL)
            self.scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(rng_tensors, state["rng"])
        except (KeyError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{path} does not match this run's model or optimizer: {error}") from error
        return {**state, "carry": carry, "train_config": saved_config, "path": str(path)}

    def check_config(self, state: dict[str, Any], accepted: list[str]) -> dict[str, tuple[Any, Any]]:
        """Compare the loaded checkpoint's config with this run's. Refuses (CheckpointError listing every change
        and the trainer.resume_changes that would accept them) if a change is neither in SAFE_CHANGES nor named in
        `accepted`; otherwise prints every change it applies and returns them. Accepted optim.* changes take
        effect: the optimizer's hyper-parameters and the schedule's base learning rates become this run's (the
        checkpoint's moments are kept)."""
        saved = state.get("train_config")
        path = state.get("path", "the checkpoint")
        if saved is None:
            self._say(f"{path} records no training config: resuming without comparing configs")
            return {}
        changes = config_changes(saved, self.train_config)
        unsafe = {k: v for k, v in changes.items() if not _matches(k, SAFE_CHANGES)}
        refused = [k for k in unsafe if not _matches(k, accepted)]
        lines = "\n".join(f"  {k}: {old!r} -> {new!r}" + ("" if k in unsafe else "  (safe)")
                          for k, (old, new) in changes.items())
        if refused:
            raise CheckpointError(
                f"resuming {path}, whose config differs from this run's:\n{lines}\nThe changes not marked safe "
                "change what is trained. Restore them, start a new run directory, or accept them with "
                f"trainer.resume_changes=[{','.join(unsafe)}] (a key or a prefix such as optim)."
            )
        if changes:
            self._say(f"Resuming {path} with these config changes applied:\n{lines}")
        if any(k.startswith("optim.") for k in unsafe):
            self._use_current_optimizer_settings()
        return changes

    def _use_current_optimizer_settings(self) -> None:
        for group, fresh in zip(self.optimizer.param_groups, self._fresh_groups):
            group.update({k: v for k, v in fresh.items() if k not in ("lr", "initial_lr")})
        if self._fresh_base_lrs:
            self.scheduler.base_lrs = list(self._fresh_base_lrs)
            lrs = [base * factor(self.scheduler.last_epoch)
                   for base, factor in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas)]
            for group, base, lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs, lrs):
                group["initial_lr"], group["lr"] = base, lr
            self.scheduler._last_lr = lrs

    # -------------------------------------------------------------------------------------------- save

    def newest(self) -> str:
        """A sentence naming the newest checkpoint with its step and loss (every checkpoint written is finite)."""
        latest = latest_checkpoint(self.run_dir)
        if latest is None:
            return "No checkpoint has been written yet."
        state = read_trainer_state(latest)
        loss = state.get("loss")
        loss_text = f", loss {loss:.6g}" if isinstance(loss, (int, float)) else ""
        return (f"The newest checkpoint (finite parameters, step {state['step']}{loss_text}) is {latest} and was "
                "not touched.")

    def save(self, step: int, data_states: list[dict[str, Any]], trainer_state: dict[str, Any],
             carry: dict[str, torch.Tensor] | None = None) -> Path | None:
        """Write step `step` atomically, then remove checkpoints older than it beyond keep_last. Collective: every
        rank calls it; rank 0 writes and gets the path, the others None. data_states: every rank's stream position;
        trainer_state: more JSON for trainer_state.json (e.g. the step's loss, stage); carry: carried memory.
        Raises NonFiniteError, writing nothing, if a parameter holds a NaN or inf."""
        nonfinite = _nonfinite_parameters(self.model)
        if all_reduce_sum(float(len(nonfinite)), self.runtime) > 0:
            raise NonFiniteError(
                f"step {step}: parameters {nonfinite[:4]}{' ...' if len(nonfinite) > 4 else ''} hold NaN or inf "
                f"values (on rank {self.runtime.rank}, or on another rank); no checkpoint was written for this step. "
                f"{self.newest()} Lower optim.lr or check the data."
            )
        model_state = get_model_state_dict(self.module, options=FULL)
        optim_state = get_optimizer_state_dict(self.module, self.optimizer, options=FULL)
        if not self.runtime.is_main:
            return None
        metrics = self.run_dir / METRICS
        final = self.root / f"{PREFIX}{step:08d}"
        with atomic_directory(final) as tmp:
            save_model(tmp, self.model, self.tokenizer, state=model_state, train_config=self.train_config, step=step)
            optim_tensors, optim_rest = _split_optimizer_state(optim_state)
            save_file(optim_tensors, str(tmp / OPTIMIZER))
            rng_tensors, rng_rest = _rng_state()
            save_file(rng_tensors, str(tmp / RNG))
            if carry:
                save_file({k: v.detach().cpu().contiguous() for k, v in carry.items()}, str(tmp / CARRY))
            state = {"step": step, "scheduler": self.scheduler.state_dict(), "optimizer": optim_rest,
                     "data": data_states, "rng": rng_rest,
                     "metrics_bytes": metrics.stat().st_size if metrics.is_file() else 0, **trainer_state}
            (tmp / TRAINER_STATE).write_text(json.dumps(state))
        self._rotate(step)
        return final

    def _rotate(self, step: int) -> None:
        """Keep the newest keep_last checkpoints up to `step`, that one included; later ones are not touched."""
        if self.keep_last <= 0:
            return
        older = [p for p in list_checkpoints(self.run_dir) if step_of(p) < step]
        stale = older[:max(0, len(older) - (self.keep_last - 1))]
        for path in stale:  # renamed out of the step_* names first: a crash mid-removal leaves only a leftover
            doomed = self.root / f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
            path.rename(doomed)
            shutil.rmtree(doomed)
        if stale:
            fsync_directory(self.root)
