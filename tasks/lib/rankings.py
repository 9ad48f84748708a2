"""Human rankings of K completions: the record format, its checks, the preference pairs it
implies, agreement between labelers, and the JSONL file the labeling app writes.

    from tasks.lib.rankings import RankingStore, parse_record, preference_pairs, agreement
    store = RankingStore("labels/rankings.jsonl")
    store.upsert({"id": "p1", "prompt": "...", "completions": ["a", "b", "c"], "ranking": [2, 0, 1],
                  "labeler": "alice", "ties": [[0, 1]], "flagged": []})

One ranking per line (what `preferences.labeler: file` imports, tasks/preferences.py):

    {"id", "prompt", "completions": [K strings], "ranking": [best index, ..., worst],
     "labeler"?: name, "ties"?: [[indices ranked equal], ...], "flagged"?: [unusable indices],
     "finished"?: [K booleans: the completion ended its turn], "judge_scores"?: [K numbers], "time"?: ISO time}

or a chosen/rejected pair `{"prompt", "chosen", "rejected"}`. `ranking` always orders all K
completions; a tie group is a run of neighbours in it that the labeler found equally good (no
preference between them); a flagged completion is unusable and takes part in no pair.

The store rewrites the whole file for every answer, into a temporary sibling that is synced
and renamed over it, under an exclusive lock (several labelers, several app processes): a
kill at any moment leaves the previous file or the new one, never a torn one. Nothing here
reads params.yaml; errors are `RankingError` with a message that names the problem.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tasks.lib.errors import StageError
from tasks.lib.storage import atomic_file

LABELER_RE = re.compile(r"^[A-Za-z0-9_.@:+\-]{1,100}$")
JUDGE = "gold"  # the programmatic judge's name as a labeler; a human may not take it
MAX_K = 16


class RankingError(StageError):
    """A ranking record that cannot be used; the message says which field and why."""


def _indices(value: Any, k: int, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise RankingError(f"'{what}' must be a list of completion indices")
    bad = [i for i in value if not 0 <= i < k]
    if bad:
        raise RankingError(f"'{what}' has index {bad[0]}, outside 0..{k - 1}")
    if len(set(value)) != len(value):
        raise RankingError(f"'{what}' names a completion twice")
    return list(value)


def check_labels(k: int, ranking: Any, ties: Any = None, flagged: Any = None) -> tuple[list[int], list[list[int]], list[int]]:
    """Validated (ranking, ties, flagged) for K completions: ranking a permutation of 0..K-1,
    tie groups of 2+ disjoint indices that are neighbours in the ranking, flagged indices."""
    if not (isinstance(ranking, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)
            and sorted(ranking) == list(range(k))):
        raise RankingError(f"'ranking' must order all {k} completions by index, best first (a permutation of 0..{k - 1})")
    groups: list[list[int]] = []
    if ties is not None:
        if not isinstance(ties, list):
            raise RankingError("'ties' must be a list of groups of completion indices")
        pos = {c: i for i, c in enumerate(ranking)}
        seen: set[int] = set()
        for g in ties:
            g = _indices(g, k, "ties")
            if len(g) < 2:
                raise RankingError("'ties': a group needs at least 2 completions")
            if seen & set(g):
                raise RankingError("'ties': a completion is in two groups")
            seen |= set(g)
            places = sorted(pos[c] for c in g)
            if places[-1] - places[0] != len(g) - 1:
                raise RankingError(f"'ties': the group {g} is not a run of neighbours in 'ranking'")
            groups.append(sorted(g, key=pos.__getitem__))
    flags = sorted(_indices(flagged, k, "flagged")) if flagged is not None else []
    return list(ranking), groups, flags


def parse_record(rec: Any) -> dict:
    """One line of a rankings file, checked and normalised (raises RankingError)."""
    if not isinstance(rec, dict):
        raise RankingError(f"expected a JSON object, got {type(rec).__name__}")
    prompt = rec.get("prompt")
    if not isinstance(prompt, str):
        raise RankingError("needs a 'prompt' string")
    rid = rec.get("id")
    if rid is not None and not (isinstance(rid, str) and rid):
        raise RankingError("'id' must be a non-empty string")
    if "chosen" in rec:
        if not (isinstance(rec.get("chosen"), str) and isinstance(rec.get("rejected"), str)):
            raise RankingError("'chosen' and 'rejected' must both be strings")
        comps, ranking = [rec["chosen"], rec["rejected"]], [0, 1]
    else:
        comps, ranking = rec.get("completions"), rec.get("ranking")
        if not (isinstance(comps, list) and 2 <= len(comps) <= MAX_K and all(isinstance(c, str) for c in comps)):
            raise RankingError(f"'completions' must be a list of 2 to {MAX_K} strings")
    k = len(comps)
    ranking, ties, flagged = check_labels(k, ranking, rec.get("ties"), rec.get("flagged"))
    labeler = rec.get("labeler", "file")
    if not (isinstance(labeler, str) and LABELER_RE.match(labeler)):
        raise RankingError("'labeler' must be a name of 1-100 letters, digits or _.@:+-")
    finished = rec.get("finished", [True] * k)
    if not (isinstance(finished, list) and len(finished) == k and all(isinstance(f, bool) for f in finished)):
        raise RankingError(f"'finished' must be a list of {k} booleans")
    out = {"id": rid or hashlib.sha1(prompt.encode()).hexdigest()[:12], "labeler": labeler, "prompt": prompt, "completions": comps,
           "finished": finished, "ranking": ranking, "ties": ties, "flagged": flagged}
    if rec.get("judge_scores") is not None:
        js = rec["judge_scores"]
        if not (isinstance(js, list) and len(js) == k and all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in js)):
            raise RankingError(f"'judge_scores' must be a list of {k} numbers")
        out["judge_scores"] = js
    if isinstance(rec.get("time"), str):
        out["time"] = rec["time"]
    return out


def read_jsonl(path: Path, parse=parse_record) -> list[dict]:
    """Every record of a JSONL file through `parse`; a bad line raises RankingError naming
    the file and the line. Blank lines are skipped."""
    out = []
    for n, raw in enumerate(Path(path).read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RankingError(f"{path}:{n}: not valid UTF-8 (byte {err.start})") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise RankingError(f"{path}:{n}: not JSON ({err.msg})") from None
        except RecursionError:
            raise RankingError(f"{path}:{n}: JSON nested too deeply to read") from None
        try:
            out.append(parse(rec))
        except RankingError as err:
            raise RankingError(f"{path}:{n}: {err}") from None
    return out


# ------------------------------------------------------------------ pairs and agreement
def tie_group_of(ties: Iterable[Iterable[int]]) -> dict[int, int]:
    return {c: g for g, group in enumerate(ties) for c in group}


def preference_pairs(ranking: list[int], ties=(), flagged=(), scores=None) -> list[tuple[int, int]]:
    """(better, worse) index pairs a ranking implies: every pair of the C(K,2) except those
    with a flagged completion, those in one tie group, and those with equal judge `scores`."""
    rank = {c: i for i, c in enumerate(ranking)}
    group, bad = tie_group_of(ties), set(flagged)
    out = []
    for a, b in itertools.combinations(range(len(ranking)), 2):
        if a in bad or b in bad or (a in group and group.get(a) == group.get(b)):
            continue
        if scores is not None and scores[a] == scores[b]:
            continue
        out.append((a, b) if rank[a] < rank[b] else (b, a))
    return out


def read_pairs(path: Path) -> list[dict]:
    """What the reward model and DPO train on, from a preferences file (train/val/test.jsonl):
    per prompt with at least one usable pair, {"prompt", "completions", "finished", "pairs":
    [(better, worse), ...]} (the C(K,2) pairs less ties, flagged completions and equal judge
    scores). One reader for both, so they learn from exactly the same pairs."""
    import json

    if not Path(path).is_file():
        raise StageError(f"{path}: missing (run the preferences stage first)")
    out = []
    for lineno, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        try:
            r = json.loads(line.decode("utf-8"))
            k = len(r["completions"])
            ranking, ties, flagged = check_labels(k, r["ranking"], r.get("ties"), r.get("flagged"))
            finished = r.get("finished", [True] * k)
            if not (isinstance(r["prompt"], str) and all(isinstance(c, str) for c in r["completions"]) and len(finished) == k):
                raise TypeError("prompt, completions or finished")
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError, RankingError) as err:
            raise RankingError(f"{path}:{lineno}: not a preference record ({type(err).__name__}); rerun the preferences stage") from None
        pairs = preference_pairs(ranking, ties, flagged, r.get("scores"))
        if pairs:
            out.append({"prompt": r["prompt"], "completions": list(r["completions"]), "finished": [bool(f) for f in finished], "pairs": pairs})
    return out


def labeler_kind(paths: Iterable[Path]) -> str:
    """Who ranked the preference files: `judge` (the programmatic gold judge), `human`, or `mixed`."""
    import json

    kinds = set()
    for p in paths:
        if Path(p).is_file():
            for line in Path(p).read_bytes().splitlines():
                if line.strip():
                    kinds.add("judge" if json.loads(line).get("labeler") == JUDGE else "human")
    return kinds.pop() if len(kinds) == 1 else "mixed" if kinds else "none"


def _relation(rec: dict, x: int, y: int) -> int:
    group = tie_group_of(rec.get("ties") or ())
    if x in group and group.get(x) == group.get(y):
        return 0
    pos = {c: i for i, c in enumerate(rec["ranking"])}
    return -1 if pos[x] < pos[y] else 1


def compare(a: dict, b: dict) -> tuple[int, int]:
    """(pairs ordered alike, pairs compared) by two rankings of the same completions: better,
    worse or tied; pairs with a completion either labeler flagged are left out."""
    bad = set(a.get("flagged") or ()) | set(b.get("flagged") or ())
    same = total = 0
    for x, y in itertools.combinations(range(len(a["ranking"])), 2):
        if x in bad or y in bad:
            continue
        total += 1
        same += _relation(a, x, y) == _relation(b, x, y)
    return same, total


def judge_ranking(scores: list[float]) -> dict:
    """The judge's scores as a ranking record: best first, equal scores tied."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    ties = [list(g) for _, g in itertools.groupby(order, key=lambda i: scores[i])]
    return {"ranking": order, "ties": [g for g in ties if len(g) > 1], "flagged": []}


def same_item(rec: dict) -> tuple:
    return (rec["prompt"], tuple(rec["completions"]))


def agreement_counts(records: list[dict]) -> tuple[int, int, int]:
    """(pairs ordered alike, pairs compared, prompts ranked more than once) over every two
    rankings of the same prompt and completions."""
    by_item = defaultdict(list)
    for r in records:
        by_item[same_item(r)].append(r)
    same = total = shared = 0
    for recs in by_item.values():
        shared += len(recs) > 1
        for a, b in itertools.combinations(recs, 2):
            s, t = compare(a, b)
            same, total = same + s, total + t
    return same, total, shared


def agreement(records: list[dict]) -> float | None:
    """Share of completion pairs ordered the same way by two rankings of the same prompt."""
    same, total, _ = agreement_counts(records)
    return same / total if total else None


def judge_agreement(records: list[dict]) -> float | None:
    """Share of pairs a human orders as the programmatic judge does (records with judge_scores)."""
    same = total = 0
    for r in records:
        if r.get("judge_scores") is not None and r.get("labeler") != JUDGE:
            s, t = compare(r, judge_ranking(r["judge_scores"]))
            same, total = same + s, total + t
    return same / total if total else None


# ------------------------------------------------------------------ the rankings file
def dump_line(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False) + "\n"


class RankingStore:
    """The rankings JSONL: read it, or put one labeler's answer for one prompt in it (the
    previous answer of that labeler for that prompt and completions is replaced), atomically and under a
    lock shared by every process that writes it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def read(self) -> list[dict]:
        return read_jsonl(self.path) if self.path.exists() else []

    def write(self, records: list[dict]) -> None:
        with atomic_file(self.path) as fh:
            fh.writelines(dump_line(r) for r in records)
            fh.flush()
            os.fsync(fh.fileno())

    def upsert(self, new: Iterable[dict]) -> list[dict]:
        """Add these answers (checked first), each replacing the same labeler's earlier
        answer for the same prompt id and completions; returns every record now in the file."""
        new = [parse_record(r) for r in new]
        with self.locked():
            records = self.read()
            for rec in new:
                records = [r for r in records if answer_key(r) != answer_key(rec)] + [rec]
            self.write(records)
        return records


def answer_key(rec: dict) -> tuple:
    """One labeler's answer for one prompt as sampled: resampled completions under the same
    id are a new item, and a ranking of the old ones stays valid data."""
    return (rec["id"], tuple(rec["completions"]), rec["labeler"])
