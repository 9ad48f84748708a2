"""Sampling speed of the preferences and evaluate stages: CPU fp32 against the GPU (bf16).

    python bench/inference_stages.py          # after `dvc repro sft reward`, from the project root

Uses the trained checkpoints in models/ and params.yaml as they are. For each device it
times the gold labeler's sampling (`tasks.preferences.sample_and_rank`, on a slice of
its prompts) and the evaluator's generation and scoring of the SFT model
(`tasks.evaluate.Evaluator.run`), then prints seconds, the speed-up against the CPU run
measured in the same process (after an untimed warm-up on the GPU), and the mean gold score each device's samples reach, which
should agree within sampling noise (the GPU draws other random numbers than the CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.lib import instructions  # noqa: E402
from tasks.lib.template import Template  # noqa: E402
from tasks.config import load_params  # noqa: E402
from tasks.evaluate import Evaluator  # noqa: E402
from tasks.lib.model import load_checkpoint  # noqa: E402
from tasks.preferences import sample_and_rank  # noqa: E402
from tasks.lib.bpe import load_tokenizer  # noqa: E402
from tasks.lib.runtime import Runtime  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prompts", type=int, default=64, help="preference prompts to sample (of preferences.prompts)")
    args = ap.parse_args()
    params = load_params(args.params)
    paths = params.paths
    sft_dir, rm_dir = Path(paths.sft), Path(paths.reward)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"devices: {', '.join(devices)}{'; ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''}; torch {torch.__version__}")
    base: dict[str, float] = {}
    for dev in devices:
        pref = params.preferences.model_copy(update={"compute": params.preferences.compute.model_copy(update={"device": dev}), "prompts": args.prompts})
        ev_cfg = params.evaluate.model_copy(update={"compute": params.evaluate.compute.model_copy(update={"device": dev})})
        p = params.model_copy(update={"preferences": pref, "evaluate": ev_cfg})
        if dev == "cuda":  # CUDA start-up and first kernel loads are not what is measured
            sample_and_rank(params.model_copy(update={"preferences": pref.model_copy(update={"prompts": 8})}), sft_dir)
        t0 = time.perf_counter()
        records = sample_and_rank(p, sft_dir)
        t_pref = time.perf_counter() - t0
        gold_pref = float(np.mean([s for r in records for s in r["scores"]]))

        rt = Runtime(ev_cfg.compute)
        t = Template(load_tokenizer(sft_dir))
        splits = instructions.splits(params.instructions, params.seed)
        examples = [ex for ex in splits["eval"] if len(t.prompt(ex["messages"][0]["content"])) <= params.instructions.max_prompt_tokens][: ev_cfg.prompts]
        scorer, _ = load_checkpoint(rm_dir, rt.device)
        model = load_checkpoint(sft_dir, rt.device)[0].eval()
        ev = Evaluator(p, t, scorer.eval(), examples, splits["sft"][: ev_cfg.few_shot], rt.autocast)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = ev.run(model, chat=True)
        t_eval = time.perf_counter() - t0
        for name, secs, gold in (("preferences sampling", t_pref, gold_pref), ("evaluate (sft model)", t_eval, float(np.mean(out["gold"])))):
            base.setdefault(name, secs)
            print(f"{dev:>4} {rt.dtype_name:>8} {name:>21}: {secs:7.2f} s  x{base[name] / secs:5.2f} vs cpu  mean gold score {gold:.3f}")


if __name__ == "__main__":
    main()
