"""Real command lines composed from conf/: a group picked on the command line is used as written, each data kind
has its own schema, and a bad choice fails at compose time naming the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

import train
from models import Transformer
from training.stages import resolve_stages

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=["name=test", "trainer.run_dir=/unused", *overrides])


def test_the_default_job_is_unchanged():
    cfg, _ = train.to_train_config(compose_train())
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.segment_len, cfg.model.attention) == (128, 2, 64, "infini")
    assert cfg.model.memory_update == "linear"
    assert (cfg.data.kind, cfg.data.seq_len, cfg.data.batch_size) == ("passkey", 512, 16)
    assert (cfg.data.passkey_answer_offset, cfg.data.passkey_haystack_scale) == ("balanced", 128.0)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.warmup_steps) == ("adamw", 1e-3, 100)
    assert (cfg.trainer.max_steps, cfg.trainer.eval_every, cfg.trainer.ckpt_every) == (3200, 100, 500)
    assert [(s.name, s.steps, s.advance_when) for s in cfg.trainer.stages] == [
        ("retrieve", 2400, "val/loss <= 0.35"), ("extrapolate", 800, "")]
    stages = resolve_stages(cfg)
    assert stages[0].data.seq_len_mix == [256, 384, 512] and stages[0].data.passkey_answer_offset == "fixed"
    assert stages[1].data.seq_len_mix == [384, 512] and stages[1].data.passkey_answer_offset == "balanced"
    assert stages[1].optim.warmup_steps == 50
    assert cfg.name == "test"


def test_a_model_picked_on_the_command_line_keeps_its_own_values():
    cfg, _ = train.to_train_config(compose_train("model=paper_pg19"))
    assert (cfg.model.segment_len, cfg.model.dim, cfg.model.n_layers) == (2048, 1024, 12)
    assert cfg.data.seq_len == 512  # the default job's data, as its group says


def test_other_groups_picked_on_the_command_line_keep_their_values():
    cfg, _ = train.to_train_config(compose_train("trainer=gpu"))
    assert (cfg.trainer.device, cfg.trainer.max_steps, cfg.trainer.eval_every, cfg.trainer.stages) == (
        "cuda", 1000, 1000, [])
    cfg, _ = train.to_train_config(compose_train("optim=adafactor_paper"))
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.warmup_steps) == ("adafactor", 0.01, 1000)
    cfg, _ = train.to_train_config(compose_train("data=passkey"))
    assert (cfg.data.seq_len, cfg.data.passkey_answer_offset, cfg.data.passkey_haystack_scale) == (256, "fixed", 1.0)
    cfg, _ = train.to_train_config(compose_train("attention=infini_delta"))
    assert (cfg.model.memory_update, cfg.model.segment_len) == ("delta", 64)


def test_text_data_carries_no_passkey_field_and_rejects_one():
    cfg = compose_train("data=pg19", "trainer=cpu")
    assert cfg.data.kind == "text" and cfg.data.source == "deepmind/pg19" and cfg.data.seq_len == 32768
    assert not {"seq_len_mix", "passkey_answer_offset", "loss_on", "max_input_tokens"} & set(cfg.data)
    with pytest.raises(ConfigCompositionException, match="Could not override 'data.seq_len_mix'"):
        compose_train("data=pg19", "data.seq_len_mix=[256]")
    cfg = compose_train("data=booksum")
    assert cfg.data.kind == "booksum" and cfg.data.max_input_tokens == 31744 and "text_field" not in cfg.data


def test_stage_overrides_of_another_kind_fail_naming_the_stage():
    typed, _ = train.to_train_config(compose_train("data=pg19"))  # the default trainer's stages are passkey's
    with pytest.raises(ValueError, match=r"trainer.stages\[0\] \('retrieve'\).data.seq_len_mix=.*TextDataConfig"):
        resolve_stages(typed)


@pytest.mark.parametrize("override,allowed", [
    ("data.passkey_answer_offset=middle", "fixed, uniform, balanced"),
    ("data.loss_on=some", "answer, all"),
    ("model.attention=sparse", "infini, full, local, xl"),
    ("model.attention_backend=triton", "auto, sdpa, eager, flash"),
    ("optim.name=sgd", "adamw, adafactor"),
    ("optim.schedule=linear", "cosine, constant"),
    ("trainer.precision=fp8", "auto, fp32, bf16"),
    ("trainer.parallel=tp", "auto, ddp, fsdp, none"),
    ("logger.mode=cloud", "offline, online, disabled"),
])
def test_a_bad_choice_fails_at_compose_time_naming_the_allowed_values(override, allowed):
    with pytest.raises(ConfigCompositionException) as error:
        compose_train(override)
    assert f"expected one of [{allowed}]" in str(error.value.__cause__)


def test_choices_are_plain_strings_in_the_resolved_config():
    _, plain = train.to_train_config(compose_train())
    assert plain["model"]["attention"] == "infini" and type(plain["model"]["attention"]) is str
    assert type(plain["data"]["passkey_answer_offset"]) is str and type(plain["trainer"]["precision"]) is str


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_resolves_its_stages_and_builds_on_meta(experiment):
    cfg, _ = train.to_train_config(compose_train(f"experiment={experiment}"))
    resolve_stages(cfg)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert cfg.data.kind == {"booksum_8b": "booksum", "passkey_1b_finetune": "passkey",
                             "passkey_cpu": "passkey", "mqar_cpu": "mqar"}.get(experiment, "text")


def test_experiment_values_still_apply():
    cfg, _ = train.to_train_config(compose_train("experiment=passkey_1b_finetune"))
    assert (cfg.data.kind, cfg.data.seq_len, cfg.trainer.max_steps, cfg.optim.warmup_steps) == (
        "passkey", 5120, 400, 20)
    assert cfg.model.segment_len == 2048
    cfg, _ = train.to_train_config(compose_train("experiment=pg19_transformer_xl_like"))
    assert (cfg.model.attention, cfg.data.kind, cfg.data.seq_len) == ("xl", "text", 32768)
