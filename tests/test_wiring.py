"""Wiring tests: a training stage's run(), end to end at tiny size, checked through a path
that does not share its code. The functions a stage glues together are pinned elsewhere;
these catch the glue: which batch goes to which loss, with which mask.

- pretrain on a planted cycle (each token always followed by the same next token) must learn
  the *next* token, measured by a cross-entropy written out here, not the model's loss;
- SFT on prompts that all share one long marker must learn the answers and not the marker
  (its prompt tokens carry no loss), measured the same way.

    pytest tests/test_wiring.py
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import run_stage, tiny_raw_params

TEXTS = [f"def function_{i}(value): return value + {i} # the answer number {i} is here" for i in range(300)]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from tasks.lib.bpe import train_bpe

    d = tmp_path_factory.mktemp("tok")
    tok = train_bpe(iter(TEXTS + ["alpha beta gamma delta epsilon zeta eta theta iota kappa"] * 5), 400, 2)
    tok.save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


def params_with(**sections):
    from tasks.config import parse_params

    raw = tiny_raw_params()
    for key, value in sections.items():
        section, _, sub = key.partition("__")
        (raw[section][sub] if sub else raw[section]).update(value)
    return parse_params(raw)


def next_token_nll(model, ids: list[int], positions: list[int]) -> float:
    """Mean -log p(ids[j] | ids[:j]) over `positions` j, from the logits by hand."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0][0].double()
    total = 0.0
    for j in positions:
        row = logits[j - 1]
        total += float(torch.logsumexp(row, 0) - row[ids[j]])
    return total / len(positions)


def test_pretrain_learns_the_next_token_not_the_current_one(workdir, tokenizer_file):
    from tasks import pretrain
    from tasks.lib.model import load_checkpoint
    from tasks.lib.tokens import token_dtype

    params = params_with(pretrain={"seq_len": 32}, pretrain__train={"steps": 40, "lr": 0.01, "batch_size": 8, "eval_every": 40,
                                                                     "ckpt_every": 40, "warmup_steps": 0})
    (workdir / "models/tokenizer").mkdir(parents=True)
    (workdir / "models/tokenizer/tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    vocab = json.loads(tokenizer_file.read_text())["model"]["vocab"]
    rng = np.random.default_rng(0)
    cycle = rng.choice(np.arange(20, len(vocab)), size=37, replace=False)  # 37 distinct ids, each followed by one fixed id
    tokens = workdir / "data/tokens"
    tokens.mkdir(parents=True)
    dt = token_dtype(len(vocab))
    np.tile(cycle, 200).astype(dt).tofile(tokens / "train.bin")
    np.tile(cycle, 20).astype(dt).tofile(tokens / "val.bin")
    (tokens / "meta.json").write_text(json.dumps({"dtype": dt.name, "vocab_size": len(vocab),
                                                  "splits": {"train": {"tokens": 37 * 200}, "val": {"tokens": 37 * 20}}}))
    run_stage(pretrain, params)

    model, _ = load_checkpoint(workdir / "models/base")
    seq = np.tile(cycle, 2)[5:45].tolist()
    nxt = next_token_nll(model, seq, list(range(1, len(seq))))
    # the same positions scored as if the target were the current token (what a model trained
    # on targets == inputs would predict)
    with torch.no_grad():
        logits = model(torch.tensor([seq]))[0][0].double()
    same = float(np.mean([float(torch.logsumexp(logits[j - 1], 0) - logits[j - 1][seq[j - 1]]) for j in range(1, len(seq))]))
    assert nxt < 0.35 * math.log(37), (nxt, same)  # far below a uniform guess over the cycle
    assert nxt < same - 2.0


def test_sft_learns_answers_and_leaves_the_shared_prompt_unlearned(workdir, tokenizer_file):
    from tasks import sft
    from tasks.lib.bpe import load_tokenizer
    from tasks.lib.model import GPT, ModelConfig, load_checkpoint, save_checkpoint
    from tasks.lib.template import Template

    marker = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    rows = [{"prompt": f"{marker} {i}", "response": f"def function_{i}(value): return value + {i}"} for i in range(300)]
    (workdir / "inst").mkdir()
    (workdir / "inst/data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = params_with(instructions={"sources": [{"name": "planted", "kind": "files", "globs": ["inst/*.jsonl"]}]},
                         sft__train={"steps": 40, "lr": 0.01, "batch_size": 8, "eval_every": 40, "ckpt_every": 40})
    torch.manual_seed(0)
    tok_dir = tokenizer_file.parent
    vocab = load_tokenizer(tok_dir).get_vocab_size()
    base = GPT(ModelConfig(vocab_size=vocab, n_layer=1, n_head=2, d_model=32, max_seq_len=192))
    save_checkpoint(workdir / "models/base", base, tok_dir, {"stage": "pretrain", "chat": False})
    run_stage(sft, params)

    tuned, _ = load_checkpoint(workdir / "models/sft")
    t = Template(load_tokenizer(tok_dir))
    marker_ids = t.text_ids(marker)
    gains = {"prompt": [], "answer": []}
    for r in rows[:40]:
        ids, mask = t.render([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}])
        start = next(j for j in range(len(ids)) if ids[j : j + len(marker_ids)] == marker_ids)
        in_marker = list(range(start + 1, start + len(marker_ids)))  # predicted from the marker's own earlier tokens
        answer = [j for j in range(1, len(ids)) if mask[j]]
        gains["prompt"].append(next_token_nll(base, ids, in_marker) - next_token_nll(tuned, ids, in_marker))
        gains["answer"].append(next_token_nll(base, ids, answer) - next_token_nll(tuned, ids, answer))
    prompt_gain, answer_gain = float(np.mean(gains["prompt"])), float(np.mean(gains["answer"]))
    # the answers were learned (nats per token gained) ...
    assert answer_gain > 1.5, gains
    # ... the marker, the same ten words in every prompt and the easiest text to learn, was not
    assert prompt_gain < 0.25 * answer_gain, (prompt_gain, answer_gain)


def test_reward_accuracy_recomputed_from_raw_scores_and_the_raw_rankings(workdir, tokenizer_file):
    """A planted preference (answers with `good` beat answers with `bad`, in either position;
    six test pairs hold one text twice, so the test figure differs from the val figure).
    The test builds the pairs from each record's ranking itself and reads the RM's raw score
    at the readout token of a sequence it assembles from the special-token ids: the stage's
    test_accuracy must equal that figure, and be high."""
    from tasks import reward
    from tasks.lib.bpe import SPECIAL_TOKENS, load_tokenizer
    from tasks.lib.model import GPT, ModelConfig, load_checkpoint, save_checkpoint

    rng = np.random.default_rng(1)
    prefs = workdir / "data/preferences"
    prefs.mkdir(parents=True)
    records = {}
    for split, n in (("train", 120), ("val", 30), ("test", 30)):
        rows = []
        for i in range(n):
            good, bad = f"def function_{i}(value): good", f"def function_{i}(value): bad"
            if split == "test" and i < 6:  # a pair no model can order (one text twice): test accuracy <= 24/30
                bad = good
            flip = bool(rng.integers(2))
            completions = [bad, good] if flip else [good, bad]
            rows.append({"id": f"{split}-{i}", "prompt": f"return value + {i}", "completions": completions,
                         "finished": [True, True], "ranking": [1, 0] if flip else [0, 1], "labeler": "gold"})
        (prefs / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        records[split] = rows
    tok_dir = tokenizer_file.parent
    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    sft = GPT(ModelConfig(vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, d_model=32, max_seq_len=192))
    save_checkpoint(workdir / "models/sft", sft, tok_dir, {"stage": "sft", "chat": True})
    params = params_with(reward__train={"steps": 30, "lr": 0.003, "batch_size": 8, "eval_every": 10, "ckpt_every": 10})
    metrics = run_stage(reward, params)

    rm, _ = load_checkpoint(workdir / "models/reward", kind="scalar")
    sp = {k: tok.token_to_id(v) for k, v in SPECIAL_TOKENS.items()}

    def score(prompt: str, completion: str) -> float:
        ids = [sp["eot"], sp["user"], *tok.encode(prompt, add_special_tokens=False).ids, sp["end_of_turn"], sp["assistant"],
               *tok.encode(completion, add_special_tokens=False).ids, sp["end_of_turn"], sp["reward"]]
        with torch.no_grad():
            return float(rm(torch.tensor([ids]))[0, -1])

    right = [score(r["prompt"], r["completions"][r["ranking"][0]]) > score(r["prompt"], r["completions"][r["ranking"][1]])
             for r in records["test"]]
    assert metrics["test_accuracy"] == pytest.approx(float(np.mean(right)), abs=1e-9)
    assert metrics["test_pairs"] == len(right)
    assert 0.7 <= np.mean(right) <= 0.8  # every learnable test pair right, the six unorderable ones wrong
