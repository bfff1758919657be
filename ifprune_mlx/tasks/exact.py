"""Exact-answer tasks: a deterministic check of a short generated answer.

Each record has `check` (how to score) and `answers`:
- "number": the numbers the response states beyond those of the prompt are exactly one, the
  answer ("7 + 5 = 12" is right for "What is 7 plus 5?"; "12, or maybe 13" is not);
- "text": one of the answers appears as a whole word or phrase, case-insensitively;
- "text_case": the same, case-sensitively ("RIVER" for "write river in capitals");
- "yesno": the response's first word is the answer, yes or no;
- "json": the response holds a JSON object (markdown fences allowed) with every key of the
  answer object and equal values (strings compared case-insensitively); extra keys are allowed.
"""

from __future__ import annotations

import json
import math
import re

_NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")
CHECKS = ("number", "text", "text_case", "yesno", "json")


def stated_numbers(text: str) -> set[float]:
    """The non-negative numbers written in digits in a text ("1,000" is 1000)."""
    return {float(n.replace(",", "")) for n in _NUMBER.findall(text)}


def check_number(prompt: str, response: str, answer: str) -> bool:
    new = stated_numbers(response) - stated_numbers(prompt)
    return len(new) == 1 and math.isclose(new.pop(), float(answer))


def check_text(response: str, answers: list[str], case_sensitive: bool = False) -> bool:
    flags = 0 if case_sensitive else re.IGNORECASE
    return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", response, flags) for a in answers)


def check_yes_no(response: str, answer: str) -> bool:
    first = re.match(r"\W*(\w+)", response)
    return first is not None and first.group(1).lower() == answer


def check_json(response: str, answer: str) -> bool:
    found = _json_object(response)
    expected = json.loads(answer)
    return found is not None and all(k in found and _same(found[k], v) for k, v in expected.items())


def _json_object(text: str) -> dict | None:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        found = json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None
    return found if isinstance(found, dict) else None


def _same(got, expected) -> bool:
    if isinstance(expected, str):
        return isinstance(got, str) and got.strip().casefold() == expected.casefold()
    if isinstance(expected, bool) or isinstance(got, bool):
        return got is expected
    if isinstance(expected, (int, float)):
        return isinstance(got, (int, float)) and math.isclose(got, expected)
    return got == expected


def is_correct(doc: dict, response: str) -> bool:
    """Whether a response answers a record correctly, by the record's check."""
    check, answers = doc["check"], doc["answers"]
    if check == "number":
        return check_number(doc["prompt"], response, answers[0])
    if check in ("text", "text_case"):
        return check_text(response, answers, case_sensitive=check == "text_case")
    if check == "yesno":
        return check_yes_no(response, answers[0])
    if check == "json":
        return check_json(response, answers[0])
    raise ValueError(f"record {doc.get('key')!r} has check {check!r}; expected one of {', '.join(CHECKS)}")


def process_results(doc: dict, results: list[str]) -> dict:
    """lm-eval's per-record metric: acc is 1.0 when the answer is right."""
    return {"acc": float(is_correct(doc, results[0]))}
