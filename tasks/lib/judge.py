"""The `gold` judge: a programmatic stand-in for human labelers, validated against baselines.

No human preference data ships offline, so the default ranks completions (preferences), reads
PPO's progress and gives the verdict (evaluate) with a documented rule. The judge knows a
corpus of (prompt, reference answer) pairs (every instruction example); it scores an answer
to one prompt by what the answer shares *specifically* with that prompt's reference:

    words(x)      lower-cased \\w+ tokens of x, as a set, minus the words of the prompt
                  (restating the question earns nothing; a copy of the prompt is empty)
    idf(w)        ln((N + 1) / (df(w) + 1)) over the N references of the corpus: a word in
                  every reference weighs 0, a word in none ln(N + 1)
    F(a, r)       weighted F1 of the two word sets = 2 idf(a & r) / (idf(a) + idf(r)),
                  where idf(S) sums idf over S (0 when both sets are empty)
    contrast      F(answer, own reference) - mean F(answer, r) over `contrast_references`
                  other references (a fixed, seeded sample per prompt)
    score         contrast - repetition_penalty * share of repeated word 3-grams
                  - unfinished_penalty if the answer never ended its turn

Why each part: generic words ("Return the value of the object") are in most references and
weigh almost nothing; an answer that is not about this prompt matches the other references
as well as its own, so the contrast takes away what it got by chance. A constant answer, the
same for every prompt, therefore scores about 0 in expectation over prompts whatever it says
(its own-reference match has the same distribution as its match with other references); a
copy of the prompt scores 0; another prompt's reference scores about 0; the reference
itself scores about 1 minus its mean overlap with the others. The evaluate stage measures
exactly these baselines on every run (README, "Evaluation").

What it does not see, so how it can still be gamed: word order and grammar, negation and
truth ("does not serialize" matches "serialize"), synonyms (a correct paraphrase in other
words scores low), and answers that name the reference's rare words without meaning them.
It is a stand-in: the same pipeline takes human rankings with `preferences.labeler: file`.

    judge = Judge([(prompt, reference), ...], repetition_penalty=0.5, unfinished_penalty=0.3, contrast_references=64)
    judge.score("Serialize obj to a JSON formatted str.", "What does `json.dumps` do?", reference, finished=True)
    judge.scores(answers, prompts, references, finished)          # many at once (vectorised)
    judge.constant_scores(candidates, prompts, references)        # (candidates x prompts) for the best constant
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def repetition(text: str) -> float:
    """Share of the word 3-grams of `text` that repeat an earlier one (0 for < 3 words)."""
    w = words(text)
    grams = list(zip(w, w[1:], w[2:]))
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


class Judge:
    """The gold judge over a corpus of (prompt, reference) pairs (see the module docstring)."""

    def __init__(self, corpus: Sequence[tuple[str, str]], repetition_penalty: float, unfinished_penalty: float,
                 contrast_references: int):
        refs = sorted({r for _, r in corpus})  # each distinct reference once, in a fixed order
        if len(refs) < 2:
            raise ValueError("the judge needs at least 2 distinct reference answers")
        self.rp, self.up, self.m = repetition_penalty, unfinished_penalty, min(contrast_references, len(refs) - 1)
        self.refs = refs
        self.ref_index = {r: i for i, r in enumerate(refs)}
        self.vocab: dict[str, int] = {}
        ref_sets = [set(words(r)) for r in refs]
        for s in ref_sets:
            for w in sorted(s):
                self.vocab.setdefault(w, len(self.vocab))
        df = np.zeros(len(self.vocab))
        for s in ref_sets:
            df[[self.vocab[w] for w in s]] += 1
        n = len(refs)
        self.idf = np.log((n + 1) / (df + 1))
        self.unknown_idf = math.log(n + 1)  # a word no reference has: as rare as a word can be
        self.R = self._matrix(ref_sets)  # references, binary (n_refs x V)

    # ------------------------------------------------------------------ building blocks
    def _matrix(self, sets: Sequence[set[str]]) -> sp.csr_matrix:
        """Binary rows over the corpus vocabulary (words outside it are left out: they can
        never overlap a reference; their weight is counted by `_weight`)."""
        rows, cols = [], []
        for i, s in enumerate(sets):
            c = sorted(self.vocab[w] for w in s if w in self.vocab)  # sorted: sums in one order in every process
            rows += [i] * len(c)
            cols += c
        return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(sets), len(self.vocab)))

    def _weight(self, s: set[str]) -> float:
        # fsum: exactly rounded whatever the order; a set's order changes with Python's hash seed
        return math.fsum(self.idf[self.vocab[w]] if w in self.vocab else self.unknown_idf for w in s)

    def others(self, prompt: str, reference: str) -> np.ndarray:
        """Indices of the `contrast_references` other references compared with answers to this
        prompt: a sample seeded by the prompt and reference, so the same on every call."""
        seed = int.from_bytes(hashlib.sha256(f"{prompt}\x00{reference}".encode()).digest()[:8], "big")
        own = self.ref_index.get(reference)
        pool = np.arange(len(self.refs)) if own is None else np.delete(np.arange(len(self.refs)), own)
        return np.sort(np.random.default_rng(seed).choice(pool, size=self.m, replace=False))

    def _item(self, prompt: str, reference: str):
        """What scoring answers to one prompt needs: the prompt's words, and the own and other
        references without them, as idf-weighted rows and their total weights."""
        pw = set(words(prompt))
        keep = np.ones(len(self.vocab))
        keep[[self.vocab[w] for w in pw if w in self.vocab]] = 0.0
        w_keep = self.idf * keep
        own_set = set(words(reference)) - pw
        own = self._matrix([own_set]).multiply(w_keep[None, :]).tocsr()
        oth = self.R[self.others(prompt, reference)].multiply(w_keep[None, :]).tocsr()
        return pw, own, self._weight(own_set), oth, np.asarray(oth.sum(1)).ravel()

    @staticmethod
    def _dice(overlap: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
        den = wa + wb
        return np.divide(2 * overlap, den, out=np.zeros(np.broadcast(overlap, den).shape), where=den > 0)

    def _contrast(self, A: sp.csr_matrix, wa: np.ndarray, item) -> np.ndarray:
        """F(answer, own) - mean F(answer, other) for rows of A (binary, prompt words removed)."""
        _, own, w_own, oth, w_oth = item
        f_own = self._dice(np.asarray((A @ own.T).todense()).ravel(), wa, w_own)
        f_oth = self._dice(np.asarray((A @ oth.T).todense()), wa[:, None], w_oth[None, :])
        return f_own - f_oth.mean(1)

    # ------------------------------------------------------------------ scoring
    def scores(self, answers: Sequence[str], prompts: Sequence[str], references: Sequence[str], finished: Sequence[bool]) -> np.ndarray:
        """The judge's score of each answer to its prompt (same-length sequences)."""
        if not (len(answers) == len(prompts) == len(references) == len(finished)):
            raise ValueError("answers, prompts, references and finished must be equally long")
        out = np.zeros(len(answers))
        groups: dict[tuple[str, str], list[int]] = {}
        for i, key in enumerate(zip(prompts, references)):
            groups.setdefault(key, []).append(i)
        for (prompt, reference), idx in groups.items():
            item = self._item(prompt, reference)
            sets = [set(words(answers[i])) - item[0] for i in idx]
            wa = np.array([self._weight(s) for s in sets])
            out[idx] = self._contrast(self._matrix(sets), wa, item)
        out -= self.rp * np.array([repetition(a) for a in answers])
        out -= self.up * (1 - np.asarray(finished, dtype=float))
        return out

    def score(self, answer: str, prompt: str, reference: str, finished: bool) -> float:
        return float(self.scores([answer], [prompt], [reference], [finished])[0])

    def constant_scores(self, candidates: Sequence[str], prompts: Sequence[str], references: Sequence[str]) -> np.ndarray:
        """(candidates x prompts) scores of each candidate given as the (finished) answer to
        every prompt: what the search for the best constant answer needs, in one pass per
        prompt instead of one per candidate and prompt."""
        sets = [set(words(c)) for c in candidates]
        C = self._matrix(sets)
        w_full = np.array([self._weight(s) for s in sets])
        rep = np.array([repetition(c) for c in candidates])
        out = np.zeros((len(candidates), len(prompts)))
        for j, (prompt, reference) in enumerate(zip(prompts, references)):
            item = self._item(prompt, reference)
            # the candidate's words minus this prompt's: its weight loses the prompt words it has
            w_prompt = np.array([self._weight(s & item[0]) for s in sets]) if item[0] else 0.0
            keep = np.ones(len(self.vocab))
            keep[[self.vocab[w] for w in item[0] if w in self.vocab]] = 0.0
            out[:, j] = self._contrast(C.multiply(keep[None, :]).tocsr(), w_full - w_prompt, item)
        return out - self.rp * rep[:, None]
