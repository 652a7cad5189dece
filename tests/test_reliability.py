"""Nothing lost, nothing silent (issue 13): checkpoint lines and branches, rotation, the run-directory lock, unique
default run directories, start-up cleanup, metrics without duplicate steps, finite-only checkpoints and the NaN
message, resume that compares configs, a signal during the final evaluation, safe export/import, errors that name
the file, field or value, and processes killed at random moments that resume bit-for-bit."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_train import CONF, ROOT, losses_of, run_train_cli, smoke

import train
from models import Transformer
from models import checkpoint as model_checkpoint
from models.checkpoint import CheckpointError, atomic_directory, load_model, save_model
from training import checkpointing
from training.checkpointing import Checkpointer, NonFiniteError, list_checkpoints, read_trainer_state
from training.config import OptimConfig
from training.metrics import read_metrics
from training.optim import build_optimizer, build_scheduler
from training.parallel import Runtime
from training.run_dir import LOCK_FILE, RunDirectoryLockedError, RunLock


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def tiny_model() -> Transformer:
    return Transformer(train.to_train_config(smoke(Path("/unused")))[0].model)


def leftovers(run_dir: Path) -> list[str]:
    """Anything an interrupted write or a run would leave behind: temporary or swapped-out directories, the lock."""
    found = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".old-"))] \
        if (run_dir / "checkpoints").is_dir() else []
    return found + [LOCK_FILE] * (run_dir / LOCK_FILE).exists()


# ----------------------------------------------------------------------------- rotation and branches (item 1)


def test_rotation_never_removes_the_checkpoint_just_written_nor_a_later_one(tmp_path):
    """The issue's data loss: rotation by step number deleted a checkpoint written after a resume to an earlier
    step at once (keep_last=1) and kept the abandoned later one."""
    model = tiny_model()
    optimizer = build_optimizer(model, OptimConfig())
    runtime = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), autocast_dtype=None)
    checkpointer = Checkpointer(tmp_path, model, model, optimizer, build_scheduler(optimizer, OptimConfig(), 10),
                                runtime, keep_last=1, tokenizer="byte", train_config={})
    checkpointer.save(5, [{}], {})
    assert checkpointer.save(2, [{}], {}) == tmp_path / "checkpoints" / "step_00000002"
    assert names(tmp_path / "checkpoints") == ["step_00000002", "step_00000005"]
    checkpointer.save(3, [{}], {})  # keep_last=1: step 2 goes, step 5 (later) is not rotation's to remove
    assert names(tmp_path / "checkpoints") == ["step_00000003", "step_00000005"]


def test_an_earlier_resume_moves_the_later_line_aside_and_auto_never_picks_it(tmp_path, capsys):
    run = tmp_path / "run"
    common = ("trainer.max_steps=4", "trainer.ckpt_every=1")
    first = train.train(smoke(run, *common, "trainer.keep_last=0"))
    lr = read_trainer_state(run / "checkpoints" / "step_00000004")["optimizer"]["param_groups"][0]["initial_lr"]
    old_step4 = (run / "checkpoints" / "step_00000004" / "model.safetensors").read_bytes()
    step2 = run / "checkpoints" / "step_00000002"

    # back to step 2 with another learning rate (accepted) and keep_last=1: a new line from step 2
    second = train.train(smoke(run, *common, "trainer.keep_last=1", f"trainer.resume={step2}",
                               f"optim.lr={3 * lr}", "trainer.resume_changes=[optim.lr]"))
    assert second["resumed_from"] == str(step2)
    assert names(run / "checkpoints") == ["step_00000004"]  # the new line's newest, kept by keep_last=1
    [branch] = (run / "branches").iterdir()
    assert branch.name.endswith("_after_step_00000002")
    assert names(branch / "checkpoints") == ["step_00000003", "step_00000004"]
    assert (branch / "checkpoints" / "step_00000004" / "model.safetensors").read_bytes() == old_step4
    assert f"moved step_00000003, step_00000004 (and their metrics) aside to {branch}" in capsys.readouterr().out
    # the loss of step 3 is computed before the first update at the new lr; step 4's differs
    assert second["losses"][3] == first["losses"][3] and second["losses"][4] != first["losses"][4]
    new_groups = read_trainer_state(run / "checkpoints" / "step_00000004")["optimizer"]["param_groups"]
    assert new_groups[0]["initial_lr"] == 3 * lr  # the accepted change took effect
    # metrics.jsonl: each step once, this line's values; the abandoned line's records went with its checkpoints
    records = [(r["step"], r["train/loss"]) for r in read_metrics(run)]
    assert records == [(1, first["losses"][1]), (2, first["losses"][2]), (3, second["losses"][3]),
                       (4, second["losses"][4])]
    assert [(r["step"], r["train/loss"]) for r in read_metrics(branch)] == [(3, first["losses"][3]),
                                                                            (4, first["losses"][4])]

    third = train.train(smoke(run, "trainer.max_steps=5", f"optim.lr={3 * lr}"))  # resume=auto
    assert third["resumed_from"] == str(run / "checkpoints" / "step_00000004")
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]


def test_resume_none_into_a_used_run_directory_keeps_the_old_line(tmp_path):
    train.train(smoke(tmp_path, "trainer.max_steps=2", "trainer.ckpt_every=1", "trainer.keep_last=0"))
    train.train(smoke(tmp_path, "trainer.max_steps=1", "trainer.resume=none", "trainer.keep_last=1"))
    [branch] = (tmp_path / "branches").iterdir()
    assert names(branch / "checkpoints") == ["step_00000001", "step_00000002"]
    assert names(tmp_path / "checkpoints") == ["step_00000001"]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1] and [r["step"] for r in read_metrics(branch)] == [1, 2]


# ------------------------------------------------------------------------------------ one run per directory


def test_a_second_run_into_a_locked_run_directory_stops_at_once_naming_the_holder(tmp_path):
    holder = RunLock(tmp_path)
    holder.acquire()
    try:
        expected = rf"in use by pid {os.getpid()} on host {re.escape(socket.gethostname())}, started \d{{4}}-"
        with pytest.raises(RunDirectoryLockedError, match=expected):
            train.train(smoke(tmp_path))
        assert names(tmp_path) == [LOCK_FILE]  # nothing written
    finally:
        holder.release()
    assert names(tmp_path) == []
    assert train.train(smoke(tmp_path, "trainer.max_steps=1"))["step"] == 1
    assert not (tmp_path / LOCK_FILE).exists()  # released when the run ends


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = {"pid": dead.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00Z", "argv": ["train.py"]}
    (tmp_path / LOCK_FILE).write_text(json.dumps(holder))
    with pytest.warns(RuntimeWarning, match=rf"taking over the stale lock of pid {dead.pid} on host .* started "
                                            r"2026-01-01T00:00:00Z \(train.py\), which is no longer running"):
        assert train.train(smoke(tmp_path, "trainer.max_steps=1"))["step"] == 1
    assert not (tmp_path / LOCK_FILE).exists()


def test_without_flock_the_pid_in_the_lock_file_still_protects_the_directory(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    first = RunLock(tmp_path)
    with pytest.warns(RuntimeWarning, match="does not support flock"):
        first.acquire()
    with pytest.warns(RuntimeWarning), pytest.raises(RunDirectoryLockedError, match=f"in use by pid {os.getpid()}"):
        RunLock(tmp_path).acquire()  # this process is alive
    first.release()
    assert names(tmp_path) == []


@pytest.mark.slow
def test_cli_run_into_a_locked_directory_exits_with_the_holder_named(tmp_path):
    holder = RunLock(tmp_path / "run")
    holder.acquire()
    try:
        result = run_train_cli("debug=smoke", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120)
    finally:
        holder.release()
    assert result.returncode != 0
    assert f"run directory {tmp_path / 'run'} is in use by pid {os.getpid()}" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_default_run_directory_ends_in_the_time_and_the_process_id():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    assert re.fullmatch(rf"outputs/\d{{4}}-\d\d-\d\d/\d\d-\d\d-\d\d-{os.getpid()}", cfg.hydra.run.dir)
    assert re.fullmatch(rf"multirun/\d{{4}}-\d\d-\d\d/\d\d-\d\d-\d\d-{os.getpid()}", cfg.hydra.sweep.dir)
    assert re.fullmatch(rf"\.hydra/\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d-{os.getpid()}", cfg.hydra.output_subdir)


@pytest.mark.slow
def test_two_default_runs_started_together_get_two_directories(tmp_path):
    command = [sys.executable, str(ROOT / "train.py"), "debug=smoke", "trainer.max_steps=1"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    runs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for _ in range(2)]
    assert [run.wait(timeout=300) for run in runs] == [0, 0]
    [day] = (tmp_path / "outputs").iterdir()
    assert len(names(day)) == 2 and all((day / d / "checkpoints" / "step_00000001").is_dir() for d in names(day))


# ------------------------------------------------------------------ leftovers, metrics, durability (item 6)


def test_leftovers_of_interrupted_writes_are_cleaned_at_start_up(tmp_path, capsys):
    train.train(smoke(tmp_path, "trainer.max_steps=2", "trainer.ckpt_every=1", "trainer.keep_last=0"))
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_00000003-0badc0de").mkdir()  # killed mid-write
    (root / ".tmp-step_00000003-0badc0de" / "model.safetensors").write_bytes(b"x" * 1000)
    shutil.copytree(root / "step_00000001", root / ".old-step_00000001-12345678")  # killed before removing the old
    (root / "step_00000002").rename(root / ".old-step_00000002-87654321")  # killed between a swap's two renames
    summary = train.train(smoke(tmp_path, "trainer.max_steps=3", "trainer.keep_last=0"))
    out = capsys.readouterr().out
    assert "removed .tmp-step_00000003-0badc0de (an interrupted write)" in out
    assert "restored step_00000002 from .old-step_00000002-87654321" in out
    assert summary["resumed_from"] == str(root / "step_00000002")
    assert names(root) == ["step_00000001", "step_00000002", "step_00000003"]


def test_metrics_have_no_duplicate_steps_after_a_resume(tmp_path):
    full = train.train(smoke(tmp_path / "full", "trainer.max_steps=3"))
    train.train(smoke(tmp_path / "run", "trainer.max_steps=3", "trainer.ckpt_every=2"))
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000003")  # killed after logging step 3, before saving
    train.train(smoke(tmp_path / "run", "trainer.max_steps=3"))
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["train/loss"] for r in records] == losses_of(full)


def test_atomic_directory_fsyncs_the_parent_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_rename, real_fsync = Path.rename, model_checkpoint.fsync_directory
    monkeypatch.setattr(Path, "rename", lambda self, target: (events.append(("rename", Path(target).name)),
                                                              real_rename(self, target))[1])
    monkeypatch.setattr(model_checkpoint, "fsync_directory", lambda d: (events.append(("fsync", Path(d).name)),
                                                                        real_fsync(d))[1])
    for text in ("first", "second"):  # a new directory, then one replacing it
        events.clear()
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "file").write_text(text)
        renamed = events.index(("rename", "out"))
        assert ("fsync", tmp_path.name) in events[renamed + 1:]
        assert any(event == ("fsync", tmp.name) for event in events[:renamed])  # the new files were synced first
        assert (tmp_path / "out" / "file").read_text() == text and names(tmp_path) == ["out"]
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(tmp_path / "out") as tmp:
        (tmp / "file").write_text("third")
        raise RuntimeError("boom")
    assert (tmp_path / "out" / "file").read_text() == "second" and names(tmp_path) == ["out"]


# ------------------------------------------------------------------------------------- NaN recovery (item 4)


def test_no_checkpoint_with_non_finite_parameters_and_the_nan_stop_names_the_newest_finite_one(tmp_path,
                                                                                                monkeypatch):
    inner, calls = train.forward_backward, []

    def poison_the_second_step(module, *args, **kwargs):
        result = inner(module, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # an update that leaves a parameter infinite (as a huge lr does)
            with torch.no_grad():
                module.layers[0].attention.wq.weight[0, 0] = float("inf")
        return result

    monkeypatch.setattr(train, "forward_backward", poison_the_second_step)
    with pytest.raises(NonFiniteError) as error:
        train.train(smoke(tmp_path, "trainer.max_steps=4", "trainer.ckpt_every=1"))
    first_loss = read_metrics(tmp_path)[0]["train/loss"]
    newest = f"The newest checkpoint (finite parameters, step 1, loss {first_loss:.6g}) is " \
             f"{tmp_path / 'checkpoints' / 'step_00000001'} and was not touched."
    assert "step 2: parameters ['layers.0.attention.wq.weight'] hold NaN or inf" in str(error.value)
    assert newest in str(error.value)
    assert names(tmp_path / "checkpoints") == ["step_00000001"] and leftovers(tmp_path) == []

    def nan_loss(*args, **kwargs):
        return float("nan"), inner(*args, **kwargs)[1]

    monkeypatch.setattr(train, "forward_backward", nan_loss)
    with pytest.raises(train.NonFiniteLossError, match=r"^step 1: loss=nan, grad_norm=.*before the optimizer step\. "
                                                       + re.escape(newest)):
        train.train(smoke(tmp_path, "trainer.max_steps=4", "trainer.ckpt_every=1"))


def test_an_overflowing_learning_rate_is_named_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"optim.lr=1e\+39 must be finite, >= 0 and below float32's largest"):
        train.train(smoke(tmp_path, "optim.lr=1e39"))
    with pytest.raises(ValueError, match=r"optim.lr \* optim.gate_lr_multiplier=1e\+39 must be finite"):
        train.train(smoke(tmp_path, "optim.lr=1e38", "optim.gate_lr_multiplier=10"))


# ------------------------------------------------------------------------------ resume checks config (item 5)


def test_resume_refuses_unlisted_config_changes_and_lists_the_ones_it_applies(tmp_path, capsys):
    train.train(smoke(tmp_path, "trainer.max_steps=1"))
    saved = json.loads((tmp_path / "checkpoints" / "step_00000001" / "config.json").read_text())["train_config"]
    lr = saved["optim"]["lr"]
    changed = ("trainer.max_steps=2", f"optim.lr={lr * 10}", "attention=infini_delta", "model.segment_len=32")
    with pytest.raises(CheckpointError) as error:
        train.train(smoke(tmp_path, *changed))
    message = str(error.value)
    for line in (f"  optim.lr: {lr!r} -> {lr * 10!r}\n", "  model.segment_len: 64 -> 32\n",
                 "  model.memory_update: 'linear' -> 'delta'\n", "  trainer.max_steps: 1 -> 2  (safe)\n"):
        assert line in message
    assert "trainer.resume_changes=[model.memory_update,model.segment_len,optim.lr]" in message
    assert names(tmp_path / "checkpoints") == ["step_00000001"] and [r["step"] for r in read_metrics(tmp_path)] == [1]

    capsys.readouterr()
    summary = train.train(smoke(tmp_path, *changed, "trainer.resume_changes=[model,optim.lr]"))
    out = capsys.readouterr().out
    assert summary["resumed_from"].endswith("step_00000001") and summary["step"] == 2
    assert "with these config changes applied:\n" in out and "  model.segment_len: 64 -> 32\n" in out
    model, meta = load_model(tmp_path / "checkpoints" / "step_00000002")
    assert (model.config.segment_len, model.config.memory_update) == (32, "delta")
    groups = read_trainer_state(tmp_path / "checkpoints" / "step_00000002")["optimizer"]["param_groups"]
    assert groups[0]["initial_lr"] == lr * 10


# --------------------------------------------------------------------------- a signal in the final evaluation


def test_sigterm_during_the_final_evaluation_stops_it_cleanly(tmp_path, monkeypatch):
    forward, sent = Transformer.forward, []

    def signal_in_evaluation(self, *args, **kwargs):
        if not self.training and not sent:  # the first evaluation-mode call: the final passkey evaluation
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Transformer, "forward", signal_in_evaluation)
    final = ("evaluation.final=[{task: passkey, lengths: [256], depths: [0.5], trials: 1}]",)
    summary = train.train(smoke(tmp_path, *final))
    monkeypatch.undo()
    assert sent and summary["stopped_by_signal"] and summary["step"] == 3 and "passkey" not in summary
    assert not isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), train.StopRequest)
    assert list_checkpoints(tmp_path)[-1].name == "step_00000003" and leftovers(tmp_path) == []
    assert not (tmp_path / "passkey" / "passkey_summary.json").exists()

    again = train.train(smoke(tmp_path, *final))  # resume=auto: nothing to train, the evaluation runs
    assert again["resumed_from"].endswith("step_00000003") and again["losses"] == {} and "passkey" in again
    assert [r["step"] for r in read_metrics(tmp_path) if "train/loss" in r] == [1, 2, 3]


# ----------------------------------------------------------------------------------- export/import (item 2)


def test_export_refuses_its_source_and_non_empty_destinations_and_leaves_no_stale_shards(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from test_hf import make_llama

    from models.hf import export_checkpoint, from_hf, main

    reference = make_llama(tmp_path / "hf")
    ours = tmp_path / "ours"
    save_model(ours, from_hf(tmp_path / "hf", {"segment_len": 16}), tokenizer="byte")
    with torch.no_grad():  # "trained": every weight differs from the Llama the old export below holds
        model = load_model(ours)[0]
        for p in model.parameters():
            p.add_(0.5)
    shutil.rmtree(ours)
    save_model(ours, model, tokenizer="byte")
    weights = (ours / "model.safetensors").read_bytes()

    with pytest.raises(FileExistsError, match="is the source itself"):
        export_checkpoint(ours, ours)
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(ours), str(ours)])
    assert exit_.value.code == 2 and "is the source itself" in capsys.readouterr().err
    assert (ours / "model.safetensors").read_bytes() == weights  # untouched

    old_export = tmp_path / "exported"
    reference.save_pretrained(old_export, max_shard_size="20KB")  # an older, sharded export of other weights
    assert (old_export / "model.safetensors.index.json").is_file()
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export_checkpoint(ours, old_export)
    export_checkpoint(ours, old_export, overwrite=True)
    assert names(old_export) == ["config.json", "infini_attention.json", "infini_attention.safetensors",
                                 "model.safetensors"]
    back = from_hf(old_export)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())

    export_checkpoint(ours, ours, overwrite=True)  # told to: the source becomes its export
    assert all(torch.equal(from_hf(ours).state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(FileExistsError, match="contains the source"):
        export_checkpoint(old_export, tmp_path, overwrite=True)
    assert transformers.LlamaForCausalLM.from_pretrained(old_export) is not None


def test_import_names_the_directory_problem_before_the_tokenizer(tmp_path):
    from models.hf import ConversionError, convert_checkpoint

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="empty has no config.json; is it a Hugging Face model directory"):
        convert_checkpoint(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2",
                                                               "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConversionError, match=r"unsupported architecture \['GPT2LMHeadModel'\]"):
        convert_checkpoint(tmp_path / "gpt2", tmp_path / "out")
    with pytest.raises(ConversionError, match="'meta-llama/Llama-3.2-1B' is not a local directory.*never downloaded"):
        convert_checkpoint("meta-llama/Llama-3.2-1B", tmp_path / "out")
    with pytest.raises(FileExistsError, match="is the source itself"):
        convert_checkpoint(tmp_path / "gpt2", tmp_path / "gpt2")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- errors that name (item 7)


def test_data_errors_name_the_file_or_the_value(tmp_path, monkeypatch):
    from data import text

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait. ".encode("latin-1") * 20)
    with pytest.raises(ValueError, match=rf"data file '{re.escape(str(latin1))}' is not UTF-8 text: byte 0xe9 at "
                                         r"offset 3"):
        text.load_documents(str(latin1))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=rf"data source '{re.escape(str(empty))}': the file is empty or only "
                                         "whitespace"):
        train.train(smoke(tmp_path / "run", "data=pg19", f"data.source={empty}", "data.val_split=null"))

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'mybooks' on the Hub")

    monkeypatch.setattr(text.datasets, "load_dataset", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"data source 'mybooks' is not a local path \('"
                                                rf"{re.escape(str(tmp_path / 'mybooks'))}' does not exist\), so it "
                                                r"was looked up as a Hugging Face Hub dataset name, which failed: "
                                                r"Couldn't reach"):
        text.load_documents("mybooks")


@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "--prompt number 1 is empty"),
    (["--prompt", "a", "--prompt", ""], "--prompt number 2 is empty"),
    (["--prompt", "a", "--max-new-tokens", "-1"], "--max-new-tokens=-1 is out of range"),
    (["--prompt", "a", "--top-p", "0"], "--top-p=0.0 is out of range"),
    (["--prompt-file", "missing.txt"], "--prompt-file 'missing.txt' cannot be read"),
])
def test_generation_cli_names_the_bad_argument(tmp_path, monkeypatch, capsys, args, message):
    from models.generation import main

    save_model(tmp_path / "model", tiny_model(), tokenizer="byte")
    (tmp_path / "empty.txt").write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "model"), *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_generation_cli_names_a_missing_checkpoint(tmp_path, capsys):
    from models.generation import main

    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope"), "--prompt", "a"])
    assert f"checkpoint directory '{tmp_path / 'nope'}' does not exist" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- fault injection

FAULT_RUN = ("trainer.max_steps=16", "trainer.ckpt_every=2", "trainer.keep_last=2")


def kill_at(kind: str, n: int) -> None:
    """In a child process: SIGKILL this process at the n-th call of a point of the training loop or of a
    checkpoint write. step: during a step's forward/backward; weights / optimizer: after writing half of the file
    (a torn write); sync: at an fsync of a directory (the 1st syncs the new checkpoint's files, the 2nd follows
    the rename into place); rotate: while removing an old checkpoint."""
    calls = [0]

    def wrap(inner, tear: bool = False):
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                if tear:
                    inner(*args, **kwargs)
                    path = Path(args[1])
                    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return inner(*args, **kwargs)
        return call

    if kind == "step":
        train.forward_backward = wrap(train.forward_backward)
    elif kind == "weights":
        model_checkpoint.save_file = wrap(model_checkpoint.save_file, tear=True)
    elif kind == "optimizer":
        checkpointing.save_file = wrap(checkpointing.save_file, tear=True)
    elif kind == "sync":
        model_checkpoint.fsync_directory = wrap(model_checkpoint.fsync_directory)
    elif kind == "rotate":
        checkpointing.shutil.rmtree = wrap(checkpointing.shutil.rmtree)


def run_child(run_dir: Path, kind: str, n: int) -> int:
    """Train in a forked child killed at (kind, n); returns the signal that ended it (0: it finished)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            kill_at(kind, n)
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the child exits right after
            train.train(smoke(run_dir, *FAULT_RUN))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status)
    assert os.WEXITSTATUS(status) == 0, "the child failed (not killed)"
    return 0


def assert_same_as_uninterrupted(run_dir: Path, reference: Path) -> None:
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        assert (run_dir / "checkpoints" / "step_00000016" / name).read_bytes() == \
            (reference / "checkpoints" / "step_00000016" / name).read_bytes(), name
    assert [(r["step"], r["train/loss"]) for r in read_metrics(run_dir)] == \
        [(r["step"], r["train/loss"]) for r in read_metrics(reference)]  # bit-for-bit, each step once
    assert leftovers(run_dir) == [] and not (run_dir / "branches").exists()
    assert names(run_dir / "checkpoints") == names(reference / "checkpoints")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_killed_at_random_moments_resumes_bit_for_bit(tmp_path):
    """Children killed (SIGKILL) mid-step, mid-write of each file, around the rename and mid-rotation, each one
    resuming where the last left off, end equal to an uninterrupted run: same bytes, same losses, no leftover."""
    train.train(smoke(tmp_path / "reference", *FAULT_RUN))
    rng = random.Random(13)
    plan = [("optimizer", rng.randint(1, 4)), ("weights", rng.randint(1, 2)), ("sync", 2),
            ("step", rng.randint(1, 3)), ("rotate", 1), ("sync", 1)]  # each child gets at most 4 steps further
    assert [run_child(tmp_path / "run", kind, n) for kind, n in plan] == [signal.SIGKILL] * len(plan)
    assert run_child(tmp_path / "run", "none", 0) == 0
    assert_same_as_uninterrupted(tmp_path / "run", tmp_path / "reference")


KILLER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {root!r})
sys.argv = [{train!r}, *sys.argv[1:]]
import train
from test_reliability import kill_at
kill_at({kind!r}, {n})
import runpy
runpy.run_path({train!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_cli_killed_at_random_moments_resumes_bit_for_bit(tmp_path):
    """The command line, killed by the test at random wall-clock moments and by kill points inside checkpoint
    writes, then run to the end: equal to an uninterrupted command-line run."""
    args = ["debug=smoke", *FAULT_RUN]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT / "tests")}
    assert run_train_cli(*args, f"hydra.run.dir={tmp_path / 'reference'}", cwd=tmp_path).returncode == 0
    rng = random.Random(2026)
    run = f"hydra.run.dir={tmp_path / 'run'}"
    for _ in range(3):  # random moments: the test kills the process
        process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, run], cwd=tmp_path, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            process.wait(timeout=rng.uniform(3.0, 12.0))
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
    for kind, n in (("optimizer", rng.randint(1, 2)), ("sync", 2)):  # inside a checkpoint write
        script = KILLER.format(root=str(ROOT), train=str(ROOT / "train.py"), kind=kind, n=n)
        result = subprocess.run([sys.executable, "-c", script, *args, run], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode in (-signal.SIGKILL, 0), result.stderr[-2000:]
    assert run_train_cli(*args, run, cwd=tmp_path).returncode == 0
    assert_same_as_uninterrupted(tmp_path / "run", tmp_path / "reference")
