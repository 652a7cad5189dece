"""Trainer stages (a length curriculum inside one run) and optim.no_weight_decay: tiny smoke-sized runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_train import SignalAt, losses_of, smoke

import train
from models import Transformer
from models.checkpoint import CheckpointError
from training.config import OptimConfig
from training.metrics import read_metrics
from training.optim import build_optimizer, build_scheduler
from training.stages import stage_seed

# short: 3 steps of 3 x 256 tokens at lr 2e-3 (1 warmup step); long: 4 steps of 1 x 384 at optim.lr, min ratio 0.5
# (256 is about the shortest passkey prompt of the byte tokenizer)
TWO_STAGES = ("trainer.stages=[{steps:3,name:short,data:{seq_len:256,batch_size:3},optim:{lr:2e-3,warmup_steps:1}},"
              "{steps:4,name:long,data:{seq_len:384,batch_size:1},optim:{warmup_steps:1,min_lr_ratio:0.5}}]")
BASE_OPTIM = ("optim.lr=1e-3", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1", "optim.schedule=cosine")


def tiny_model() -> Transformer:
    return Transformer(train.to_train_config(smoke(Path("/unused")))[0].model)


class RecordBatches:
    """Wrap train.forward_backward to record each micro-batch's tokens and its answer (targets under the mask)."""

    def __init__(self):
        self.inner, self.shapes, self.answers = train.forward_backward, [], []

    def __call__(self, module, batch, *args, **kwargs):
        self.shapes.append(tuple(batch["tokens"].shape))
        self.answers.append(batch["targets"][0][batch["loss_mask"][0] > 0].tolist())
        return self.inner(module, batch, *args, **kwargs)


def test_without_stages_the_losses_are_those_of_before_stages(tmp_path):
    """trainer.stages=[] is the run as it was: these losses were recorded (1 thread, fp32) from the code before
    stages existed; they change only if the model's or the data's numerics change (then re-record them). A single
    stage without overrides is exactly the same run (its seed is data.seed, its lr ratio exactly 1.0)."""
    # re-recorded 2026-12-01 when q, k, v became one matmul (rounding: within 6e-7 of the earlier record)
    before = [5.539943150111607, 5.495626722063337, 5.42883791242327, 5.393549237932477, 5.333727155412946]
    assert torch.get_num_threads() == 1  # as tests/conftest.py sets it, and as they were recorded
    extra = ("trainer.max_steps=5", "optim.warmup_steps=2")
    assert losses_of(train.train(smoke(tmp_path / "plain", *extra))) == before
    assert losses_of(train.train(smoke(tmp_path / "one", *extra, "trainer.stages=[{steps:5}]"))) == before
    records = read_metrics(tmp_path / "one")
    assert [r["train/stage"] for r in records] == [0] * 5 and "train/stage" not in read_metrics(tmp_path / "plain")[0]


def test_stage_boundaries_switch_batches_and_restart_the_schedule(tmp_path, monkeypatch, capsys):
    recorder = RecordBatches()
    monkeypatch.setattr(train, "forward_backward", recorder)
    summary = train.train(smoke(tmp_path, "trainer.max_steps=7", *BASE_OPTIM, TWO_STAGES))
    assert summary["step"] == 7
    assert recorder.shapes == [(3, 256)] * 3 + [(1, 384)] * 4  # (B, T) of each step
    records = read_metrics(tmp_path)
    assert [r["train/stage"] for r in records] == [0, 0, 0, 1, 1, 1, 1]
    # short (lr 2e-3, warmup 1, cosine to 0.1 over 3 steps): 2e-3, 2e-3, 2e-3 * (0.1 + 0.9 * (1 + cos(pi/2)) / 2)
    # long (lr 1e-3, warmup 1, cosine to 0.5 over 4 steps): 1e-3, 1e-3, 1e-3 * (0.5 + 0.5 * (1 + cos(pi/3)) / 2),
    # 1e-3 * (0.5 + 0.5 * (1 + cos(2pi/3)) / 2)
    expected = [2e-3, 2e-3, 1.1e-3, 1e-3, 1e-3, 8.75e-4, 6.25e-4]
    assert [r["train/lr"] for r in records] == pytest.approx(expected, rel=1e-12, abs=0)
    # the long stage's stream has its own seed: not the short stage's passkeys again at another length
    assert stage_seed(0, 0) == 0 and stage_seed(0, 1) != 0
    assert recorder.answers[3] != recorder.answers[0]
    out = capsys.readouterr().out
    assert "trainer.stages[0] ('short'): steps 1-3 of 7, seq_len 256, batch_size 3, lr 0.002" in out
    assert "trainer.stages[1] ('long'): steps 4-7 of 7, seq_len 384, batch_size 1, lr 0.001" in out


def test_staged_scheduler_values_groups_and_state_dict():
    """Every group follows its stage's schedule (gates at 10x); a scheduler restored from a state dict continues
    every stage exactly (the factor is a function of the global step); past the end: the last stage's floor."""
    model = tiny_model()
    base = OptimConfig(lr=1e-3, warmup_steps=2, min_lr_ratio=0.1)
    stages = [(2, OptimConfig(lr=1e-3, warmup_steps=1, schedule="constant")),
              (3, OptimConfig(lr=4e-3, warmup_steps=2, min_lr_ratio=0.25))]

    def run(steps: int, state=None):
        optimizer = build_optimizer(model, base)
        scheduler = build_scheduler(optimizer, base, 5, stages)
        if state is not None:
            optimizer.load_state_dict(state[0])
            scheduler.load_state_dict(state[1])
        lrs = []
        for _ in range(steps):
            lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})
            optimizer.step()
            scheduler.step()
        return lrs, (optimizer.state_dict(), scheduler.state_dict())

    lrs, _ = run(7)
    assert [lr["decay"] for lr in lrs] == pytest.approx([1e-3, 1e-3, 2e-3, 4e-3, 4e-3, 1e-3, 1e-3], rel=1e-12)
    assert all(lr["gates"] == pytest.approx(10 * lr["decay"], rel=1e-12) for lr in lrs)
    first, state = run(3)
    rest, _ = run(4, state)
    assert first + rest == lrs  # exactly
    with pytest.raises(ValueError, match="optim.lr=0"):
        build_scheduler(build_optimizer(model, OptimConfig(lr=0.0)), OptimConfig(lr=0.0), 5, stages)


def test_resume_mid_stage_and_at_a_stage_boundary_equals_uninterrupted(tmp_path, monkeypatch):
    def stages(first: int, second: int) -> str:
        return (f"trainer.stages=[{{steps:{first},data:{{batch_size:3}}}},{{steps:{second},data:{{seq_len:384,"
                "seq_len_mix:[256,384],batch_size:1},optim:{lr:3e-3,warmup_steps:1}}]")

    extra = ("trainer.max_steps=6", *BASE_OPTIM, stages(3, 3))
    full = train.train(smoke(tmp_path / "full", *extra, "trainer.ckpt_every=1", "trainer.keep_last=0"))
    full_records = read_metrics(tmp_path / "full")
    checkpoints = tmp_path / "full" / "checkpoints"
    stage_of = {step: json.loads((checkpoints / f"step_{step:08d}" / "trainer_state.json").read_text())["stage"]
                for step in range(1, 7)}
    assert stage_of == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 1}  # at step 3 the next stage's stream is saved

    # interrupted (SIGUSR1) during step 5, in the middle of the second stage, then resumed
    monkeypatch.setattr(train, "forward_backward", SignalAt(5))
    stopped = train.train(smoke(tmp_path / "run", *extra))
    assert stopped["stopped_by_signal"] and stopped["step"] == 5
    monkeypatch.undo()
    resumed = train.train(smoke(tmp_path / "run", *extra))
    assert resumed["resumed_from"].endswith("step_00000005")
    assert losses_of(stopped) + losses_of(resumed) == losses_of(full)  # exactly equal
    keys = ("step", "train/loss", "train/lr", "train/stage")
    assert [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "run")] == \
        [{k: r[k] for k in keys} for r in full_records]

    # resumed exactly at the stage boundary: the second stage's stream from its start and its schedule
    at_boundary = train.train(smoke(tmp_path / "boundary", *extra, f"trainer.resume={checkpoints / 'step_00000003'}"))
    assert losses_of(at_boundary) == losses_of(full)[3:]
    assert [r["train/lr"] for r in read_metrics(tmp_path / "boundary")] == [r["train/lr"] for r in full_records[3:]]

    # the stages changed since the checkpoint: step 3 would now be in stage 0, the checkpoint holds stage 1's stream
    with pytest.raises(CheckpointError, match=r"step 3 in stage 1 .* step 3 in trainer.stages\[0\]"):
        train.train(smoke(tmp_path / "changed", "trainer.max_steps=6", *BASE_OPTIM, stages(4, 2),
                          f"trainer.resume={checkpoints / 'step_00000003'}"))


def test_max_steps_must_equal_the_sum_of_the_stages_steps(tmp_path):
    with pytest.raises(ValueError, match=r"trainer.max_steps=5 but the steps of trainer.stages sum to 7: "
                                         r"set trainer.max_steps=7"):
        train.train(smoke(tmp_path, "trainer.max_steps=5", TWO_STAGES))
    assert not tmp_path.joinpath("metrics.jsonl").exists()


BAD_STAGES = {  # the second stage of a run whose first stage is {steps:1}: (stage, the error it gives)
    "misspelt data key": ("{steps:2,name:long,data:{seq_lenn:512}}",
                          r"trainer.stages\[1\] \('long'\).data.seq_lenn=512: Key 'seq_lenn' not in "
                          r"'PasskeyDataConfig'"),
    "mistyped data value": ("{steps:2,data:{batch_size:many}}",
                            r"trainer.stages\[1\] \('stage1'\).data.batch_size='many': Value 'many'"),
    "misspelt optim key": ("{steps:2,optim:{lrr:0.1}}",
                           r"trainer.stages\[1\] \('stage1'\).optim.lrr=0.1: Key 'lrr' not in 'OptimConfig'"),
    "tokenizer": ("{steps:2,data:{tokenizer:gpt2}}", r"trainer.stages\[1\] \('stage1'\).data.tokenizer: cannot change"),
    "no steps": ("{steps:0}", r"trainer.stages\[1\] \('stage1'\).steps=0: a stage needs at least one step"),
}


@pytest.mark.parametrize("case", list(BAD_STAGES))
def test_a_bad_stage_fails_before_training_naming_stage_and_key(tmp_path, case):
    stage, message = BAD_STAGES[case]
    max_steps = 1 + (0 if "steps:0" in stage else 2)
    with pytest.raises(ValueError, match=message):
        train.train(smoke(tmp_path, f"trainer.max_steps={max_steps}", f"trainer.stages=[{{steps:1}},{stage}]"))
    assert not tmp_path.joinpath("metrics.jsonl").exists()  # nothing ran


@pytest.mark.parametrize("key,value", [("betas", "[0.8,0.9]"), ("weight_decay", "0.0"), ("name", "adafactor"),
                                       ("grad_clip", "0.5")])
def test_a_stage_may_override_only_schedule_fields(tmp_path, key, value):
    message = (rf"trainer.stages\[0\] \('stage0'\).optim.{key}: a stage may only override the learning-rate "
               rf"schedule .*set optim.{key} for the whole run")
    with pytest.raises(ValueError, match=message):
        train.train(smoke(tmp_path, "trainer.max_steps=2", f"trainer.stages=[{{steps:2,optim:{{{key}:{value}}}}}]"))


def test_no_weight_decay_patterns_move_parameters_to_the_no_decay_group():
    model = tiny_model()
    names = {id(p): n for n, p in model.named_parameters()}
    cfg = OptimConfig(no_weight_decay=["layers.*.attention.wk.weight", "output.*"])
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in build_optimizer(model, cfg).param_groups}
    moved = {"layers.0.attention.wk.weight", "layers.1.attention.wk.weight", "output.weight"}
    assert moved <= groups["no_decay"] and not moved & groups["decay"]
    default = {g["name"]: {names[id(p)] for p in g["params"]}
               for g in build_optimizer(model, OptimConfig()).param_groups}
    assert groups["decay"] == default["decay"] - moved and groups["no_decay"] == default["no_decay"] | moved
    assert groups["gates"] == default["gates"]
    assert sum(len(g) for g in groups.values()) == len(names)  # every parameter in exactly one group
    with pytest.raises(ValueError, match=r"\['layers.\*.attention.wkk.weight'\] match no parameter name"):
        build_optimizer(model, OptimConfig(no_weight_decay=["output.weight", "layers.*.attention.wkk.weight"]))


def test_no_weight_decay_composes_from_the_command_line(tmp_path):
    typed, _ = train.to_train_config(smoke(tmp_path, "optim.no_weight_decay=[tok_embeddings.weight]"))
    assert typed.optim.no_weight_decay == ["tok_embeddings.weight"]
    assert math.isfinite(train.train(smoke(tmp_path, "trainer.max_steps=1",
                                           "optim.no_weight_decay=[tok_embeddings.weight]"))["losses"][1])


ADVANCING = ("trainer.stages=[{steps:4,name:short,data:{seq_len:256,batch_size:3},advance_when:'val/loss <= 100'},"
             "{steps:3,name:long,data:{seq_len:384,batch_size:1},optim:{warmup_steps:1,min_lr_ratio:0.5}}]")


def test_advance_when_ends_a_stage_early_and_the_last_stage_gets_the_steps(tmp_path, monkeypatch, capsys):
    """A stage whose condition holds at a periodic evaluation ends there: the next stage's stream and validation
    batches from the next step on, the last stage's schedule stretched over the steps saved, the boundaries in
    every checkpoint, and a resume mid-stage equals the uninterrupted run."""
    recorder = RecordBatches()
    monkeypatch.setattr(train, "forward_backward", recorder)
    extra = ("trainer.max_steps=7", "trainer.eval_every=2", "trainer.eval_batches=1", *BASE_OPTIM, ADVANCING)
    full = train.train(smoke(tmp_path / "full", *extra, "trainer.ckpt_every=1", "trainer.keep_last=0"))
    monkeypatch.undo()
    assert recorder.shapes == [(3, 256)] * 2 + [(1, 384)] * 5  # stage 0 ended after step 2 of its planned 4
    records = read_metrics(tmp_path / "full")
    train_records = [r for r in records if "train/loss" in r]
    assert [r["train/stage"] for r in train_records] == [0, 0, 1, 1, 1, 1, 1]
    # stage 1 restarts warmup (1 step) then cosine to 0.5 over its 5 steps (planned 3): steps 3..7
    expected = [1e-3 * (0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * (i - 1) / 4))) if i else 1e-3 for i in range(5)]
    assert [r["train/lr"] for r in train_records[2:]] == pytest.approx(expected, rel=1e-12)
    state = json.loads((tmp_path / "full" / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["stage"] == 1 and state["stage_starts"] == [0, 2]
    assert "ends at step 2: val/loss=" in capsys.readouterr().out

    monkeypatch.setattr(train, "forward_backward", SignalAt(5))
    stopped = train.train(smoke(tmp_path / "run", *extra))
    monkeypatch.undo()
    resumed = train.train(smoke(tmp_path / "run", *extra))
    assert losses_of(stopped) + losses_of(resumed) == losses_of(full)
    assert [r["train/lr"] for r in read_metrics(tmp_path / "run") if "train/lr" in r] == \
        [r["train/lr"] for r in train_records]


def test_advance_when_not_met_keeps_the_plan_and_bad_conditions_are_named(tmp_path):
    never = ADVANCING.replace("val/loss <= 100", "val/loss <= -1")
    train.train(smoke(tmp_path / "never", "trainer.max_steps=7", "trainer.eval_every=2", "trainer.eval_batches=1",
                      never))
    stages_logged = [r["train/stage"] for r in read_metrics(tmp_path / "never") if "train/stage" in r]
    assert stages_logged == [0, 0, 0, 0, 1, 1, 1]
    misspelt = ADVANCING.replace("val/loss <= 100", "val/los <= 100")
    with pytest.raises(ValueError, match=r"advance_when names 'val/los'.*val/loss"):
        train.train(smoke(tmp_path / "misspelt", "trainer.max_steps=7", "trainer.eval_every=2",
                          "trainer.eval_batches=1", misspelt))
    with pytest.raises(ValueError, match=r"advance_when='val/loss < 1': expected"):
        train.train(smoke(tmp_path / "syntax", "trainer.max_steps=7", ADVANCING.replace("<= 100", "< 1")))
    last = "trainer.stages=[{steps:3},{steps:4,advance_when:'val/loss <= 1'}]"
    with pytest.raises(ValueError, match="the last stage has no next stage"):
        train.train(smoke(tmp_path / "last", "trainer.max_steps=7", last))
