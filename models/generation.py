"""Generation with streaming state: greedy, temperature / top-k / top-p sampling, beam search.

    logits, state = prefill(model, prompt_tokens)            # any length, fed in chunks
    new_tokens = generate(model, prompts, GenerationConfig(max_new_tokens=64, do_sample=True, top_p=0.95))

The prompt is consumed `chunk_size` tokens at a time and only the last position is projected to the vocabulary,
so prefill memory is bounded by one chunk whatever the prompt length. Decoding then feeds one token per step
through the cached state and never recomputes the prompt. With `infini` and `local` attention the state is the
compressive memory plus the keys/values of the unfinished segment (at most segment_len tokens), with `xl` the
keys/values of the previous and the unfinished segment (fewer than 2 segment_len tokens), so each decoding step
costs constant memory and time however long the stream is; with `full` attention it grows with the stream.

Prompts of different lengths are not padded: segments are fixed by absolute position in the stream, so padding
would shift every segment boundary and change the result. Prompts are grouped by length instead and each group
runs as one batch; a prompt's continuation is the same as when it is generated alone.

CLI:  python -m models.generation CHECKPOINT_DIR --prompt "Once upon a time" --max-new-tokens 64 --top-p 0.9
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from models.config import DType
from models.streaming import stream
from models.transformer import ModelState, Transformer, map_state


@dataclass
class GenerationConfig:
    """Decoding settings. do_sample False: greedy (num_beams 1) or beam search (num_beams > 1)."""

    max_new_tokens: int = 32
    do_sample: bool = False
    """Sample from softmax(logits / temperature) restricted by top_k and top_p; False: the argmax."""
    temperature: float = 1.0
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p (nucleus sampling)."""
    num_beams: int = 1
    length_penalty: float = 1.0
    """Beam search ranks finished hypotheses by sum(log p) / length ** length_penalty."""
    stop_tokens: tuple[int, ...] = ()
    """A sequence ends at the first of these; the stop token is not returned."""
    chunk_size: int = 4096
    """Prompt tokens per forward call during prefill: bounds prefill memory."""
    seed: int | None = None
    """Prompt i samples from its own generator seeded with seed + i (None: torch's global generator)."""

    def __post_init__(self) -> None:
        self.stop_tokens = tuple(int(t) for t in self.stop_tokens)
        checks = (
            ("max_new_tokens", self.max_new_tokens >= 0),
            ("temperature", self.temperature > 0),
            ("top_k", self.top_k >= 0),
            ("top_p", 0 < self.top_p <= 1),
            ("num_beams", self.num_beams >= 1),
            ("chunk_size", self.chunk_size >= 1),
        )
        for name, ok in checks:
            if not ok:
                raise ValueError(f"GenerationConfig.{name}={getattr(self, name)!r} is out of range")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("GenerationConfig: sampling with num_beams > 1 is not supported; choose one")


@torch.no_grad()
def prefill(
    model: Transformer, tokens: Tensor, state: ModelState | None = None, chunk_size: int = 4096
) -> tuple[Tensor, ModelState]:
    """Feed tokens (B, T) through the model in chunks; return the last position's logits (B, V) float32 and the
    state. Only the last position is projected to the vocabulary, so memory is bounded by one chunk."""
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be (batch, time) with time >= 1, got shape {tuple(tokens.shape)}")
    tokens = tokens.to(model.tok_embeddings.weight.device)

    def step(span: slice, state: ModelState | None) -> tuple[Tensor, ModelState]:
        h, state = model.hidden(tokens[:, span], state)
        return h[:, -1:], state  # (B, 1, dim): only the last position is kept

    last, state = stream(step, tokens.shape[1], chunk_size, state)
    return model.logits(last[-1])[:, 0].float(), state


def sampling_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """logits (B, V) -> logits / temperature with the tokens outside top-k and the top-p nucleus set to -inf.

    top-p keeps the smallest set of most likely tokens whose total probability is >= top_p: a token is dropped
    when the tokens ranked above it already reach top_p. The most likely token is always kept."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        mass_above = probs.cumsum(-1) - probs  # probability of the tokens ranked strictly above
        drop_sorted = mass_above >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _choose(logits: Tensor, config: GenerationConfig, generators: list[torch.Generator | None]) -> Tensor:
    """logits (B, V) -> next tokens (B,): argmax, or one sample per row from that row's generator."""
    if not config.do_sample:
        return logits.argmax(-1)
    probs = sampling_logits(logits, config.temperature, config.top_k, config.top_p).softmax(-1)  # (B, V)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs.cpu(), generators)]).to(
        logits.device
    )


def _greedy_or_sample(
    model: Transformer, prompts: Tensor, config: GenerationConfig, generators: list[torch.Generator | None]
) -> list[list[int]]:
    """prompts (B, T) of one length -> new tokens per row."""
    logits, state = prefill(model, prompts, chunk_size=config.chunk_size)
    B = prompts.shape[0]
    stop = torch.tensor(config.stop_tokens, dtype=torch.long, device=logits.device)
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    outputs: list[list[int]] = [[] for _ in range(B)]
    for step in range(config.max_new_tokens):
        tokens = _choose(logits, config, generators)  # (B,)
        done |= torch.isin(tokens, stop)
        for row, token in enumerate(tokens.tolist()):
            if not done[row]:
                outputs[row].append(token)
        if bool(done.all()) or step == config.max_new_tokens - 1:
            break
        out = model(tokens.unsqueeze(1), state)  # one token per step through the cached state
        logits, state = out.logits[:, -1].float(), out.state
    return outputs


def _beam_search(model: Transformer, prompts: Tensor, config: GenerationConfig) -> list[list[int]]:
    """prompts (G, T) of one length -> the best hypothesis per prompt.

    K = num_beams beams per prompt share one batch of G*K streams; after each step the state is re-ordered
    with the surviving beams (index_select on the batch dimension). A candidate ending in a stop token among the
    K best of its step becomes a finished hypothesis; a prompt's search ends once it has K of them (as
    transformers' early_stopping=True, which makes num_beams=1 exactly greedy) or after max_new_tokens, when
    the running beams count as finished. Hypotheses are ranked by sum(log p) / length ** length_penalty,
    length counting the stop token. Scores are summed in float64 so that adding them never creates ties."""
    K, lp = config.num_beams, config.length_penalty
    stop = set(config.stop_tokens)
    logits, state = prefill(model, prompts, chunk_size=config.chunk_size)
    G, V = logits.shape
    state = map_state(state, lambda t: t.repeat_interleave(K, dim=0))  # (G*K, ...)
    log_probs = logits.double().log_softmax(-1).repeat_interleave(K, dim=0)  # (G*K, V)
    beam_scores = torch.full((G, K), float("-inf"), dtype=torch.float64, device=logits.device)
    beam_scores[:, 0] = 0.0  # all beams start identical: only the first is live
    beams: list[list[int]] = [[] for _ in range(G * K)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(G)]
    done = [False] * G
    n_candidates = min(K + len(stop), K * V)
    for step in range(config.max_new_tokens):
        scores = (beam_scores.view(G * K, 1) + log_probs).view(G, K * V)
        top_scores, top_index = scores.topk(n_candidates, dim=1)  # (G, n_candidates)
        sources, tokens, new_scores = [], [], []
        for g in range(G):
            chosen: list[tuple[int, int, float]] = []
            if not done[g]:
                for rank, (score, index) in enumerate(zip(top_scores[g].tolist(), top_index[g].tolist())):
                    if score == float("-inf") or len(chosen) == K:
                        break
                    beam, token = divmod(index, V)
                    if token in stop:
                        if rank < K:
                            finished[g].append((score / (step + 1) ** lp, beams[g * K + beam]))
                        continue
                    chosen.append((g * K + beam, token, score))
                done[g] = len(finished[g]) >= K or not chosen
            while len(chosen) < K:  # a finished prompt, or fewer live candidates than beams: dead filler
                chosen.append((g * K, 0, float("-inf")))
            for source, token, score in chosen:
                sources.append(source)
                tokens.append(token)
                new_scores.append(score)
        beams = [beams[s] + [t] for s, t in zip(sources, tokens)]
        beam_scores = torch.tensor(new_scores, dtype=torch.float64, device=logits.device).view(G, K)
        if all(done) or step == config.max_new_tokens - 1:
            break
        index = torch.tensor(sources, device=logits.device)
        state = map_state(state, lambda t, index=index: t.index_select(0, index))
        out = model(torch.tensor(tokens, device=logits.device).unsqueeze(1), state)
        log_probs, state = out.logits[:, -1].double().log_softmax(-1), out.state
    results = []
    for g in range(G):
        if not done[g]:
            for k in range(K):
                score = float(beam_scores[g, k])
                if score > float("-inf"):
                    finished[g].append((score / max(len(beams[g * K + k]), 1) ** lp, beams[g * K + k]))
        results.append(max(finished[g], key=lambda item: item[0])[1] if finished[g] else [])
    return results


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], config: GenerationConfig) -> list[list[int]]:
    """Continue each prompt; returns only the new tokens of each, stop token excluded."""
    vocab = model.config.vocab_size
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; generation needs at least one token to condition on")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab})")
    if config.max_new_tokens == 0:
        return [[] for _ in prompts]
    device = model.tok_embeddings.weight.device
    generators: list[torch.Generator | None] = [
        None if config.seed is None else torch.Generator().manual_seed(config.seed + i) for i in range(len(prompts))
    ]
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    results: list[list[int]] = [[] for _ in prompts]
    for indices in by_length.values():
        batch = torch.tensor([prompts[i] for i in indices], dtype=torch.long, device=device)  # (G, T)
        if config.num_beams > 1:
            outputs = _beam_search(model, batch, config)
        else:
            outputs = _greedy_or_sample(model, batch, config, [generators[i] for i in indices])
        for i, output in zip(indices, outputs):
            results[i] = output
    return results


def main(argv: list[str] | None = None) -> None:
    """Generate from a model directory written by models.checkpoint.save_model (or models.hf import)."""
    from data.tokenizer import load_tokenizer  # imported here: the library part of this module needs no tokenizer
    from models.checkpoint import CheckpointError, load_model

    parser = argparse.ArgumentParser(prog="python -m models.generation", description=main.__doc__)
    parser.add_argument("checkpoint", help="model directory (model.safetensors + config.json)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    source.add_argument("--prompt-file", type=Path, help="a text file used as one (possibly very long) prompt")
    parser.add_argument("--tokenizer", default=None, help='override the checkpoint\'s tokenizer ("byte" or a path)')
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy / beam search")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--length-penalty", type=float, default=1.0)
    parser.add_argument("--stop", type=int, action="append", default=None,
                        help="stop token id (repeatable); default: the tokenizer's end-of-sequence token")
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=[d.value for d in DType], default="float32")
    args = parser.parse_args(argv)

    # bad arguments end with a usage line naming the flag, the file or the value, not a traceback
    try:
        config = GenerationConfig(
            max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams, length_penalty=args.length_penalty,
            chunk_size=args.chunk_size, seed=args.seed,
        )
    except ValueError as error:
        flag = re.search(r"GenerationConfig\.(\w+)=", str(error))
        parser.error(f"--{flag.group(1).replace('_', '-')}={getattr(args, flag.group(1))} is out of range"
                     if flag else str(error))
    if args.prompt_file is not None:
        try:
            texts = [args.prompt_file.read_text()]
        except (OSError, UnicodeDecodeError) as error:
            parser.error(f"--prompt-file {str(args.prompt_file)!r} cannot be read: {error}")
    else:
        texts = args.prompt
    try:
        model, meta = load_model(args.checkpoint, device=args.device, dtype=DType(args.dtype).torch)
        tokenizer = load_tokenizer(args.tokenizer or meta.get("tokenizer", "byte"))
    except (CheckpointError, OSError, ValueError) as error:
        parser.error(str(error))
    prompts = [tokenizer.encode(text) for text in texts]
    for i, prompt in enumerate(prompts):
        if not prompt:
            where = f"--prompt-file {str(args.prompt_file)!r}" if args.prompt_file else f"--prompt number {i + 1}"
            parser.error(f"{where} is empty: generation needs at least one token to continue")
    stop = args.stop if args.stop is not None else ([] if tokenizer.eos_id is None else [tokenizer.eos_id])
    config.stop_tokens = tuple(stop)
    try:
        outputs = generate(model, prompts, config)
    except ValueError as error:  # e.g. token ids outside the model's vocabulary (--tokenizer of another model)
        parser.error(str(error))
    for text, output in zip(texts, outputs):
        if len(texts) > 1:
            print(f"--- {text[:60]!r}")
        sys.stdout.write(tokenizer.decode(output) + "\n")


if __name__ == "__main__":
    main()
