"""The lm-evaluation-harness model `infini` (evaluation/lm_eval_model.py) on local tasks (task YAMLs over a jsonl file
this test writes; no network): multiple-choice log-likelihoods and accuracy equal a direct computation with the
model (one full forward pass, no streaming), rolling log-likelihoods equal the perplexity evaluation's and a direct
computation, generate_until equals models.generation cut at the stop strings."""

from __future__ import annotations

import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from data.tokenizer import ByteTokenizer  # noqa: E402
from evaluation.lm_eval_model import InfiniLM, cut_at_stop  # noqa: E402
from evaluation.perplexity import evaluate_perplexity  # noqa: E402
from models.checkpoint import save_model  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.generation import GenerationConfig, generate  # noqa: E402
from models.transformer import Transformer  # noqa: E402

DOCS = [
    {"context": "The cat sat on the", "choices": ["mat", "dog", "moon"], "answer": 0, "target": " mat.",
     "text": "A long document, streamed through the memory segment after segment. " * 6},
    {"context": "One, two,", "choices": ["three", "four"], "answer": 0, "target": " three",
     "text": "short"},
    {"context": "Colours: red, green and", "choices": ["blue", "gold", "teal", "grey"], "answer": 2,
     "target": " blue", "text": "Colours: red, green and blue.\nShapes: round."},
]
TASKS = {
    "choice": """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
""",
    "rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: bits_per_byte
""",
    "generate": """output_type: generate_until
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: [".", "\\n", "zz"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny byte-level model directory, the jsonl data and the three task YAMLs."""
    root = tmp_path_factory.mktemp("lm_eval")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, segment_len=8,
                                    init_std=0.2)).eval()
    with torch.no_grad():  # gates different per head and away from 0.5, so the memory path matters
        for layer in model.layers:
            layer.attention.gate_logit.copy_(torch.linspace(-2, 2, 4))
    save_model(root / "ckpt", model, tokenizer="byte")
    (root / "data.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (root / "tasks").mkdir()
    for name, body in TASKS.items():
        header = (f"task: local_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                  f"    test: {root / 'data.jsonl'}\n  cache_dir: {root / 'cache'}\ntest_split: test\n")
        (root / "tasks" / f"{name}.yaml").write_text(header + body)
    return root, model


@pytest.fixture(scope="module")
def results(setup):
    root, _ = setup
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="infini", model_args=f"pretrained={root / 'ckpt'},chunk_size=16", batch_size=2,
        tasks=["local_choice", "local_rolling", "local_generate"],
        task_manager=TaskManager(include_path=str(root / "tasks"), include_defaults=False), log_samples=True,
    )


def direct_logprob(model: Transformer, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) from one forward pass over the whole sequence."""
    ctx, cont = list(context.encode()), list(continuation.encode())
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids[:, :-1]).logits[0].double().log_softmax(-1)  # (T - 1, V)
    positions = torch.arange(len(ctx) - 1, ids.shape[1] - 1)
    targets = ids[0, len(ctx):]
    return float(logp[positions, targets].sum()), bool((logp[positions].argmax(-1) == targets).all())


def test_multiple_choice_equals_direct_computation(setup, results):
    _, model = setup
    samples = sorted(results["samples"]["local_choice"], key=lambda s: s["doc_id"])
    correct = []
    for doc, sample in zip(DOCS, samples):
        expected = [direct_logprob(model, doc["context"], " " + choice) for choice in doc["choices"]]
        got = [resp[0] for resp in sample["resps"]]
        for (lp, greedy), (want_lp, want_greedy) in zip(got, expected):
            assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy
        correct.append(max(range(len(expected)), key=lambda k: expected[k][0]) == doc["answer"])
    assert results["results"]["local_choice"]["acc,none"] == pytest.approx(sum(correct) / len(correct))


def test_rolling_equals_perplexity_evaluation(setup, results):
    _, model = setup
    samples = sorted(results["samples"]["local_rolling"], key=lambda s: s["doc_id"])
    perplexity = evaluate_perplexity(model, ByteTokenizer(), [doc["text"] for doc in DOCS], chunk_size=16)
    for doc, sample, score in zip(DOCS, samples, perplexity.scores):
        assert sample["resps"][0][0] == -score.nll  # the same code: equal exactly
        ids = torch.tensor([list(doc["text"].encode())])
        with torch.no_grad():  # and a full forward pass, the first byte context only (no EOS to condition on)
            logp = model(ids[:, :-1]).logits[0].double().log_softmax(-1)
        direct = float(logp.gather(-1, ids[0, 1:, None]).sum())
        assert sample["resps"][0][0] == pytest.approx(direct, abs=1e-4)
    total_bytes = sum(len(doc["text"].encode()) for doc in DOCS)
    bits_per_byte = sum(s.nll for s in perplexity.scores) / total_bytes / math.log(2)
    assert results["results"]["local_rolling"]["bits_per_byte,none"] == pytest.approx(bits_per_byte, rel=1e-9)


def test_generate_until_equals_models_generation(setup, results):
    _, model = setup
    samples = sorted(results["samples"]["local_generate"], key=lambda s: s["doc_id"])
    for doc, sample in zip(DOCS, samples):
        # "." and "\n" are one byte: stop tokens; "zz" is cut from the text afterwards
        config = GenerationConfig(max_new_tokens=12, stop_tokens=(ord("\n"), ord(".")))
        tokens = generate(model, [list(doc["context"].encode())], config)[0]
        expected = cut_at_stop(bytes(tokens).decode("utf-8", errors="replace"), ["zz"])
        assert sample["resps"][0][0] == expected
    exact = [s["resps"][0][0] == doc["target"] for doc, s in zip(DOCS, samples)]
    assert results["results"]["local_generate"]["exact_match,none"] == pytest.approx(sum(exact) / len(exact))


def test_batching_and_chunking_do_not_change_scores(setup):
    root, _ = setup
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", doc, (doc["context"], " " + choice), 0)
                for doc in DOCS for choice in doc["choices"]]
    one = InfiniLM(pretrained=str(root / "ckpt"), batch_size=1, chunk_size=4096).loglikelihood(requests, True)
    many = InfiniLM(pretrained=str(root / "ckpt"), batch_size=8, chunk_size=5).loglikelihood(requests, True)
    for (a, greedy_a), (b, greedy_b) in zip(one, many):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b


def test_transformers_directory_and_bad_arguments(setup, tmp_path):
    pytest.importorskip("transformers")
    from models.hf_model import checkpoint_to_hf

    root, model = setup
    checkpoint_to_hf(root / "ckpt", tmp_path / "hf")
    lm = InfiniLM(pretrained=str(tmp_path / "hf"))
    assert lm.tokenizer_name == "byte"
    for name, tensor in model.state_dict().items():
        assert torch.equal(lm.model.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="dtype"):
        InfiniLM(pretrained=str(root / "ckpt"), dtype="int8")
    with pytest.raises(ValueError, match="unsupported gen_kwargs"):
        lm.generation_config({"until": ["."], "num_beams": 4})


def test_cut_at_stop():
    assert cut_at_stop("abc. def\nghi", [".", "\n"]) == "abc"
    assert cut_at_stop("abc", ["zz", ""]) == "abc"
    assert cut_at_stop("a\nb.", ["."]) == "a\nb"
