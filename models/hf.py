"""Hugging Face Llama-family checkpoints <-> our Transformer, for continual pre-training with Infini-attention.

    model = from_hf("path/to/Llama-3.2-1B", {"attention": "infini", "segment_len": 2048})
    convert_checkpoint("path/to/Llama-3.2-1B", "runs/llama-infini")   # our model directory (models/checkpoint.py)
    to_hf(model, "exported/")                                         # back to a LlamaForCausalLM directory

Import reads config.json and the safetensors weights (one file or shards with model.safetensors.index.json) as
plain JSON and raw tensors: it needs neither `transformers` nor the network, and never unpickles (a directory
with only pytorch_model.bin is refused). The tokenizer is not converted: our model directory records the
Hugging Face directory as its tokenizer, which data/tokenizer.py loads through `transformers`.

Every Llama weight has a counterpart: embed_tokens -> tok_embeddings, q/k/v/o_proj -> attention.wq/wk/wv/wo
(grouped-query heads unchanged, both use the rotate_half layout so nothing is permuted), gate/up/down_proj ->
feed_forward.w1/w3/w2, input/post_attention_layernorm -> attention_norm/ffn_norm, norm, lm_head -> output (or
tied to the embedding). What Llama lacks are the Infini-attention parameters: the gate logit beta of each head,
which starts at ModelConfig.gate_init, or with `preserve_original` at ORIGINAL_BEHAVIOUR_GATE_LOGIT, where the
converted model computes exactly what the original does on any input no longer than one segment (see that
constant); and whatever parameters the memory rule has (e.g. a write gate), which start as the rule initialises
them.

Export writes a directory `transformers.LlamaForCausalLM.from_pretrained` loads (config.json with both the v5
`rope_parameters` and the v4 `rope_theta`/`rope_scaling` keys, model.safetensors), plus our side files:
infini_attention.json (the full ModelConfig: attention kind, segment length, memory rule, RoPE knobs) and
infini_attention.safetensors (every Infini-attention parameter Llama lacks: gate logits, memory-rule
parameters). Importing such a directory restores our model exactly.

Both directions write their output directory atomically (models.checkpoint.atomic_directory) and refuse a
destination that is not empty or that is their own source, unless told to overwrite (`overwrite=True`,
`--overwrite`); overwriting replaces the directory as a whole, so no stale shard or side file of an earlier export
survives to be loaded with the new weights. A destination that contains the source is always refused.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.checkpoint import CheckpointError, atomic_directory, load_model, save_model
from models.config import ATTENTION_KINDS, DType, ModelConfig
from models.transformer import Transformer

ORIGINAL_BEHAVIOUR_GATE_LOGIT = -20.0
"""Gate logit with which a converted model starts at the original network's outputs.

Inside the first segment the memory is empty and reads exactly 0, so a head outputs (1 - sigmoid(beta)) * A_dot;
sigmoid(-20) = 2.1e-9 is below half a float32 ulp of 1, so 1 - sigmoid(beta) rounds to exactly 1 in float32,
bfloat16 and float16 (in float64 the local path is scaled by 1 - 2e-9). The gate is not frozen: its gradient is
sigmoid'(beta) ~ 2e-9 times the usual, which Adam's normalisation and the gate's own learning rate can lift; a
gate at -inf would give the same outputs and never move. Beyond one segment the original network attends over
the whole context while ours attends locally and reads memory: no gate makes those equal."""

SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
SIDE_CONFIG = "infini_attention.json"
SIDE_WEIGHTS = "infini_attention.safetensors"
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json",
)
# buffers some Llama checkpoints carry; recomputed, never loaded
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")
# ModelConfig fields that the checkpoint's tensors fix; overriding them cannot work
ARCHITECTURE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "norm_eps",
                       "tie_embeddings")
ROPE_TYPES_IN = {"default": "none", "linear": "linear", "llama3": "llama3", "yarn": "yarn"}


class ConversionError(ValueError):
    """A Hugging Face directory that this converter cannot map onto our Transformer, and why."""


# ----------------------------------------------------------------------------------------------- config


def _rope_fields(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig rope_* fields from a Llama config: v5 `rope_parameters` or v4 `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES_IN:
        raise ConversionError(
            f"{where}: RoPE type {rope_type!r} is not supported; supported: {sorted(ROPE_TYPES_IN)} "
            "(dynamic NTK and longrope depend on the sequence length, which our per-segment positions do not have)"
        )
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConversionError(f"{where}: partial_rotary_factor={partial} is not supported (only 1.0)")
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_scaling": ROPE_TYPES_IN[rope_type]}
    if rope_type == "default":
        return out
    try:
        return _rope_scaling_fields(hf, params, rope_type, where, out)
    except KeyError as error:
        raise ConversionError(f"{where}: RoPE type {rope_type!r} needs the parameter {error.args[0]!r}") from None


def _rope_scaling_fields(hf: Mapping[str, Any], params: Mapping[str, Any], rope_type: str, where: str,
                         out: dict[str, Any]) -> dict[str, Any]:
    out["rope_scaling_factor"] = float(params["factor"])
    if rope_type in ("llama3", "yarn"):
        original = params.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
        out["rope_original_max_position_embeddings"] = int(original)
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(params["low_freq_factor"])
        out["rope_high_freq_factor"] = float(params["high_freq_factor"])
    if rope_type == "yarn":
        if params.get("truncate", True) is False:
            raise ConversionError(f"{where}: yarn with truncate=false is not supported")
        out["rope_yarn_beta_fast"] = float(params.get("beta_fast") or 32.0)
        out["rope_yarn_beta_slow"] = float(params.get("beta_slow") or 1.0)
        attention_factor = params.get("attention_factor")
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if attention_factor is None and mscale and mscale_all_dim:  # DeepSeek's variant of YaRN's temperature
            def m(scale: float, k: float) -> float:
                return 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0

            factor = out["rope_scaling_factor"]
            attention_factor = m(factor, mscale) / m(factor, mscale_all_dim)
        if attention_factor is not None:
            out["rope_attention_factor"] = float(attention_factor)
    return out


def config_from_hf(hf: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                   where: str = HF_CONFIG) -> ModelConfig:
    """ModelConfig for a Hugging Face Llama config dict. `overrides` sets the fields Llama does not have
    (attention, memory_update, segment_len, gate_init, attention_backend, RoPE scaling knobs); the fields the
    weights fix (ARCHITECTURE_FIELDS) cannot be overridden."""
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    expected = SUPPORTED_MODEL_TYPES.get(model_type)
    if expected is None or (architectures and architectures != [expected]):
        supported = ", ".join(f"{a} (model_type {t!r})" for t, a in SUPPORTED_MODEL_TYPES.items())
        raise ConversionError(
            f"{where}: unsupported architecture {architectures or None} with model_type {model_type!r}; "
            f"supported: {supported}"
        )
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in required if key not in hf]
    if missing:
        raise ConversionError(f"{where}: missing config keys {missing}")
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), ("silu", "swish")),
        "attention_bias": (hf.get("attention_bias", False), (False,)),
        "mlp_bias": (hf.get("mlp_bias", False), (False,)),
        "sliding_window": (hf.get("sliding_window"), (None,)),
    }
    for key, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise ConversionError(f"{where}: {key}={value!r} is not supported (only {list(allowed)})")

    def number(key: str, kind: type, default: Any = None) -> Any:
        value = hf.get(key, default)
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or (kind is int and not float(value).is_integer()):
            raise ConversionError(f"{where}: {key}={value!r} must be {'an integer' if kind is int else 'a number'}")
        return kind(value)

    dim, n_heads = number("hidden_size", int), number("num_attention_heads", int)
    head_dim = hf.get("head_dim") or dim // n_heads
    if head_dim * n_heads != dim:
        raise ConversionError(
            f"{where}: head_dim={head_dim} differs from hidden_size / num_attention_heads = {dim} / {n_heads}; our "
            "Transformer requires head_dim * n_heads == dim"
        )
    values: dict[str, Any] = {
        "vocab_size": number("vocab_size", int),
        "dim": dim,
        "n_layers": number("num_hidden_layers", int),
        "n_heads": n_heads,
        "n_kv_heads": number("num_key_value_heads", int, n_heads) if hf.get("num_key_value_heads") else n_heads,
        "ffn_dim": number("intermediate_size", int),
        "norm_eps": number("rms_norm_eps", float, 1e-6),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        **_rope_fields(hf, where),
    }
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - {f.name for f in fields(ModelConfig)})
    if unknown:
        raise ConversionError(f"unknown ModelConfig fields in overrides: {unknown}")
    fixed = sorted(k for k in overrides if k in ARCHITECTURE_FIELDS and overrides[k] != values[k])
    if fixed:
        raise ConversionError(f"overrides {fixed} contradict the checkpoint ({where}); its tensors fix them")
    if overrides.get("rope_scaling", values["rope_scaling"]) != values["rope_scaling"]:
        # a different scaling rule replaces the checkpoint's one, knobs included
        values = {k: v for k, v in values.items() if not k.startswith("rope_") or k == "rope_theta"}
    try:
        return ModelConfig(**{**values, **overrides})
    except (TypeError, ValueError) as error:
        raise ConversionError(f"{where}: {error}") from error


def config_to_hf(config: ModelConfig, base: Mapping[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A LlamaForCausalLM config.json dict for `config`, keeping the other keys of `base` (token ids, ...)."""
    hf = {k: v for k, v in (base or {}).items() if k not in ("torch_dtype", "rope_scaling", "transformers_version")}
    theta = config.rope_theta
    rope: dict[str, Any] = {"rope_type": "default"}
    if config.rope_scaling == "ntk":  # static NTK-aware scaling is plain RoPE with a larger theta
        theta = theta * config.rope_scaling_factor ** (config.head_dim / (config.head_dim - 2))
    elif config.rope_scaling != "none":
        rope = {"rope_type": config.rope_scaling, "factor": config.rope_scaling_factor}
    if config.rope_scaling in ("llama3", "yarn"):
        rope["original_max_position_embeddings"] = config.rope_original_max_position_embeddings
    if config.rope_scaling == "llama3":
        rope.update(low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor)
    if config.rope_scaling == "yarn":
        rope.update(beta_fast=config.rope_yarn_beta_fast, beta_slow=config.rope_yarn_beta_slow)
        if config.rope_attention_factor is not None:
            rope["attention_factor"] = config.rope_attention_factor
    if "max_position_embeddings" not in hf:
        original = config.rope_original_max_position_embeddings
        hf["max_position_embeddings"] = int(original * config.rope_scaling_factor) if original else config.segment_len
    hf.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        rope_theta=theta,  # transformers 4.x
        rope_scaling=None if rope["rope_type"] == "default" else rope,  # transformers 4.x
        rope_parameters={**rope, "rope_theta": theta},  # transformers 5.x
        dtype=str(dtype).removeprefix("torch."),
    )
    return hf


# ---------------------------------------------------------------------------------------------- weights


def weight_names(config: ModelConfig) -> dict[str, str]:
    """Our parameter name -> Hugging Face Llama tensor name, for every weight Llama has (all but the gates)."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not config.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    per_layer = {
        "attention_norm.weight": "input_layernorm.weight",
        "attention.wq.weight": "self_attn.q_proj.weight",
        "attention.wk.weight": "self_attn.k_proj.weight",
        "attention.wv.weight": "self_attn.v_proj.weight",
        "attention.wo.weight": "self_attn.o_proj.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight",
        "feed_forward.w3.weight": "mlp.up_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight",
    }
    for i in range(config.n_layers):
        for ours, theirs in per_layer.items():
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter name -> shape, from a meta-device model (no memory, no initialisation cost)."""
    with torch.device("meta"):
        model = Transformer(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for a single-file or sharded checkpoint."""
    index = directory / HF_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing_files = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing_files:
            raise ConversionError(f"{directory}: shards listed in {HF_INDEX} are missing: {missing_files}")
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / HF_WEIGHTS
    if single.is_file():
        with safe_open(str(single), "pt") as f:
            return dict.fromkeys(f.keys(), single)
    present = sorted(p.name for p in directory.iterdir())
    hint = " (pickled weights are never loaded: convert them to safetensors first)" if any(
        p.endswith((".bin", ".pt", ".pth")) for p in present) else ""
    raise ConversionError(f"{directory}: no {HF_WEIGHTS} or {HF_INDEX}; found {present}{hint}")


def _read_tensors(files: Mapping[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    """Read only the requested tensors, one shard open at a time."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for path, wanted in by_file.items():
        with safe_open(str(path), "pt") as f:
            for name in wanted:
                out[name] = f.get_tensor(name)
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from error


def from_hf(
    directory: str | Path,
    overrides: Mapping[str, Any] | None = None,
    *,
    preserve_original: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Transformer:
    """Build our Transformer from a Hugging Face Llama directory (config.json + safetensors).

    overrides: ModelConfig fields Llama lacks (attention kind, segment_len, memory_update, gate_init, RoPE
    scaling, ...). A directory written by `to_hf` carries them in its side file; overrides win over it.
    preserve_original: gate logits at ORIGINAL_BEHAVIOUR_GATE_LOGIT (the original outputs within one segment).
    Returns the model in eval mode, weights in `dtype` (float32 by default: the master copy for training).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ConversionError(f"{str(directory)!r} is not a local directory ({directory.absolute()} does not exist); "
                              "Hub names are never downloaded here: fetch the model first, e.g. `huggingface-cli "
                              "download NAME --local-dir DIR`, and pass DIR")
    if not (directory / HF_CONFIG).is_file():
        raise ConversionError(f"{directory} has no {HF_CONFIG}; is it a Hugging Face model directory?")
    hf = _read_json(directory / HF_CONFIG)
    user_overrides = dict(overrides or {})
    if preserve_original and "gate_init" in user_overrides:
        raise ConversionError("preserve_original sets gate_init; do not pass both")
    overrides = dict(user_overrides)
    side_path = directory / SIDE_CONFIG
    if side_path.is_file():  # written by to_hf: our own fields, checked against config.json below
        side = _read_json(side_path)["model"]
        overrides = {**{k: v for k, v in side.items() if k not in ARCHITECTURE_FIELDS}, **overrides}
    if preserve_original:
        overrides["gate_init"] = ORIGINAL_BEHAVIOUR_GATE_LOGIT
    config = config_from_hf(hf, overrides, where=str(directory / HF_CONFIG))
    if side_path.is_file():
        side_config = ModelConfig(**side)
        clash = [k for k in ARCHITECTURE_FIELDS if getattr(side_config, k) != getattr(config, k)]
        if clash:
            raise ConversionError(f"{side_path} contradicts {HF_CONFIG} on {clash}")

    names = weight_names(config)  # ours -> theirs
    shapes = _expected_shapes(config)
    files = _tensor_files(directory)
    available = set(files)
    missing = sorted(theirs for theirs in names.values() if theirs not in available)
    if missing:
        raise ConversionError(f"{directory}: missing tensors {missing}")
    known = set(names.values()) | ({"lm_head.weight"} if config.tie_embeddings else set())
    unexpected = sorted(n for n in available - known if not n.endswith(IGNORED_SUFFIXES))
    if unexpected:
        raise ConversionError(f"{directory}: unexpected tensors {unexpected} (not part of a Llama decoder)")
    tensors = _read_tensors(files, list(names.values()))
    wrong = [f"{theirs} {tuple(tensors[theirs].shape)} != {shapes[ours]}" for ours, theirs in names.items()
             if tuple(tensors[theirs].shape) != shapes[ours]]
    if wrong:
        raise ConversionError(f"{directory}: tensors with the wrong shape for {HF_CONFIG}: {wrong}")

    state = {ours: tensors[theirs].to(device=device, dtype=dtype) for ours, theirs in names.items()}
    if config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    if config.attention == "infini":
        # trained gates and rule parameters from a to_hf side file, unless the caller asks for fresh gates
        extras = _fresh_extras(config)
        if not (preserve_original or "gate_init" in user_overrides or not side_path.is_file()):
            extras = _side_extras(directory, extras)
        state.update({name: t.to(device, dtype) for name, t in extras.items()})
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:  # assign replaced both Parameters; share one again
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def is_extra_parameter(name: str) -> bool:
    """Whether a parameter of our Transformer has no Llama counterpart: the Infini-attention gate logits and the
    memory rule's parameters (everything under layers.<i>.attention. but the four projections)."""
    if ".attention." not in name or not name.startswith("layers."):
        return False
    return not name.endswith((".wq.weight", ".wk.weight", ".wv.weight", ".wo.weight"))


def _fresh_extras(config: ModelConfig) -> dict[str, torch.Tensor]:
    """The Infini-attention parameters of a freshly initialised model of this config (gates at gate_init)."""
    from attention.rules import build_rule

    extras = {}
    for i in range(config.n_layers):
        extras[f"layers.{i}.attention.gate_logit"] = torch.full((config.n_heads,), float(config.gate_init))
        rule = build_rule(config.memory_update, config.n_kv_heads, config.head_dim, config.memory_feature_map,
                          config.memory_write_gate, config.memory_write_gate_init)
        extras.update({f"layers.{i}.attention.rule.{name}": t.detach() for name, t in rule.state_dict().items()})
    return extras


def _side_extras(directory: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The side file's Infini-attention parameters: every expected name, with the expected shape."""
    path = directory / SIDE_WEIGHTS
    if not path.is_file():
        raise ConversionError(f"{directory}: {SIDE_CONFIG} describes an infini model but {SIDE_WEIGHTS} is missing")
    with safe_open(str(path), "pt") as f:
        present = set(f.keys())
        missing = sorted(set(expected) - present)
        if missing:
            raise ConversionError(f"{path}: missing tensors {missing}")
        loaded = {name: f.get_tensor(name) for name in expected}
    wrong = [f"{name} {tuple(t.shape)} != {tuple(expected[name].shape)}" for name, t in loaded.items()
             if t.shape != expected[name].shape]
    if wrong:
        raise ConversionError(f"{path}: tensors with the wrong shape: {wrong}")
    return loaded


def check_destination(destination: str | Path, source: str | Path | None, overwrite: bool) -> None:
    """Refuse (FileExistsError) to write `destination` when it is `source` or a non-empty directory, unless
    `overwrite`; a destination that contains `source` is refused always (replacing it would delete the source)."""
    destination = Path(destination).resolve()
    if source is not None:
        source = Path(source).resolve()
        if destination in source.parents:
            raise FileExistsError(f"{destination} contains the source {source}: writing there would delete it; "
                                  "choose another destination")
        if destination == source and not overwrite:
            raise FileExistsError(f"{destination} is the source itself: writing there would replace it; choose "
                                  "another destination (or pass overwrite=True / --overwrite to replace it)")
    if destination.exists() and not overwrite and (not destination.is_dir() or any(destination.iterdir())):
        raise FileExistsError(f"{destination} exists and is not empty; choose another destination, or pass "
                              "overwrite=True / --overwrite to replace it as a whole (no file of it is kept)")


def to_hf(
    model: Transformer,
    directory: str | Path,
    *,
    base_config: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
) -> None:
    """Write `model` as a Hugging Face LlamaForCausalLM directory plus our side files (see the module docstring).

    base_config: the original Hugging Face config.json (kept: token ids, max_position_embeddings, ...).
    dtype: of the written weights (default: the model's). tokenizer_dir: tokenizer files copied from there.
    overwrite: replace a non-empty `directory` as a whole (default: refuse, FileExistsError).
    """
    check_destination(directory, None, overwrite)
    with atomic_directory(directory) as tmp:
        _write_hf(model, tmp, base_config, dtype, tokenizer_dir)


def _write_hf(model: Transformer, directory: Path, base_config: Mapping[str, Any] | None, dtype: torch.dtype | None,
              tokenizer_dir: str | Path | None) -> None:
    config = model.config
    params = dict(model.named_parameters(remove_duplicate=False))
    dtype = dtype or params["tok_embeddings.weight"].dtype
    weights = {theirs: params[ours].detach().to("cpu", dtype).contiguous() for ours, theirs in
               weight_names(config).items()}
    save_file(weights, str(directory / HF_WEIGHTS), metadata={"format": "pt"})
    hf = config_to_hf(config, base_config, dtype)
    (directory / HF_CONFIG).write_text(json.dumps(hf, indent=2, sort_keys=True))
    side = {"model": asdict(config), "note": "Infini-attention fields of this checkpoint; see models/hf.py"}
    (directory / SIDE_CONFIG).write_text(json.dumps(side, indent=2, sort_keys=True))
    extras = {name: p.detach().to("cpu", dtype).contiguous() for name, p in params.items()
              if is_extra_parameter(name)}
    if extras:
        save_file(extras, str(directory / SIDE_WEIGHTS), metadata={"format": "pt"})
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, directory / name)


def has_tokenizer(directory: str | Path) -> bool:
    """Whether a directory holds Hugging Face tokenizer files."""
    return any((Path(directory) / name).is_file() for name in ("tokenizer.json", "tokenizer.model",
                                                                "tokenizer_config.json"))


def convert_checkpoint(
    hf_directory: str | Path,
    output_directory: str | Path,
    overrides: Mapping[str, Any] | None = None,
    *,
    preserve_original: bool = False,
    tokenizer: str | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Transformer:
    """Convert a Hugging Face Llama directory into our model directory (models/checkpoint.py), which training
    resumes from and generation loads. tokenizer: "byte" or a path; default the Hugging Face directory itself.
    The original config.json is kept under "hf_config" so that `export_checkpoint` restores its token ids.
    overwrite: as in to_hf (the output may then even be the Hugging Face directory itself)."""
    check_destination(output_directory, hf_directory, overwrite)
    model = from_hf(hf_directory, overrides, preserve_original=preserve_original, dtype=dtype)  # config errors first
    hf_directory = Path(hf_directory).resolve()
    if tokenizer is None:
        if not has_tokenizer(hf_directory):
            raise ConversionError(f"{hf_directory} has no tokenizer files; pass tokenizer='byte' or a tokenizer path")
        tokenizer = str(hf_directory)
    hf_config = _read_json(hf_directory / HF_CONFIG)
    with atomic_directory(output_directory) as tmp:
        save_model(tmp, model, tokenizer=tokenizer, hf_config=hf_config, converted_from=str(hf_directory))
    return model


def export_checkpoint(model_directory: str | Path, hf_directory: str | Path, dtype: torch.dtype | None = None,
                      overwrite: bool = False) -> None:
    """Export our model directory to a Hugging Face Llama directory, with its tokenizer files when it has some.
    overwrite: as in to_hf (the destination may then even be `model_directory` itself)."""
    check_destination(hf_directory, model_directory, overwrite)
    model, meta = load_model(model_directory)
    tokenizer = meta.get("tokenizer")
    tokenizer_dir = tokenizer if tokenizer and tokenizer != "byte" and Path(tokenizer).is_dir() else None
    to_hf(model, hf_directory, base_config=meta.get("hf_config"), dtype=dtype, tokenizer_dir=tokenizer_dir,
          overwrite=overwrite)


# -------------------------------------------------------------------------------------------------- CLI

DTYPES = {d.value: d.torch for d in DType}


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set expects key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.hf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face Llama directory -> our model directory")
    imp.add_argument("hf_directory")
    imp.add_argument("output_directory")
    imp.add_argument("--attention", choices=ATTENTION_KINDS, default=None)
    imp.add_argument("--memory-update", default=None, help="a memory rule (ModelConfig.memory_update); the config "
                     "names the allowed ones if it is not one")
    imp.add_argument("--segment-len", type=int, default=None)
    imp.add_argument("--gate-init", type=float, default=None)
    imp.add_argument("--preserve-original", action="store_true",
                     help=f"gate logits at {ORIGINAL_BEHAVIOUR_GATE_LOGIT}: the original outputs within a segment")
    imp.add_argument("--set", type=_parse_override, action="append", default=[], metavar="FIELD=VALUE",
                     help="any other ModelConfig field, e.g. --set rope_scaling=yarn --set rope_scaling_factor=4")
    imp.add_argument("--tokenizer", default=None, help='"byte" or a path (default: the Hugging Face directory)')
    imp.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    exp = sub.add_parser("export", help="our model directory -> Hugging Face Llama directory + side files")
    exp.add_argument("model_directory")
    exp.add_argument("hf_directory")
    exp.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    for command in (imp, exp):
        command.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory (even "
                             "the input itself) as a whole; default: refuse")
    args = parser.parse_args(argv)
    try:
        _run(args)
    except (ConversionError, CheckpointError, FileExistsError, FileNotFoundError) as error:
        parser.error(str(error))  # usage and the message naming the file or field, exit status 2


def _run(args: argparse.Namespace) -> None:
    if args.command == "import":
        overrides = dict(args.set)
        for field, value in (("attention", args.attention), ("memory_update", args.memory_update),
                             ("segment_len", args.segment_len), ("gate_init", args.gate_init)):
            if value is not None:
                overrides[field] = value
        model = convert_checkpoint(args.hf_directory, args.output_directory, overrides,
                                   preserve_original=args.preserve_original, tokenizer=args.tokenizer,
                                   dtype=DTYPES[args.dtype], overwrite=args.overwrite)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"wrote {args.output_directory}: {n_params:,} parameters, {model.config}")
    else:
        export_checkpoint(args.model_directory, args.hf_directory, DTYPES[args.dtype] if args.dtype else None,
                          overwrite=args.overwrite)
        print(f"wrote {args.hf_directory}")


if __name__ == "__main__":
    main()
