"""An lm-evaluation-harness model, registered as `infini`: any task of the harness on our models, documents of any
length streamed through the state.

    python -m evaluation.lm_eval_model run --model infini --model_args pretrained=DIR --tasks hellaswag
    # or, in Python, after `import evaluation.lm_eval_model`: lm_eval.simple_evaluate(model="infini", ...)

The harness (0.4.x) finds only the models it ships, so `lm_eval --model infini` needs this module imported first:
`python -m evaluation.lm_eval_model` is the harness's own command line with `infini` registered.

model_args: pretrained (this project's model directory, models/checkpoint.py, or a transformers directory written by
models/hf_model.py), tokenizer (default: the checkpoint's), device, dtype (float32, bfloat16, float16, float64),
chunk_size (tokens per forward call: bounds memory), batch_size.

- loglikelihood: context + continuation streamed in chunks (evaluation.perplexity.stream_scores), only the
  continuation's positions projected to the vocabulary. Requests whose token sequences have the same length run
  as one batch (padding would shift the segment boundaries, which are fixed by absolute position).
- loglikelihood_rolling: each document from an empty state through evaluation.perplexity.score_document, the code
  of the PG19 evaluation: constant memory whatever the length, every token scored once (the first one given the
  tokenizer's EOS/BOS when it has one; the byte tokenizer has neither, so there the first token is context only).
- generate_until: models.generation.generate (prompts of one length batched), stopped at the end-of-sequence token
  and at `until` strings of one token, then cut at the first `until` string.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from data.tokenizer import load_tokenizer
from evaluation.perplexity import score_document, stream_scores
from models.checkpoint import load_model
from models.generation import GenerationConfig, generate
from models.hf import DTYPES
from models.transformer import Transformer

log = logging.getLogger(__name__)
GENERATION_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


def load_pretrained(directory: str | Path, device: str, dtype: torch.dtype) -> tuple[Transformer, str]:
    """(model in eval mode, tokenizer spec) of our model directory or of a transformers directory (model_type
    infini_lm, written by models/hf_model.py)."""
    config_path = Path(directory) / "config.json"
    if config_path.is_file() and json.loads(config_path.read_text()).get("model_type") == "infini_lm":
        from models.hf_model import InfiniForCausalLM, tokenizer_spec  # transformers: only for such directories

        model = InfiniForCausalLM.from_pretrained(directory).model.to(device=device, dtype=dtype).eval()
        return model, tokenizer_spec(directory)
    model, meta = load_model(directory, device=device, dtype=dtype)
    return model, meta.get("tokenizer", "byte")


@register_model("infini")
class InfiniLM(TemplateLM):
    """lm-evaluation-harness model over our Transformer (see the module docstring)."""

    def __init__(
        self,
        pretrained: str,
        tokenizer: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        chunk_size: int = 4096,
        batch_size: int | str = 16,
        max_gen_toks: int = 256,
        **unused: Any,  # what the harness passes to every model (max_batch_size, ...)
    ):
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"infini model_args dtype={dtype!r} is not one of {sorted(DTYPES)}")
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:  # the harness's command line passes --device cuda unless told otherwise
                log.warning("infini: device %s is not available; running on the CPU", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.model, spec = load_pretrained(pretrained, str(self._device), DTYPES[dtype])
        self.tokenizer = load_tokenizer(tokenizer or spec)
        self.chunk_size = int(chunk_size)
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        if self.chunk_size < 1 or self.batch_size < 1:
            raise ValueError(f"infini model_args chunk_size={chunk_size} and batch_size={batch_size} must be positive")

    @property
    def eot_token_id(self) -> int | None:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int | None:
        """What an empty context or a rolling document starts from: EOS, else BOS, else None (the byte tokenizer:
        then the first token is context only and is not scored)."""
        if self.tokenizer.eos_id is not None:
            return self.tokenizer.eos_id
        return getattr(self.tokenizer, "bos_id", None)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "spec", "byte"))

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string)

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for context, continuation in (request.args for request in requests):
            if context:
                context_enc, continuation_enc = self._encode_pair(context, continuation)
            else:
                continuation_enc = self.tok_encode(continuation)
                if self.prefix_token_id is None:  # nothing to condition on: the first token is context only
                    context_enc, continuation_enc = continuation_enc[:1], continuation_enc[1:]
                else:
                    context_enc = [self.prefix_token_id]
            pairs.append(((context, continuation), context_enc, continuation_enc))
        return self._loglikelihood_tokens(pairs, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding gives the continuation; requests of
        one total length batched."""
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, (_, context, continuation) in enumerate(requests):
            if not context:
                raise ValueError(f"loglikelihood request {i} has an empty context after tokenization")
            if continuation:
                by_length[len(context) + len(continuation)].append(i)
        batches = [indices[k : k + self.batch_size] for indices in by_length.values()
                   for k in range(0, len(indices), self.batch_size)]
        for indices in tqdm(batches, desc="infini loglikelihood", disable=disable_tqdm):
            ids = torch.tensor([requests[i][1] + requests[i][2] for i in indices], dtype=torch.long)  # (B, L)
            starts = [len(requests[i][1]) - 1 for i in indices]  # position predicting the first continuation token
            first = min(starts)
            nll, greedy = stream_scores(self.model, ids[:, :-1], ids[:, 1:], self.chunk_size, first)  # (B, L-1-first)
            for row, (i, start) in enumerate(zip(indices, starts)):
                results[i] = (-float(nll[row, start - first :].sum()), bool(greedy[row, start - first :].all()))
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """log p(document), streamed through the state by the perplexity evaluation's score_document."""
        results = []
        for (text,) in tqdm([request.args for request in requests], desc="infini rolling", disable=disable_tqdm):
            tokens = self.tok_encode(text)
            if len(tokens) < (1 if self.prefix_token_id is not None else 2):
                results.append(0.0)  # nothing to score
                continue
            score = score_document(self.model, tokens, self.chunk_size, prefix_token=self.prefix_token_id)
            results.append(-score.nll)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), -score.nll)
        return results

    def generation_config(self, gen_kwargs: dict[str, Any]) -> tuple[GenerationConfig, list[str]]:
        """The harness's gen_kwargs -> our GenerationConfig and the `until` strings."""
        unknown = sorted(set(gen_kwargs) - GENERATION_KEYS)
        if unknown:
            raise ValueError(f"infini generate_until: unsupported gen_kwargs {unknown} (supported: "
                             f"{sorted(GENERATION_KEYS)})")
        until = gen_kwargs.get("until", [])
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature", 1.0))
        do_sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0  # temperature 0: greedy
        stops = {self.tokenizer.eos_id} - {None}
        stops |= {ids[0] for ids in map(self.tok_encode, until) if len(ids) == 1}
        config = GenerationConfig(
            max_new_tokens=int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)), do_sample=do_sample,
            temperature=temperature if do_sample else 1.0, top_k=int(gen_kwargs.get("top_k", 0) or 0),
            top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0), stop_tokens=tuple(sorted(stops)),
            chunk_size=self.chunk_size,
        )
        return config, until

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        results = [""] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)  # requests with the same gen_kwargs decode together
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        for indices in tqdm(list(groups.values()), desc="infini generate_until", disable=disable_tqdm):
            config, until = self.generation_config(requests[indices[0]].args[1])
            for k in range(0, len(indices), self.batch_size):
                batch = indices[k : k + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0]) or [self.prefix_token_id or 0] for i in batch]
                for i, tokens in zip(batch, generate(self.model, prompts, config)):
                    results[i] = cut_at_stop(self.tokenizer.decode(tokens), until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
        return results


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """text up to the first occurrence of any `until` string."""
    cut = min((text.find(s) for s in until if s and s in text), default=len(text))
    return text[:cut]


def main() -> None:
    """The harness's command line (`lm_eval ...`) with `infini` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
