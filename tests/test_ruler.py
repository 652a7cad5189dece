"""RULER-style tasks: token-exact prompts for any tokenizer, needles where they belong, answers recoverable from
the prompt text alone, seeded; RULER's scores on hand-checked cases; `python -m evaluation task=ruler` end to end."""

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_data import CharTokenizer, save_tiny_hf_tokenizer

import evaluation.ruler as ruler_eval
from data.passkey import FILLER
from data.ruler import (
    NIAH_INSTRUCTION,
    TASKS,
    VT_INSTRUCTION,
    RulerSettings,
    RulerTemplate,
    ruler_trial,
    score_all,
    score_part,
)
from data.tokenizer import ByteTokenizer, load_tokenizer
from evaluation.run import run
from models import ModelConfig, Transformer
from models.checkpoint import save_model

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", params=["byte", "char", "hf"])
def tokenizer(request, tmp_path_factory):
    if request.param == "byte":
        return ByteTokenizer()
    if request.param == "char":
        return CharTokenizer()
    return load_tokenizer(str(save_tiny_hf_tokenizer(tmp_path_factory.mktemp("tok"))))


def recovered_answers(task: str, text: str) -> list[str]:
    """The answers read off the prompt text alone, as a reader following the instructions would."""
    if task == "variable_tracking":
        value = re.search(r"assigned the value (\d+) in the text above", text).group(1)
        holds = {name for name, v in re.findall(r"VAR ([A-Z]+) = (\d+)\.", text) if v == value}
        for name, previous in re.findall(r"VAR ([A-Z]+) = VAR ([A-Z]+)\.", text):  # in text order
            if previous in holds:
                holds.add(name)
        chain = [n for n in re.findall(r"VAR ([A-Z]+) = ", text) if n in holds]
        return chain
    question = text.rsplit("\n", 1)[1]
    keys = re.search(r"numbers? for (.+?) mentioned", question).group(1)
    keys = re.split(r", | and ", keys)
    return [value for key in keys for value in re.findall(rf"magic numbers for {key} is: (\d+)\.", text)]


@pytest.mark.parametrize("task", TASKS)
def test_prompts_are_token_exact_and_answers_recoverable_from_the_text(tokenizer, task):
    template = RulerTemplate(tokenizer)
    for length, trial in [(700, 0), (701, 1), (1500, 2), (2999, 3)]:
        prompt = ruler_trial(template, task, length, trial, seed=0)
        assert len(prompt.tokens) == length and prompt.task == task
        text = tokenizer.decode(prompt.tokens)
        instruction = VT_INSTRUCTION if task == "variable_tracking" else NIAH_INSTRUCTION
        assert text.startswith(instruction + "\n") and text.endswith("\n" + prompt.question)
        assert recovered_answers(task, text) == prompt.answers
        # every needle span decodes to one needle sentence, and they do not overlap
        for (start, end), (next_start, _) in zip(prompt.needle_spans, prompt.needle_spans[1:] + [(length, 0)]):
            needle = tokenizer.decode(prompt.tokens[start:end])
            assert re.fullmatch(r" (One of the special magic numbers for [a-z-]+ is: \d+|VAR [A-Z]+ = .+)\.", needle)
            assert end <= next_start
        expected = {"niah_multikey": 4, "niah_multivalue": 4, "niah_multiquery": 4, "variable_tracking": 5}
        assert len(prompt.needle_spans) == expected.get(task, 1)
        assert len(prompt.answers) == {"niah_multivalue": 4, "niah_multiquery": 4, "variable_tracking": 5}.get(task, 1)


def test_haystacks_repeat_the_filler_or_vary():
    template = RulerTemplate(ByteTokenizer())
    repeat = ByteTokenizer().decode(ruler_trial(template, "niah_single_repeat", 2000, 0, 0).tokens)
    varied = ByteTokenizer().decode(ruler_trial(template, "niah_single_varied", 2000, 0, 0).tokens)
    assert repeat.count(FILLER) >= 15 and FILLER not in varied
    sentences = re.findall(r"The [a-z]+ [a-z]+ [a-z]+ the [^.]+\.", varied)
    assert len(sentences) > 20 and len(set(sentences)) > 0.9 * len(sentences)


def test_needles_go_to_the_requested_depth_at_sentence_boundaries():
    tokenizer = ByteTokenizer()
    template = RulerTemplate(tokenizer)
    needle = "One of the special magic numbers for a-b is: 1234567."
    at = {}
    for depth in (0.0, 0.5, 1.0):
        prompt = template._assemble("t", 1000, "I.", [needle], [depth], "Q?", ["1234567"], "repeat", random.Random(0))
        text = tokenizer.decode(prompt.tokens)
        start, end = prompt.needle_spans[0]
        assert tokenizer.decode(prompt.tokens[start:end]) == " " + needle
        at[depth] = start
        if depth < 1.0:  # a whole filler sentence group follows
            assert text[end:].startswith(" The grass is green.")
    head = len("I.\n")
    assert at[0.0] == head + len(FILLER)  # after the first sentence group, never before it
    assert at[1.0] + len(" " + needle) == 1000 - len("\nQ?")  # right before the question
    haystack = 1000 - head - len("\nQ?") - len(" " + needle)
    assert abs(at[0.5] - head - haystack / 2) <= (len(FILLER) + 1) / 2  # the boundary nearest the middle


def test_prompts_are_seeded_and_identical_across_runs():
    template = RulerTemplate(ByteTokenizer())
    for task in TASKS:
        first = [ruler_trial(template, task, 800, t, seed=5).tokens for t in range(3)]
        assert first == [ruler_trial(RulerTemplate(ByteTokenizer()), task, 800, t, seed=5).tokens for t in range(3)]
        assert len({tuple(x) for x in first}) == 3
        assert ruler_trial(template, task, 800, 0, seed=6).tokens != first[0]


def test_settings_change_the_counts_and_bad_ones_are_named():
    template = RulerTemplate(ByteTokenizer(), RulerSettings(digits=4, values=2, queries=3, hops=2, chains=3))
    assert [len(v) for v in ruler_trial(template, "niah_multivalue", 900, 0, 0).answers] == [4, 4]
    assert len(ruler_trial(template, "niah_multiquery", 900, 0, 0).answers) == 3
    vt = ruler_trial(template, "variable_tracking", 900, 0, 0)
    assert len(vt.answers) == 3 and len(vt.needle_spans) == 9  # 3 chains of 3 assignments
    assert recovered_answers("variable_tracking", ByteTokenizer().decode(vt.tokens)) == vt.answers
    with pytest.raises(ValueError, match="ruler.values must be >= 1"):
        RulerSettings(values=0)
    with pytest.raises(ValueError, match="niah_multiquery prompt length 100 is too short: the minimum is"):
        ruler_trial(RulerTemplate(ByteTokenizer()), "niah_multiquery", 100, 0, 0)
    with pytest.raises(ValueError, match="unknown RULER task 'qa'"):
        RulerTemplate(ByteTokenizer()).prompt("qa", 500, random.Random(0))


@pytest.mark.parametrize("prediction,answers,expected_all,expected_part", [
    (" 1234567.", ["1234567"], 1.0, 1.0),
    (" 1234568.", ["1234567"], 0.0, 0.0),
    (" 123, 456 and 999", ["123", "456", "789"], 2 / 3, 1.0),
    (" 111, 222, 333, 444", ["444", "333", "222", "111"], 1.0, 1.0),  # order does not matter
    (" abcde, FGHIJ", ["ABCDE", "FGHIJ", "KLMNO", "PQRST"], 0.5, 1.0),  # case-insensitive
    ("", ["1"], 0.0, 0.0),
])
def test_ruler_scores_on_hand_checked_cases(prediction, answers, expected_all, expected_part):
    assert score_all(prediction, answers) == pytest.approx(expected_all)
    assert score_part(prediction, answers) == expected_part


def test_evaluation_tables_with_a_stand_in_model_that_gives_the_first_answer(monkeypatch, tmp_path):
    tokenizer = ByteTokenizer()
    template = RulerTemplate(tokenizer)
    answers = {tuple(ruler_trial(template, t, n, i, 0).tokens): ruler_trial(template, t, n, i, 0).answers
               for t in TASKS for n in (800, 1000) for i in range(2)}

    def first_answer(model, prompts, config):
        return [tokenizer.encode(" " + answers[tuple(p)][0] + ".")[: config.max_new_tokens] for p in prompts]

    monkeypatch.setattr(ruler_eval, "generate", first_answer)
    model = Transformer(ModelConfig(vocab_size=256, dim=16, n_layers=1, n_heads=2, segment_len=32))
    results = ruler_eval.evaluate_ruler(model, tokenizer, [800, 1000], TASKS, trials=2, batch_size=2)
    full = {"niah_single_repeat": 1.0, "niah_single_varied": 1.0, "niah_multikey": 1.0, "niah_multivalue": 0.25,
            "niah_multiquery": 0.25, "variable_tracking": 0.2}
    assert results.cells("all") == pytest.approx({(t, n): v for t, v in full.items() for n in (800, 1000)})
    assert set(results.cells("part").values()) == {1.0}
    paths = ruler_eval.write_outputs(results, tmp_path)
    table = paths["table"].read_text()
    assert "| niah_multivalue | 25.0 | 25.0 |" in table and "| mean | 61.7 | 61.7 |" in table
    assert paths["heatmap"].read_bytes()[:8] == PNG
    assert len(paths["trials"].read_text().splitlines()) == len(TASKS) * 2 * 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=2, segment_len=64,
                                    attention_backend="sdpa"))
    directory = tmp_path_factory.mktemp("ruler_ckpt")
    save_model(directory, model, tokenizer="byte")
    return directory


def test_run_ruler_task_through_the_eval_config(checkpoint, tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "eval"), version_base="1.3"):
        cfg = compose("evaluate", overrides=["task=ruler", f"checkpoint={checkpoint}", f"out_dir={tmp_path}",
                                             "task.lengths=[700]", "task.trials=1", "task.tasks=[niah_multivalue]",
                                             "task.settings.values=2", "task.max_new_tokens=3"])
    summary = run(cfg)
    trial = json.loads((tmp_path / "ruler_trials.jsonl").read_text())
    assert len(trial["answers"]) == 2 and len(trial["prediction"]) <= 3  # 3 bytes decoded
    assert summary["metrics"]["all"]["cells"]["niah_multivalue"]["700"] == trial["all"]


def test_python_m_evaluation_task_ruler_end_to_end(checkpoint, tmp_path):
    command = [sys.executable, "-m", "evaluation", "task=ruler", f"checkpoint={checkpoint}", f"out_dir={tmp_path}",
               "task.lengths=[800]", "task.trials=1", "threads=1"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "ruler_summary.json").read_text())
    assert summary["tasks"] == list(TASKS) and summary["lengths"] == [800]
    assert "| variable_tracking |" in done.stdout and (tmp_path / "ruler_heatmap.png").read_bytes()[:8] == PNG
