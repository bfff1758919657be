"""The offline task files (ifprune_mlx/tasks): held-out distance rule, record formats, scoring
through lm-eval's own machinery with a canned LM, offline (no network, no nltk data)."""

import json
import socket
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ifprune_mlx.tasks import TASK_DIR, TASKS, read_records
from ifprune_mlx.tasks.distance import MAX_EDITS, MAX_JACCARD, clashes, jaccard, rule_violations, too_close, word_edits, words

ROOT = Path(__file__).resolve().parents[1]
IFEVAL_SIZES = {"ifprune_ifeval_dev": 120, "ifprune_ifeval_test": 300}  # the least number of prompts


def training_prompts() -> list[str]:
    """Every prompt of the SmolLM2 training data: the templates (data.jsonl) and the
    self-instruct files."""
    folder = ROOT / "examples" / "smollm2"
    prompts = []
    for file in [folder / "data.jsonl", *sorted(folder.glob("self_instruct*.jsonl"))]:
        lines = file.read_text().splitlines()
        assert "meta" in json.loads(lines[0])
        prompts += [json.loads(line)["prompt"] for line in lines[1:]]
    return prompts


def all_task_prompts() -> list[str]:
    return [r["prompt"] for name in TASKS for r in read_records(TASKS[name])]


# -- the distance rule ---------------------------------------------------------------------------

def test_words_and_examples():
    assert words("What's 2+2, Bob?") == ["what", "s", "2", "2", "bob"]
    assert word_edits(words("Name the capital of Peru."), words("Name the capital of Chile.")) == 1
    assert jaccard(["a", "b"], ["b", "c"]) == pytest.approx(1 / 3)
    assert too_close("Which city is the capital of France?", "Which city is the capital of Spain?")
    assert too_close("tell me a joke about cats", "about cats tell me a joke")  # Jaccard 1, many edits
    assert not too_close("Describe a rainy afternoon in a busy city.", "Convert 25 kilograms to grams.")


def test_rule_violations_names_both_kinds():
    lines = rule_violations(["Which city is the capital of Chile?", "Write a poem about rain.",
                             "Write a poem about snow."], ["Which city is the capital of Peru?"])
    assert len(lines) == 2
    assert "training prompt" in lines[0] and "Chile" in lines[0]
    assert "each other" in lines[1] and "snow" in lines[1]


def _brute_force(prompts, reference=None):
    pairs = ([(i, j) for i in range(len(prompts)) for j in range(i + 1, len(prompts))] if reference is None
             else [(i, j) for i in range(len(prompts)) for j in range(len(reference))])
    ref = prompts if reference is None else reference
    return {(i, j) for i, j in pairs if too_close(prompts[i], ref[j])}


prompt_lists = st.lists(st.lists(st.sampled_from("a b c d e f g".split()), max_size=7).map(" ".join), max_size=8)


@settings(max_examples=60, deadline=None)
@given(prompt_lists, prompt_lists)
def test_clashes_match_brute_force(prompts, reference):
    assert {(c.i, c.j) for c in clashes(prompts, reference)} == _brute_force(prompts, reference)
    assert {(c.i, c.j) for c in clashes(prompts)} == _brute_force(prompts)
    for c in clashes(prompts, reference):
        assert c.edits <= MAX_EDITS or c.jaccard >= MAX_JACCARD


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from("abcd"), max_size=8), st.lists(st.sampled_from("abcd"), max_size=8))
def test_word_edits_is_a_distance(a, b):
    assert word_edits(a, b) == word_edits(b, a)
    assert (word_edits(a, b) == 0) == (a == b)
    assert abs(len(a) - len(b)) <= word_edits(a, b) <= max(len(a), len(b))


def test_task_prompts_are_held_out():
    """No task prompt within two word edits or word-Jaccard >= 0.5 of any SmolLM2 training
    prompt (train or held-out split), nor of another task prompt."""
    problems = rule_violations(all_task_prompts(), training_prompts())
    assert not problems, "\n".join(problems[:20])


# -- the record formats --------------------------------------------------------------------------

def test_every_task_has_a_yaml_and_data():
    for name, data_file in TASKS.items():
        config = (TASK_DIR / f"{name}.yaml").read_text()
        assert f"task: {name}\n" in config and f"data_file: {data_file}\n" in config
        assert read_records(data_file)


def test_ifeval_records():
    from ifprune_mlx.tasks.ifeval import checkers

    checkers()  # first: imports lm-eval's checkers without a download
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT

    kinds, keys = set(), set()
    for name, least in IFEVAL_SIZES.items():
        if name not in TASKS:
            continue
        records = read_records(TASKS[name])
        assert len(records) >= least, name
        for r in records:
            assert set(r) == {"key", "prompt", "instruction_id_list", "kwargs"}
            assert r["key"] not in keys
            keys.add(r["key"])
            assert 1 <= len(r["instruction_id_list"]) == len(r["kwargs"]) <= 2
            for kind, kwargs in zip(r["instruction_id_list"], r["kwargs"]):
                kinds.add(kind)
                _assert_fully_specified(INSTRUCTION_DICT[kind], kind, kwargs, r["prompt"])
    assert len(kinds) >= 15


def _assert_fully_specified(cls, kind, kwargs, prompt):
    """Every argument given: lm-eval draws a missing one at random, so the check would change."""
    import random

    descriptions = set()
    for seed in range(4):
        random.seed(seed)
        instruction = cls(kind)
        descriptions.add(instruction.build_description(**kwargs))
    assert len(descriptions) == 1, (prompt, kind, kwargs)
    for name, value in kwargs.items():
        assert value, (prompt, kwargs)  # lm-eval drops falsy arguments (0, "") before checking
        if name in STATED_IN_PROMPT:
            for word in value if isinstance(value, list) else [value]:
                assert word.lower() in prompt.lower(), (prompt, name, word)


# arguments whose text the prompt itself must state (the rest are numbers and relations)
STATED_IN_PROMPT = {"keywords", "forbidden_words", "keyword", "letter", "end_phrase", "postscript_marker",
                    "first_word", "section_spliter", "prompt_to_repeat"}


# -- lm-eval end to end, offline ---------------------------------------------------------------

SATISFY = {
    "change_case:english_lowercase": "here is a short answer written only in lowercase letters.",
    "startend:quotation": '"Here is a short answer, wrapped in double quotation marks."',
    "detectable_format:json_format": '```json\n{"answer": "short", "valid": true}\n```',
}
VIOLATE = {
    "change_case:english_lowercase": "Here Is A Short Answer With Capitals.",
    "startend:quotation": "Here is a short answer without quotation marks.",
    "detectable_format:json_format": "{answer: short, valid: yes",
}


def _canned_lm(answers: dict):
    from lm_eval.api.model import LM

    class Canned(LM):
        def generate_until(self, requests):
            return [answers.get(request.args[0], "") for request in requests]

        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

    return Canned()


def _evaluate_offline(monkeypatch, task, answers, limit=None):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def no_network(*_args, **_kwargs):
        raise OSError("this test runs offline")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    results = simple_evaluate(model=_canned_lm(answers), tasks=[task], limit=limit,
                              task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False))
    return results["results"][task]


@pytest.mark.parametrize("table", [SATISFY, VIOLATE], ids=["satisfy", "violate"])
def test_ifeval_dev_scores_through_lm_eval(monkeypatch, table):
    """A canned LM answers the single-instruction prompts of three kinds (satisfying or violating
    them) and leaves every other prompt empty (always a miss); lm-eval's scores must agree."""
    records = read_records(TASKS["ifprune_ifeval_dev"])
    answers = {r["prompt"]: table[r["instruction_id_list"][0]] for r in records
               if len(r["instruction_id_list"]) == 1 and r["instruction_id_list"][0] in table}
    assert len(answers) >= 10
    scores = _evaluate_offline(monkeypatch, "ifprune_ifeval_dev", answers)
    expected = len(answers) / len(records) if table is SATISFY else 0.0
    instructions = sum(len(r["instruction_id_list"]) for r in records)
    for level in ("strict", "loose"):
        assert scores[f"prompt_level_{level}_acc,none"] == pytest.approx(expected)
        assert scores[f"inst_level_{level}_acc,none"] == pytest.approx(expected * len(records) / instructions)


def test_sentences_counted_without_nltk_data():
    from ifprune_mlx.tasks.ifeval import checkers
    from lm_eval.tasks.ifeval import instructions_util

    checkers()
    assert instructions_util.count_sentences("It rained. We stayed in! Did you?") == 3
    assert instructions_util.nltk.word_tokenize("GO TEAM, go!") == ["GO", "TEAM", ",", "go", "!"]


# -- exact-answer tasks --------------------------------------------------------------------------

EXACT_SIZES = {"ifprune_exact_dev": 60, "ifprune_exact_test": 150}


def test_exact_checks():
    from ifprune_mlx.tasks.exact import check_json, check_number, check_text, check_yes_no, stated_numbers

    assert stated_numbers("1,000 g is 1 kg, or 1.5 lb") == {1000.0, 1.0, 1.5}
    assert check_number("What is 7 plus 5?", "7 + 5 = 12.", "12")
    assert not check_number("What is 7 plus 5?", "It is 12, or maybe 13.", "12")
    assert not check_number("What is 7 plus 5?", "7 plus 5", "12")
    assert check_text("The capital is Rome.", ["Rome"])
    assert not check_text("Romeo lived in Verona.", ["Rome"])
    assert check_text("Painted by Leonardo da Vinci.", ["Leonardo", "da Vinci"])
    assert check_text("It reads RIVER.", ["RIVER"], case_sensitive=True)
    assert not check_text("It reads River.", ["RIVER"], case_sensitive=True)
    assert check_yes_no("No, penguins cannot fly.", "no") and check_yes_no('"Yes."', "yes")
    assert not check_yes_no("Penguins? No.", "no")
    assert check_json('```json\n{"city": "oslo", "extra": 1}\n```', '{"city": "Oslo"}')
    assert not check_json('{"city": "Oslo"', '{"city": "Oslo"}')
    assert not check_json('{"done": 1}', '{"done": true}')
    assert not check_json('{"age": "3"}', '{"age": 3}')


def _right_answer(r):
    return {"number": f"The answer is {r['answers'][0]}.", "text": f"It is {r['answers'][0]}.",
            "text_case": f"It is {r['answers'][0]}.", "yesno": f"{r['answers'][0].title()}.",
            "json": r["answers"][0]}[r["check"]]


def _wrong_answer(r):
    if r["check"] == "number":
        return f"The answer is {float(r['answers'][0]) + 1:g}."
    if r["check"] == "yesno":
        return "Yes." if r["answers"][0] == "no" else "No."
    if r["check"] == "text_case":
        return f"It is {r['answers'][0].lower()}."
    return {"text": "I am not sure about that.", "json": '{"answer": null}'}[r["check"]]


def test_exact_records():
    from ifprune_mlx.tasks.exact import CHECKS, is_correct

    kinds, keys = {}, set()
    for name, least in EXACT_SIZES.items():
        if name not in TASKS:
            continue
        records = read_records(TASKS[name])
        assert len(records) >= least, name
        kinds[name] = {r["kind"] for r in records}
        for r in records:
            assert set(r) == {"key", "kind", "prompt", "check", "answers"} and r["check"] in CHECKS
            assert r["key"] not in keys
            keys.add(r["key"])
            assert is_correct(r, _right_answer(r)), r
            if r["check"] in ("text", "text_case"):  # else echoing the question would score
                assert not is_correct(r, r["prompt"]), r
            assert not is_correct(r, _wrong_answer(r)), r
    assert len(set(map(frozenset, kinds.values()))) <= 1, kinds  # dev and test: the same kinds


def test_exact_dev_scores_through_lm_eval(monkeypatch):
    """A canned LM answers every other question right; lm-eval's accuracy must be that share."""
    records = read_records(TASKS["ifprune_exact_dev"])
    answers = {r["prompt"]: (_right_answer(r) if n % 2 == 0 else _wrong_answer(r)) for n, r in enumerate(records)}
    scores = _evaluate_offline(monkeypatch, "ifprune_exact_dev", answers)
    assert scores["acc,none"] == pytest.approx(sum(n % 2 == 0 for n in range(len(records))) / len(records))


def test_read_records_errors(tmp_path, monkeypatch):
    from ifprune_mlx.tasks import TaskDataError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ifeval_dev.jsonl").write_text('{"shadow": true}\n')
    assert read_records("ifeval_dev.jsonl")[0]["key"] == 1000  # a bare name is the shipped file
    assert read_records("./ifeval_dev.jsonl") == [{"shadow": True}]
    with pytest.raises(TaskDataError, match="not found"):
        read_records("no_such_task.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(TaskDataError, match=r"bad.jsonl:2 is a list"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"a": 1\n')
    with pytest.raises(TaskDataError, match=r"bad.jsonl:1 is not JSON"):
        read_records(tmp_path / "bad.jsonl")
