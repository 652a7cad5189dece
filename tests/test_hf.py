"""Hugging Face Llama <-> our Transformer: logits equal to transformers' own LlamaForCausalLM (built tiny and
random, locally), exact export/import round trips, and errors that name what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import load_model
from models.hf import (
    ORIGINAL_BEHAVIOUR_GATE_LOGIT,
    ConversionError,
    convert_checkpoint,
    export_checkpoint,
    from_hf,
    to_hf,
)

transformers = pytest.importorskip("transformers")

SEGMENT = 16



def make_llama(directory: Path, seed: int = 0, model_class: str = "LlamaForCausalLM", **overrides):
    """Save a tiny random Llama-family model; every weight perturbed (norms away from 1) so a swapped or
    transposed mapping shows up in the logits."""
    kwargs = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    kwargs.update(overrides)
    config_class = getattr(transformers, model_class.replace("ForCausalLM", "Config"))
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config_class(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.25)
    model.save_pretrained(directory)
    return model


def logits_of(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return out.logits


def tokens(T, batch=2, seed=1, vocab=96):
    return torch.randint(0, vocab, (batch, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gqa")
    return make_llama(directory), directory


@pytest.mark.parametrize("attention", ["infini", "local", "full"])
@pytest.mark.parametrize("T", [SEGMENT, 5])
def test_logits_equal_transformers_with_gqa(gqa_llama, attention, T):
    reference, directory = gqa_llama
    assert reference.config.num_key_value_heads < reference.config.num_attention_heads
    ours = from_hf(directory, {"attention": attention, "segment_len": SEGMENT}, preserve_original=True)
    assert ours.config.n_kv_heads == 2 and ours.config.n_heads == 4 and not ours.config.tie_embeddings
    x = tokens(T)
    expected = logits_of(reference, x)
    assert expected.std() > 1.0  # logits far from trivial
    assert (logits_of(ours, x) - expected).abs().max() <= 1e-4


def test_tied_embeddings(tmp_path):
    reference = make_llama(tmp_path, tie_word_embeddings=True, num_key_value_heads=4)
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    ours = from_hf(tmp_path, {"segment_len": SEGMENT}, preserve_original=True)
    assert ours.config.tie_embeddings and ours.output.weight is ours.tok_embeddings.weight
    x = tokens(SEGMENT)
    assert (logits_of(ours, x) - logits_of(reference, x)).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
        {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
    ],
    ids=["llama3", "yarn", "linear"],
)
def test_rope_scaling_logits_equal_transformers(tmp_path, rope_parameters):
    reference = make_llama(tmp_path, rope_parameters=rope_parameters)
    ours = from_hf(tmp_path, {"attention": "local", "segment_len": 64})
    assert ours.config.rope_scaling == rope_parameters["rope_type"]
    x = tokens(64, batch=1)
    assert (logits_of(ours, x) - logits_of(reference, x)).abs().max() <= 1e-4
    plain = from_hf(tmp_path, {"attention": "local", "segment_len": 64, "rope_scaling": "none"})
    assert (logits_of(plain, x) - logits_of(reference, x)).abs().max() > 1e-3  # the scaling matters here


def test_legacy_v4_rope_keys_are_read(gqa_llama, tmp_path):
    _, directory = gqa_llama
    for name in ("model.safetensors",):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    config = json.loads((directory / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rope_theta=1234.0, rope_scaling={"type": "linear", "factor": 3.0})
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = from_hf(tmp_path)
    config = ours.config
    assert (config.rope_theta, config.rope_scaling, config.rope_scaling_factor) == (1234.0, "linear", 3.0)


def test_preserve_original_is_the_local_network_bit_for_bit(gqa_llama):
    _, directory = gqa_llama
    preserved = from_hf(directory, {"segment_len": SEGMENT}, preserve_original=True)
    local = from_hf(directory, {"segment_len": SEGMENT, "attention": "local"})
    x = tokens(SEGMENT)
    assert torch.equal(logits_of(preserved, x), logits_of(local, x))
    gate = torch.sigmoid(torch.tensor(ORIGINAL_BEHAVIOUR_GATE_LOGIT))
    assert torch.equal(preserved.gates(), torch.full((2, 4), gate))
    # the gate is not frozen: its gradient is small but non-zero
    preserved.train()
    logits_of_grad = preserved(tokens(2 * SEGMENT)).logits
    logits_of_grad.square().mean().backward()
    assert all(layer.attention.gate_logit.grad.abs().max() > 0 for layer in preserved.layers)


def test_gates_initialised_from_config(gqa_llama):
    _, directory = gqa_llama
    default = from_hf(directory)
    assert default.config.attention == "infini"
    assert torch.equal(torch.stack([layer.attention.gate_logit for layer in default.layers]), torch.zeros(2, 4))
    custom = from_hf(directory, {"gate_init": -3.0})
    assert torch.equal(torch.stack([layer.attention.gate_logit for layer in custom.layers]), torch.full((2, 4), -3.0))
    with pytest.raises(ConversionError, match="preserve_original sets gate_init"):
        from_hf(directory, {"gate_init": -3.0}, preserve_original=True)


def test_export_import_round_trip_is_exact(gqa_llama, tmp_path):
    reference, directory = gqa_llama
    model = from_hf(directory, {"segment_len": 8, "memory_update": "delta", "rope_scaling": "yarn",
                                "rope_scaling_factor": 2.0, "rope_original_max_position_embeddings": 8})
    with torch.no_grad():  # as if trained: gates and weights no longer what was imported
        for layer in model.layers:
            layer.attention.gate_logit.copy_(torch.randn(4))
        model.norm.weight.mul_(1.5)
    to_hf(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors", "infini_attention.json",
                                                    "infini_attention.safetensors"}
    back = from_hf(tmp_path)
    assert back.config == model.config
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    x = tokens(3 * 8 + 5)
    assert torch.equal(logits_of(back, x), logits_of(model, x))


def test_export_loads_in_transformers_with_equal_logits(gqa_llama, tmp_path):
    _, directory = gqa_llama
    scalings = (
        {"rope_scaling": "none"},
        {"rope_scaling": "ntk", "rope_scaling_factor": 4.0},  # exported as plain RoPE with theta * s^(D/(D-2))
        {"rope_scaling": "llama3", "rope_scaling_factor": 8.0, "rope_original_max_position_embeddings": 32},
        {"rope_scaling": "yarn", "rope_scaling_factor": 4.0, "rope_original_max_position_embeddings": 16,
         "rope_yarn_beta_fast": 8.0},
    )
    x = tokens(48)
    for scaling in scalings:
        ours = from_hf(directory, {"segment_len": 48, **scaling}, preserve_original=True)
        out = tmp_path / scaling["rope_scaling"]
        to_hf(ours, out)
        exported = transformers.LlamaForCausalLM.from_pretrained(out).eval()
        assert (logits_of(exported, x) - logits_of(ours, x)).abs().max() <= 1e-4, scaling
        plain = from_hf(directory, {"segment_len": 48}, preserve_original=True)
        if scaling["rope_scaling"] != "none":
            assert (logits_of(plain, x) - logits_of(ours, x)).abs().max() > 1e-3  # the scaling is visible


def test_sharded_checkpoint(tmp_path):
    reference = make_llama(tmp_path)
    sharded = tmp_path / "sharded"
    reference.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    ours = from_hf(sharded, {"segment_len": SEGMENT}, preserve_original=True)
    x = tokens(SEGMENT)
    assert (logits_of(ours, x) - logits_of(reference, x)).abs().max() <= 1e-4


def test_mistral_without_sliding_window(tmp_path):
    reference = make_llama(tmp_path, model_class="MistralForCausalLM", sliding_window=None)
    ours = from_hf(tmp_path, {"segment_len": SEGMENT}, preserve_original=True)
    x = tokens(SEGMENT)
    assert (logits_of(ours, x) - logits_of(reference, x)).abs().max() <= 1e-4
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "sliding_window": 4096}))
    with pytest.raises(ConversionError, match="sliding_window=4096 is not supported"):
        from_hf(tmp_path)


def test_bfloat16_checkpoint_is_upcast_exactly(gqa_llama, tmp_path):
    reference, _ = gqa_llama
    reference.to(torch.bfloat16).save_pretrained(tmp_path)
    reference.float()
    ours = from_hf(tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert ours.tok_embeddings.weight.dtype == torch.float32
    assert torch.equal(ours.layers[1].attention.wk.weight, stored["model.layers.1.self_attn.k_proj.weight"].float())


# ------------------------------------------------------------------------------------------------ errors


def copy_checkpoint(source: Path, target: Path, config_changes=None, drop=(), add=None) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    config = {**json.loads((source / "config.json").read_text()), **(config_changes or {})}
    (target / "config.json").write_text(json.dumps(config))
    weights = {k: v for k, v in load_file(str(source / "model.safetensors")).items() if k not in drop}
    save_file({**weights, **(add or {})}, str(target / "model.safetensors"))
    return target


def test_unexpected_architecture_is_named(gqa_llama, tmp_path):
    _, directory = gqa_llama
    copy_checkpoint(directory, tmp_path, {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(ConversionError, match=r"unsupported architecture \['GPT2LMHeadModel'\].*'gpt2'"):
        from_hf(tmp_path)


def test_missing_tensors_are_listed(gqa_llama, tmp_path):
    _, directory = gqa_llama
    drop = ("model.layers.1.mlp.up_proj.weight", "lm_head.weight")
    copy_checkpoint(directory, tmp_path, drop=drop)
    with pytest.raises(ConversionError) as error:
        from_hf(tmp_path)
    assert "missing tensors ['lm_head.weight', 'model.layers.1.mlp.up_proj.weight']" in str(error.value)


def test_unexpected_tensors_are_listed(gqa_llama, tmp_path):
    _, directory = gqa_llama
    copy_checkpoint(directory, tmp_path, add={"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)})
    with pytest.raises(ConversionError, match=r"unexpected tensors \['model.layers.0.self_attn.q_proj.bias'\]"):
        from_hf(tmp_path)


def test_wrong_shapes_are_listed(gqa_llama, tmp_path):
    _, directory = gqa_llama
    copy_checkpoint(directory, tmp_path, {"intermediate_size": 48})
    expected = r"wrong shape.*model.layers.0.mlp.gate_proj.weight \(40, 32\) != \(48, 32\)"
    with pytest.raises(ConversionError, match=expected):
        from_hf(tmp_path)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"attention_bias": True}, "attention_bias=True is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"head_dim": 16}, "head_dim=16 differs from hidden_size / num_attention_heads"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "RoPE type 'dynamic'"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}},
         "RoPE type 'llama3' needs the parameter 'low_freq_factor'"),
        ({"num_hidden_layers": None}, "num_hidden_layers=None must be an integer"),
        ({"num_hidden_layers": 0}, "n_layers must be a positive integer, got 0"),
    ],
)
def test_unsupported_configs_are_named(gqa_llama, tmp_path, changes, message):
    _, directory = gqa_llama
    copy_checkpoint(directory, tmp_path, changes)
    with pytest.raises(ConversionError, match=message):
        from_hf(tmp_path)


def test_missing_config_keys_and_files(gqa_llama, tmp_path):
    _, directory = gqa_llama
    with pytest.raises(ConversionError, match="has no config.json"):
        from_hf(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    del config["vocab_size"], config["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"missing config keys \['vocab_size', 'intermediate_size'\]"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConversionError, match="pickled weights are never loaded"):
        from_hf(tmp_path)


def test_architecture_overrides_are_refused(gqa_llama):
    _, directory = gqa_llama
    with pytest.raises(ConversionError, match=r"overrides \['dim'\] contradict the checkpoint"):
        from_hf(directory, {"dim": 64})
    with pytest.raises(ConversionError, match=r"unknown ModelConfig fields in overrides: \['segment_length'\]"):
        from_hf(directory, {"segment_length": 64})


# ------------------------------------------------------------------- model directories and the tokenizer


def save_tiny_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate("the cat sat on a mat .".split())}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(directory)


def test_convert_checkpoint_with_tokenizer_then_export(tmp_path):
    from data.tokenizer import load_tokenizer

    hf_dir, ours_dir, out_dir = tmp_path / "hf", tmp_path / "ours", tmp_path / "exported"
    reference = make_llama(hf_dir, bos_token_id=1, eos_token_id=2)
    save_tiny_tokenizer(hf_dir)
    convert_checkpoint(hf_dir, ours_dir, {"segment_len": SEGMENT}, preserve_original=True)
    model, meta = load_model(ours_dir)
    assert meta["tokenizer"] == str(hf_dir.resolve())
    tokenizer = load_tokenizer(meta["tokenizer"])
    assert tokenizer.encode("the cat sat on a mat .") == [3, 4, 5, 6, 7, 8, 9] and tokenizer.eos_id == 2
    x = torch.tensor([tokenizer.encode("the cat sat on a mat .")])
    assert (logits_of(model, x) - logits_of(reference, x)).abs().max() <= 1e-4

    export_checkpoint(ours_dir, out_dir)
    exported = json.loads((out_dir / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"], exported["max_position_embeddings"]) == (1, 2, 256)
    assert (out_dir / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    assert load_tokenizer(out_dir).encode("a mat") == [7, 8]
    back = from_hf(out_dir)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_convert_checkpoint_needs_a_tokenizer(gqa_llama, tmp_path):
    _, directory = gqa_llama
    with pytest.raises(ConversionError, match="has no tokenizer files; pass tokenizer='byte'"):
        convert_checkpoint(directory, tmp_path / "ours")
    convert_checkpoint(directory, tmp_path / "ours", tokenizer="byte")
    assert load_model(tmp_path / "ours")[1]["tokenizer"] == "byte"


def test_command_line_import_and_export(gqa_llama, tmp_path, capsys):
    from models.hf import main

    _, directory = gqa_llama
    main(["import", str(directory), str(tmp_path / "ours"), "--tokenizer", "byte", "--segment-len", "16",
          "--memory-update", "delta", "--gate-init", "-2.5", "--set", "rope_scaling=linear",
          "--set", "rope_scaling_factor=2"])
    model, meta = load_model(tmp_path / "ours")
    config = model.config
    assert (config.segment_len, config.memory_update, config.gate_init, config.rope_scaling,
            config.rope_scaling_factor) == (16, "delta", -2.5, "linear", 2.0)
    assert torch.equal(model.layers[0].attention.gate_logit, torch.full((4,), -2.5))
    assert meta["hf_config"]["model_type"] == "llama"
    main(["export", str(tmp_path / "ours"), str(tmp_path / "hf")])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_parameters"]["factor"] == 2.0
    back = from_hf(tmp_path / "hf")
    assert back.config == config
    assert "wrote" in capsys.readouterr().out
