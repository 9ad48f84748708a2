"""Property tests (Hypothesis): invariants of the model and the data code that a single
hand-picked input can hide. Each property is checked against an independent computation
written here, over many drawn inputs (positions, split points, temperatures, weights, shard
counts, vocabulary sizes, input orders), not against the code's own figures.

    pytest tests/test_properties.py
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.lib.model import GPT, KVCache, ModelConfig, apply_rope, rope_tables

# small models, a bounded number of examples: the whole file runs in a few seconds
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tiny(positions: str = "rope", tie: bool = True, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=61, n_layer=2, n_head=2, d_model=16, max_seq_len=64, positions=positions,
                           tie_embeddings=tie)).eval()


MODEL = tiny()
TOKENS = st.lists(st.integers(0, 60), min_size=2, max_size=20)


# ----------------------------------------------------------------------------- positions
@FAST
@given(i=st.integers(0, 40), j=st.integers(0, 40), shift=st.integers(1, 20), seed=st.integers(0, 10_000))
def test_rope_scores_depend_only_on_the_distance(i, j, shift, seed):
    """q·k after rotation at (i, j) equals that at (i + s, j + s): positions are relative."""
    cfg = MODEL.cfg
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 1, 1, cfg.head_dim, generator=g), torch.randn(1, 1, 1, cfg.head_dim, generator=g)

    def score(a, b):
        ra, rb = rope_tables(cfg, torch.tensor([[a]])), rope_tables(cfg, torch.tensor([[b]]))
        return float((apply_rope(q, *ra) * apply_rope(k, *rb)).sum())

    assert score(i + shift, j + shift) == pytest.approx(score(i, j), abs=1e-4)
    # and the rotation keeps the norm (a rotation, not a rescaling)
    assert float(apply_rope(q, *rope_tables(cfg, torch.tensor([[i]]))).norm()) == pytest.approx(float(q.norm()), rel=1e-5)


@FAST
@given(tokens=TOKENS, shift=st.integers(1, 40))
def test_a_rope_model_is_invariant_to_shifting_every_position(tokens, shift):
    x = torch.tensor([tokens])
    pos = torch.arange(len(tokens))[None]
    if shift + len(tokens) > MODEL.cfg.max_seq_len:
        shift = MODEL.cfg.max_seq_len - len(tokens)
    with torch.no_grad():
        a = MODEL.hidden(x, positions=pos)
        b = MODEL.hidden(x, positions=pos + shift)
    assert torch.allclose(a, b, atol=1e-4)


def test_learned_positions_are_absolute():
    """The contrast that makes the test above meaningful: learned positions do change."""
    m = tiny("learned")
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert not torch.allclose(m.hidden(x, positions=torch.arange(4)[None]), m.hidden(x, positions=torch.arange(4)[None] + 5))


# ------------------------------------------------------------------------------ causality
@FAST
@given(tokens=TOKENS, data=st.data())
def test_logits_never_see_later_tokens(tokens, data):
    t = data.draw(st.integers(0, len(tokens) - 1))
    other = tokens[: t + 1] + data.draw(st.lists(st.integers(0, 60), min_size=len(tokens) - t - 1, max_size=len(tokens) - t - 1))
    with torch.no_grad():
        a = MODEL(torch.tensor([tokens]))[0][0, : t + 1]
        b = MODEL(torch.tensor([other]))[0][0, : t + 1]
    assert torch.allclose(a, b, atol=1e-5)


# --------------------------------------------------------------------------- KV cache
@FAST
@given(tokens=st.lists(st.integers(0, 60), min_size=3, max_size=24), data=st.data())
def test_the_cache_gives_the_full_pass_at_any_split_point(tokens, data):
    """Prefix through the cache, then the rest in one chunk (or token by token): the same
    logits as one pass over everything."""
    split = data.draw(st.integers(1, len(tokens) - 1))
    x = torch.tensor([tokens])
    with torch.no_grad():
        full = MODEL(x)[0]
        cache = KVCache(MODEL.cfg, 1, len(tokens), "cpu", torch.float32)
        first = MODEL(x[:, :split], cache=cache)[0]
        rest = MODEL(x[:, split:], cache=cache)[0]
        assert torch.allclose(torch.cat([first, rest], 1), full, atol=1e-4)
        cache = KVCache(MODEL.cfg, 1, len(tokens), "cpu", torch.float32)
        steps = [MODEL(x[:, i : i + 1], cache=cache)[0] for i in range(len(tokens))]
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4)


# --------------------------------------------------------------------------- tied weights
def test_tied_weights_are_one_tensor_and_stay_tied_through_training():
    m = tiny(tie=True)
    assert m.head.weight.data_ptr() == m.tok.weight.data_ptr()
    assert sum(p.numel() for p in m.parameters()) == m.num_params()
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    x = torch.randint(0, 61, (2, 8))
    m.train()
    m(x[:, :-1], x[:, 1:])[1].backward()
    opt.step()
    assert torch.equal(m.head.weight, m.tok.weight)
    untied = tiny(tie=False)
    assert untied.head.weight.data_ptr() != untied.tok.weight.data_ptr()
    assert untied.num_params() == m.num_params() + 61 * 16


# ---------------------------------------------------------------------------- temperature
@FAST
@given(tokens=TOKENS, temperature=st.floats(0.05, 4.0).filter(lambda t: abs(t - 1.0) > 0.05))
def test_log_probs_and_entropy_are_those_of_logits_over_temperature(tokens, temperature):
    from tasks.lib.rl import token_logprobs

    x = torch.tensor([tokens])
    with torch.no_grad():
        logp, entropy = token_logprobs(MODEL, x, temperature)
        logits = MODEL(x)[0][0, :-1].double()
    # by hand: log softmax of logits / T, written out, not through log_softmax
    z = logits / temperature
    z = z - z.max(-1, keepdim=True).values
    log_norm = torch.log(torch.exp(z).sum(-1))
    want = z.gather(-1, x[0, 1:, None]).squeeze(-1) - log_norm
    p = torch.exp(z - log_norm[:, None])
    want_h = -(p * (z - log_norm[:, None])).sum(-1)
    assert torch.allclose(logp[0].double(), want, atol=1e-4)
    assert torch.allclose(entropy[0].double(), want_h, atol=1e-4)


# ---------------------------------------------------------------------------- the loss
@FAST
@given(tokens=st.lists(st.integers(0, 60), min_size=4, max_size=16), data=st.data())
def test_the_masked_loss_is_the_mean_over_the_masked_positions(tokens, data):
    mask = data.draw(st.lists(st.booleans(), min_size=len(tokens) - 1, max_size=len(tokens) - 1).filter(any))
    x, y = torch.tensor([tokens[:-1]]), torch.tensor([tokens[1:]])
    with torch.no_grad():
        logits, loss = MODEL(x, y, loss_mask=torch.tensor([mask]))
    nll = [-math.log(float(torch.softmax(logits[0, i].double(), -1)[y[0, i]])) for i in range(len(mask))]
    assert float(loss) == pytest.approx(sum(n for n, m in zip(nll, mask) if m) / sum(mask), rel=1e-4)


# ------------------------------------------------------------------------------ mixture
@FAST
@given(sizes=st.lists(st.floats(1.0, 5000.0), min_size=1, max_size=40), factor=st.floats(0.01, 7.5), seed=st.integers(0, 2**31))
def test_a_source_is_sampled_to_its_target_within_half_a_document(sizes, factor, seed):
    from tasks.mix import sample_source

    sizes = np.array(sizes)
    target = factor * sizes.sum()
    counts = sample_source(sizes, target, np.random.default_rng(seed))
    full = int(target // sizes.sum())
    assert counts.min() >= full and counts.max() <= full + 1  # whole passes, then each document at most once more
    assert abs(float(counts @ sizes) - target) <= sizes.max() / 2 + 1e-6


@pytest.mark.parametrize("vocab, dtype", [(2, np.uint16), (65_535, np.uint16), (65_536, np.uint16), (65_537, np.uint32),
                                          (100_277, np.uint32)])
def test_the_token_dtype_holds_every_id_of_the_vocabulary(vocab, dtype):
    from tasks.lib.tokens import token_dtype

    assert token_dtype(vocab) == dtype
    assert np.iinfo(token_dtype(vocab)).max >= vocab - 1


@FAST
@given(vocab=st.integers(2, 300_000))
def test_token_dtype_at_any_vocabulary(vocab):
    from tasks.lib.tokens import token_dtype

    dt = token_dtype(vocab)
    assert np.iinfo(dt).max >= vocab - 1
    assert dt.itemsize == (2 if vocab <= 2**16 else 4)  # the smallest that holds every id


def test_token_files_round_trip_ids_above_65535(tmp_path):
    """A vocabulary above 65,536: ids past uint16 survive writing and reading."""
    import json

    from tasks.lib.tokens import token_dtype, token_files

    vocab = 70_000
    ids = np.array([0, 65_535, 65_536, 69_999, 12], dtype=token_dtype(vocab))
    (tmp_path / "train.bin").write_bytes(ids.tobytes())
    (tmp_path / "val.bin").write_bytes(ids[::-1].tobytes())
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": token_dtype(vocab).name, "vocab_size": vocab,
                                                    "splits": {"train": {"tokens": 5}, "val": {"tokens": 5}}}))
    train, val, _ = token_files(tmp_path)
    assert train.tolist() == [0, 65_535, 65_536, 69_999, 12] and val.tolist() == [12, 69_999, 65_536, 65_535, 0]


# --------------------------------------------------------------------------- dedup keep
@FAST
@given(clusters=st.lists(st.integers(0, 5), min_size=2, max_size=30), data=st.data())
def test_the_kept_document_has_the_best_role_whatever_the_order_and_labels(clusters, data):
    """Per cluster the kept member has the best role; among those the first in input order
    (distinct texts, none a prefix of another); renaming clusters changes nothing."""
    from tasks.dedup import choose_keep

    n = len(clusters)
    labels = np.array(clusters)
    roles = np.array(data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))
    exact = np.array([[i + 1, 7 * i + 3] for i in range(n)], dtype=np.uint64)  # every text distinct
    nwords = np.full(n, 10)
    keep = choose_keep(labels, roles, nwords, exact, lambda req: {})
    for label in set(clusters):
        members = [i for i in range(n) if clusters[i] == label]
        if len(members) < 2:
            assert label not in keep
            continue
        best = min(roles[i] for i in members)
        assert keep[label] == min(i for i in members if roles[i] == best)
    # renaming the clusters (any permutation of labels) keeps the same documents
    perm = np.array(data.draw(st.permutations(range(6))))
    renamed = choose_keep(perm[labels], roles, nwords, exact, lambda req: {})
    assert sorted(renamed.values()) == sorted(keep.values())


# ----------------------------------------------------------------------------- quality rules
# words drawn from letters of several scripts, digits (decimal and not), marks, punctuation,
# symbols, and every kind of whitespace str.split() splits on
WORD_CHARS = st.sampled_from(list("aZé日本ßǅ٣²½Ⅻ_-.,!?#…—'\"()") + ["\u0301", "\u200b"])
SPACES = st.sampled_from([" ", "\n", "\t", "\xa0", "\u3000", "\u2028", "\x1c", "\x0c", "  "])


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(st.tuples(st.text(WORD_CHARS, min_size=1, max_size=6), SPACES), max_size=25))
def test_letter_words_counts_the_words_holding_a_letter(parts):
    """The regular-expression count equals the definition, word by word, in any script."""
    from tasks.quality import letter_words

    text = "".join(w + s for w, s in parts)
    words = text.split()
    assert letter_words(text, len(words)) == sum(any(c.isalpha() for c in w) for w in words)


@settings(max_examples=100, deadline=None)
@given(lines=st.lists(st.sampled_from([
    "Subscribe to our newsletter today.", "Click here for more", "Home | About | Blog", "privacy   policy and terms",
    "The function returns the parsed value, or raises an error when it cannot.", "", "   ",
    "A subscriber clicked here: the phrase is inside a longer sentence with enough words.",
    "Read the privacy\u2028policy before you sign up for the newsletter today please.",
]), max_size=30))
def test_after_line_cleaning_no_line_is_left_for_the_boilerplate_rule(lines):
    """What lets the stage skip the boilerplate rule on cleaned text: the rules decide the same
    with and without the phrase pattern once line cleaning has run with it."""
    from tasks import quality
    from tests.conftest import cfg

    rules, line_cfg = cfg("quality.rules", min_words=1), cfg("quality.lines")
    pattern = quality.phrase_pattern(rules.boilerplate_phrases)
    cleaned = quality.clean_lines("\n".join(lines), line_cfg, pattern)[0]
    if cleaned.split():
        assert quality.rule_filter(cleaned, rules, pattern) == quality.rule_filter(cleaned, rules, None)
