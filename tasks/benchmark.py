"""benchmark: score any registered model or checkpoint with lm-evaluation-harness (a tool, not a stage).

    python -m tasks.benchmark --model models:/rlhf@champion                  # the built-in doc_match task
    python -m tasks.benchmark --checkpoint models/base --tasks doc_match --num-fewshot 0
    python -m tasks.benchmark --model models:/sft/1 --include my_tasks/ --tasks my_task
    python -m tasks.benchmark --model models:/base@latest --tasks hellaswag arc_easy mmlu   # needs the hub (internet)

`doc_match` is built from this project's held-out instruction data (tasks/lib/benchmarks.py:
pick the right documentation sentence among distractors; chance is 1 / choices), written as
an lm-eval task (JSONL + YAML) into a temporary folder; any other name is one of lm-eval's
tasks or a task in a YAML file under `--include` (local data files: `dataset_path: json`
with `dataset_kwargs.data_files`). lm-eval's standard tasks (HellaSwag, ARC, MMLU, ...) load
their data from the Hugging Face hub on first use, so they need internet once (then
`HF_DATASETS_OFFLINE=1` uses the cache). With `--model`, the results go to the version's
MLflow run as metrics (`bench.<task>.<metric>`) and onto the version as tags; the printed
table has each figure beside chance where the task has one. Exit code 2 on a bad model, task
or path.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

BUILTIN = "doc_match"


def builtin_task(folder: Path, params_file: str) -> tuple[Path, float]:
    """Write doc_match (the evaluate stage's items and few-shot block) as an lm-eval task;
    returns its YAML file and the accuracy of a random guess."""
    from tasks.config import load_params
    from tasks.lib import benchmarks, instructions

    params = load_params(params_file)
    splits = instructions.splits(params.instructions, params.seed)
    b = params.evaluate.benchmark
    items = benchmarks.doc_match(splits["eval"], [ex["messages"][1]["content"] for ex in splits["eval"]], b.choices, params.seed)
    prefix = benchmarks.doc_match_prefix(instructions.sample(splits["sft"], b.few_shot, params.seed, "benchmark-shots"))
    return benchmarks.write_lm_eval_task(folder, items, prefix, BUILTIN), 1 / b.choices


def resolve(model_uri: str | None, checkpoint: str | None):
    """(checkpoint folder, (registered name, version) or None)."""
    if checkpoint:
        return Path(checkpoint), None
    import mlflow

    from tasks.lib import registry
    from tasks.lib.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    uri, version = registry.resolve_uri(model_uri)
    return registry.download_checkpoint(uri), version


def record(version: tuple[str, str], results: dict) -> None:
    """Results as metrics of the version's MLflow run and as tags of the version."""
    import mlflow

    from tasks.lib import registry

    name, v = version
    client = mlflow.MlflowClient()
    run_id = client.get_model_version(name, v).run_id
    flat = {f"bench.{task}.{k}": val for task, m in results.items() for k, val in m.items()}
    for k, val in flat.items():
        client.log_metric(run_id, k, val)
    registry.tag_version(name, v, {k: round(val, 6) for k, val in flat.items()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tasks.benchmark", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="registered model URI, e.g. models:/rlhf@champion or models:/sft/2")
    src.add_argument("--checkpoint", help="a checkpoint folder, e.g. models/sft")
    ap.add_argument("--tasks", nargs="+", default=[BUILTIN], help=f"lm-eval task names or YAML files (default: {BUILTIN})")
    ap.add_argument("--include", action="append", default=[], help="a folder of lm-eval task YAML files (repeatable)")
    ap.add_argument("--num-fewshot", type=int, default=None)
    ap.add_argument("--limit", type=float, default=None, help="at most this many examples per task (or a fraction < 1)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--params", default="params.yaml", help="for the built-in task: the instruction data")
    ap.add_argument("--output", help="write the results as JSON here")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = ap.parse_args(argv)
    if args.num_fewshot is not None and args.num_fewshot < 0 or args.limit is not None and args.limit <= 0 or args.batch_size < 1:
        print("error: benchmark: --num-fewshot must be >= 0, --limit > 0 and --batch-size >= 1", file=sys.stderr)
        return 2

    from tasks.config import ConfigError
    from tasks.lib.errors import StageError

    try:
        import torch

        from tasks.lib.bpe import load_tokenizer
        from tasks.lib.harness import PipelineLM, evaluate_tasks
        from tasks.lib.model import load_checkpoint

        folder, version = resolve(args.model, args.checkpoint)
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model, info = load_checkpoint(folder, device)
        if info["kind"] != "lm":
            raise StageError(f"{args.model or args.checkpoint} is a {info['kind']} model (a reward model), not a language model")
        lm = PipelineLM(model, load_tokenizer(folder), batch_size=args.batch_size)
        with tempfile.TemporaryDirectory() as tmp:
            include, chance = list(args.include), {}
            if BUILTIN in args.tasks:
                spec, chance[BUILTIN] = builtin_task(Path(tmp), args.params)
                include.append(str(spec.parent))
            results = evaluate_tasks(lm, args.tasks, include or None, args.num_fewshot, args.limit)
    except (StageError, ConfigError, FileNotFoundError) as err:
        print(f"error: benchmark: {err}", file=sys.stderr)
        return 2
    for task, metrics in results.items():
        print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
              + (f" (chance {chance[task]:.3f})" if task in chance else ""))
    if version is not None:
        record(version, results)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
