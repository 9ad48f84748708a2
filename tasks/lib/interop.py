"""Round trips with the labeling tools teams already run: Label Studio and Argilla.

    python -m tasks.label export --format label-studio OUT   # OUT/tasks.json + OUT/labeling_config.xml
    python -m tasks.label export --format argilla OUT        # OUT/records.json + OUT/.argilla/{settings,dataset}.json
    python -m tasks.label import --format label-studio EXPORT.json
    python -m tasks.label import --format argilla OUT_DIR_OR_records.json

Both directions go through the rankings record of tasks/lib/rankings.py (`id`, `prompt`,
`completions`, `ranking`, `ties`, `flagged`, `labeler`).

**Label Studio** (its documented JSON task format and `Ranker` tag): each prompt is a task
`{"data": {"prompt_id", "prompt", "items": [{"id": "c0", "title", "body"}, ...]}}`; the
labeling config shows the prompt (`Text`) and the completions as a `List` that a `Ranker`
orders, with two `Bucket`s: `ranked` (the default: every item starts there, best first)
and `flagged` (unusable). Its JSON export holds, per task, `annotations` whose `result` has
a `ranker` item: `"value": {"ranker": {"ranked": [ids], "flagged": [ids]}}` (the plain
list `"value": {"ranker": [ids]}` of a Ranker without buckets is read too). A cancelled
annotation (`was_cancelled`) is skipped; the labeler is the annotator's email where the
export has it (`completed_by: {"email"}`), else `label-studio:<user id>`. Label Studio's
Ranker has no ties: they come only from this app and Argilla.

**Argilla 2.x** (`Dataset.to_disk` / `from_disk` layout, checked against the 2.8 SDK):
`records.json` is a list of records `{"id", "fields": {"prompt", "completion_1".."completion_K"},
"metadata", "suggestions", "responses", "vectors"}`, `.argilla/dataset.json` the dataset
(`status: draft` until the server publishes it) and `.argilla/settings.json` declares the
text fields, a `RankingQuestion` named `ranking` over the options `completion_1..K` and a
multi-label question `flagged`. A ranking value is the option names best first (the SDK's
form) or `[{"value", "rank"}]` (the API's form, where equal ranks are ties).

Only submitted responses are rankings. The SDK's `to_disk` drops each response's status
(its `records.json` holds `{"value", "user_id"}` only), so from such a file drafts and
discarded responses cannot be told from answers: import the flat export instead,
`json.dump(dataset.records(with_responses=True).to_list(flatten=True), open("argilla.json", "w"))`,
whose `ranking.responses`, `.users` and `.status` columns say it (records written by other
tools with a `status` in each response are read too), or pass `all_responses=True`
(`--all-responses`) to take every response. The labeler is `argilla:<user_id>`.

Nothing here reads params.yaml; bad input raises RankingError naming the file and the task
or record.
"""

from __future__ import annotations

import json
from itertools import groupby
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from tasks.lib.rankings import RankingError, parse_record
from tasks.lib.storage import atomic_dir

LS_RANKED, LS_FLAGGED = "ranked", "flagged"
GUIDELINES = ("Order the completions from best to worst answer to the prompt: helpful, correct, finished. "
              "Completions that are equally good may share a rank; flag any that are unusable (empty, garbled, off-topic).")


# ------------------------------------------------------------------ Label Studio
def label_studio_config(title: str = "Rank the completions, best first") -> str:
    """The labeling config: the prompt, its completions as a List, a Ranker with buckets."""
    return (
        "<View>\n"
        "  <Style>.htx-ranker-item { white-space: pre-wrap; }</Style>\n"
        f"  <Header value={quoteattr(title)}/>\n"
        '  <Text name="prompt" value="$prompt"/>\n'
        '  <List name="completions" value="$items" title="Completions"/>\n'
        '  <Ranker name="rank" toName="completions">\n'
        f'    <Bucket name="{LS_RANKED}" title="Ranked, best first" default="true"/>\n'
        f'    <Bucket name="{LS_FLAGGED}" title="Unusable (flagged)"/>\n'
        "  </Ranker>\n"
        "</View>\n"
    )


def label_studio_tasks(items: list[dict]) -> list[dict]:
    return [{"data": {"prompt_id": it["id"], "prompt": it["prompt"],
                      "items": [{"id": f"c{i}", "title": f"Completion {i + 1}", "body": c} for i, c in enumerate(it["completions"])]}}
            for it in items]


def export_label_studio(items: list[dict], out: Path) -> list[Path]:
    with atomic_dir(out) as tmp:
        (tmp / "tasks.json").write_text(json.dumps(label_studio_tasks(items), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        (tmp / "labeling_config.xml").write_text(label_studio_config(), encoding="utf-8")
    return [out / "tasks.json", out / "labeling_config.xml"]


def _ls_labeler(ann: dict) -> str:
    who = ann.get("completed_by")
    if isinstance(who, dict):
        return str(who.get("email") or f"label-studio:{who.get('id')}")
    return f"label-studio:{who}"


def _ls_order(value: Any, ids: list[str], where: str) -> tuple[list[str], list[str]]:
    """(ranked item ids best first, flagged ids) from a ranker result's value."""
    ranker = value.get("ranker") if isinstance(value, dict) else None
    if isinstance(ranker, list):
        ranked, flagged = ranker, []
    elif isinstance(ranker, dict):
        ranked = list(ranker.get(LS_RANKED) or ranker.get("_") or [])
        flagged = list(ranker.get(LS_FLAGGED) or [])
        others = set(ranker) - {LS_RANKED, LS_FLAGGED, "_"}
        if others:
            raise RankingError(f"{where}: unknown bucket(s) {sorted(others)} (this config has '{LS_RANKED}' and '{LS_FLAGGED}')")
    else:
        raise RankingError(f"{where}: a ranker result needs 'value': {{'ranker': [...] or {{bucket: [...]}}}}")
    missing = [i for i in ids if i not in ranked and i not in flagged]
    unknown = [i for i in ranked + flagged if i not in ids]
    if unknown:
        raise RankingError(f"{where}: item id {unknown[0]!r} is not one of the task's items")
    if missing or len(set(ranked + flagged)) != len(ranked + flagged):
        raise RankingError(f"{where}: the ranking must place each of the {len(ids)} items once ({len(missing)} missing)")
    return ranked, flagged


def _json_list(path: Path, what: str, missing: str | None = None) -> list:
    """The JSON list in `path`, or a RankingError naming the file (`what`: what the list holds)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        if missing is None:
            raise
        raise RankingError(f"{path}: no such file ({missing})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RankingError(f"{path}: not a JSON file ({err})") from None
    if not isinstance(data, list):
        raise RankingError(f"{path}: expected a JSON list of {what}")
    return data


def import_label_studio(path: Path) -> list[dict]:
    """Rankings from a Label Studio JSON export (a list of tasks with annotations)."""
    tasks = _json_list(path, "tasks (Label Studio's JSON export)")
    out = []
    for n, task in enumerate(tasks):
        where = f"{path}: task {n}"
        data = task.get("data") if isinstance(task, dict) else None
        if not (isinstance(data, dict) and isinstance(data.get("prompt"), str) and isinstance(data.get("items"), list)):
            raise RankingError(f"{where}: needs 'data' with 'prompt' and 'items' (exported with this app's tasks.json?)")
        items = data["items"]
        if not all(isinstance(it, dict) and isinstance(it.get("id"), str) and isinstance(it.get("body"), str) for it in items):
            raise RankingError(f"{where}: each item needs string 'id' and 'body'")
        ids = [it["id"] for it in items]
        for a, ann in enumerate(task.get("annotations") or []):
            if not isinstance(ann, dict) or ann.get("was_cancelled"):
                continue
            results = [r for r in ann.get("result") or [] if isinstance(r, dict) and r.get("type") == "ranker"]
            if not results:
                continue
            ranked, flagged = _ls_order(results[0].get("value"), ids, f"{where}, annotation {a}")
            rec = {"id": str(data.get("prompt_id") or task.get("id") or ""), "prompt": data["prompt"], "completions": [it["body"] for it in items],
                   "ranking": [ids.index(i) for i in ranked + flagged], "flagged": [ids.index(i) for i in flagged], "labeler": _ls_labeler(ann)}
            if not rec["id"]:
                del rec["id"]
            try:
                out.append(parse_record(rec))
            except RankingError as err:
                raise RankingError(f"{where}, annotation {a}: {err}") from None
    return out


# ------------------------------------------------------------------ Argilla
def _option(i: int) -> str:
    return f"completion_{i + 1}"


def _argilla_settings(k: int) -> dict:
    text = {"type": "text", "use_markdown": False}
    options = [{"value": _option(i), "text": f"Completion {i + 1}", "description": None} for i in range(k)]
    return {
        "guidelines": GUIDELINES,
        "fields": [{"id": None, "name": "prompt", "title": "Prompt", "required": True, "settings": text}]
        + [{"id": None, "name": _option(i), "title": f"Completion {i + 1}", "required": True, "settings": text} for i in range(k)],
        "questions": [
            {"id": None, "name": "ranking", "title": "Rank the completions, best first", "description": None, "required": True,
             "settings": {"type": "ranking", "options": options}},
            {"id": None, "name": "flagged", "title": "Unusable completions", "description": None, "required": False,
             "settings": {"type": "multi_label_selection", "options": options, "visible_options": None, "options_order": "natural"}},
        ],
        "vectors": [], "metadata": [], "allow_extra_metadata": False,
    }


def export_argilla(items: list[dict], out: Path) -> list[Path]:
    ks = {len(it["completions"]) for it in items}
    if len(ks) != 1:
        raise RankingError(f"Argilla needs the same number of completions in every record; these have {sorted(ks)}")
    (k,) = ks
    records = [{"id": it["id"], "fields": {"prompt": it["prompt"], **{_option(i): c for i, c in enumerate(it["completions"])}},
                "metadata": {}, "suggestions": {}, "responses": {}, "vectors": {}, "_server_id": None} for it in items]
    dataset = {"id": None, "name": "gpt-pipeline-preferences", "guidelines": GUIDELINES, "allow_extra_metadata": False,
               "distribution": {"strategy": "overlap", "min_submitted": 1}, "status": "draft", "workspace_id": None}
    with atomic_dir(out) as tmp:
        (tmp / ".argilla").mkdir()
        (tmp / ".argilla/settings.json").write_text(json.dumps(_argilla_settings(k), indent=1) + "\n", encoding="utf-8")
        (tmp / ".argilla/dataset.json").write_text(json.dumps(dataset, indent=1) + "\n", encoding="utf-8")
        (tmp / "records.json").write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return [out / "records.json", out / ".argilla/settings.json", out / ".argilla/dataset.json"]


def _argilla_ranking(value: Any, k: int, where: str) -> tuple[list[int], list[list[int]]]:
    """(ranking, ties) from a RankingQuestion value: option names, or [{"value", "rank"}]."""
    names = {_option(i): i for i in range(k)}
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        ranked = [(r, v) for r, v in enumerate(value)]
    elif isinstance(value, list) and all(isinstance(v, dict) and isinstance(v.get("value"), str) for v in value):
        if not all(isinstance(v.get("rank"), int) for v in value):
            raise RankingError(f"{where}: each ranked option needs an integer 'rank'")
        ranked = sorted(((v["rank"], v["value"]) for v in value), key=lambda t: t[0])
    else:
        raise RankingError(f"{where}: a ranking value is a list of option names or of {{'value', 'rank'}} objects")
    unknown = [v for _, v in ranked if v not in names]
    if unknown:
        raise RankingError(f"{where}: option {unknown[0]!r} is not one of {sorted(names)}")
    ranking = [names[v] for _, v in ranked]
    ties = [[names[v] for _, v in grp] for _, grp in groupby(ranked, key=lambda t: t[0])]
    return ranking, [g for g in ties if len(g) > 1]


def _flat_to_nested(rec: dict, where: str) -> dict:
    """A record of `to_list(flatten=True)` (fields at the top, `<question>.responses`, `.users`
    and `.status` as parallel lists) in the nested form, each response with its status."""
    fields = {k: v for k, v in rec.items() if k == "prompt" or k.startswith("completion_")}
    responses: dict[str, list] = {}
    for q in ("ranking", "flagged"):
        values = rec.get(f"{q}.responses") or []
        users = rec.get(f"{q}.responses.users") or []
        status = rec.get(f"{q}.responses.status") or [None] * len(values)
        if not (isinstance(values, list) and isinstance(users, list) and isinstance(status, list) and len(values) == len(users) == len(status)):
            raise RankingError(f"{where}: '{q}.responses', '.users' and '.status' must be lists of one length")
        responses[q] = [{"value": v, "user_id": u, "status": st} for v, u, st in zip(values, users, status)]
    return {"id": rec.get("id"), "fields": fields, "responses": responses}


def import_argilla(path: Path, all_responses: bool = False) -> list[dict]:
    """Rankings from an Argilla export: a `to_disk` folder, its records.json, or the flat
    `to_list(flatten=True)` list; only submitted responses unless `all_responses`."""
    path = Path(path)
    file = path / "records.json" if path.is_dir() else path
    records = _json_list(file, "records (Argilla's records.json)", missing="an Argilla to_disk folder holds records.json")
    out = []
    for n, rec in enumerate(records):
        where = f"{file}: record {n}"
        if isinstance(rec, dict) and "fields" not in rec and "prompt" in rec:
            rec = _flat_to_nested(rec, where)
        fields = rec.get("fields") if isinstance(rec, dict) else None
        if not (isinstance(fields, dict) and isinstance(fields.get("prompt"), str)):
            raise RankingError(f"{where}: needs 'fields' with a 'prompt'")
        comps = []
        while isinstance(fields.get(_option(len(comps))), str):
            comps.append(fields[_option(len(comps))])
        responses = rec.get("responses") or {}
        if not isinstance(responses, dict):
            raise RankingError(f"{where}: 'responses' must map question names to lists of responses")
        flags_by_user = {str(r.get("user_id")): r.get("value") or [] for r in responses.get("flagged") or []
                         if isinstance(r, dict) and (all_responses or r.get("status") == "submitted")}
        for m, resp in enumerate(responses.get("ranking") or []):
            at = f"{where}, ranking response {m}"
            if not isinstance(resp, dict) or resp.get("user_id") is None:
                raise RankingError(f"{at}: needs 'value' and 'user_id'")
            if not all_responses:
                if "status" not in resp or resp["status"] is None:
                    raise RankingError(f"{at}: says nothing of whether it was submitted (Argilla's Dataset.to_disk drops each "
                                       "response's status): export with dataset.records(with_responses=True).to_list(flatten=True) "
                                       "as JSON, or import with --all-responses to take drafts and discarded responses too")
                if resp["status"] != "submitted":
                    continue
            ranking, ties = _argilla_ranking(resp.get("value"), len(comps), at)
            user = str(resp["user_id"])
            flagged = flags_by_user.get(user, [])
            if not (isinstance(flagged, list) and all(f in {_option(i) for i in range(len(comps))} for f in flagged)):
                raise RankingError(f"{where}: the 'flagged' response of {user} names an unknown option")
            raw = {"id": str(rec["id"]) if rec.get("id") else None, "prompt": fields["prompt"], "completions": comps, "ranking": ranking,
                   "ties": ties, "flagged": [int(f.rsplit("_", 1)[1]) - 1 for f in flagged], "labeler": f"argilla:{user}"}
            if raw["id"] is None:
                del raw["id"]
            try:
                out.append(parse_record(raw))
            except RankingError as err:
                raise RankingError(f"{at}: {err}") from None
    return out
