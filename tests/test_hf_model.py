"""The transformers wrapper (models/hf_model.py): the Transformer's logits exactly, save_pretrained/from_pretrained
and the checkpoint conversions as exact round trips, generate() token for token as models.generation (greedy,
beam, sampling from one seed), the streamed state at constant size, the Auto classes with and without
trust_remote_code, and errors for what it cannot do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from models.checkpoint import load_model, save_model  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.generation import GenerationConfig, generate  # noqa: E402
from models.hf_model import (  # noqa: E402
    InfiniCache,
    InfiniConfig,
    InfiniForCausalLM,
    main,
    tokenizer_spec,
)
from models.transformer import Transformer  # noqa: E402

SEGMENT = 8
VOCAB = 48
ROOT = Path(__file__).resolve().parents[1]


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, segment_len=SEGMENT, init_std=0.2)
    kwargs.update(overrides)
    model = Transformer(ModelConfig(**kwargs)).eval()
    with torch.no_grad():  # gates different per head and away from 0.5, so the memory path matters
        for layer in model.layers:
            if hasattr(layer.attention, "gate_logit"):
                layer.attention.gate_logit.copy_(torch.linspace(-2, 2, 4))
    return model


def tokens(T: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True, "memory_update": "delta"},
                                       {"memory_write_gate": True}, {"attention": "full"}])
def test_logits_equal_transformer(overrides):
    model = tiny_model(**overrides)
    wrapper = InfiniForCausalLM.from_transformer(model)
    x = tokens(29, batch=2)  # 3 segments and a partial one
    with torch.no_grad():
        expected = model(x).logits
        out = wrapper(x)
        torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-5)
        # streamed through the returned cache in uneven chunks: the same logits
        first = wrapper(x[:, :11])
        second = wrapper(x[:, 11:], cache=first.cache)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), expected, rtol=0, atol=1e-5)
    assert second.cache.get_seq_length() == 29


def test_loss_is_mean_next_token_cross_entropy():
    model = tiny_model()
    wrapper = InfiniForCausalLM.from_transformer(model)
    x = tokens(20)
    labels = x.clone()
    labels[0, 5] = -100
    out = wrapper(x, labels=labels)
    logits = model(x).logits[0, :-1]  # position t predicts token t + 1
    nll = -logits.log_softmax(-1).gather(-1, x[0, 1:, None])[:, 0]
    keep = torch.ones(19, dtype=torch.bool)
    keep[4] = False  # label 5 is predicted at position 4
    torch.testing.assert_close(out.loss, nll[keep].mean(), rtol=0, atol=1e-6)
    out.loss.backward()  # gradients reach the wrapped Transformer's parameters
    assert model.layers[0].attention.gate_logit.grad is not None


@pytest.mark.parametrize("tie", [False, True])
def test_save_pretrained_round_trip(tmp_path, tie):
    model = tiny_model(tie_embeddings=tie, memory_write_gate=True)
    InfiniForCausalLM.from_transformer(model).save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "modeling_infini.py"} <= {p.name for p in tmp_path.iterdir()}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "infini_lm" and config["model"]["segment_len"] == SEGMENT
    loaded = InfiniForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.config == model.config
    expected = model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    if tie:
        assert loaded.model.output.weight is loaded.model.tok_embeddings.weight


def test_auto_classes_and_remote_code(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tiny_model()
    InfiniForCausalLM.from_transformer(model).save_pretrained(tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # registered by importing models.hf_model
    assert isinstance(loaded, InfiniForCausalLM)
    assert AutoConfig.from_pretrained(tmp_path / "hf").model_config() == model.config
    # a fresh interpreter that never imports models.hf_model: the auto_map's modeling_infini.py does
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True); "
            "print(type(m).__module__, m(torch.tensor([[1, 2, 3]])).logits[0, -1, :3].tolist())")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "hf")], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    module, logits = result.stdout.split(" ", 1)
    assert module == "models.hf_model"
    with torch.no_grad():
        expected = model(torch.tensor([[1, 2, 3]])).logits[0, -1, :3].tolist()
    assert json.loads(logits) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("prompt_len", [5, 21])
def test_generate_greedy_and_beam_equal_models_generation(prompt_len):
    model = tiny_model()
    wrapper = InfiniForCausalLM.from_transformer(model)
    prompts = tokens(prompt_len, batch=2, seed=prompt_len)
    for num_beams in (1, 3):
        ours = generate(model, prompts.tolist(), GenerationConfig(max_new_tokens=12, num_beams=num_beams))
        theirs = wrapper.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=12,
                                  num_beams=num_beams, do_sample=False, early_stopping=True, pad_token_id=0)
        assert theirs[:, prompt_len:].tolist() == ours, num_beams


def test_generate_beam_with_stop_token_equals_models_generation(monkeypatch):
    reorders = []
    original = InfiniCache.reorder_cache
    monkeypatch.setattr(InfiniCache, "reorder_cache",
                        lambda cache, beam_idx: reorders.append(beam_idx.tolist()) or original(cache, beam_idx))
    model = tiny_model(seed=3)
    wrapper = InfiniForCausalLM.from_transformer(model)
    prompt = tokens(10, seed=4)
    # a stop token the search meets: the most likely first token of the greedy continuation
    stop = generate(model, prompt.tolist(), GenerationConfig(max_new_tokens=3))[0][2]
    config = GenerationConfig(max_new_tokens=10, num_beams=4, stop_tokens=(stop,))
    ours = generate(model, prompt.tolist(), config)[0]
    theirs = wrapper.generate(prompt, max_new_tokens=10, num_beams=4, do_sample=False, early_stopping=True,
                              eos_token_id=stop, pad_token_id=stop,
                              attention_mask=torch.ones_like(prompt))[0, 10:].tolist()
    assert len(ours) < 10
    assert theirs[: len(ours)] == ours and theirs[len(ours)] == stop
    # transformers re-ordered the state through Cache.reorder_cache, and beams did swap rows
    assert reorders and any(index != sorted(index) or len(set(index)) < 4 for index in reorders)


def test_generate_sampling_draws_the_same_tokens_from_one_seed():
    model = tiny_model()
    wrapper = InfiniForCausalLM.from_transformer(model)
    prompt = tokens(9, seed=5)
    torch.manual_seed(123)
    ours = generate(model, prompt.tolist(), GenerationConfig(max_new_tokens=15, do_sample=True, temperature=1.5))
    torch.manual_seed(123)
    theirs = wrapper.generate(prompt, max_new_tokens=15, do_sample=True, temperature=1.5, top_k=0, top_p=1.0,
                              pad_token_id=0, attention_mask=torch.ones_like(prompt))
    assert theirs[:, 9:].tolist() == ours
    assert len(set(ours[0])) > 3  # really sampled (greedy from this model repeats one or two tokens)


def state_bytes_during_generate(wrapper, prompt, **kwargs) -> list[int]:
    sizes = []
    handle = wrapper.register_forward_hook(lambda module, args, output: sizes.append(output.cache.nbytes()))
    try:
        wrapper.generate(prompt, attention_mask=torch.ones_like(prompt), pad_token_id=0, do_sample=False, **kwargs)
    finally:
        handle.remove()
    return sizes


def test_generate_state_is_constant_in_size_over_a_long_prompt():
    model = tiny_model()
    wrapper = InfiniForCausalLM.from_transformer(model)
    memory = (2 * 2 * 8 * 8 + 2 * 2 * 8) * 4  # per layer: M (B, Hkv, D, D) + z (B, Hkv, D), float32, B = 2
    kv_token = 2 * 2 * 2 * 8 * 4  # per layer and cached token: keys + values (B, Hkv, D)
    for prompt_len in (3, 400):
        sizes = state_bytes_during_generate(wrapper, tokens(prompt_len, batch=2), max_new_tokens=2 * SEGMENT,
                                            num_beams=1)
        # one prefill call, then one call per new token; the unfinished segment holds at most N - 1 tokens
        assert len(sizes) == 2 * SEGMENT
        assert max(sizes) == 2 * (memory + (SEGMENT - 1) * kv_token), prompt_len
        assert min(sizes) == 2 * memory, prompt_len  # right after a segment is written


def test_returned_cache_continues_generation():
    """generate(full input_ids, cache=returned) feeds only the tokens the cache has not seen."""
    model = tiny_model()
    wrapper = InfiniForCausalLM.from_transformer(model)
    prompt = tokens(11)
    first = wrapper.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                             pad_token_id=0, return_dict_in_generate=True)
    assert first.cache.get_seq_length() == 11 + 5  # the last new token is not fed yet
    sequences = first.sequences
    more = wrapper.generate(sequences, attention_mask=torch.ones_like(sequences), cache=first.cache, max_new_tokens=6,
                            do_sample=False, pad_token_id=0)
    assert more[0, 11:].tolist() == generate(model, prompt.tolist(), GenerationConfig(max_new_tokens=12))[0]


def test_cache_reorder_and_errors():
    model = tiny_model()
    wrapper = InfiniForCausalLM.from_transformer(model)
    with torch.no_grad():
        out = wrapper(tokens(13, batch=3))
        cache = out.cache
        rows = [s.memory.matrix.clone() for s in cache.state]
        cache.reorder_cache(torch.tensor([2, 0, 0]))
        for before, state in zip(rows, cache.state):
            assert torch.equal(state.memory.matrix, before[[2, 0, 0]])
        assert cache.batch_size == 3 and len(cache) == 2
        with pytest.raises(NotImplementedError, match="cannot undo"):
            cache.crop(-1)
        with pytest.raises(ValueError, match="cannot pad"):
            wrapper(tokens(4, batch=2), attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
        with pytest.raises(TypeError, match="InfiniCache"):
            from transformers import DynamicCache
            wrapper(tokens(4), cache=DynamicCache())
    with pytest.raises(ValueError, match="segment_len"):
        InfiniConfig(model={"segment_len": 0})


def test_missing_tensors_are_initialised_as_the_transformer_does(tmp_path):
    """transformers initialises a checkpoint's missing tensors through Transformer.init_module."""
    from safetensors.torch import load_file, save_file

    model = tiny_model(gate_init=-3.0)
    InfiniForCausalLM.from_transformer(model).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.attention.gate_logit"], weights["model.layers.0.ffn_norm.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = InfiniForCausalLM.from_pretrained(tmp_path).model
    assert torch.equal(loaded.layers[1].attention.gate_logit, torch.full((4,), -3.0))
    assert torch.equal(loaded.layers[0].ffn_norm.weight, torch.ones(32))
    assert torch.equal(loaded.layers[0].attention.gate_logit, model.layers[0].attention.gate_logit)  # loaded


def test_checkpoint_conversion_cli_round_trip(tmp_path, capsys):
    model = tiny_model(memory_write_gate=True)
    save_model(tmp_path / "ckpt", model, tokenizer="byte")
    main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    assert tokenizer_spec(tmp_path / "hf") == "byte"
    main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "back")])
    back, meta = load_model(tmp_path / "back")
    assert back.config == model.config and meta["tokenizer"] == "byte"
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert "wrote" in capsys.readouterr().out


def test_conversion_copies_a_hugging_face_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(ord("a") + i): i for i in range(26)} | {"[UNK]": 26}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    save_model(tmp_path / "ckpt", tiny_model(vocab_size=27), tokenizer=str(tmp_path / "tok"))
    main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert tokenizer_spec(tmp_path / "hf") == str((tmp_path / "hf").resolve())
    from data.tokenizer import load_tokenizer

    assert load_tokenizer(tokenizer_spec(tmp_path / "hf")).encode("abc") == [0, 1, 2]


def test_cache_is_a_transformers_cache():
    from transformers.cache_utils import Cache

    cache = InfiniCache()
    assert isinstance(cache, Cache) and cache.get_seq_length() == 0 and cache.nbytes() == 0


def test_peft_lora_on_the_transformers_class_merges_to_the_same_logits():
    peft = pytest.importorskip("peft")
    model = tiny_model()
    lora = peft.get_peft_model(InfiniForCausalLM.from_transformer(model),
                               peft.LoraConfig(r=4, target_modules=["wq", "wv", "w2"], init_lora_weights=False))
    trainable = [name for name, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)
    x = tokens(20, batch=2)
    lora(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in lora.parameters() if p.requires_grad)
    with torch.no_grad():
        adapted = lora(input_ids=x).logits
        base = tiny_model()  # the same weights (LoRA went into `model` in place)
        assert (adapted - base(x).logits).abs().max() > 1e-3  # the adapters (w2 too, inside SwiGLU) act
        merged = lora.merge_and_unload()
        assert isinstance(merged, InfiniForCausalLM)
        torch.testing.assert_close(merged(input_ids=x).logits, adapted, rtol=0, atol=1e-5)
