"""Our Transformer as a `transformers` model: save_pretrained / from_pretrained / generate keep the memory.

    import models.hf_model                                    # registers the Auto classes (model_type "infini_lm")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("hf_dir")   # or trust_remote_code=True without the import
    out = model.generate(input_ids, max_new_tokens=32, num_beams=4)

InfiniForCausalLM wraps the same `Transformer` (models/transformer.py) as its submodule `model`, so the logits are
those of the Transformer: no second implementation of the math. The streaming state (compressive memory plus the
keys/values of the unfinished segment, one AttentionState per layer) travels as the `cache` argument of forward
(transformers' `past_key_values`, renamed `cache` in v5; both names are accepted), wrapped in InfiniCache, a
transformers Cache. generate() therefore decodes one token per step through the state at constant memory with
`infini` attention, and beam search reorders the state through Cache.reorder_cache, the hook transformers calls.

What the class cannot do, and says so: padding (a 0 in attention_mask), because segments are fixed by absolute
position in the stream and padding would shift every boundary; undoing memory writes (Cache.crop), which
assisted decoding needs. Prompts of different lengths go to generate() in separate calls (models.generation
groups them by length).

A transformers directory holds config.json (model_type "infini_lm": every ModelConfig field, the tokenizer, an
auto_map), model.safetensors (our tensor names under "model."), modeling_infini.py (a two-line module that imports
this one, for trust_remote_code=True where this package is installed) and the tokenizer files when the model has
a Hugging Face tokenizer. The byte tokenizer has no files: config.tokenizer says "byte".

CLI (this project's model directories, models/checkpoint.py, both ways):
    python -m models.hf_model to-hf   CHECKPOINT_DIR HF_DIR [--dtype bfloat16]
    python -m models.hf_model from-hf HF_DIR CHECKPOINT_DIR
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from models.checkpoint import load_model, save_model
from models.config import ModelConfig
from models.generation import GenerationConfig, prefill
from models.hf import DTYPES, TOKENIZER_FILES, has_tokenizer
from models.transformer import ModelState, Transformer, map_state

if Version(transformers.__version__) < Version("5.0"):
    raise ImportError(f"models.hf_model needs transformers >= 5.0 (tested with 5.24), found {transformers.__version__}"
                      "; pip install -U transformers")

MODEL_TYPE = "infini_lm"
REMOTE_CODE_FILE = "modeling_infini.py"
REMOTE_CODE = '''"""Loads this directory through the installed infini-lm package (its models/hf_model.py): what
AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) imports."""

from models.hf_model import InfiniConfig, InfiniForCausalLM  # noqa: F401
'''
AUTO_MAP = {"AutoConfig": "modeling_infini.InfiniConfig", "AutoModelForCausalLM": "modeling_infini.InfiniForCausalLM"}
# the output field that carries the state: "cache" since transformers 5.x, "past_key_values" before
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class InfiniConfig(PretrainedConfig):
    """The ModelConfig (as a dict under `model`, as in our own config.json: flat fields such as rope_scaling
    would collide with transformers' own) and the tokenizer spec; transformers' generic names (hidden_size,
    num_hidden_layers, ...) read the ModelConfig."""

    model_type = MODEL_TYPE

    def __init__(self, model: dict[str, Any] | None = None, tokenizer: str = "byte", use_cache: bool = True,
                 **kwargs: Any):
        model_config = ModelConfig(**(model or {}))  # validates, fills the derived defaults (ffn_dim, n_kv_heads)
        self.model = asdict(model_config)
        self.tokenizer = tokenizer
        """"byte", or the tokenizer directory the model was trained with (its files are copied beside the weights
        by checkpoint_to_hf: see tokenizer_spec)."""
        self.use_cache = use_cache
        """forward returns the state (an InfiniCache) unless told otherwise."""
        kwargs["tie_word_embeddings"] = model_config.tie_embeddings  # transformers ties weights by this name
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, config: ModelConfig, tokenizer: str = "byte", **kwargs: Any) -> InfiniConfig:
        return cls(model=asdict(config), tokenizer=tokenizer, **kwargs)

    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.model)

    # transformers' generic names, read by tools that size things (lm-eval, PEFT, accelerate)
    @property
    def vocab_size(self) -> int:
        return self.model["vocab_size"]

    @property
    def hidden_size(self) -> int:
        return self.model["dim"]

    @property
    def num_hidden_layers(self) -> int:
        return self.model["n_layers"]

    @property
    def num_attention_heads(self) -> int:
        return self.model["n_heads"]

    @property
    def num_key_value_heads(self) -> int:
        return self.model["n_kv_heads"]

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """config.json, and modeling_infini.py that the auto_map names (for trust_remote_code=True)."""
        super().save_pretrained(save_directory, **kwargs)
        (Path(save_directory) / REMOTE_CODE_FILE).write_text(REMOTE_CODE)


class InfiniCache(Cache):
    """The streaming state of a Transformer (one AttentionState per layer) as a transformers Cache.

    `state` is None before the first forward call. `seen_tokens` counts the tokens fed so far (what
    get_seq_length reports, so generate() knows which tokens of input_ids are new). With `infini` attention the
    state's size is constant: the memory plus at most segment_len - 1 cached keys/values per layer (`xl`: no
    memory, at most 2 segment_len - 1 cached keys/values per layer)."""

    def __init__(self, state: ModelState | None = None, seen_tokens: int = 0):
        super().__init__(layers=[])  # the per-layer cache objects of transformers do not apply: we hold one state
        self.state = state
        self.seen_tokens = seen_tokens

    def __len__(self) -> int:
        return 0 if self.state is None else len(self.state)

    def __repr__(self) -> str:
        return f"InfiniCache(seen_tokens={self.seen_tokens}, nbytes={self.nbytes()})"

    def tensors(self) -> list[Tensor]:
        """Every tensor of the state (keys, values and memory of every layer)."""
        return [t for layer in self.state or () for t in (layer.keys, layer.values, *(layer.memory or ()))]

    def nbytes(self) -> int:
        """Bytes held by the state."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def advance(self, state: ModelState, new_tokens: int) -> None:
        """Record the state after `new_tokens` more tokens (what forward does)."""
        self.state = state
        self.seen_tokens += new_tokens

    def update(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("InfiniCache holds the Transformer's whole streaming state; there are no per-layer "
                                  "key/value updates")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i of the new state is row beam_idx[i] of the old one."""
        if self.state is not None:
            self.state = map_state(self.state, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = map_state(self.state, lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("InfiniCache cannot remove tokens: the compressive memory cannot undo a write")

    def reset(self) -> None:
        self.state, self.seen_tokens = None, 0

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state[0].keys.shape[0]

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self)

    @property
    def is_linear(self) -> list[bool]:
        # not "linear attention" in transformers' sense (a cache without a sequence length): generate() then
        # slices input_ids by get_seq_length when a filled cache is passed back in
        return [False] * len(self)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self)


class InfiniForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM whose `model` is our Transformer. forward(input_ids, cache) -> logits and the cache advanced
    by the new tokens; labels give the mean next-token cross-entropy (positions labelled -100 ignored)."""

    config_class = InfiniConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderBlock"]
    _tied_weights_keys = {"model.output.weight": "model.tok_embeddings.weight"}  # used when tie_word_embeddings

    def __init__(self, config: InfiniConfig):
        super().__init__(config)
        self.model = Transformer(config.model_config())
        self.post_init()

    @classmethod
    def from_transformer(cls, model: Transformer, tokenizer: str = "byte") -> InfiniForCausalLM:
        """Wrap an existing Transformer (its parameters are shared, not copied)."""
        with torch.device("meta"):  # the wrapper's own Transformer is replaced at once: never allocate it
            wrapper = cls(InfiniConfig.from_model_config(model.config, tokenizer=tokenizer))
        wrapper.model = model
        return wrapper.train(model.training)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward creates its own InfiniCache

    def _init_weights(self, module: nn.Module) -> None:
        """transformers initialises module by module (missing tensors of a checkpoint, a fresh model): as
        Transformer.init_weights does."""
        names = {id(m): name for name, m in self.model.named_modules()}
        if id(module) in names:
            self.model.init_module(names[id(module)], module)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.tok_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.output

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.output = value

    def forward(
        self,
        input_ids: Tensor,
        cache: InfiniCache | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: InfiniCache | None = None,
        inputs_embeds: Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """input_ids (B, T): the next T tokens of each stream; cache (or past_key_values): the state after the
        earlier tokens (None: a fresh stream); logits_to_keep k > 0: only the last k positions' logits (generate
        asks for 1; with 1 and no gradient the input is fed in chunks as models.generation.prefill does, so a
        long prompt costs the memory of one chunk). position_ids and other keyword arguments are ignored: the
        position in the stream is the state's."""
        if inputs_embeds is not None:
            raise ValueError("InfiniForCausalLM takes input_ids, not inputs_embeds")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("InfiniForCausalLM cannot pad: segments are fixed by absolute position, so padding "
                             "would shift every segment boundary. Batch prompts of one length (attention_mask all 1); "
                             "generate() masks every pad_token_id in the prompt unless given "
                             "attention_mask=torch.ones_like(input_ids)")
        if cache is None:
            cache = past_key_values
        if cache is not None and not isinstance(cache, InfiniCache):
            raise TypeError(f"cache must be an InfiniCache (what forward returns), got {type(cache).__name__}")
        if use_cache is None:
            use_cache = self.config.use_cache
        state = None if cache is None else cache.state
        if logits_to_keep == 1 and labels is None and not torch.is_grad_enabled():
            last, new_state = prefill(self.model, input_ids, state, GenerationConfig.chunk_size)  # (B, V) float32
            logits = last.unsqueeze(1)  # (B, 1, V)
        else:
            h, new_state = self.model.hidden(input_ids, state)  # (B, T, dim)
            logits = self.model.logits(h[:, -logits_to_keep:] if logits_to_keep else h)  # (B, T or k, V)
        loss = None
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels need the logits of every position: logits_to_keep must be 0")
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        if use_cache:
            cache = cache if cache is not None else InfiniCache()
            cache.advance(new_state, input_ids.shape[1])
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})


AutoConfig.register(MODEL_TYPE, InfiniConfig, exist_ok=True)
AutoModelForCausalLM.register(InfiniConfig, InfiniForCausalLM, exist_ok=True)


# ------------------------------------------------------------------------------------------- conversion

def tokenizer_spec(hf_directory: str | Path) -> str:
    """The tokenizer of a transformers directory for data.tokenizer.load_tokenizer: the directory itself when it
    holds tokenizer files, else config.tokenizer ("byte")."""
    if has_tokenizer(hf_directory):
        return str(Path(hf_directory).resolve())
    return InfiniConfig.from_pretrained(hf_directory).tokenizer


def checkpoint_to_hf(checkpoint_dir: str | Path, hf_dir: str | Path, dtype: torch.dtype | None = None) -> None:
    """This project's model directory (models/checkpoint.py) -> a transformers directory, tokenizer files
    copied when the checkpoint's tokenizer is a directory."""
    model, meta = load_model(checkpoint_dir, dtype=dtype)
    tokenizer = meta.get("tokenizer", "byte")
    InfiniForCausalLM.from_transformer(model, tokenizer=tokenizer).save_pretrained(hf_dir)
    if tokenizer != "byte" and Path(tokenizer).is_dir():
        for name in TOKENIZER_FILES:
            if (Path(tokenizer) / name).is_file():
                shutil.copyfile(Path(tokenizer) / name, Path(hf_dir) / name)


def hf_to_checkpoint(hf_dir: str | Path, checkpoint_dir: str | Path) -> None:
    """A transformers directory written by InfiniForCausalLM.save_pretrained -> this project's model directory,
    whose tokenizer is the transformers directory's (see tokenizer_spec)."""
    model = InfiniForCausalLM.from_pretrained(hf_dir)
    save_model(checkpoint_dir, model.model, tokenizer=tokenizer_spec(hf_dir),
               converted_from=str(Path(hf_dir).resolve()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.hf_model", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="our model directory -> transformers directory (save_pretrained)")
    to_hf.add_argument("checkpoint_dir")
    to_hf.add_argument("hf_dir")
    to_hf.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="of the written weights")
    from_hf = sub.add_parser("from-hf", help="transformers directory -> our model directory")
    from_hf.add_argument("hf_dir")
    from_hf.add_argument("checkpoint_dir")
    args = parser.parse_args(argv)
    if args.command == "to-hf":
        checkpoint_to_hf(args.checkpoint_dir, args.hf_dir, DTYPES[args.dtype] if args.dtype else None)
        print(f"wrote {args.hf_dir}")
    else:
        hf_to_checkpoint(args.hf_dir, args.checkpoint_dir)
        print(f"wrote {args.checkpoint_dir}")


if __name__ == "__main__":
    main()
