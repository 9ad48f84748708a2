"""The `gold` judge: a programmatic stand-in for human labelers, used on the offline default.

No human preference data ships offline, so the default ranks completions with a plain,
documented rule instead of people. Score of a completion given the reference answer:

    F1 of word overlap with the reference
    - repetition_penalty * share of repeated word 3-grams
    - unfinished_penalty  if the model never ended its turn

It rewards answers that say what the documentation says, concisely, and that stop. It is a
stand-in: the same pipeline takes human rankings with `preferences.labeler: file`.
"""

from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def overlap_f1(candidate: str, reference: str) -> float:
    c, r = Counter(words(candidate)), Counter(words(reference))
    common = sum((c & r).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(c.values()), common / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def repetition(text: str) -> float:
    w = words(text)
    grams = list(zip(w, w[1:], w[2:]))
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def gold_score(candidate: str, reference: str, finished: bool, repetition_penalty: float = 0.5, unfinished_penalty: float = 0.3) -> float:
    return overlap_f1(candidate, reference) - repetition_penalty * repetition(candidate) - (0.0 if finished else unfinished_penalty)
