"""LoRA continual pre-training (training/lora.py): only the adapters, the gates and the memory-rule parameters train
(checked parameter by parameter after a run), a run resumes exactly from a checkpoint, and merging gives the
adapted model's logits as a plain Transformer that every loader reads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

pytest.importorskip("peft")

import train  # noqa: E402
from models.checkpoint import load_model, read_config, read_weights, save_model  # noqa: E402
from models.transformer import Transformer  # noqa: E402
from training.checkpointing import latest_checkpoint  # noqa: E402
from training.lora import LoraConfig, apply_lora, lora_config_of, main, trainable_parameters  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
LORA = ["lora.enabled=true", "lora.rank=4", "lora.targets=[wq,wv,w1,w2]", "model.memory_write_gate=true",
        "optim.lr=1e-2", "optim.warmup_steps=0"]


def lora_run(run_dir: Path, base: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["name=test", "debug=smoke", f"trainer.run_dir={run_dir}",
                                          f"trainer.init_from={base}", *LORA, *overrides])
    return train.train(cfg)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The model LoRA starts from (as a converted Llama would be): the smoke model with a write gate."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["name=test", "debug=smoke", "trainer.run_dir=/unused", *LORA])
    typed, _ = train.to_train_config(cfg)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("base")
    save_model(directory, Transformer(typed.model))
    return directory


@pytest.fixture(scope="module")
def full_run(base, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora_full")
    return run_dir, lora_run(run_dir, base, "trainer.max_steps=4", "trainer.ckpt_every=2")


def test_only_adapters_gates_and_rule_parameters_train(base, full_run):
    run_dir, _ = full_run
    checkpoint = latest_checkpoint(run_dir)
    config, meta = read_config(checkpoint)
    model = apply_lora(Transformer(config), lora_config_of(meta))
    trained = read_weights(model, checkpoint)
    initial = {name: tensor for name, tensor in read_weights(Transformer(config), base).items()}
    trainable = set(trainable_parameters(model))
    assert trainable and all(".lora_" in n or n.endswith("gate_logit") or ".rule." in n for n in trainable)
    for name, tensor in trained.items():
        if ".lora_A." in name or ".lora_B." in name:
            assert any(f".{target}." in name for target in ("wq", "wv", "w1", "w2")), name
            if ".lora_B." in name:  # B starts at 0 (the adapted model starts at the base model) and moved
                assert tensor.abs().max() > 0, name
            continue
        before = initial[name.replace(".base_layer", "")]
        if name.endswith("gate_logit") or ".rule." in name:
            assert not torch.equal(tensor, before), f"{name} should train in full"
        else:
            assert torch.equal(tensor, before), f"{name} should be frozen"
    assert any(".rule.write_gate." in n for n in trainable)


def test_resume_is_exact(base, full_run, tmp_path):
    run_dir, full = full_run
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_dir / "checkpoints" / "step_00000002", tmp_path / "run" / "checkpoints" / "step_00000002")
    resumed = lora_run(tmp_path / "run", base, "trainer.max_steps=4", "trainer.ckpt_every=2")
    assert resumed["resumed_from"].endswith("step_00000002")
    assert [resumed["losses"][s] for s in (3, 4)] == [full["losses"][s] for s in (3, 4)]  # exactly equal
    ours = load_weights_of(tmp_path / "run" / "checkpoints" / "step_00000004")
    theirs = load_weights_of(run_dir / "checkpoints" / "step_00000004")
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def load_weights_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    config, meta = read_config(checkpoint)
    return read_weights(apply_lora(Transformer(config), lora_config_of(meta)), checkpoint)


def test_merge_gives_the_adapted_logits(full_run, tmp_path, capsys):
    run_dir, _ = full_run
    checkpoint = latest_checkpoint(run_dir)
    config, meta = read_config(checkpoint)
    adapted = apply_lora(Transformer(config), lora_config_of(meta)).eval()
    adapted.load_state_dict(read_weights(adapted, checkpoint))
    main(["merge", str(checkpoint), str(tmp_path / "merged")])
    assert "wrote" in capsys.readouterr().out
    merged, merged_meta = load_model(tmp_path / "merged")  # a plain model directory
    tokens = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(0))  # 3 segments
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, adapted(tokens).logits, rtol=0, atol=1e-5)
        base = Transformer(config).eval()
        base.load_state_dict({k.replace(".base_layer", ""): v for k, v in read_weights(adapted, checkpoint).items()
                              if ".lora_" not in k})
        assert (base(tokens).logits - adapted(tokens).logits).abs().max() > 1e-3  # the adapters matter
    assert merged_meta["tokenizer"] == "byte"


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="lora.targets"):
        LoraConfig(targets=["q_proj"])
    with pytest.raises(ValueError, match="lora.rank"):
        LoraConfig(rank=0)
