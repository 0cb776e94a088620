"""VQA accuracy of generated answers: the VQA benchmark's answer normalisation, then exact match.

Normalisation (the steps of the VQA evaluation, applied to the prediction and to every reference):
lower case, tabs and newlines to spaces; each punctuation mark is dropped where it touches a space (or the text
has a digit-comma-digit group) and becomes a space elsewhere; a period is dropped unless a digit follows it
("3.5" stays); number words zero..ten (and "none") become digits; the articles a, an, the are dropped;
apostrophe-less contractions get their apostrophe ("dont" -> "don't"); words are joined by single spaces.

Score of one question (:func:`vqa_score`): with a single reference, 1 if the normalised prediction equals it,
else 0; with several (VQAv2's ten human answers), min(1, matching references / 3), the benchmark's rule.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

from omnibal_pl.errors import DataError

_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "didnt": "didn't", "isnt": "isn't", "arent": "aren't",
                 "wasnt": "wasn't", "werent": "weren't", "cant": "can't", "couldnt": "couldn't", "wont": "won't",
                 "wouldnt": "wouldn't", "shouldnt": "shouldn't", "hasnt": "hasn't", "havent": "haven't",
                 "hadnt": "hadn't", "im": "i'm", "ive": "i've", "youre": "you're", "theyre": "they're",
                 "thats": "that's", "whats": "what's", "wheres": "where's", "whos": "who's", "its": "it's",
                 "lets": "let's", "theres": "there's"}


def normalize_answer(text: str) -> str:
    """The VQA normalisation of an answer (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    commas_in_numbers = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCTUATION:
        touches_space = f"{p} " in text or f" {p}" in text
        text = text.replace(p, "" if touches_space or commas_in_numbers else " ")
    text = _PERIOD_NOT_BEFORE_DIGIT.sub("", text)
    words = [_CONTRACTIONS.get(w, _NUMBERS.get(w, w)) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_score(prediction: str, references: Sequence[str]) -> float:
    """One question's score in [0, 1] (see the module docstring)."""
    if not references:
        raise DataError("a VQA question needs at least one reference answer")
    predicted = normalize_answer(prediction)
    matches = sum(normalize_answer(r) == predicted for r in references)
    return float(matches > 0) if len(references) == 1 else min(1.0, matches / 3.0)


def references_of(question: dict) -> list[str] | None:
    """A question's reference answers: ``answer`` (a string) or ``answers`` (strings, or VQAv2's
    ``{"answer": ...}`` records); None when it has neither."""
    if "answers" in question:
        return [a["answer"] if isinstance(a, dict) else str(a) for a in question["answers"]]
    if "answer" in question:
        return [str(question["answer"])]
    return None


def vqa_accuracy(questions: Iterable[dict], predictions: Iterable[str]) -> tuple[float, int]:
    """(mean score, questions scored) over the questions that carry reference answers (0.0, 0 when none does)."""
    scores = [vqa_score(p, refs) for q, p in zip(questions, predictions) if (refs := references_of(q)) is not None]
    return (sum(scores) / len(scores) if scores else 0.0), len(scores)
