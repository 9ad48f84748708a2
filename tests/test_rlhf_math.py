"""RLHF pinned with hand-computed values: the model's causality and cache, the SFT mask, the
reward model's readout and pairs, PPO's losses, GAE, KL, the KL controller, sampling, and
the behaviour of the PPO loop at its first step. Each test here failed on a planted bug."""

import math

import pytest
import torch
import torch.nn.functional as F

from tasks.lib import rl
from tasks.lib.model import GPT, KVCache, ModelConfig, ScalarModel, sample_next
from tests.conftest import cfg as conf

TINY = ModelConfig(vocab_size=40, n_layer=2, n_head=2, d_model=32, max_seq_len=48)


# ------------------------------------------------------------------ the model
@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_changing_a_future_token_changes_no_earlier_logit(positions):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**TINY.__dict__, "positions": positions})).eval()
    x = torch.randint(0, 40, (2, 12))
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % 40
    a, b = model(x)[0], model(y)[0]
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-4)


def test_cache_without_a_mask_attends_like_the_full_sequence():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    x = torch.randint(0, 40, (1, 10))
    full = model(x)[0]
    cache = KVCache(TINY, 1, 10, "cpu", torch.float32)
    model.hidden(x[:, :6], cache=cache)
    # three new tokens at once: query length 3, key length 9
    part = model.head(model.hidden(x[:, 6:9], cache=cache))
    assert torch.allclose(part, full[:, 6:9], atol=1e-5)


def test_reward_readout_is_the_same_alone_and_padded_in_a_batch():
    torch.manual_seed(0)
    rm = ScalarModel(TINY).eval()
    short, long = [1, 2, 3, 9], [4, 5, 6, 7, 8, 1, 2, 9]
    alone = [rl.rewards_of(rm, [s], pad_id=0).item() for s in (short, long)]
    together = rl.rewards_of(rm, [short, long], pad_id=0).tolist()
    assert together == pytest.approx(alone, abs=1e-5)
    # and it is the head's value at the last real token, not at a padding column
    direct = rm(torch.tensor([short]))[0, -1].item()
    assert together[0] == pytest.approx(direct, abs=1e-5)


def test_normalisation_lives_in_the_reward_model_and_survives_a_checkpoint(tmp_path):
    from tasks.lib.model import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    rm = ScalarModel(TINY).eval()
    seqs = [torch.randint(0, 40, (7,)).tolist() + [9] for _ in range(32)]
    raw = rl.rewards_of(rm, seqs, 0)
    rm.normalise(float(raw.mean()), float(raw.std()))
    norm = rl.rewards_of(rm, seqs, 0)
    assert float(norm.mean()) == pytest.approx(0.0, abs=1e-5) and float(norm.std()) == pytest.approx(1.0, abs=1e-5)
    save_checkpoint(tmp_path / "rm", rm, None)
    value, _ = load_checkpoint(tmp_path / "rm")  # PPO's value function starts here: the same units
    assert torch.allclose(rl.rewards_of(value, seqs, 0), norm, atol=1e-5)


# ------------------------------------------------------------------ SFT and the reward data
def test_sft_loss_mask_covers_exactly_the_assistant_targets():
    from tasks.lib.bpe import train_bpe
    from tasks.lib.instructions import masked_batch
    from tasks.lib.template import Template

    t = Template(train_bpe(iter(["question answer words"] * 20), 300, 1))
    ids, mask = t.render([{"role": "user", "content": "question"}, {"role": "assistant", "content": "answer words"}])
    x, y, m = masked_batch([(ids, mask)], t.pad)
    answer = t.text_ids("answer words") + [t.end_turn]
    # the targets under the mask are the answer and its end of turn, in order, and nothing else
    assert y[0][m[0]].tolist() == answer
    assert x[0][m[0]][0].item() == t.assistant  # the first masked prediction is made from <|assistant|>


def test_pair_orientation_follows_the_ranking_file(tmp_path):
    import json

    from tasks.lib.bpe import train_bpe
    from tasks.lib.template import Template
    from tasks.reward import load_prompts

    t = Template(train_bpe(iter(["a b c d e"] * 20), 300, 1))
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps({"prompt": "p", "completions": ["a", "b", "c"], "ranking": [2, 0, 1]}) + "\n")
    (rec,) = load_prompts(f, t, 48)
    # best first: c beats a and b, a beats b
    assert sorted(rec["pairs"]) == [(0, 1), (2, 0), (2, 1)]
    f.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"], "ranking": [0, 1], "scores": [0.5, 0.5]}) + "\n")
    assert load_prompts(f, t, 48) == []  # a tie carries no preference


def test_pair_loss_by_hand():
    from tasks.reward import pair_loss

    class Fixed(torch.nn.Module):  # reward = first token of the sequence, read at the end
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.w * x[:, :1].float().expand_as(x)

    loss, acc = pair_loss(Fixed(), [{"seqs": [[3, 9], [1, 9], [2, 9]], "pairs": [(0, 1), (2, 1), (1, 2)]}], pad_id=0)
    expected = -(F.logsigmoid(torch.tensor(2.0)) + F.logsigmoid(torch.tensor(1.0)) + F.logsigmoid(torch.tensor(-1.0))) / 3
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6) and acc == pytest.approx(2 / 3)


def test_readout_token_survives_a_full_context():
    from tasks.lib.bpe import train_bpe
    from tasks.lib.template import Template

    t = Template(train_bpe(iter(["a b c"] * 20), 300, 1))
    seq = t.scored(list(range(30, 60)), list(range(60, 90)), max_len=48)
    assert len(seq) == 48 and seq[-1] == t.reward and seq[-2] == 89


# ------------------------------------------------------------------ PPO math
def test_kl_rewards_by_hand():
    logp = torch.tensor([[0.0, -1.0, -2.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0]])
    mask = torch.tensor([[False, True, True, False]])
    rewards, kl = rl.kl_rewards(logp, ref, torch.tensor([3.0]), mask, beta=0.1)
    assert kl.tolist() == [[0.0, 0.5, -1.0, 0.0]]
    # -beta * kl on response tokens, the score at the last one
    assert rewards[0].tolist() == pytest.approx([0.0, -0.05, 0.1 + 3.0, 0.0])


def test_gae_with_gamma_and_lambda_by_hand():
    rewards = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
    values = torch.tensor([[9.0, 0.5, 1.0, 7.0], [0.0, 3.0, 9.0, 9.0]])  # non-zero values after the end must not leak in
    mask = torch.tensor([[False, True, True, False], [False, False, True, False]])
    g, lam = 0.9, 0.8
    adv = rl.gae(rewards, values, mask, gamma=g, lam=lam)
    d2 = 2.0 - 1.0  # last response token: no next value
    d1 = 1.0 + g * 1.0 - 0.5
    assert adv[0].tolist() == pytest.approx([0.0, d1 + g * lam * d2, d2, 0.0])
    assert adv[1].tolist() == pytest.approx([0.0, 0.0, 5.0 - 9.0, 0.0])


def test_policy_loss_is_the_clipped_surrogate_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, ratio = rl.policy_loss(logp, old, adv, mask, clip=0.2)
    # ratio 1.5, A>0: min(1.5, 1.2)*A = 1.2 -> -1.2; ratio 0.5, A>0: min(0.5, 0.8) = 0.5 -> -0.5;
    # ratio 1.1, A<0: min(1.1*-2, 1.1*-2) = -2.2 -> 2.2
    assert ratio[0].tolist() == pytest.approx([1.5, 0.5, 1.1])
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3)


def test_value_loss_is_clipped_by_hand():
    v, old, ret = torch.tensor([[2.0, 0.1]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    loss = rl.value_loss(v, old, ret, torch.ones(1, 2), clip=0.2)
    # token 1: max((2-1)^2, (0.2-1)^2) = 1; token 2: max((0.1-1)^2, (0.1-1)^2) = 0.81
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.81) / 2)


def test_token_logprobs_use_the_sampling_temperature():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    x = torch.randint(0, 40, (1, 6))
    logp, ent = rl.token_logprobs(model, x, temperature=0.5)
    logits = model(x)[0][:, :-1] / 0.5
    expected = F.log_softmax(logits, -1).gather(-1, x[:, 1:, None]).squeeze(-1)
    assert torch.allclose(logp, expected, atol=1e-6)
    p = F.softmax(logits, -1)
    assert torch.allclose(ent, -(p * p.log()).sum(-1), atol=1e-5)


def test_kl_controller_by_hand_and_able_to_act_at_the_defaults():
    ctl = rl.KLController(beta=0.1, adaptive=True, target=2.0, horizon=100)
    ctl.update(kl=6.0, n_steps=10)  # error clipped to +0.2
    assert ctl.beta == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl.update(kl=1.5, n_steps=10)  # error -0.25 clipped to -0.2
    assert ctl.beta == pytest.approx(0.1 * 1.02 * 0.98)
    fixed = rl.KLController(beta=0.1, adaptive=False, target=2.0, horizon=100)
    fixed.update(kl=50.0, n_steps=10)
    assert fixed.beta == 0.1
    # at the shipped defaults, a KL twice the target over the run must be able to double beta
    ppo = conf("ppo")
    from tasks.config import load_params
    from tests.conftest import REPO

    ppo = load_params(str(REPO / "params.yaml")).ppo
    ctl = rl.KLController(ppo.kl.beta, True, ppo.kl.target, ppo.kl.horizon)
    for _ in range(ppo.steps):
        ctl.update(2 * ppo.kl.target, ppo.batch_prompts)
    assert ctl.beta >= 2 * ppo.kl.beta


def test_sampling_stays_inside_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    nucleus = {int(sample_next(logits, 1.0, None, 0.7, gen)) for _ in range(300)}
    assert nucleus == {0, 1}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are outside
    top2 = {int(sample_next(logits, 1.0, 2, None, gen)) for _ in range(300)}
    assert top2 == {0, 1}
    everything = {int(sample_next(logits, 1.0, None, None, gen)) for _ in range(2000)}
    assert everything == {0, 1, 2, 3}


# ------------------------------------------------------------------ the PPO loop
def test_ppo_ratio_is_exactly_one_before_the_first_update_with_dropout_and_temperature():
    from tasks.lib.rl_loop import rl_loop

    torch.manual_seed(0)
    dropped = ModelConfig(**{**TINY.__dict__, "dropout": 0.3})
    policy, ref, value = GPT(dropped), GPT(dropped), ScalarModel(dropped)
    ref.load_state_dict(policy.state_dict())
    cfg = conf("ppo", steps=1, value_warmup=0, batch_prompts=8, ppo_epochs=1, minibatches=1, lr=1e-30, value_lr=1e-30,
               sampling={"max_new_tokens": 6, "temperature": 0.7, "top_p": 1.0},
               kl={"beta": 0.1, "adaptive": False, "target": 2.0, "horizon": 64})
    hist = rl_loop(policy, ref, value, lambda p, r, i: torch.zeros(len(r)), [[1, 2, 3 + i] for i in range(8)], cfg,
                    pad_id=0, stop_ids=(), seed=0, device=torch.device("cpu"))
    assert hist[0]["approx_kl"] == pytest.approx(0.0, abs=1e-12) and hist[0]["clip_fraction"] == 0.0
    assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start


def test_unfinished_responses_pay_the_missing_eos_penalty():
    from tasks.lib.rl_loop import rl_loop

    torch.manual_seed(0)
    policy, ref, value = GPT(TINY), GPT(TINY), ScalarModel(TINY)
    ref.load_state_dict(policy.state_dict())
    cfg = conf("ppo", steps=1, value_warmup=0, batch_prompts=8, ppo_epochs=1, minibatches=1, missing_eos_penalty=1.5,
               sampling={"max_new_tokens": 3, "temperature": 1.0, "top_p": 1.0})
    hist = rl_loop(policy, ref, value, lambda p, r, i: torch.zeros(len(r)), [[1, 2, 3 + i] for i in range(8)], cfg,
                    pad_id=0, stop_ids=(), seed=0, device=torch.device("cpu"))  # no stop token: nothing finishes
    assert hist[0]["reward_mean"] == pytest.approx(-1.5)


def test_sequences_and_response_mask_by_hand():
    x, mask = rl.sequences([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0, device="cpu")
    assert x.tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]] and x.dtype == torch.long
    # position j predicts token j+1: response tokens are predicted from positions 2,3 and 0,1,2
    assert mask.tolist() == [[False, False, True, True], [True, True, True, False]]


def test_masked_mean_and_whiten_by_hand():
    v, m = torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 0.0])
    assert rl.masked_mean(v, m).item() == 2.0
    assert rl.masked_mean(v, torch.tensor([0.0, 1.0, 0.0])).item() == 3.0  # one valid element
    assert rl.whiten(v, m).tolist() == pytest.approx([-1.0, 1.0, 0.0], abs=1e-6)


def test_token_logprobs_default_to_temperature_one():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    x = torch.randint(0, 40, (1, 6))
    logp, _ = rl.token_logprobs(model, x)
    expected = F.log_softmax(model(x)[0][:, :-1], -1).gather(-1, x[:, 1:, None]).squeeze(-1)
    assert torch.allclose(logp, expected, atol=1e-6)


def test_clipping_below_by_hand():
    # a negative advantage with a ratio under 1 - eps: the clipped term is the larger loss
    loss, _ = rl.policy_loss(torch.log(torch.tensor([[0.5]])), torch.zeros(1, 1), torch.tensor([[-2.0]]), torch.ones(1, 1), clip=0.2)
    assert loss.item() == pytest.approx(2.0 * 0.8)
    # a value that fell far below its old estimate: the clipped value (-0.2) is further from the return
    vl = rl.value_loss(torch.tensor([[-1.0]]), torch.zeros(1, 1), torch.tensor([[-2.0]]), torch.ones(1, 1), clip=0.2)
    assert vl.item() == pytest.approx(0.5 * 1.8**2)


def test_explained_variance_by_hand():
    returns, m = torch.tensor([[1.0, 5.0, 50.0]]), torch.tensor([[1.0, 1.0, 0.0]])  # the third is padding
    # Var(returns) over [1, 5] = 4; values [3, 3] leave a mean squared residual of 4: explain nothing
    assert rl.explained_variance(torch.tensor([[3.0, 3.0, 0.0]]), returns, m) == pytest.approx(0.0)
    assert rl.explained_variance(torch.tensor([[1.0, 5.0, 0.0]]), returns, m) == pytest.approx(1.0)
    # residuals [1, 1]: 1 - 1 / 4
    assert rl.explained_variance(torch.tensor([[2.0, 6.0, 9.0]]), returns, m) == pytest.approx(0.75)
    # a small variance is not clamped away: returns [1, 2] (Var 0.25), values [1.5, 1.5]
    assert rl.explained_variance(torch.tensor([[1.5, 1.5, 0.0]]), torch.tensor([[1.0, 2.0, 0.0]]), m) == pytest.approx(0.0)


def test_ppo_reports_half_the_mean_squared_log_ratio_of_the_second_epoch():
    """approx_kl (Schulman's k2 estimator, 0.5 (log pi - log pi_old)^2 over response tokens),
    recomputed here from the weights after the first epoch: with two epochs on one minibatch the
    first epoch's figure is 0 (nothing moved yet), so the iteration's mean is half the second's."""
    import copy

    from tasks.lib.rl_loop import rl_loop

    torch.manual_seed(0)
    policy0, ref, value = GPT(TINY), GPT(TINY), ScalarModel(TINY)
    ref.load_state_dict(policy0.state_dict())
    prompts = [[1, 2, 3 + i] for i in range(6)]
    T = 0.7

    def run(epochs):
        policy, seen = copy.deepcopy(policy0), {}
        cfg = conf("ppo", steps=1, value_warmup=0, batch_prompts=6, ppo_epochs=epochs, minibatches=1, lr=3e-2,
                   sampling={"max_new_tokens": 5, "temperature": T, "top_p": 1.0})
        hist = rl_loop(policy, ref, copy.deepcopy(value), lambda p, r, i: torch.arange(len(r), dtype=torch.float32),
                       prompts, cfg, pad_id=0, stop_ids=(), seed=0, device=torch.device("cpu"),
                       on_iter=lambda it, row, responses, idx: seen.update(responses=responses, idx=idx))
        return policy, hist[0], seen

    policy1, _, first = run(1)  # the weights the second epoch of a two-epoch run starts from
    _, row, second = run(2)
    assert first == second  # the same rollout

    def logps(model):  # log-softmax of logits / T at each response token, written out here
        out = []
        with torch.no_grad():
            for i, r in zip(second["idx"], second["responses"]):
                seq = torch.tensor([prompts[i] + r])
                logits = model(seq)[0][0] / T
                out += [float(torch.log_softmax(logits[len(prompts[i]) - 1 + j], -1)[tok]) for j, tok in enumerate(r)]
        return torch.tensor(out)

    delta = logps(policy1.eval()) - logps(policy0.eval())
    assert delta.abs().max() > 1e-3  # the first epoch moved the policy
    expected = 0.5 * (0.5 * delta**2).mean()  # epochs' mean of (0, the second epoch's figure)
    assert row["approx_kl"] == pytest.approx(float(expected), rel=1e-3)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_dropout_drops_attention_weights_in_training_only(masked):
    """At dropout 1 every attention weight is dropped, so a training-mode attention outputs
    exactly 0; in eval mode nothing is dropped. Both paths: plain causal and an explicit mask."""
    from tasks.lib.model import Attention

    torch.manual_seed(0)
    attn = Attention(ModelConfig(**{**TINY.__dict__, "dropout": 1.0}), 0)
    x = torch.randn(2, 5, TINY.d_model)
    mask = torch.ones(5, 5, dtype=torch.bool).tril() if masked else None
    assert torch.equal(attn.train()(x, None, mask, None), torch.zeros_like(x))
    assert attn.eval()(x, None, mask, None).abs().min() > 0


def test_gradients_go_through_one_flat_buffer_and_back_to_their_parameters():
    """The several-process update sums every gradient in one flat all-reduce: on one process the
    sum is the gradient itself, so each parameter must get its own gradient back (its shape, its
    offset in the buffer), and a parameter with none gets zeros (the layout is the same everywhere)."""
    from tasks.lib.rl_loop import _sum_gradients
    from tests.conftest import runtime

    torch.manual_seed(0)
    policy, value = GPT(TINY), ScalarModel(TINY)
    x = torch.randint(0, TINY.vocab_size, (2, 6))
    (policy(x, x)[1] + value(x).sum()).backward()
    untouched = next(p for p in value.parameters() if p.grad is not None)
    untouched.grad = None  # as a parameter outside the loss
    before = {(i, n): p.grad.clone() for i, mod in enumerate((policy, value)) for n, p in mod.named_parameters() if p.grad is not None}
    _sum_gradients([policy, value], runtime())
    after = {(i, n): p.grad for i, mod in enumerate((policy, value)) for n, p in mod.named_parameters()}
    assert len(before) == len(after) - 1 and all(torch.equal(g, after[k]) for k, g in before.items())
    assert torch.equal(untouched.grad, torch.zeros_like(untouched))
