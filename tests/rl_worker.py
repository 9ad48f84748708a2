"""Run by tests/test_alignment.py under torchrun (gloo): the RL loop on several processes.

Environment: OUT (folder: per rank, the final weights and a JSON of the history and of what the
score function saw), ALGORITHM (ppo or rloo), STEPS. Planted reward: the share of token 7 in a
response; token 5 ends a response (so responses differ in length and padding).
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_model

from tasks.lib.model import GPT, ModelConfig, ScalarModel
from tasks.lib.rl import whiten
from tasks.lib.rl_loop import rl_loop
from tests.conftest import cfg as conf
from tests.conftest import runtime

algorithm = os.environ["ALGORITHM"]
out = Path(os.environ["OUT"])
tiny = ModelConfig(vocab_size=40, n_layer=1, n_head=2, d_model=32, max_seq_len=32)
torch.manual_seed(0)
policy, ref = GPT(tiny), GPT(tiny)
ref.load_state_dict(policy.state_dict())
value = ScalarModel(tiny) if algorithm == "ppo" else None
rt = runtime("cpu")
seen: list[dict] = []


def score_fn(prompts, responses, idx):
    scores = [sum(t == 7 for t in r) / max(len(r), 1) for r in responses]
    seen.append({"idx": list(idx), "scores": scores})
    return torch.tensor(scores, dtype=torch.float)


def ptx_fn(key):  # PPO-ptx's "pretraining" batches: random tokens, seeded by the loop's key
    t = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(key))
    return t[:, :-1], t[:, 1:]


common = dict(steps=int(os.environ["STEPS"]), batch_prompts=4, sampling={"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0},
              ppo_epochs=2, minibatches=2, lr=3e-3, missing_eos_penalty=0.0, ptx_coef=0.0,
              kl={"beta": 0.01, "adaptive": True, "target": 2.0, "horizon": 1000})
if algorithm == "ppo":
    cfg = conf("ppo", value_warmup=1, **{**common, "ptx_coef": 0.5})
else:
    cfg = conf("group_rl", algorithm=algorithm, group_size=4, **common)
# prompts of 3 to 27 tokens in a context of 32: a batch holding a long one allows fewer new tokens
prompts = [[1, 2] + [3 + i % 30] * (1 + (i % 4) * 8) for i in range(32)]
hist = rl_loop(policy, ref, value, score_fn, prompts, cfg, pad_id=0, stop_ids=(5,), seed=0,
               device=torch.device("cpu"), algorithm=algorithm, group_size=1 if algorithm == "ppo" else 4, rt=rt,
               ptx_fn=ptx_fn)
save_model(policy, str(out / f"policy{rt.rank}.safetensors"))
if value is not None:
    save_model(value, str(out / f"value{rt.rank}.safetensors"))
# the whitening over processes on data of each rank's own (lengths and masks differ)
g = torch.Generator().manual_seed(rt.rank)
v, m = torch.randn(3 + rt.rank, 5, generator=g) * (1 + rt.rank), (torch.rand(3 + rt.rank, 5, generator=g) > 0.3).float()
whitened = whiten(v, m, rt.all_sum)
(out / f"rank{rt.rank}.json").write_text(json.dumps({"world_size": rt.world, "history": hist, "seen": seen,
                                                     "whiten": {"v": v.tolist(), "m": m.tolist(), "out": whitened.tolist()}}))
