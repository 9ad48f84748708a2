"""DPO, the critic-free RLOO / GRPO and best-of-n, pinned by hand, then seen to work end to end
at tiny size: DPO on planted preferences moves the policy toward the preferred completions on
held-out prompts (measured by a direct forward pass, not the stage's code); RLOO and GRPO on a
planted reward raise it; bad settings and data are one clear error."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tasks.lib import rl
from tests.conftest import cfg as conf
from tests.conftest import tiny_raw_params

TINY_VOCAB = 40


def test_dpo_loss_by_hand():
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    # h = (log pi(w) - log ref(w)) - (log pi(l) - log ref(l)) = 1 - (-1) = 2; beta h = 1
    loss, h = rl.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert float(h) == 2.0 and float(loss) == pytest.approx(math.log(1 + math.exp(-1)))
    smooth, _ = rl.dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert float(smooth) == pytest.approx(0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1)))
    ipo, _ = rl.dpo_loss(pc, pr, rc, rr, beta=0.5, ipo=True)
    assert float(ipo) == pytest.approx((2 - 1 / (2 * 0.5)) ** 2)
    # two pairs: the mean; a pair the policy prefers the wrong way has h < 0 and a larger loss
    loss2, h2 = rl.dpo_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]), 0.5)
    assert h2.tolist() == [2.0, -2.0] and float(loss2) == pytest.approx((math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2)


def uniform(vocab: int = TINY_VOCAB):
    from tasks.lib.model import GPT, ModelConfig

    m = GPT(ModelConfig(vocab_size=vocab, n_layer=1, n_head=2, d_model=16, max_seq_len=32, tie_embeddings=False)).eval()
    with torch.no_grad():
        m.head.weight.zero_()
    return m


def test_sequence_logprobs_sum_or_per_token_by_hand():
    m = uniform()
    prompts, comps = [[1, 2], [3]], [[4, 5, 6], [7]]
    total = rl.sequence_logprobs(m, prompts, comps, 0, "cpu")
    assert total.tolist() == pytest.approx([-3 * math.log(TINY_VOCAB), -math.log(TINY_VOCAB)], rel=1e-5)
    per_token = rl.sequence_logprobs(m, prompts, comps, 0, "cpu", length_normalise=True)
    assert per_token.tolist() == pytest.approx([-math.log(TINY_VOCAB)] * 2, rel=1e-5)
    # DPO's per-prompt groups, over batches that cut across prompts: sums, or per-token means
    from tasks.dpo import completion_logprobs

    items = [{"prompt": [1, 2], "comps": [[4, 5, 6], [7]]}, {"prompt": [3], "comps": [[8, 9]]}]
    for normalise, lengths in ((False, [[3, 1], [2]]), (True, [[1, 1], [1]])):
        got = completion_logprobs(m, items, 0, "cpu", normalise, batch=2)
        assert [g.tolist() for g in got] == [pytest.approx([-n * math.log(TINY_VOCAB) for n in row], rel=1e-5) for row in lengths]


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    loo = rl.group_advantages(r, 4, "rloo")
    assert loo.tolist() == pytest.approx([1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2, 0, 0, 0, 0])
    std = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3)  # unbiased, within the group
    grpo = rl.group_advantages(r, 4, "grpo")
    assert grpo.tolist() == pytest.approx([(x - 3) / (std + rl.GROUP_STD_EPS) for x in (1, 2, 3, 6)] + [0, 0, 0, 0])
    assert rl.group_advantages(torch.tensor([2.0, 4.0]), 2, "rloo").tolist() == [-2.0, 2.0]
    for bad in ((r, 1, "rloo"), (r[:7], 4, "rloo"), (r, 4, "ppo")):
        with pytest.raises(ValueError):
            rl.group_advantages(*bad)


def test_best_of_n_keeps_the_reward_models_favourite():
    from tasks.evaluate import best_of

    out = {"rm": np.array([[0.1, 0.5, 0.9], [0.9, 0.2, 0.9]]), "gold": np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),
           "texts": ["a", "b", "c", "d", "e", "f"], "finished": [True, False, True, True, True, False],
           "comp_ids": [[1], [2], [3], [4], [5], [6]], "samples": 3}
    two = best_of(out, 2)  # among the first two of each prompt: b (0.5) and d (0.9)
    assert two["texts"] == ["b", "d"] and two["gold"][:, 0].tolist() == [2.0, 4.0] and two["finished"] == [False, True]
    assert two["rm"].shape == (2, 1) and two["samples"] == 1 and two["comp_ids"] == [[2], [4]]
    assert best_of(out, 3)["texts"] == ["c", "d"]  # equal scores: the first


def test_rloo_and_grpo_raise_a_planted_reward():
    from tasks.lib.model import GPT, ModelConfig
    from tasks.lib.rl_loop import rl_loop

    tiny = ModelConfig(vocab_size=TINY_VOCAB, n_layer=1, n_head=2, d_model=32, max_seq_len=32)

    def score_fn(prompts, responses, idx):  # planted reward: emit token 7
        return torch.tensor([sum(t == 7 for t in r) / max(len(r), 1) for r in responses], dtype=torch.float)

    for algorithm in ("rloo", "grpo"):
        torch.manual_seed(0)
        policy, ref = GPT(tiny), GPT(tiny)
        ref.load_state_dict(policy.state_dict())
        cfg = conf("group_rl", algorithm=algorithm, group_size=4, steps=30, batch_prompts=4,
                   sampling={"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0}, ppo_epochs=2, minibatches=2, lr=3e-3,
                   kl={"beta": 0.01, "adaptive": False, "target": 2.0, "horizon": 1000})
        hist = rl_loop(policy, ref, None, score_fn, [[1, 2, 3 + i % 5] for i in range(32)], cfg, pad_id=0, stop_ids=(), seed=0,
                       device=torch.device("cpu"), algorithm=algorithm, group_size=4)
        start = np.mean([h["reward_mean"] for h in hist[:5]])
        end = np.mean([h["reward_mean"] for h in hist[-5:]])
        assert end > start + 0.3, (algorithm, start, end)
        assert "value_loss" not in hist[-1] and "explained_variance" not in hist[-1] and hist[-1]["clip_fraction"] >= 0
    with pytest.raises(ValueError, match="rloo and grpo have none"):
        rl_loop(policy, ref, policy, score_fn, [[1]], cfg, pad_id=0, stop_ids=(), seed=0, device=torch.device("cpu"), algorithm="rloo", group_size=4)
    with pytest.raises(ValueError, match="K >= 2"):
        rl_loop(policy, ref, None, score_fn, [[1]], cfg, pad_id=0, stop_ids=(), seed=0, device=torch.device("cpu"), algorithm="grpo", group_size=1)


def test_a_group_shares_its_prompt_and_its_advantage():
    """The K samples of a prompt are rolled out from that prompt and scored as its group."""
    from tasks.lib.model import GPT, ModelConfig
    from tasks.lib.rl_loop import rl_loop

    tiny = ModelConfig(vocab_size=TINY_VOCAB, n_layer=1, n_head=2, d_model=16, max_seq_len=32)
    torch.manual_seed(0)
    policy, ref = GPT(tiny), GPT(tiny)
    ref.load_state_dict(policy.state_dict())
    seen = []

    def score_fn(prompts, responses, idx):
        seen.append((prompts, idx))
        return torch.zeros(len(responses))

    prompts = [[1, 2, 10 + i] for i in range(6)]
    cfg = conf("group_rl", group_size=3, steps=1, batch_prompts=2, sampling={"max_new_tokens": 3, "temperature": 1.0, "top_p": 1.0})
    rl_loop(policy, ref, None, score_fn, prompts, cfg, pad_id=0, stop_ids=(), seed=0, device=torch.device("cpu"), algorithm="rloo", group_size=3)
    (ps, idx), = seen
    assert len(idx) == 6 and idx[0] == idx[1] == idx[2] and idx[3] == idx[4] == idx[5] and idx[0] != idx[3]
    assert all(p == prompts[i] for p, i in zip(ps, idx))


@pytest.fixture
def dpo_setup(tmp_path):
    """An SFT checkpoint and preference files where the preferred completion of every prompt
    says `yes good` and the other `no bad`: DPO must learn the planted preference."""
    from tasks.config import parse_params
    from tasks.lib.bpe import train_bpe
    from tasks.lib.model import GPT, ModelConfig, save_checkpoint

    tok = train_bpe(iter([f"question {i} yes good no bad" for i in range(50)] * 4), 300, 1)
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok/tokenizer.json"))
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "sft", GPT(ModelConfig(vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, d_model=32, max_seq_len=64)),
                    tmp_path / "tok", {"chat": True})
    prefs = tmp_path / "prefs"
    prefs.mkdir()
    for split, ids in (("train", range(0, 30)), ("val", range(30, 36)), ("test", range(36, 42))):
        with open(prefs / f"{split}.jsonl", "w") as fh:
            for i in ids:
                order = [0, 1] if i % 2 else [1, 0]  # the preferred one is first or second
                comps = ["yes good", "no bad"] if i % 2 else ["no bad", "yes good"]
                fh.write(json.dumps({"prompt": f"question {i}", "completions": comps, "ranking": order, "finished": [True, True]}) + "\n")
    raw = tiny_raw_params()
    raw["dpo"]["train"].update(steps=15, batch_size=4, lr=3e-3, eval_every=5, warmup_steps=0)
    raw["dpo"].update(kl_prompts=4, kl_max_new_tokens=4)
    return parse_params(raw), tok, tmp_path


def direct_margin(model, tok, prompts):
    """log p(yes good) - log p(no bad) per prompt, by a plain forward pass."""
    from tasks.lib.template import Template

    t = Template(tok)
    out = []
    for q in prompts:
        lps = []
        for c in ("yes good", "no bad"):
            p, comp = t.prompt(q), t.text_ids(c) + [t.end_turn]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([p + comp]))[0][0], -1)
            lps.append(sum(float(logp[len(p) - 1 + j, tok_]) for j, tok_ in enumerate(comp)))
        out.append(lps[0] - lps[1])
    return np.array(out)


def test_dpo_moves_the_policy_toward_the_preferred_completions(dpo_setup):
    from tasks import dpo
    from tasks.lib.model import load_checkpoint

    params, tok, d = dpo_setup
    m = dpo.run(params, {"sft": d / "sft", "preferences": d / "prefs"}, {"dpo": d / "out", "checkpoints": d / "ck", "report": d / "rep"})
    held_out = [f"question {i}" for i in range(42, 50)]  # prompts in no preference file
    before = direct_margin(load_checkpoint(d / "sft")[0].eval(), tok, held_out)
    after = direct_margin(load_checkpoint(d / "out")[0].eval(), tok, held_out)
    assert (after > before + 1.0).all(), (before, after)
    assert m["test_accuracy"] == 1.0 and m["test_margin"] > 0 and m["kl_to_reference"] > 0 and m["train_pairs"] == 30
    evals = json.loads((d / "rep/val.json").read_text())
    assert [e["step"] for e in evals] == [5, 10, 15] and evals[-1]["val_accuracy"] == 1.0
    again = dpo.run(params, {"sft": d / "sft", "preferences": d / "prefs"}, {"dpo": d / "out2", "checkpoints": d / "ck", "report": d / "rep2"})
    assert again == m  # the finished run is found again: same figures, same weights
    assert (d / "out/model.safetensors").read_bytes() == (d / "out2/model.safetensors").read_bytes()


def test_dpo_refuses_preferences_without_a_usable_pair(dpo_setup):
    from tasks import dpo
    from tasks.lib.errors import StageError

    params, _, d = dpo_setup
    tied = d / "prefs/val.jsonl"
    tied.write_text(json.dumps({"prompt": "q", "completions": ["a", "b"], "ranking": [0, 1], "ties": [[0, 1]]}) + "\n")
    with pytest.raises(StageError, match=r"no usable preference pair for DPO in val \(0 prompts\)"):
        dpo.run(params, {"sft": d / "sft", "preferences": d / "prefs"}, {"dpo": d / "out", "checkpoints": d / "ck", "report": d / "rep"})
    assert not (d / "out").exists()


@pytest.mark.parametrize("key, value, message", [
    ("dpo.beta", 0.0, "dpo.beta = 0.0: Input should be greater than 0"),
    ("group_rl.group_size", 1, "group_rl.group_size = 1: Input should be greater than or equal to 2"),
    ("group_rl.algorithm", "ppo2", "group_rl.algorithm = 'ppo2': Input should be 'rloo' or 'grpo'"),
    ("dpo.loss", "hinge", "dpo.loss = 'hinge'"),
    ("evaluate.best_of_n", 8, "best_of_n (8) must not exceed samples_per_prompt"),
])
def test_bad_alignment_settings_are_named(key, value, message):
    from tasks.config import ConfigError, parse_params

    raw = tiny_raw_params()
    section, field = key.split(".")
    raw[section][field] = value
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert message in str(err.value)


def _rl_on(out, nproc: int, algorithm: str, steps: int):
    """tests/rl_worker.py on `nproc` gloo processes under torchrun."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OUT": str(out), "ALGORITHM": algorithm, "STEPS": str(steps), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    out.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                          str(Path(__file__).with_name("rl_worker.py"))], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.slow
@pytest.mark.parametrize(("algorithm", "steps"), [("ppo", 4), ("rloo", 24)])
def test_rl_on_two_processes_is_the_run_of_one_split_in_two(tmp_path, algorithm, steps):
    """Each process samples its half of an iteration's prompts (a group stays whole) with the
    random numbers one process uses for those rows; the figures are the whole batch's and the
    minibatch gradients are summed over processes: the weights and figures of one process, and
    replicas that stay identical. A sub-batch is padded to its own longest prompt, so the two
    runs differ in their last bits, and over many iterations such a difference can flip a
    sampled token (RLOO's 24 here did at the 20th): the long run is compared over its first 12."""
    from safetensors.torch import load_file

    from tasks.lib.train import seeded

    one = _rl_on(tmp_path / "one", 1, algorithm, steps)[0]
    ranks = _rl_on(tmp_path / "two", 2, algorithm, steps)
    assert ranks[0]["history"] == ranks[1]["history"], "every process reports the same figures"
    for name in ("policy", "value") if algorithm == "ppo" else ("policy",):
        a, b = (load_file(str(tmp_path / f"two/{name}{r}.safetensors")) for r in (0, 1))
        assert all(torch.equal(a[k], b[k]) for k in a), f"the {name} replicas drifted apart"
        if algorithm == "ppo":  # every iteration compared: the final weights too
            w1 = load_file(str(tmp_path / f"one/{name}0.safetensors"))
            diff = max(float((w1[k] - a[k]).abs().max()) for k in w1)
            assert diff < 1e-4, f"{name}: 2 processes drifted from 1 by {diff}"
    compared = len(one["history"]) if algorithm == "ppo" else 12
    assert len(one["history"]) == len(ranks[0]["history"]) >= compared
    for h1, h2 in zip(one["history"][:compared], ranks[0]["history"][:compared], strict=True):
        assert h2["phase"] == h1["phase"] and h2.keys() == h1.keys()
        assert {k: h2[k] for k in h1 if k != "phase"} == pytest.approx({k: h1[k] for k in h1 if k != "phase"}, rel=1e-4, abs=1e-5)
    k = 1 if algorithm == "ppo" else 4
    for it, row in enumerate(ranks[0]["history"]):
        picked = torch.randperm(32, generator=seeded(0, it))[:4].tolist()  # the iteration's prompts, drawn as the loop draws them
        halves = [ranks[r]["seen"][it]["idx"] for r in (0, 1)]
        assert halves[0] == [i for i in picked[:2] for _ in range(k)] and halves[1] == [i for i in picked[2:] for _ in range(k)]
        both = ranks[0]["seen"][it]["scores"] + ranks[1]["seen"][it]["scores"]
        if it < compared:
            assert both == pytest.approx(one["seen"][it]["scores"], abs=1e-6)  # the same responses as one process
        assert row["reward_mean"] == pytest.approx(float(np.mean(both)), abs=1e-6)  # the whole batch's mean
        assert row["reward_std"] == pytest.approx(float(np.std(both, ddof=1)), abs=1e-5)
    w = [ranks[r]["whiten"] for r in (0, 1)]  # whitening over processes = whitening of the concatenated batch
    v, m = (torch.cat([torch.tensor(w[r][key]) for r in (0, 1)]) for key in ("v", "m"))
    assert torch.allclose(torch.cat([torch.tensor(w[r]["out"]) for r in (0, 1)]), rl.whiten(v, m), atol=1e-5)
    if algorithm == "rloo":  # and it learns: the planted reward rises
        hist = ranks[0]["history"]
        assert np.mean([h["reward_mean"] for h in hist[-5:]]) > np.mean([h["reward_mean"] for h in hist[:5]]) + 0.2
    else:
        assert all(math.isfinite(h["explained_variance"]) for h in ranks[0]["history"])
