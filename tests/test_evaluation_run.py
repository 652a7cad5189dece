"""Evaluations end to end on tiny random models: passkey and summarization outputs and files, the Hydra
configs under conf/eval/, `python -m evaluation`'s run(cfg), and the errors a user meets first."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import evaluation.passkey as passkey_module
import evaluation.summarization as summarization_module
from data.booksum import SummarizationExample, summarization_prompt
from data.passkey import passkey_prompt, trial_passkey
from data.text import MissingFieldError
from data.tokenizer import ByteTokenizer
from evaluation.config import EvalConfig, PasskeyTaskConfig
from evaluation.passkey import evaluate_passkey, markdown_table, score_passkey
from evaluation.report import read_jsonl
from evaluation.rouge import RougeScorer, geometric_mean
from evaluation.run import run
from evaluation.summarization import evaluate_summarization
from evaluation.tasks import discover
from models import ModelConfig, Transformer
from models.checkpoint import CheckpointError, save_model
from models.generation import GenerationConfig

CONF = Path(__file__).resolve().parents[1] / "conf" / "eval"
PNG = b"\x89PNG\r\n\x1a\n"
LENGTHS, DEPTHS, TRIALS = [260, 300], [0.0, 0.5, 1.0], 2


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    base = dict(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, segment_len=32, attention="infini",
                attention_backend="sdpa")
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**base, **overrides}))
    with torch.no_grad():
        for layer in model.layers:
            if hasattr(layer.attention, "gate_logit"):
                layer.attention.gate_logit.uniform_(-2, 2)
    return model.eval()


@torch.no_grad()
def greedy_by_recomputation(model: Transformer, prompt: list[int], steps: int) -> list[int]:
    """Reference decoder: the whole sequence re-run from scratch (no state) for every new token."""
    sequence = list(prompt)
    for _ in range(steps):
        sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[len(prompt) :]


def compose_eval(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


# ---------------------------------------------------------------- passkey


def test_passkey_streamed_decoding_equals_full_recomputation(tmp_path):
    model = tiny_model().double()
    tokenizer = ByteTokenizer()
    results = evaluate_passkey(model, tokenizer, LENGTHS, DEPTHS, TRIALS, seed=3, chunk_size=48, max_new_tokens=6,
                               batch_size=2)
    assert len(results.trials) == len(LENGTHS) * len(DEPTHS) * TRIALS
    for trial in results.trials:
        assert trial.passkey == trial_passkey(3, trial.length, trial.depth, trial.trial)  # seeded, model-free
        prompt = passkey_prompt(tokenizer, trial.length, trial.depth, trial.passkey)
        expected = tokenizer.decode(greedy_by_recomputation(model, prompt.tokens, 6))
        assert trial.prediction == expected
        assert (trial.needle_start, trial.needle_end) == (prompt.needle_start, prompt.needle_end)
        score = score_passkey(trial.prediction, trial.passkey)
        assert (trial.exact, trial.substring, trial.digit_accuracy) == (score.exact, score.substring,
                                                                       score.digit_accuracy)


def fake_generate(answers: dict[float, str]):
    """A stand-in for models.generation.generate that reads the passkey out of the prompt and answers by the
    needle's depth (recognised by rebuilding the prompt): a controlled model with known accuracies."""
    tokenizer = ByteTokenizer()

    def generate(model, prompts, config):
        outputs = []
        for tokens in prompts:
            key = re.search(r"The pass key is (\d+)\.", tokenizer.decode(tokens)).group(1)
            (depth,) = [d for d in answers if passkey_prompt(tokenizer, len(tokens), d, key).tokens == tokens]
            outputs.append(tokenizer.encode(answers[depth].format(key=key, wrong=key[:3] + "00")))
        return outputs

    return generate


def test_passkey_scores_tables_and_files_with_a_controlled_model(tmp_path, monkeypatch):
    answers = {0.0: " {key}. Remember", 0.5: " {wrong}", 1.0: " nothing"}
    monkeypatch.setattr(passkey_module, "generate", fake_generate(answers))
    results = evaluate_passkey(tiny_model(), ByteTokenizer(), [400, 1200], DEPTHS, TRIALS, seed=0, out_dir=tmp_path)
    exact, digits = results.accuracy("exact"), results.accuracy("digit_accuracy")
    for n in (400, 1200):
        assert (exact[(n, 0.0)], exact[(n, 0.5)], exact[(n, 1.0)]) == (1.0, 0.0, 0.0)
        # " 81000" for key 81098: 3 of 5 digits right (a key ending in 00 would score 5/5; none of these do)
        assert digits[(n, 0.5)] == pytest.approx(0.6) and digits[(n, 1.0)] == 0.0
    assert results.mean("exact") == pytest.approx(1 / 3)

    rows = read_jsonl(tmp_path / "passkey_trials.jsonl")
    assert len(rows) == 12 and {r["trial"] for r in rows} == {0, 1}
    assert all(r["exact"] == (r["depth"] == 0.0) for r in rows)
    assert all(r["prediction"] == answers[0.0].format(key=r["passkey"]) for r in rows if r["depth"] == 0.0)
    summary = json.loads((tmp_path / "passkey_summary.json").read_text())
    assert summary["lengths"] == [400, 1200] and summary["n_trials"] == 12
    assert summary["metrics"]["exact"]["cells"]["400"] == {"0.0": 1.0, "0.5": 0.0, "1.0": 0.0}
    assert summary["metrics"]["digit_accuracy"]["cells"]["1200"]["0.5"] == pytest.approx(0.6)
    assert summary["metrics"]["exact"]["mean"] == pytest.approx(1 / 3)
    table = (tmp_path / "passkey_table.md").read_text()
    assert "| length | 0% | 50% | 100% | mean |" in table and "| 400 | 100.0 | 0.0 | 0.0 | 33.3 |" in table
    assert "| 1200 | 60.0 | " not in table and "| 60.0 |" in markdown_table(results, "digit_accuracy")
    assert (tmp_path / "passkey_heatmap.png").read_bytes()[:8] == PNG


def test_passkey_rejects_bad_depths_and_restores_training_mode():
    model = tiny_model().train()
    with pytest.raises(ValueError, match="outside"):
        evaluate_passkey(model, ByteTokenizer(), [300], [1.5], 1, 0)
    evaluate_passkey(model, ByteTokenizer(), [260], [1.0], 1, 0, max_new_tokens=1)
    assert model.training


# ---------------------------------------------------------------- summarization


def test_summarization_decodes_with_streamed_state_and_scores_rouge(tmp_path):
    model = tiny_model().double()
    tokenizer = ByteTokenizer()
    examples = [
        SummarizationExample("b1", "Once upon a time a cat sat on a mat. " * 8,
                             ["A cat sat.", "The cat sat on a mat."]),
        SummarizationExample("b2", "The dog ran in the park every day. " * 5, ["A dog ran."]),
    ]
    config = GenerationConfig(max_new_tokens=8, chunk_size=40)
    results = evaluate_summarization(model, tokenizer, examples, config, max_input_tokens=150, out_dir=tmp_path)
    scorer = RougeScorer()
    for record, example in zip(results.records, examples):
        prompt = summarization_prompt(tokenizer, example.document, 150)
        assert record.prompt_tokens == len(prompt) <= 150
        assert record.prediction == tokenizer.decode(greedy_by_recomputation(model, prompt, 8)).strip()
        assert record.rouge == scorer.score(record.prediction, example.references)
    rows = read_jsonl(tmp_path / "summarization_examples.jsonl")
    assert [r["id"] for r in rows] == ["b1", "b2"] and rows[0]["references"] == examples[0].references


def test_summarization_aggregates_known_summaries(tmp_path, monkeypatch):
    tokenizer = ByteTokenizer()
    outputs = {"b1": "The cat sat on the mat. It was happy.", "b2": "A dog ran in the park."}

    def generate(model, prompts, config):
        assert config.do_sample and config.temperature == 0.5 and config.top_p == 0.95
        text = tokenizer.decode(prompts[0])
        return [tokenizer.encode(outputs["b1" if "cat" in text else "b2"])]

    monkeypatch.setattr(summarization_module, "generate", generate)
    examples = [SummarizationExample("b1", "cat " * 50, ["A cat sat on a mat.", "The happy cat sat."]),
                SummarizationExample("b2", "dog " * 50, ["The dog ran in a park. It was fast."])]
    config = GenerationConfig(max_new_tokens=1024, do_sample=True, temperature=0.5, top_p=0.95, seed=0)
    results = evaluate_summarization(tiny_model(), tokenizer, examples, config, 100, RougeScorer(use_stemmer=True),
                                     out_dir=tmp_path)
    assert [r.prediction for r in results.records] == [outputs["b1"], outputs["b2"]]
    direct = [RougeScorer(use_stemmer=True).score(outputs[e.id], e.references) for e in examples]
    summary = json.loads((tmp_path / "summarization_summary.json").read_text())
    for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert summary["rouge"][name] == pytest.approx((direct[0][name] + direct[1][name]) / 2)
        assert summary["rouge"][name] > 0
    means = [summary["rouge"][n] for n in ("rouge1", "rouge2", "rougeL")]
    assert summary["rouge"]["overall"] == pytest.approx(math.prod(means) ** (1 / 3))
    assert summary["rouge"]["overall"] == pytest.approx(geometric_mean(means))
    assert summary["settings"]["use_stemmer"] is True and summary["examples"] == 2


# ---------------------------------------------------------------- Hydra configs and run(cfg)


def test_every_shipped_eval_config_composes():
    options = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
    assert {"passkey", "passkey_1m", "pg19", "booksum", "booksum_paper", "memory_footprint"} <= set(options)
    for option in options:
        overrides = [f"task={option}"] + (["task.source=x.jsonl"] if option == "perplexity_local" else [])
        cfg = compose_eval(*overrides)
        OmegaConf.to_container(cfg, throw_on_missing=True)
        assert cfg.task.name in discover()  # every YAML names a registered task
    paper = compose_eval("task=booksum_paper").task
    assert (paper.max_input_tokens, paper.generation.temperature, paper.generation.top_p,
            paper.generation.max_new_tokens, paper.generation.do_sample) == (500_000, 0.5, 0.95, 1024, True)
    cfg = compose_eval()
    assert OmegaConf.get_type(cfg) is EvalConfig and OmegaConf.get_type(cfg.task) is PasskeyTaskConfig
    assert cfg.wandb.mode == "disabled"


@pytest.mark.parametrize("override", ["task.lenghts=[1024]", "chekpoint=runs/x", "task.trials=many",
                                      "task=passkey_99", "wandb.mood=offline"])
def test_misspelt_or_mistyped_keys_fail_at_compose_time(override):
    with pytest.raises(ConfigCompositionException):
        compose_eval(override)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ckpt")
    save_model(directory, tiny_model(), tokenizer="byte")
    return directory


def test_run_passkey_from_a_checkpoint_directory(checkpoint, tmp_path):
    cfg = compose_eval("task=passkey", f"checkpoint={checkpoint}", f"out_dir={tmp_path}", "task.lengths=[260]",
                       "task.depth_grid=2", "task.trials=1", "task.max_new_tokens=3", "task.chunk_size=64")
    summary = run(cfg)
    assert summary["depths"] == [0.0, 1.0] and summary["checkpoint"] == str(checkpoint)
    written = json.loads((tmp_path / "passkey_summary.json").read_text())
    # the checkpoint's segment_len (32) places the prompts: 260 rounds to 256, one length per offset class;
    # `inside` is empty (the 37-token question is longer than a segment)
    assert written["metrics"] == summary["metrics"] and written["requested_lengths"] == [260]
    assert written["lengths"] == [256 + 16, 256] and written["offset_classes"] == ["straddles", "opens"]
    assert written["settings"]["segment_len"] == 32 and written["settings"]["skipped_offset_classes"] == ["inside"]
    assert len(read_jsonl(tmp_path / "passkey_trials.jsonl")) == 4
    assert (tmp_path / "passkey_heatmap.png").read_bytes()[:8] == PNG
    assert OmegaConf.load(tmp_path / "eval_config.yaml").task.lengths == [260]


def test_run_perplexity_on_local_jsonl(checkpoint, tmp_path):
    data = tmp_path / "books.jsonl"
    texts = ["It was a dark and stormy night. " * 6, "Call me Ishmael. Some years ago. " * 4]
    data.write_text("\n".join(json.dumps({"short_book_title": f"book{i}", "text": t}) for i, t in enumerate(texts)))
    cfg = compose_eval("task=perplexity_local", f"task.source={data}", "task.id_field=short_book_title",
                       f"checkpoint={checkpoint}", f"out_dir={tmp_path / 'out'}", "task.chunk_size=50")
    summary = run(cfg)
    assert summary["documents"] == 2 and summary["tokens"] == sum(len(t.encode()) - 1 for t in texts)
    assert summary["bits_per_byte"] == pytest.approx(summary["loss"] / math.log(2))
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "perplexity_documents.jsonl")] == ["book0", "book1"]


def test_run_summarization_on_local_booksum_jsonl(checkpoint, tmp_path):
    data = tmp_path / "test.jsonl"
    rows = [{"bid": 1, "source": "a", "title": "T", "summary": "A cat sat.", "book": "The cat sat down. " * 10},
            {"bid": 1, "source": "b", "title": "T", "summary": "The cat sat down.", "book": "The cat sat down. " * 10},
            {"bid": 2, "source": "a", "title": "U", "summary": "Dogs ran.", "book": "Dogs ran and ran. " * 10}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = compose_eval("task=booksum", f"task.source={data}", f"checkpoint={checkpoint}", f"out_dir={tmp_path / 'o'}",
                       "task.max_input_tokens=64", "task.generation.max_new_tokens=4")
    summary = run(cfg)
    assert summary["examples"] == 2 and summary["settings"]["max_input_tokens"] == 64
    records = read_jsonl(tmp_path / "o" / "summarization_examples.jsonl")
    assert records[0]["references"] == ["A cat sat.", "The cat sat down."] and records[0]["prompt_tokens"] == 64
    assert summary["rouge"]["overall"] == pytest.approx(geometric_mean(
        [summary["rouge"][n] for n in ("rouge1", "rouge2", "rougeL")]))


def test_run_memory_footprint_prints_the_paper_numbers(tmp_path, capsys, checkpoint):
    summary = run(compose_eval("task=memory_footprint", f"out_dir={tmp_path}"))
    printed = capsys.readouterr().out
    for text in ("1.6M", "50M", "183M", "2.5M"):
        assert f"| {text} |" in printed
    assert summary["elements"]["Infini-Transformer"] == 1_585_152
    ours = run(compose_eval("task=memory_footprint", f"checkpoint={checkpoint}", f"out_dir={tmp_path / 'c'}"))
    assert ours["setting"]["n_layers"] == 2 and ours["elements"]["Infini-Transformer"] == 8 * 9 * 4 * 2


# ---------------------------------------------------------------- errors


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "no_such_run"
    with pytest.raises(CheckpointError, match=re.escape(str(missing))):
        run(compose_eval("task=passkey", f"checkpoint={missing}", f"out_dir={tmp_path}"))
    with pytest.raises(ValueError, match="checkpoint="):
        run(compose_eval("task=passkey", f"out_dir={tmp_path}"))


def test_dataset_without_the_text_field_names_it_and_lists_columns(checkpoint, tmp_path):
    data = tmp_path / "books.jsonl"
    data.write_text(json.dumps({"title": "x", "content": "some text"}) + "\n")
    cfg = compose_eval("task=perplexity_local", f"task.source={data}", f"checkpoint={checkpoint}",
                       f"out_dir={tmp_path / 'o'}")
    with pytest.raises(MissingFieldError, match=r"'text'.*\['title', 'content'\]"):
        run(cfg)


def test_booksum_without_the_summary_field_names_it(checkpoint, tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"bid": 1, "book": "text", "abstract": "x"}) + "\n")
    cfg = compose_eval("task=booksum", f"task.source={data}", f"checkpoint={checkpoint}", f"out_dir={tmp_path / 'o'}")
    with pytest.raises(MissingFieldError, match="'summary'"):
        run(cfg)
