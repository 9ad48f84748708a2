"""The built-in benchmark: `doc_match`, few-shot multiple choice made from the built-in
instruction data, so that the CPU default has a benchmark that needs no hub.

Each item asks what a function or topic does ("Q: What does `json.dumps` do?\\nA:") and offers
`choices` answers: the first sentence of its own documentation and first sentences of other
items' documentation (a seeded sample), the right one at a seeded position. A model is
right when it gives the right sentence the highest log-probability (tasks/lib/scoring.py);
chance is 1 / choices. `write_lm_eval_task` writes the same items as a task in
lm-evaluation-harness's format (JSONL + YAML), so the harness can score any model on it
(tasks/benchmark.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tasks.lib.hashing import unit_interval

MAX_WORDS = 32


def first_sentence(text: str, max_words: int = MAX_WORDS) -> str:
    """The text up to its first full stop followed by a space (or its end), at most max_words words."""
    head = re.split(r"(?<=\.)\s", text.strip(), maxsplit=1)[0]
    return " ".join(head.split()[:max_words])


def doc_match(examples: Sequence[dict], pool: Sequence[str], choices: int, seed: int) -> list[dict]:
    """Items {"id", "context", "choices", "gold"} for examples with a distinct answer."""
    answers = sorted({first_sentence(a) for a in pool})
    items = []
    for ex in examples:
        right = first_sentence(ex["messages"][1]["content"])
        others = [a for a in answers if a != right]
        if len(others) < choices - 1 or not right:
            continue
        rng = np.random.default_rng(int(unit_interval(ex["id"], f"doc_match:{seed}:") * 2**63))
        picked = [others[i] for i in rng.choice(len(others), size=choices - 1, replace=False)]
        gold = int(rng.integers(choices))
        opts = picked[:gold] + [right] + picked[gold:]
        items.append({"id": ex["id"], "context": f"Q: {ex['messages'][0]['content']}\nA:", "choices": opts, "gold": gold})
    return items


def doc_match_prefix(shots: Sequence[dict]) -> str:
    """The few-shot block before each item: solved questions in the items' own format."""
    return "".join(f"Q: {ex['messages'][0]['content']}\nA: {first_sentence(ex['messages'][1]['content'])}\n\n" for ex in shots)


def write_lm_eval_task(folder: Path, items: Sequence[dict], prefix: str, name: str = "doc_match") -> Path:
    """The items as an lm-evaluation-harness multiple-choice task: `<name>.jsonl` (one item a
    line, the few-shot block folded into each context) and `<name>.yaml` (local data files,
    no hub). Returns the YAML's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for it in items:
            fh.write(json.dumps({"id": it["id"], "context": prefix + it["context"], "choices": it["choices"], "gold": it["gold"]}) + "\n")
    spec = folder / f"{name}.yaml"
    spec.write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\n'
        'target_delimiter: " "\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return spec
