"""lm-evaluation-harness adapter: any checkpoint of this project as an `lm_eval` model.

    from tasks.lib.harness import PipelineLM, evaluate_tasks
    lm = PipelineLM(model, tokenizer)
    results = evaluate_tasks(lm, ["doc_match"], include_path="tasks_dir", num_fewshot=0, limit=None)

`loglikelihood` (multiple choice), `loglikelihood_rolling` (perplexity tasks) and
`generate_until` (greedy generation to a stop string) run on tasks/lib/scoring.py and the
model's own generation, the same code the evaluate stage uses. Text is encoded as text: a
context starts after `<|endoftext|>` (what the model saw between pretraining documents);
chat models are scored on the task's raw text as well, as lm-eval does without
`--apply_chat_template` (this project's chat template has control tokens that are never text).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lm_eval.api.model import LM

from tasks.lib.errors import StageError


class PipelineLM(LM):
    def __init__(self, model, tokenizer, batch_size: int = 16, max_gen_toks: int = 64):
        super().__init__()
        from tasks.lib.template import Template

        self.model, self.tok, self.batch_size, self.max_gen_toks = model.eval(), tokenizer, batch_size, max_gen_toks
        self.t = Template(tokenizer)
        self._device = next(model.parameters()).device

    def _ids(self, text: str) -> list[int]:
        return self.t.text_ids(text)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        from tasks.lib.scoring import continuation_logprobs

        pairs = [([self.t.eot, *self._ids(ctx)], self._ids(cont)) for ctx, cont in (r.args for r in requests)]
        return continuation_logprobs(self.model, pairs, self.t.pad, batch=self.batch_size)

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        from tasks.lib.scoring import continuation_logprobs

        out = []
        T = self.model.cfg.max_seq_len
        for (text,) in (r.args for r in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(self._ids(text), self.t.eot, T, 1)]
            out.append(sum(lp for lp, _ in continuation_logprobs(self.model, windows, self.t.pad, batch=self.batch_size)))
        return out

    def generate_until(self, requests) -> list[str]:
        from tasks.lib.model import generate

        out = []
        for ctx, kwargs in (r.args for r in requests):
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = [self.t.eot, *self._ids(ctx)][-(self.model.cfg.max_seq_len - 1) :]
            new = generate(self.model, [ids], min(n, self.model.cfg.max_seq_len - len(ids)), pad_id=self.t.pad,
                           stop_ids=(self.t.eot,), temperature=0.0)[0]
            text = self.t.decode(new)
            cut = min([text.index(s) for s in until if s and s in text], default=len(text))
            out.append(text[:cut])
        return out


def evaluate_tasks(lm: PipelineLM, tasks: list[str], include_path: str | Path | list | None = None, num_fewshot: int | None = None,
                   limit: int | float | None = None, seed: int = 0) -> dict[str, Any]:
    """Run lm-eval's `simple_evaluate` on these tasks (names of lm-eval's own tasks, or of
    tasks in YAML files under `include_path`); returns {task: {metric: value}}."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    for p in paths:
        if not Path(p).exists():
            raise StageError(f"benchmark task path {p} does not exist")
    manager = TaskManager(include_path=[str(p) for p in paths] or None)
    unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        raise StageError(f"unknown benchmark task(s) {unknown}: not one of lm-eval's tasks nor a task file under {paths or 'no include path'}")
    res = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=False,
                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                          bootstrap_iters=0)
    out: dict[str, Any] = {}
    for task, metrics in (res or {}).get("results", {}).items():
        out[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k}
    return out
