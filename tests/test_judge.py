"""The verdict's parts, pinned by hand: the judge (and a plain re-implementation of its
formula, an independent path to the vectorised code), paired comparisons and their
bootstrap intervals, bits per byte and continuation log-probabilities, the n-gram
decontamination, and the built-in multiple-choice benchmark."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from tasks.lib import benchmarks, compare, contamination, scoring
from tasks.lib.judge import Judge, repetition, words

LN2 = math.log(2)
CORPUS = [("What is alpha?", "alpha beta gamma"), ("What is delta?", "beta delta"), ("Explain zeta.", "beta epsilon zeta")]


def plain_score(answer: str, prompt: str, reference: str, finished: bool, corpus, rp: float, up: float, others: list[str]) -> float:
    """The judge's formula, as its docstring states it, with sets and a loop."""
    refs = sorted({r for _, r in corpus})
    df: dict[str, int] = {}
    for r in refs:
        for w in set(words(r)):
            df[w] = df.get(w, 0) + 1
    idf = lambda w: math.log((len(refs) + 1) / (df.get(w, 0) + 1))  # noqa: E731
    pw = set(words(prompt))
    weight = lambda s: sum(idf(w) for w in s)  # noqa: E731

    def f(a: set, b: set) -> float:
        den = weight(a) + weight(b)
        return 2 * weight(a & b) / den if den > 0 else 0.0

    a = set(words(answer)) - pw
    contrast = f(a, set(words(reference)) - pw) - np.mean([f(a, set(words(o)) - pw) for o in others])
    return contrast - rp * repetition(answer) - (0.0 if finished else up)


def test_judge_by_hand():
    j = Judge(CORPUS, repetition_penalty=0.5, unfinished_penalty=0.3, contrast_references=2)
    # beta is in every reference: weight 0; every other word is in one of three: ln(4/2)
    assert j.idf[j.vocab["beta"]] == 0.0 and j.idf[j.vocab["gamma"]] == pytest.approx(LN2)
    # the answer has all of its reference beyond the prompt's words, and nothing of the others'
    assert j.score("gamma beta", "What is alpha?", "alpha beta gamma", True) == pytest.approx(1.0)
    # alpha is the prompt's word (no credit); delta is another prompt's: F = 1 with that one, 0
    # with its own and the third, so the contrast is 0 - 1/2; never ending the turn costs 0.3
    assert j.score("alpha delta", "What is alpha?", "alpha beta gamma", False) == pytest.approx(-0.5 - 0.3)
    assert j.score("What is alpha?", "What is alpha?", "alpha beta gamma", True) == 0.0  # a copy of the prompt
    assert j.score("", "What is alpha?", "alpha beta gamma", True) == 0.0
    # a constant answer: 1 on the prompt it happens to fit, -1/3 on the other two (see the docstring)
    qs, rs = [q for q, _ in CORPUS], [r for _, r in CORPUS]
    got = j.scores(["gamma"] * 3, qs, rs, [True] * 3)
    assert got == pytest.approx([1.0, -1 / 3, -1 / 3]) and got.mean() == pytest.approx(1 / 9)
    # trigrams gbg bgb gbg: 1 of 3 repeats, so the repetition penalty takes 0.5 / 3
    assert j.constant_scores(["gamma", "gamma beta gamma beta gamma"], qs, rs) == pytest.approx(
        np.array([[1.0, -1 / 3, -1 / 3], [1.0 - 0.5 / 3, -1 / 3 - 0.5 / 3, -1 / 3 - 0.5 / 3]]))
    # an unknown word weighs ln(N + 1): it dilutes the answer's precision
    assert j.score("gamma zork", "What is alpha?", "alpha beta gamma", True) == pytest.approx(
        2 * LN2 / ((LN2 + math.log(4)) + LN2) - 0.0)


def test_judge_matches_its_formula_on_random_inputs():
    """The sparse, vectorised judge against the plain formula above, on random texts."""
    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(40)] + ["the", "of", "a"]
    text = lambda k: " ".join(rng.choice(vocab) for _ in range(k))  # noqa: E731
    corpus = [(f"q {text(3)}", text(rng.randint(3, 12))) for _ in range(25)]
    j = Judge(corpus, 0.5, 0.3, 6)
    for _ in range(40):
        q, r = corpus[rng.randrange(len(corpus))]
        answer, fin = text(rng.randint(0, 15)), rng.random() < 0.7
        others = [j.refs[i] for i in j.others(q, r)]
        assert r not in others and len(others) == 6
        assert j.score(answer, q, r, fin) == pytest.approx(plain_score(answer, q, r, fin, corpus, 0.5, 0.3, others), abs=1e-9)
    cands = [text(rng.randint(1, 8)) for _ in range(6)]
    qs, rs = [q for q, _ in corpus[:5]], [r for _, r in corpus[:5]]
    by_matrix = j.constant_scores(cands, qs, rs)
    for i, c in enumerate(cands):
        assert by_matrix[i] == pytest.approx(j.scores([c] * 5, qs, rs, [True] * 5), abs=1e-12)


def test_judge_others_are_fixed_per_prompt_and_exclude_the_own_reference():
    j = Judge([(f"q{i}", f"answer number {i}") for i in range(30)], 0.5, 0.3, 8)
    a, b = j.others("q3", "answer number 3"), j.others("q3", "answer number 3")
    assert (a == b).all() and j.ref_index["answer number 3"] not in a and len(set(a.tolist())) == 8
    assert not (a == j.others("q4", "answer number 4")).all()
    with pytest.raises(ValueError, match="2 distinct"):
        Judge([("q", "same"), ("p", "same")], 0.5, 0.3, 4)
    with pytest.raises(ValueError, match="equally long"):
        j.scores(["a"], ["q"], [], [True])


def test_paired_comparison_by_hand():
    # prompt 1: A's samples 1 and 3 against B's 2: one loss and one win -> 0.5; prompt 2: a tie -> 0.5
    assert compare.per_prompt_wins([[1, 3], [5, 5]], [[2], [5]]) == pytest.approx([0.5, 0.5])
    assert compare.per_prompt_wins([[1, 2]], [[0, 3]]) == pytest.approx([0.5])  # 1>0, 1<3, 2>0, 2<3
    c = compare.compare(np.array([[1.0, 1.0]] * 10), np.array([[0.0]] * 10), seed=0)
    assert (c["win_rate"], c["win_ci_low"], c["win_ci_high"], c["diff"], c["prompts"]) == (1.0, 1.0, 1.0, 1.0, 10)
    with pytest.raises(ValueError, match="same prompts"):
        compare.per_prompt_wins(np.zeros((3, 1)), np.zeros((2, 1)))
    assert compare.prompts_for_half_width(0.06) == 267 and compare.worst_case_half_width(267) <= 0.06 < compare.worst_case_half_width(266)


def test_bootstrap_interval_against_known_values_and_scipy():
    from scipy import stats

    rng = np.random.default_rng(3)
    wins = (rng.random(400) < 0.7).astype(float)
    low, high = compare.bootstrap_interval(wins, seed=1, resamples=4000)
    p, se = wins.mean(), math.sqrt(wins.mean() * (1 - wins.mean()) / 400)
    assert low == pytest.approx(p - 1.96 * se, abs=0.006) and high == pytest.approx(p + 1.96 * se, abs=0.006)
    ref = stats.bootstrap((wins,), np.mean, n_resamples=4000, method="percentile", random_state=5).confidence_interval
    assert low == pytest.approx(ref.low, abs=0.006) and high == pytest.approx(ref.high, abs=0.006)
    assert compare.bootstrap_interval(wins, seed=1, resamples=4000) == (low, high)  # seeded
    diffs = rng.normal(0.1, 1.0, 500)
    low, high = compare.bootstrap_interval(diffs, seed=2, resamples=4000)
    se = diffs.std(ddof=1) / math.sqrt(500)
    assert low == pytest.approx(diffs.mean() - 1.96 * se, abs=0.01) and high == pytest.approx(diffs.mean() + 1.96 * se, abs=0.01)


@pytest.fixture(scope="module")
def tok():
    from tasks.lib.bpe import train_bpe

    return train_bpe(iter(["Serialize obj to a JSON formatted str. Return the number of items, café."] * 30), 300, 1)


def test_token_bytes_add_up_to_the_text(tok):
    b = scoring.token_bytes(tok)
    for text in ("Serialize obj to JSON.", "café au lait", "x"):
        assert b[tok.encode(text).ids].sum() == len(text.encode("utf-8"))
    assert b[tok.token_to_id("<|endoftext|>")] == 0 and b[tok.token_to_id("<|pad|>")] == 0


def uniform_model(vocab: int, seq: int = 32):
    from tasks.lib.model import GPT, ModelConfig

    m = GPT(ModelConfig(vocab_size=vocab, n_layer=1, n_head=2, d_model=16, max_seq_len=seq, tie_embeddings=False)).eval()
    with torch.no_grad():
        m.head.weight.zero_()  # every next token equally likely: loss ln V per token
    return m


def test_bits_per_byte_by_hand(tok):
    V = tok.get_vocab_size()
    eot = tok.token_to_id("<|endoftext|>")
    ids = tok.encode("Serialize obj to JSON.").ids + [eot] + tok.encode("café").ids
    tokens = np.array([eot, *ids], dtype=np.uint16)
    b = scoring.token_bytes(tok)
    out = scoring.corpus_losses(uniform_model(V), tokens, b, seq_len=4, batch=3)
    text_targets = [t for t in ids if b[t] > 0]  # <|endoftext|> as a target counts in perplexity only
    assert out["tokens"] == len(ids) and out["bytes"] == len("Serialize obj to JSON.café".encode())
    assert out["bits_per_byte"] == pytest.approx(len(text_targets) * math.log(V) / (LN2 * out["bytes"]), rel=1e-5)
    assert out["perplexity"] == pytest.approx(V, rel=1e-4)
    assert scoring.corpus_losses(uniform_model(V), tokens, b, seq_len=4, max_tokens=3)["tokens"] == 3


def test_continuation_logprobs_match_a_direct_forward_pass(tok):
    from tasks.lib.model import GPT, ModelConfig

    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, d_model=16, max_seq_len=16)).eval()
    ctx, cont = [1, 5, 9, 7], [11, 3, 3]
    (lp, greedy), = scoring.continuation_logprobs(m, [(ctx, cont)], pad_id=0)
    with torch.no_grad():
        logp = torch.log_softmax(m(torch.tensor([ctx + cont]))[0][0].float(), -1)
    want = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    assert lp == pytest.approx(want, abs=1e-5)
    assert greedy == all(int(logp[len(ctx) - 1 + i].argmax()) == t for i, t in enumerate(cont))
    # a batch with another, longer item (right padding) gives the same numbers; a context too long loses its start
    long_ctx = list(range(20, 40))
    both = scoring.continuation_logprobs(m, [(ctx, cont), (long_ctx, [4, 4])], pad_id=0)
    assert both[0][0] == pytest.approx(lp, abs=1e-5)
    alone = scoring.continuation_logprobs(m, [(long_ctx[-15:], [4, 4])], pad_id=0)
    assert both[1][0] == pytest.approx(alone[0][0], abs=1e-5)
    V = tok.get_vocab_size()
    assert scoring.continuation_logprobs(uniform_model(V), [([1], [2, 3, 4])], 0)[0][0] == pytest.approx(-3 * math.log(V), rel=1e-5)


def test_multiple_choice_picks_by_logprob_and_by_logprob_per_character(tok):
    V = tok.get_vocab_size()
    t_ids = lambda s: tok.encode(s).ids  # noqa: E731
    items = [{"context": "Q: x\nA:", "choices": ["Serialize obj to a JSON formatted str.", "x"], "gold": 1},
             {"context": "Q: y\nA:", "choices": ["Serialize obj", "Return the number of items, café."], "gold": 1}]
    # uniform model: the choice with fewer tokens has the higher log-probability; per
    # character, the one with more characters per token
    out = scoring.multiple_choice(uniform_model(V, 64), tok, items, [0], t_ids, 0)
    n_tok = [[len(t_ids(" " + c)) for c in it["choices"]] for it in items]
    per_byte = [[-n * math.log(V) / len(c) for n, c in zip(ns, it["choices"])] for ns, it in zip(n_tok, items)]
    acc = np.mean([int(np.argmin(ns)) == it["gold"] for ns, it in zip(n_tok, items)])
    acc_norm = np.mean([int(np.argmax(pb)) == it["gold"] for pb, it in zip(per_byte, items)])
    assert (out["acc"], out["acc_norm"], out["items"], out["chance"]) == (acc, acc_norm, 2, 0.5)


def test_ngram_contamination_by_hand():
    idx = contamination.NgramIndex({"reference": ["Alpha beta gamma delta.", "too short", "x y z w"]}, n=3)
    idx.scan("pretrain:a", ["nothing here", "say ALPHA, beta; gamma!"])  # normalised like dedup: case and punctuation
    idx.scan("sft", ["x y", "z w"])  # an n-gram across two documents is not one
    assert idx.dirty().tolist() == [True, False, False]
    assert idx.report() == {"ngram": 3, "items": 3, "dirty": 1,
                            "reference": {"checked": 2, "too_short": 1, "dirty_pretrain:a": 1, "dirty_sft": 0}}
    h, doc = contamination.ngram_hashes(["a b c d", "e f"], 2)
    assert doc.tolist() == [0, 0, 0, 1] and len(set(h.tolist())) == 4
    assert (contamination.ngram_hashes(["b c"], 2)[0] == h[1]).all()


def test_doc_match_items_are_seeded_and_hold_the_right_answer_once():
    ex = lambda i: {"id": f"python_qa/f{i}", "messages": [{"role": "user", "content": f"What does `f{i}` do?"},  # noqa: E731
                                                          {"role": "assistant", "content": f"Return item {i} of the list. More text."}]}
    examples = [ex(i) for i in range(10)]
    items = benchmarks.doc_match(examples, [e["messages"][1]["content"] for e in examples], 4, seed=1)
    assert len(items) == 10 and items == benchmarks.doc_match(examples, [e["messages"][1]["content"] for e in examples], 4, seed=1)
    for it, e in zip(items, examples):
        assert it["choices"][it["gold"]] == benchmarks.first_sentence(e["messages"][1]["content"]) == f"Return item {e['id'][-1]} of the list."
        assert len(set(it["choices"])) == 4 and it["context"] == f"Q: {e['messages'][0]['content']}\nA:"
    assert {it["gold"] for it in items} != {items[0]["gold"]}  # the right answer moves
    assert benchmarks.first_sentence("One two. Three") == "One two." and benchmarks.first_sentence("a " * 40) == " ".join(["a"] * 32)


JUDGE_IN_A_PROCESS = """
import sys
from tasks.lib import corpora
from tasks.lib.instructions import python_qa
from tasks.lib.judge import Judge
ex = list(python_qa(200, 0))
refs = [e["messages"][1]["content"] for e in ex]
qs = [e["messages"][0]["content"] for e in ex]
j = Judge(list(zip(qs, refs)), 0.5, 0.3, 16)
s = j.scores([refs[(i + 1) % len(refs)] + " " + qs[i] for i in range(len(refs))], qs, refs, [True] * len(refs))
c = j.constant_scores(refs[:20], qs, refs)
print(repr(s.tolist()), repr(c.tolist()))
"""


def test_judge_scores_are_bit_identical_under_any_hash_seed():
    """Python randomises the order of a set of strings per process (PYTHONHASHSEED): scores
    summed over word sets must not depend on it, or a fresh clone's report differs in the
    last bits from the committed one."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    outs = set()
    for seed in ("1", "2", "3"):
        res = subprocess.run([sys.executable, "-c", JUDGE_IN_A_PROCESS], cwd=repo, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(repo)})
        assert res.returncode == 0, res.stderr[-2000:]
        outs.add(res.stdout)
    assert len(outs) == 1
