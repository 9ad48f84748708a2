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
