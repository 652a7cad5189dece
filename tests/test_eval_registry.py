"""The evaluation registry: a task added as one module (schema + runner) and one YAML runs from
`python -m evaluation` (evaluation.run.run) and from a training run's periodic and final evaluations."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import train
from evaluation.run import run
from evaluation.tasks import TASKS, EvalContext, Report, discover, register_task
from models.checkpoint import load_model
from training.checkpointing import latest_checkpoint
from training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ToyTaskConfig:
    """The toy task: the mean of the model's last-position logits after `n_tokens` tokens 0, 1, 2, ..."""

    name: str = "toy_logit_mean"
    n_tokens: int = 8


def toy_value(model, n_tokens: int) -> float:
    with torch.no_grad():
        return float(model(torch.arange(n_tokens)[None] % model.config.vocab_size).logits[0, -1].mean())


@pytest.fixture
def toy_task():
    """Registered as a task module would register itself; unregistered afterwards."""

    @register_task(ToyTaskConfig)
    def toy(task: ToyTaskConfig, ctx: EvalContext) -> Report:
        value = toy_value(ctx.model, task.n_tokens)
        if ctx.out_dir is not None:
            (ctx.out_dir / "toy.txt").write_text(f"{value}\n")
        return Report({"task": "toy_logit_mean", "value": value}, {"toy/logit_mean": value}, text=f"toy {value}")

    yield toy
    del TASKS["toy_logit_mean"]


def test_the_shipped_tasks_are_registered_once():
    assert {"passkey", "perplexity", "summarization", "memory_footprint", "memory_probe"} <= set(discover())
    assert discover()["passkey"].periodic_name("passkey/exact/512") == "val/passkey_exact/512"
    assert discover()["memory_probe"].periodic_name("probe/needle_share/512/mean") == "probe/needle_share/512/mean"


def test_a_toy_task_runs_from_python_m_evaluation(toy_task, tmp_path, capsys):
    conf = tmp_path / "eval"
    shutil.copytree(ROOT / "conf" / "eval", conf)
    (conf / "task" / "toy.yaml").write_text("defaults:\n  - toy_logit_mean_schema\n\nname: toy_logit_mean\n"
                                            "n_tokens: 5\n")
    summary = train.train(compose_smoke(tmp_path / "run"))  # a checkpoint to evaluate
    checkpoint = summary["checkpoint"]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("evaluate", overrides=["task=toy", f"checkpoint={checkpoint}", f"out_dir={tmp_path / 'out'}"])
    result = run(cfg)
    expected = toy_value(load_model(checkpoint)[0].eval(), 5)
    assert result["value"] == expected and result["checkpoint"] == checkpoint
    assert float((tmp_path / "out" / "toy.txt").read_text()) == expected
    assert (tmp_path / "out" / "toy_logit_mean_summary.json").is_file()
    assert f"toy {expected}" in capsys.readouterr().out


def compose_smoke(run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=["name=test", "debug=smoke", f"trainer.run_dir={run_dir}", *overrides])


def test_a_toy_task_runs_during_and_after_training(toy_task, tmp_path):
    summary = train.train(compose_smoke(
        tmp_path, "trainer.max_steps=2", "trainer.eval_every=2",
        "evaluation.periodic=[{task: toy_logit_mean, n_tokens: 3}]",
        "evaluation.final=[{task: toy_logit_mean, label: toy}]"))
    model = load_model(latest_checkpoint(tmp_path))[0].eval()
    (periodic,) = [r for r in read_metrics(tmp_path) if "val/loss" in r]
    assert periodic["toy/logit_mean"] == pytest.approx(toy_value(model, 3), rel=1e-6)
    assert summary["toy"]["value"] == pytest.approx(toy_value(model, 8), rel=1e-6)
    assert (tmp_path / "toy" / "toy.txt").is_file()


def test_bad_evaluation_entries_fail_at_train_start_naming_the_entry(toy_task, tmp_path):
    with pytest.raises(ValueError, match=r"evaluation.final\[0\].task: task.name 'toys' is not one of"):
        train.train(compose_smoke(tmp_path, "evaluation.final=[{task: toys}]"))
    with pytest.raises(ValueError, match=r"evaluation.periodic\[1\].n_token=3: Key 'n_token' not in 'ToyTaskConfig'"):
        train.train(compose_smoke(tmp_path, "evaluation.periodic=[{task: toy_logit_mean}, {task: toy_logit_mean, "
                                            "n_token: 3}]"))
    with pytest.raises(ValueError, match=r"evaluation.final\[0\]: name the task"):
        train.train(compose_smoke(tmp_path, "evaluation.final=[{lengths: [512]}]"))
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing ran


def test_mqar_and_ruler_run_during_and_after_training(tmp_path):
    """The retrieval tasks as training evaluations: periodic metrics equal a direct evaluation of the checkpoint
    with the same settings; the final entries write their tables."""
    from data.mqar import MQARConfig
    from data.tokenizer import ByteTokenizer
    from evaluation.mqar import evaluate_mqar
    from evaluation.ruler import evaluate_ruler

    mqar = "{task: mqar, seq_lens: [64], num_pairs: [2, 4], vocab_size: 32, examples: 4, batch_size: 4}"
    ruler = "{task: ruler, lengths: [768], tasks: [niah_single_repeat, variable_tracking], trials: 1}"
    summary = train.train(compose_smoke(
        tmp_path, "trainer.max_steps=2", "trainer.eval_every=2", f"evaluation.periodic=[{mqar}, {ruler}]",
        f"evaluation.final=[{mqar[:-1]}, label: mqar}}, {ruler[:-1]}, label: ruler}}]"))
    model = load_model(latest_checkpoint(tmp_path))[0].eval()
    (periodic,) = [r for r in read_metrics(tmp_path) if "val/loss" in r]
    direct = evaluate_mqar(model, MQARConfig(vocab_size=32, num_pairs=[2, 4]), [64], 4, 0, 4, 4096)
    assert periodic["mqar/accuracy"] == pytest.approx(direct.mean())
    assert {k: v for k, v in periodic.items() if k.startswith("mqar/pairs/")} == pytest.approx(
        {f"mqar/pairs/{n}": v for n, v in direct.per_pairs().items()})
    ruler_direct = evaluate_ruler(model, ByteTokenizer(), [768], ["niah_single_repeat", "variable_tracking"], 1, 0)
    expected = {f"ruler/{t}/{n}": v for (t, n), v in ruler_direct.cells("all").items()}
    assert {k: v for k, v in periodic.items() if k.startswith("ruler/")} == pytest.approx(expected)
    assert (tmp_path / "mqar").is_dir() and (tmp_path / "ruler" / "ruler_table.md").is_file()
    assert summary["mqar"]["accuracy"] == pytest.approx(direct.mean())  # the final entry: same model, settings
    assert summary["mqar"]["per_pairs"] == pytest.approx({str(n): v for n, v in direct.per_pairs().items()})
