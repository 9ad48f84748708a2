"""The model and the training stages at tiny sizes, on CPU; the tests with a `cuda` variant
also run on a GPU (bf16 autocast, torch.compile) when there is one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks.lib.model import GPT, CheckpointError, ModelConfig, ScalarModel, generate, load_checkpoint, save_checkpoint
from tasks.lib.train import train_loop
from tests.conftest import cfg as conf
from tests.conftest import runtime, train_cfg

TINY = ModelConfig(vocab_size=40, n_layer=2, n_head=2, d_model=32, max_seq_len=48)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def tiny_train(steps, **kw):
    return train_cfg(steps, **kw)


def test_model_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = GPT(TINY)
    x = torch.randint(0, 40, (4, 24))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = model(x[:, :-1], x[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)), "loss must stay finite"
    assert losses[-1] < 0.1 * losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_kv_cache_and_no_cache_greedy_decoding_match(positions):
    torch.manual_seed(1)
    model = GPT(ModelConfig(**{**TINY.__dict__, "positions": positions}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(3, 40, (8, 32))
    for _ in range(30):  # a little training so the greedy path is not a constant
        loss = model(x[:, :-1], x[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    prompts = [x[0, :5].tolist(), x[1, :9].tolist(), x[2, :2].tolist()]
    cached = generate(model, prompts, 12, pad_id=0, temperature=0, use_cache=True)
    plain = generate(model, prompts, 12, pad_id=0, temperature=0, use_cache=False)
    alone = [generate(model, [p], 12, pad_id=0, temperature=0)[0] for p in prompts]
    assert cached == plain == alone
    assert len({tuple(c) for c in cached}) > 1


def test_decoding_steps_have_one_shape_so_compile_traces_the_step_once(monkeypatch):
    """The static decode step: every step after the prompt has the same tensor shapes and no
    Python number that changes, so torch.compile traces it once for the whole generation (a
    cache that grows by a slice, or a position passed as an int, is traced again at each step),
    and the compiled step chooses the tokens the plain loop and the no-cache loop choose."""
    from torch._dynamo.testing import CompileCounter

    import tasks.lib.model as M

    torch.manual_seed(2)
    model = GPT(TINY)
    prompts = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12, 13, 14, 15, 16, 17, 18]]
    counter = CompileCounter()
    torch._dynamo.reset()
    monkeypatch.setitem(M._COMPILED, "cpu", torch.compile(M.decode_step, backend=counter, dynamic=False))
    compiled = generate(model, prompts, 10, pad_id=0, temperature=0, compile=True)
    assert counter.frame_count == 1  # 9 decoding steps, one trace
    assert compiled == generate(model, prompts, 10, pad_id=0, temperature=0) == generate(model, prompts, 10, pad_id=0, temperature=0, use_cache=False)
    assert all(len(c) == 10 for c in compiled)


def test_decode_step_logits_are_the_full_forward_pass_logits():
    """Each step's logits (one token per row, attending to the cache under the keys mask) are
    the logits a full pass over the left-padded sequence gives at that position."""
    from tasks.lib.model import KVCache, attention_mask, decode_step, padded_batch, positions_of

    torch.manual_seed(4)
    model = GPT(TINY).eval()
    seqs = [[5, 6, 7, 8, 9, 10, 11, 12], [3, 4, 20, 21, 22], [13, 14, 15, 16, 17, 18, 19, 23]]
    with torch.no_grad():
        tokens, valid = padded_batch(seqs, 0, left=True)
        full = model(tokens, positions=positions_of(valid), mask=attention_mask(valid, tokens.shape[1]))[0]
        # the same rows fed as a prompt of 6 columns (left-padded), then 2 steps
        P = 6
        head = [s[: len(s) - 2] for s in seqs]
        ptok, pvalid = padded_batch(head, 0, left=True)
        cache = KVCache(TINY, 3, P + 2, "cpu", torch.float32)
        model.hidden(ptok, positions=positions_of(pvalid), mask=attention_mask(pvalid, P), cache=cache)
        keys = torch.zeros(3, P + 2, dtype=torch.bool)
        keys[:, :P] = pvalid
        cache.slot = torch.tensor([P])
        pos = positions_of(pvalid)[:, -1:]
        for step in range(2):
            keys[:, P + step] = True
            pos = pos + 1
            tok = torch.tensor([[s[len(s) - 2 + step]] for s in seqs])
            logits = decode_step(model, tok, pos, keys, cache)
            cache.slot += 1
            torch.testing.assert_close(logits, full[:, tokens.shape[1] - 2 + step], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_sampling_repeats_on_every_device(device):
    torch.manual_seed(3)
    model = GPT(TINY).to(device)

    def draw(seed):  # the stages pass a seeded CPU generator, also when the model is on a GPU
        return generate(model, [[1, 2, 3]] * 6, 10, pad_id=0, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    assert draw(0) == draw(0)
    assert draw(0) != draw(1)


def test_generation_stops_at_stop_token_and_samples_with_top_k_top_p():
    torch.manual_seed(2)
    model = GPT(TINY)
    with torch.no_grad():
        model.head.weight.zero_() if not TINY.tie_embeddings else None
    out = generate(model, [[1, 2, 3]] * 4, 10, pad_id=0, stop_ids=(7,), temperature=1.0, top_k=5, top_p=0.9,
                   generator=torch.Generator().manual_seed(0))
    for seq in out:
        assert 7 not in seq[:-1] and len(seq) <= 10


def test_generation_reports_the_entropy_a_separate_pass_computes():
    """generate(entropy=...) against token_logprobs over the finished sequences (temperature 1),
    with prompts of several lengths (left padding) and rows that stop at different steps."""
    from tasks.lib.rl import sequences, token_logprobs

    torch.manual_seed(3)
    model = GPT(TINY).eval()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    ents: list[float] = []
    out = generate(model, prompts, 6, pad_id=0, stop_ids=(7, 11), temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(1),
                   entropy=ents)
    assert len(ents) == sum(len(o) for o in out)
    x, mask = sequences(prompts, out, 0, "cpu")
    with torch.no_grad():
        _, ent = token_logprobs(model, x)
    want = [float(e) for row, m in zip(ent, mask) for e, keep in zip(row, m) if keep]
    assert ents == pytest.approx(want, abs=1e-4)


def test_sampler_draws_in_proportion_and_renormalises_the_nucleus():
    """Frequencies of 20,000 draws against the distribution (inverse CDF) and against the
    renormalised nucleus; a batch mixing rows whose nucleus fits the candidate set with a flat
    row that does not gives each row its own distribution."""
    from tasks.lib import model as model_lib
    from tasks.lib.model import sample_next

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(torch.log(probs).repeat(20000, 1), 1.0, None, None, gen)
    freq = torch.bincount(draws, minlength=4).float() / 20000
    assert freq.tolist() == pytest.approx(probs.tolist(), abs=0.012)
    draws = sample_next(torch.log(probs).repeat(20000, 1), 1.0, None, 0.7, gen)
    freq = torch.bincount(draws, minlength=4).float() / 20000
    assert freq.tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0, 0], abs=0.012)
    V = 3000  # more than the candidates looked at first
    peaked = torch.full((V,), -30.0)
    peaked[[5, 9]] = torch.tensor([0.0, -0.5])
    flat = torch.zeros(V)
    rows = torch.stack([peaked, flat] * 2000)
    draws = sample_next(rows, 1.0, None, 0.9, gen)
    assert set(draws[0::2].tolist()) == {5, 9}
    assert len(set(draws[1::2].tolist())) > 500 and max(draws[1::2].tolist()) >= model_lib.NUCLEUS_CANDIDATES  # beyond the candidates


@pytest.mark.parametrize(("top_k", "top_p"), [(None, None), (5, None), (None, 0.9)], ids=["plain", "top-k", "nucleus-mixed"])
def test_a_batch_split_into_rows_draws_what_the_whole_batch_draws(top_k, top_p):
    """`rows=(offset, total)`: each part of a batch uses the uniform numbers of its own rows, so
    the parts, joined, are the whole batch's tokens, call after call (the nucleus case mixes
    rows whose nucleus fits the candidate set with flat rows that do not)."""
    from tasks.lib.model import sample_next

    V = 3000
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, V, generator=g) * 3
    logits[1::2] = 0.0  # flat rows: their nucleus is larger than the candidates looked at first
    whole, first, second = (torch.Generator().manual_seed(7) for _ in range(3))
    for _ in range(3):
        full = sample_next(logits, 0.8, top_k, top_p, whole)
        parts = torch.cat([sample_next(logits[:3], 0.8, top_k, top_p, first, rows=(0, 8)),
                           sample_next(logits[3:], 0.8, top_k, top_p, second, rows=(3, 8))])
        assert torch.equal(parts, full)


def test_sft_prompt_tokens_carry_no_loss():
    from tasks.lib.template import Template
    from tasks.lib.instructions import masked_batch
    from tasks.lib.bpe import train_bpe

    tok = train_bpe(iter(["What does json.dumps do? It serializes an object to JSON."] * 20), 300, 1)
    t = Template(tok)
    ids, mask = t.render([{"role": "user", "content": "What does json.dumps do?"}, {"role": "assistant", "content": "It serializes."}])
    assert mask.count(True) == len(t.text_ids("It serializes.")) + 1  # the answer and its end of turn
    assert not any(mask[: ids.index(t.assistant) + 1])
    x, y, m = masked_batch([(ids, mask)], t.pad)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, d_model=16, max_seq_len=64))
    base = model(x, y, loss_mask=m)[1].item()
    y_prompt = y.clone()
    y_prompt[~m] = 5  # change every target outside the answer
    assert model(x, y_prompt, loss_mask=m)[1].item() == pytest.approx(base, abs=1e-6)
    y_answer = y.clone()
    y_answer[m] = 5
    assert model(x, y_answer, loss_mask=m)[1].item() != pytest.approx(base, abs=1e-3)


def test_reward_model_learns_a_planted_preference():
    from tasks.reward import accuracy, pair_loss

    gen = torch.Generator().manual_seed(0)

    def prompt_group():
        prompt = torch.randint(10, 40, (6,), generator=gen).tolist()
        noise = lambda: torch.randint(10, 40, (4,), generator=gen).tolist()  # noqa: E731
        # K = 3 completions: more 5s is better (rank 0 best)
        seqs = [prompt + noise() + [5, 5, 5] + [9], prompt + noise() + [5, 6, 6] + [9], prompt + noise() + [6, 6, 6] + [9]]
        return {"seqs": seqs, "pairs": [(0, 1), (0, 2), (1, 2)]}

    train, val = [prompt_group() for _ in range(64)], [prompt_group() for _ in range(32)]
    torch.manual_seed(0)
    model = ScalarModel(TINY)
    assert accuracy(model, val, pad_id=0) < 0.9
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(80):
        loss, _ = pair_loss(model, [train[(step * 8 + i) % 64] for i in range(8)], pad_id=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert accuracy(model, val, pad_id=0) > 0.95


@pytest.mark.parametrize("device", DEVICES)
def test_ppo_raises_a_planted_reward_with_bounded_kl(device):
    import contextlib

    from tasks.lib.rl_loop import rl_loop

    torch.manual_seed(0)
    policy = GPT(TINY).to(device)
    ref = GPT(TINY).to(device)
    ref.load_state_dict(policy.state_dict())
    value = ScalarModel(TINY).to(device)
    target = 7

    def score_fn(prompts, responses, idx):  # planted reward: emit token 7
        return torch.tensor([sum(t == target for t in r) / max(len(r), 1) for r in responses], dtype=torch.float)

    prompts = [[1, 2, 3 + i % 5] for i in range(32)]
    cfg = conf("ppo", steps=30, value_warmup=0, batch_prompts=16, sampling={"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0}, ppo_epochs=2,
               minibatches=2, lr=3e-3, value_lr=3e-3, kl={"beta": 0.01, "adaptive": False, "target": 2.0, "horizon": 1000})
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    hist = rl_loop(policy, ref, value, score_fn, prompts, cfg, pad_id=0, stop_ids=(), seed=0, device=torch.device(device), autocast=autocast)
    start = sum(h["reward_mean"] for h in hist[:5]) / 5
    end = sum(h["reward_mean"] for h in hist[-5:]) / 5
    assert end > start + 0.3, (start, end)
    assert all(abs(h["kl"]) < 50 and h["kl"] == h["kl"] for h in hist)
    for key in ("clip_fraction", "approx_kl", "value_loss", "entropy", "explained_variance"):
        assert key in hist[-1]


def _tiny_ppo(steps=4, perturb=False, **kw):
    kw.setdefault("value_warmup", 0)
    torch.manual_seed(0)
    policy = GPT(TINY)
    ref = GPT(TINY)
    ref.load_state_dict(policy.state_dict())
    value = ScalarModel(TINY)
    if perturb:  # other starting weights (the frozen reference stays as it was)
        with torch.no_grad():
            for p in [*policy.parameters(), *value.parameters()]:
                p.add_(0.1)

    def score_fn(prompts, responses, idx):  # reward for emitting token 7
        return torch.tensor([sum(t == 7 for t in r) / max(len(r), 1) for r in responses], dtype=torch.float)

    prompts = [[1, 2, 3 + i % 5] for i in range(8)]
    cfg = conf("ppo", steps=steps, batch_prompts=4, sampling={"max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0}, ppo_epochs=1,
               minibatches=2, lr=3e-3, value_lr=3e-3, **kw)
    from tasks.lib.rl_loop import rl_loop

    return policy, value, lambda **k: rl_loop(policy, ref, value, score_fn, prompts, cfg, pad_id=0, stop_ids=(), seed=0,
                                               device=torch.device("cpu"), **k)


def test_a_killed_ppo_run_resumes_from_its_last_checkpoint(tmp_path):
    policy, _, run = _tiny_ppo(steps=5, ckpt_every=2)
    straight = run()

    def kill_at_4th(it, row, responses, idx):
        if it == 3:
            raise KeyboardInterrupt("killed")

    policy_b, _, run_b = _tiny_ppo(steps=5, ckpt_every=2)
    with pytest.raises(KeyboardInterrupt):
        run_b(resume_dir=tmp_path, fingerprint="fp", on_iter=kill_at_4th)
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 2  # checkpoints after iterations 2 and 4 only
    policy_c, _, run_c = _tiny_ppo(steps=5, ckpt_every=2, perturb=True)  # the checkpoint's weights must win
    seen = []
    resumed = run_c(resume_dir=tmp_path, fingerprint="fp", on_iter=lambda it, *a: seen.append(it))
    assert seen == [2, 3, 4]  # continued where the checkpoint was, not from 0
    assert [h["iteration"] for h in resumed] == [1, 2, 3, 4, 5] and resumed[0] == straight[0]
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 5  # the last iteration is saved
    for (n, a), b in zip(policy.state_dict().items(), policy_c.state_dict().values()):
        assert torch.equal(a, b), n
    # another run's checkpoint (other fingerprint) is not resumed
    _, _, run_d = _tiny_ppo(steps=5, ckpt_every=2)
    seen.clear()
    run_d(resume_dir=tmp_path, fingerprint="other", on_iter=lambda it, *a: seen.append(it))
    assert seen == [0, 1, 2, 3, 4]


def test_ppo_ptx_lowers_the_pretraining_loss_and_the_adaptive_beta_moves():
    fixed = (torch.tensor([[1, 2, 3, 4, 5, 6]]), torch.tensor([[2, 3, 4, 5, 6, 7]]))
    _, _, run = _tiny_ppo(steps=6, ptx_coef=5.0, kl={"beta": 0.05, "adaptive": True, "target": 100.0, "horizon": 10})
    hist = run(ptx_fn=lambda k: fixed)
    assert hist[-1]["ptx_loss"] < hist[0]["ptx_loss"] - 0.1  # the PPO-ptx term is minimised, not maximised
    # KL far under the target: the error is clipped at -20%, so each iteration of 4 samples
    # multiplies β by 1 - 0.2 * 4 / 10 = 0.92
    assert [h["beta"] for h in hist] == pytest.approx([0.05 * 0.92 ** (k + 1) for k in range(6)])


def test_gae_matches_hand_computation():
    from tasks.lib.rl import gae

    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.0, 0.5, 0.5, 0.0]])
    mask = torch.tensor([[False, True, True, False]])
    adv = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # position 2 (last): 1 - 0.5 = 0.5; position 1: 0 + 0.5 - 0.5 + 0.5 = 0.5
    assert adv.tolist() == [[0.0, 0.5, 0.5, 0.0]]


def _pretrain_like(tmp: Path, steps: int, crash_at: int | None = None, best: bool = False):
    data = torch.randint(0, 40, (2000,), generator=torch.Generator().manual_seed(0))

    def batch_fn(step, micro):
        g = torch.Generator().manual_seed(step * 10 + micro)
        s = torch.randint(0, 1900, (4,), generator=g)
        chunk = torch.stack([data[i : i + 17] for i in s.tolist()])
        return chunk[:, :-1], chunk[:, 1:]

    def crash(step):
        if crash_at is not None and step == crash_at:
            raise KeyboardInterrupt("killed")

    scores = {2: 5.0, 4: 1.0, 6: 0.0, 8: 2.0}  # evaluations every 2 steps; the best is at step 2, before the kill
    extra = dict(eval_fn=lambda m, step: {"score": scores.get(step + 1, -1.0)}, best_by="score") if best else {}
    torch.manual_seed(0)
    model = GPT(TINY)
    return train_loop("t", model, tiny_train(steps, ckpt_every=3, grad_accum=2, warmup_steps=2, eval_every=2), runtime(), batch_fn,
                      lambda m, b: (m(*b)[1], {}), lambda b: b[0].numel(), tmp, "fp", on_step=crash, **extra)


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    straight, hist = _pretrain_like(tmp_path / "a", 8)
    with pytest.raises(KeyboardInterrupt):
        _pretrain_like(tmp_path / "b", 8, crash_at=5)  # checkpoint at step 3, killed after step 5
    assert json.loads((tmp_path / "b/state.json").read_text())["step"] == 3
    resumed, hist_b = _pretrain_like(tmp_path / "b", 8)
    assert hist_b["resumed_from"] == 3 and hist["resumed_from"] == 0
    assert [r["step"] for r in hist_b["curve"]] == list(range(1, 9))  # the curve before the kill is kept
    assert [r["loss"] for r in hist_b["curve"]] == [r["loss"] for r in hist["curve"]]
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n


def test_killed_run_resumes_with_its_best_weights_and_logs_the_mean_micro_batch_loss(tmp_path):
    straight, hist = _pretrain_like(tmp_path / "a", 8, best=True)
    with pytest.raises(KeyboardInterrupt):
        _pretrain_like(tmp_path / "b", 8, crash_at=5, best=True)
    resumed, hist_b = _pretrain_like(tmp_path / "b", 8, best=True)
    assert hist["best"] == hist_b["best"] == {"step": 2, "value": 5.0} and hist_b["resumed_from"] == 3
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n  # both return the weights of step 2
    # the first step's loss is the mean over its 2 micro-batches, computed here on the starting weights
    torch.manual_seed(0)
    start = GPT(TINY)
    data = torch.randint(0, 40, (2000,), generator=torch.Generator().manual_seed(0))
    losses = []
    for micro in range(2):
        s = torch.randint(0, 1900, (4,), generator=torch.Generator().manual_seed(micro))
        chunk = torch.stack([data[i : i + 17] for i in s.tolist()])
        losses.append(float(start(chunk[:, :-1], chunk[:, 1:])[1]))
    assert hist["curve"][0]["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)


def test_checkpoints_round_trip_through_safetensors(tmp_path):
    torch.manual_seed(0)
    for model in (GPT(TINY), ScalarModel(TINY)):
        folder = tmp_path / type(model).__name__
        save_checkpoint(folder, model, None, {"note": "x"})
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
        loaded, info = load_checkpoint(folder)
        assert type(loaded) is type(model) and info["note"] == "x" and info["num_params"] > 0
        x = torch.randint(0, 40, (2, 10))
        a, b = model(x), loaded(x)
        assert torch.equal(a[0] if isinstance(a, tuple) else a, b[0] if isinstance(b, tuple) else b)
    # the same facts in another order give the same bytes (DVC hashes config.json: no spurious rerun)
    save_checkpoint(tmp_path / "ab", GPT(TINY), None, {"a": 1, "b": 2})
    save_checkpoint(tmp_path / "ba", GPT(TINY), None, {"b": 2, "a": 1})
    assert (tmp_path / "ab/config.json").read_bytes() == (tmp_path / "ba/config.json").read_bytes()
    rm, _ = load_checkpoint(tmp_path / "GPT", kind="scalar")  # the reward model starts from an LM
    assert isinstance(rm, ScalarModel)
    with pytest.raises(CheckpointError, match="nothing: no checkpoint"):
        load_checkpoint(tmp_path / "nothing")


def _ddp(out: Path, nproc: int, stop_at: int | None = None, strategy: str = "ddp") -> subprocess.CompletedProcess:
    """tests/ddp_worker.py on `nproc` gloo processes under torchrun (1: plain python)."""
    script = Path(__file__).with_name("ddp_worker.py")
    root = str(Path(__file__).resolve().parents[1])  # the workers import tasks/ without an installed package too
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1", "STOP_AT": str(stop_at or ""), "STRATEGY": strategy,
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    env.pop("WORLD_SIZE", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run([*launcher, str(script)], env=env, capture_output=True, text=True, timeout=300)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_train_the_weights_of_one_with_the_same_global_batch(tmp_path, strategy):
    """grad_accum 4 over 2 processes is 2 micro-batches each, gradients averaged (DDP) or
    reduce-scattered into shards (FSDP): the same data and, within rounding, the same weights as
    one process; DDP's replicas stay identical, FSDP gathers whole weights to the first process."""
    one, two = _ddp(tmp_path / "one", 1), _ddp(tmp_path / "two", 2, strategy=strategy)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    w1 = _weights(tmp_path / "one/rank0.safetensors")
    w2 = [_weights(tmp_path / f"two/rank{r}.safetensors") for r in ((0, 1) if strategy == "ddp" else (0,))]
    assert all(torch.equal(w2[0][k], w2[-1][k]) for k in w1), "replicas must stay identical"
    assert set(w2[0]) == set(w1), "the whole model, every weight named as one process names it"
    figures = json.loads((tmp_path / "two/rank0.json").read_text())
    if strategy == "fsdp":  # each process held about half of the weights while it trained
        assert figures["held"] <= 0.6 * figures["whole"], figures
    else:
        assert figures["held"] == figures["whole"], figures
    diff = max(float((w1[k] - w2[0][k]).abs().max()) for k in w1)
    assert diff < 1e-5, f"2 processes drifted from 1 by {diff}"
    r1, r2 = (json.loads((tmp_path / f"{d}/rank0.json").read_text()) for d in ("one", "two"))
    assert r2["world_size"] == 2 and r1["world_size"] == 1
    assert r2["losses"] == pytest.approx(r1["losses"], rel=1e-5)  # the logged loss is the global batch's mean on both
    assert [e["step"] for e in r2["evals"]] == [0, 4, 8, 12] and r2["best"]["step"] == r1["best"]["step"]  # evaluations sample too
    assert [e["score"] for e in r2["evals"]] == pytest.approx([e["score"] for e in r1["evals"]], rel=1e-5)
    torch.manual_seed(0)
    start = GPT(ModelConfig(vocab_size=40, n_layer=2, n_head=2, d_model=32, max_seq_len=32)).state_dict()
    assert max(float((w1[k] - start[k]).abs().max()) for k in w1) > 1e-2, "the run must have trained"


@pytest.mark.slow
@pytest.mark.parametrize(("killed_on", "resumed_on"),
                         [((2, "ddp"), (1, "ddp")), ((1, "ddp"), (2, "ddp")), ((2, "fsdp"), (1, "ddp")), ((1, "ddp"), (2, "fsdp"))],
                         ids=["ddp2-to-1", "1-to-ddp2", "fsdp2-to-1", "1-to-fsdp2"])
def test_a_run_killed_resumes_on_another_number_of_processes_to_the_same_weights(tmp_path, killed_on, resumed_on):
    killed = _ddp(tmp_path / "run", killed_on[0], stop_at=7, strategy=killed_on[1])  # checkpoint at step 6, killed after step 7
    assert killed.returncode != 0 and not (tmp_path / "run/rank0.safetensors").exists()
    resumed = _ddp(tmp_path / "run", resumed_on[0], strategy=resumed_on[1])
    straight = _ddp(tmp_path / "straight", 1)
    assert resumed.returncode == 0 and straight.returncode == 0, (resumed.stderr + straight.stderr)[-3000:]
    assert json.loads((tmp_path / "run/rank0.json").read_text())["resumed_from"] == 6
    a, b = _weights(tmp_path / "run/rank0.safetensors"), _weights(tmp_path / "straight/rank0.safetensors")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-5, f"killed on {killed_on}, resumed on {resumed_on}: {diff} from an unbroken run"


def test_rerun_after_a_finished_run_reports_without_retraining(tmp_path):
    from tasks.lib.train import train_loop as loop

    def run_once():
        torch.manual_seed(0)
        model = GPT(TINY)
        x = torch.randint(0, 40, (4, 17), generator=torch.Generator().manual_seed(0))
        return loop("t", model, tiny_train(3), runtime(), lambda s, m: (x[:, :-1], x[:, 1:]), lambda m, b: (m(*b)[1], {}),
                    lambda b: b[0].numel(), tmp_path / "ck", "fp", eval_fn=lambda m, s: {"val_loss": float(m(x[:, :-1], x[:, 1:])[1])})

    first_model, first = run_once()
    again_model, again = run_once()
    assert again["resumed_from"] == 3 and again["evals"] and again["evals"][-1]["val_loss"] == pytest.approx(first["evals"][-1]["val_loss"])
    assert all(torch.equal(a, b) for a, b in zip(first_model.state_dict().values(), again_model.state_dict().values()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_loop_on_cuda_with_bf16_and_compile(tmp_path):
    data = torch.randint(0, 40, (4, 33), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model, hist = train_loop("t", GPT(TINY), tiny_train(40, lr=1e-2), runtime("cuda", "auto", compile=True),
                             lambda s, m: (data[:, :-1], data[:, 1:]), lambda m, b: (m(*(v.cuda() for v in b))[1], {}),
                             lambda b: b[0].numel(), tmp_path / "ck", "fp")
    assert hist["final"]["loss"] == hist["curve"][-1]["loss"]
    assert hist["final"]["loss"] < 0.5 * hist["first_loss"]
    save_checkpoint(tmp_path / "m", model, None, {})  # plain names: no torch.compile prefix in the file
    loaded, _ = load_checkpoint(tmp_path / "m", "cuda")
    assert sorted(loaded.state_dict()) == sorted(GPT(TINY).state_dict())


def test_best_weights_by_a_held_out_metric_are_kept(tmp_path):
    """The reward model keeps the weights of its best held-out accuracy, not the last ones."""
    x = torch.randint(0, 40, (4, 17), generator=torch.Generator().manual_seed(0))
    planted = iter([0.50, 0.55, 0.80, 0.60, 0.70])  # step 0, then after steps 1..4
    snapshots = {}

    def eval_fn(m, step):
        snapshots[step + 1] = {k: v.clone() for k, v in m.state_dict().items()}
        return {"val_accuracy": next(planted)}

    torch.manual_seed(0)
    model, hist = train_loop("t", GPT(TINY), tiny_train(4, eval_every=1), runtime(), lambda s, m: (x[:, :-1], x[:, 1:]),
                             lambda m, b: (m(*b)[1], {}), lambda b: b[0].numel(), tmp_path / "ck", "fp", eval_fn=eval_fn, best_by="val_accuracy")
    assert hist["best"] == {"step": 2, "value": 0.80}
    assert all(torch.equal(model.state_dict()[k], snapshots[2][k]) for k in snapshots[2])
    assert not torch.equal(model.state_dict()["tok.weight"], snapshots[4]["tok.weight"])


def test_ppo_scores_penalise_unfinished_responses_and_know_their_prompts():
    """One PPO iteration: the scorer gets each response with its own prompt and that prompt's
    index; a response that never reaches a stop token loses missing_eos_penalty, so the
    iteration's reward_mean is 0.5 - 2.0 x (share unfinished)."""
    from tasks.lib.rl_loop import rl_loop

    torch.manual_seed(0)
    policy, ref, value = GPT(TINY), GPT(TINY), ScalarModel(TINY)
    ref.load_state_dict(policy.state_dict())
    prompts = [[1, 2, 10 + i] for i in range(8)]
    calls = []

    def score_fn(batch_prompts, responses, idx):
        calls.append((batch_prompts, idx))
        return torch.full((len(responses),), 0.5)

    cfg = conf("ppo", steps=1, value_warmup=0, batch_prompts=4, sampling={"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0}, ppo_epochs=1,
               minibatches=1, missing_eos_penalty=2.0, kl={"beta": 0.0, "adaptive": False, "target": 2.0, "horizon": 1000})
    stop = tuple(range(0, 40, 3))  # about a third of the vocabulary stops: some responses end, some do not
    (row,) = rl_loop(policy, ref, value, score_fn, prompts, cfg, pad_id=0, stop_ids=stop, seed=0, device=torch.device("cpu"))
    (batch_prompts, idx), = calls
    assert len(idx) == 4 and [prompts[i] for i in idx] == batch_prompts
    assert 0 < row["finished_fraction"] < 1
    assert row["reward_mean"] == pytest.approx(0.5 - 2.0 * (1 - row["finished_fraction"]), abs=1e-6)


def test_the_value_warm_up_trains_the_value_alone_then_the_policy_moves():
    policy, value, run = _tiny_ppo(steps=2, value_warmup=3, ptx_coef=1.0, kl={"beta": 0.05, "adaptive": True, "target": 0.01, "horizon": 10})
    fixed = (torch.tensor([[1, 2, 3, 4, 5, 6]]), torch.tensor([[2, 3, 4, 5, 6, 7]]))
    p0 = {k: v.clone() for k, v in policy.state_dict().items()}
    v0 = {k: v.clone() for k, v in value.state_dict().items()}
    after: list[dict] = []

    def snapshot(it, row, *a):
        after.append({"policy": {k: v.clone() for k, v in policy.state_dict().items()}, "value": {k: v.clone() for k, v in value.state_dict().items()}})

    hist = run(on_iter=snapshot, ptx_fn=lambda k: fixed)
    assert "ptx_loss" in hist[3]  # PPO-ptx is on, but only once the policy moves
    assert [h["phase"] for h in hist] == ["value_warmup"] * 3 + ["policy"] * 2 and [h["iteration"] for h in hist] == [1, 2, 3, 4, 5]
    for i in range(3):  # warm-up: the policy is untouched, the value function learns, beta stays
        assert all(torch.equal(after[i]["policy"][k], p0[k]) for k in p0)
        assert hist[i]["clip_fraction"] == 0.0 and hist[i]["beta"] == 0.05 and "ptx_loss" not in hist[i]
    assert any(not torch.equal(after[0]["value"][k], v0[k]) for k in v0)
    assert any(not torch.equal(after[3]["policy"][k], p0[k]) for k in p0)  # then the policy moves
    assert hist[3]["beta"] != 0.05  # and the KL controller reacts
