"""Human feedback: the rankings format (ties, flags, labelers), the pairs and agreement it
implies, the labeling app over real HTTP (saving at once, resuming, two labelers, bad input),
Label Studio and Argilla round trips on files in their documented formats, the preferences
and reward stages on human rankings, and (slow) a ranked set made through the app training
the reward model with `dvc repro reward`."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tasks import label, preferences
from tasks.lib import interop
from tasks.lib.errors import StageError
from tasks.lib.hashing import in_fraction
from tasks.lib.rankings import (JUDGE, RankingError, RankingStore, agreement, agreement_counts, compare, judge_agreement, judge_ranking, labeler_kind,
                                parse_record, preference_pairs)
from tests.conftest import REPO, dvc, git, make_project, tiny_raw_params

ITEMS = [{"id": f"python_qa/f{i}", "prompt": f"What does `f{i}` do?", "completions": [f"answer {i}.{j}" for j in range(3)],
          "finished": [True, False, True], "k": 3, "judge_scores": [0.5, 0.2, 0.9]} for i in range(4)]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------ the format, pairs, agreement
def test_a_ranking_record_with_ties_flags_and_labeler():
    rec = parse_record({"id": "p", "prompt": "q", "completions": ["a", "b", "c", "d"], "ranking": [2, 0, 1, 3],
                        "ties": [[1, 0]], "flagged": [3], "labeler": "alice", "finished": [True, True, False, True]})
    assert rec["ties"] == [[0, 1]] and rec["flagged"] == [3] and rec["labeler"] == "alice" and rec["finished"][2] is False
    assert parse_record({"prompt": "q", "chosen": "good", "rejected": "bad"})["ranking"] == [0, 1]
    base = {"prompt": "q", "completions": ["a", "b", "c"], "ranking": [0, 1, 2]}
    for extra, msg in [({"ties": [[0, 2]]}, "not a run of neighbours"), ({"ties": [[0, 1], [1, 2]]}, "in two groups"),
                       ({"ties": [[1]]}, "at least 2"), ({"flagged": [3]}, "outside 0..2"), ({"flagged": [1, 1]}, "twice"),
                       ({"labeler": "a b"}, "'labeler'"), ({"finished": [True]}, "'finished'"), ({"ranking": [0, 1]}, "permutation"),
                       ({"ranking": [0, 1, True]}, "permutation"), ({"judge_scores": [1, 2]}, "'judge_scores'"),
                       ({"judge_scores": [1, True, 2]}, "'judge_scores'")]:
        with pytest.raises(RankingError, match=msg):
            parse_record({**base, **extra})



def test_who_ranked_the_files_judge_human_mixed_or_none(tmp_path):
    """The reward model and DPO tag their runs with this: a record whose labeler is the gold
    judge counts as the judge, any other name or none as a person; a missing file counts nothing."""
    rec = {"prompt": "q", "completions": ["a", "b"], "ranking": [0, 1]}
    judge = write_jsonl(tmp_path / "judge.jsonl", [{**rec, "labeler": JUDGE}] * 2)
    alice = write_jsonl(tmp_path / "alice.jsonl", [{**rec, "labeler": "alice"}, rec])
    missing = tmp_path / "absent.jsonl"
    assert labeler_kind([judge, missing]) == "judge"
    assert labeler_kind([alice]) == "human"
    assert labeler_kind([judge, alice]) == "mixed"
    assert labeler_kind([missing]) == "none"

def test_pairs_leave_out_ties_flags_and_equal_judge_scores():
    # ranking 2 > (0 = 1) > 3, with 3 flagged: only 2 beats 0 and 2 beats 1
    assert preference_pairs([2, 0, 1, 3], ties=[[0, 1]], flagged=[3]) == [(2, 0), (2, 1)]
    assert preference_pairs([1, 0]) == [(1, 0)]
    assert preference_pairs([0, 1, 2, 3], scores=[1, 1, 1, 0]) == [(0, 3), (1, 3), (2, 3)]


def test_agreement_counts_ties_as_a_relation_and_skips_flagged_pairs():
    a = {"prompt": "p", "completions": ["x", "y", "z"], "ranking": [0, 1, 2]}
    b = {**a, "ranking": [1, 0, 2], "ties": [[1, 0]]}  # 0 = 1 > 2
    c = {**a, "ranking": [2, 1, 0], "flagged": [2]}  # only the pair (0, 1) counts: 1 > 0
    assert compare(a, b) == (2, 3)  # (0,1): better vs tied; (0,2), (1,2) alike
    assert compare(a, c) == (0, 1)
    assert agreement([a, b, c]) == pytest.approx(2 / 5)  # (a,b) 2/3, (a,c) 0/1, (b,c) 0/1
    assert agreement([a, {**a, "prompt": "other"}]) is None
    assert judge_ranking([0.5, 0.2, 0.9, 0.5]) == {"ranking": [2, 0, 3, 1], "ties": [[0, 3]], "flagged": []}
    assert judge_agreement([{**b, "labeler": "bob", "judge_scores": [3, 2, 1]}]) == pytest.approx(2 / 3)
    assert judge_agreement([{**b, "labeler": JUDGE, "judge_scores": [3, 2, 1]}]) is None  # the judge's own ranking
    # (same, compared, prompts ranked by two or more): a prompt ranked once adds nothing
    assert agreement_counts([a, b, c, {**a, "prompt": "other"}]) == (2, 5, 1)


def test_reward_pairs_honour_ties_and_flags(tmp_path):
    from tasks import reward
    from tasks.lib.bpe import train_bpe
    from tasks.lib.template import Template

    t = Template(train_bpe(iter(["answer one two three"] * 20), 300, 1))
    f = write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": "q", "completions": ["a", "b", "c", "d"], "ranking": [2, 0, 1, 3], "ties": [[0, 1]], "flagged": [3]},
        {"prompt": "q", "completions": ["a", "b", "c"], "ranking": [0, 1, 2], "flagged": [0, 1]},  # one usable: no pair
        {"prompt": "q", "completions": ["a", "b", "c"], "ranking": [0, 1, 2], "scores": [1, 1, 0]}])
    prompts = reward.load_prompts(f, t, 64)
    assert [p["pairs"] for p in prompts] == [[(2, 0), (2, 1)], [(0, 2), (1, 2)]]
    write_jsonl(f, [{"prompt": "q", "completions": ["a", "b", "c"], "ranking": [0, 1, 2], "ties": [[0, 2]]}])
    with pytest.raises(StageError, match="train.jsonl:1: not a preference record"):
        reward.load_prompts(f, t, 64)


def ids_in_both_splits(fraction: float) -> tuple[str, list[str]]:
    val = next(f"p{i}" for i in range(100) if in_fraction(f"p{i}", fraction, "preferences:"))
    train = [f"p{i}" for i in range(100) if not in_fraction(f"p{i}", fraction, "preferences:")][:2]
    return val, train


def test_preferences_on_human_rankings_reports_human_labels_and_agreement(tmp_path, monkeypatch):
    from tasks.config import parse_params

    monkeypatch.chdir(tmp_path)
    raw = tiny_raw_params()
    raw["preferences"].update(labeler="file", val_fraction=0.3, test_fraction=0.2)
    raw["paths"]["human_preferences"] = "rankings.jsonl"
    params = parse_params(raw)
    by_split = {s: [f"p{i}" for i in range(100) if preferences.split_of_prompt(f"p{i}", 0.3, 0.2) == s] for s in ("train", "val", "test")}
    (t1, t2), val, test = by_split["train"][:2], by_split["val"][0], by_split["test"][0]
    p1 = {"id": t1, "prompt": "q1", "completions": ["a", "b", "c"], "judge_scores": [3, 2, 1]}
    rows = [{**p1, "labeler": "alice", "ranking": [0, 1, 2]},
            {**p1, "labeler": "bob", "ranking": [1, 0, 2], "ties": [[1, 0]]},
            {"id": t2, "prompt": "q2", "completions": ["x", "y"], "labeler": "alice", "ranking": [1, 0], "judge_scores": [0, 1]},
            {"id": val, "prompt": "q3", "completions": ["u", "v", "w"], "labeler": "carol", "ranking": [0, 1, 2], "flagged": [2]},
            {"id": test, "prompt": "q4", "completions": ["s", "t"], "labeler": "dave", "ranking": [1, 0]}]
    human = write_jsonl(tmp_path / "rankings.jsonl", rows)
    assert human == tmp_path / "rankings.jsonl"
    m = preferences.run(params, {"sft": tmp_path / "none", "labels": tmp_path / "labels.json"}, {"preferences": tmp_path / "out"})
    assert (m["human_labels"], m["judge_labels"], m["labelers"], m["prompts"]) == (5, 0, 4, 5)
    assert (m["train_prompts"], m["val_prompts"], m["test_prompts"]) == (3, 1, 1)
    assert (m["pairs"], m["usable_pairs"], m["flagged_completions"]) == (11, 8, 1)
    assert m["tie_fraction"] == pytest.approx(1 / 11)  # bob's tie; carol's flagged pairs are not ties
    assert m["labeler_agreement"] == pytest.approx(2 / 3) and m["agreement_prompts"] == 1
    assert m["judge_agreement"] == pytest.approx(6 / 7)  # alice 3/3 + 1/1, bob 2/3
    out = [json.loads(line) for f in ("train", "val", "test") for line in (tmp_path / "out" / f"{f}.jsonl").read_text().splitlines()]
    assert {(r["labeler"], tuple(map(tuple, r["ties"])), tuple(r["flagged"])) for r in out} == {
        ("alice", (), ()), ("bob", ((1, 0),), ()), ("carol", (), (2,)), ("dave", (), ())}
    assert not (tmp_path / "out/to_rank.jsonl").exists()  # only the gold labeler samples completions to rank


# ------------------------------------------------------------------ the app over HTTP
@contextmanager
def app_server(to_rank: Path, out: Path, labeler: str):
    app = label.Labeling(label.load_items(to_rank), RankingStore(out), labeler)
    server = label.make_server(app, 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def http(url: str, body=None, raw: bytes | None = None, headers: dict | None = None) -> tuple[int, dict | str]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})} if data is not None else
                                 (headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            status, text = res.status, res.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


@pytest.fixture
def files(tmp_path):
    return write_jsonl(tmp_path / "data/preferences/to_rank.jsonl", ITEMS), tmp_path / "labels/rankings.jsonl"


def test_each_answer_is_saved_at_once_and_a_restart_resumes_where_it_stopped(files):
    to_rank, out = files
    with app_server(to_rank, out, "alice") as url:
        status, page = http(url + "/")
        assert status == 200 and "Rank the completions" in page
        assert http(url + "/api/state")[1]["next_id"] == "python_qa/f0"
        status, st = http(url + "/api/rank", {"id": "python_qa/f0", "ranking": [2, 0, 1], "ties": [[0, 1]], "flagged": []})
        assert status == 200 and (st["done"], st["left"], st["next_id"]) == (1, 3, "python_qa/f1")
        saved = [json.loads(line) for line in out.read_text().splitlines()]  # on disk before the next request
        assert len(saved) == 1 and saved[0]["ranking"] == [2, 0, 1] and saved[0]["ties"] == [[0, 1]]
        assert saved[0]["labeler"] == "alice" and saved[0]["finished"] == [True, False, True] and saved[0]["judge_scores"] == [0.5, 0.2, 0.9]
        http(url + "/api/rank", {"id": "python_qa/f2", "ranking": [0, 1, 2]})
    with app_server(to_rank, out, "alice") as url:  # a new session: the first prompt alice has not ranked
        st = http(url + "/api/state")[1]
        assert (st["done"], st["next_id"]) == (2, "python_qa/f1")
        item = http(url + "/api/item?id=python_qa%2Ff0")[1]
        assert item["mine"] == {"ranking": [2, 0, 1], "ties": [[0, 1]], "flagged": []} and item["next_item_id"] == "python_qa/f1"
        http(url + "/api/rank", {"id": "python_qa/f0", "ranking": [1, 0, 2], "flagged": [2]})  # a changed answer replaces the old one
    recs = preferences.read_human(out)
    assert sorted((r["id"], r["labeler"]) for r in recs) == [("python_qa/f0", "alice"), ("python_qa/f2", "alice")]
    assert next(r for r in recs if r["id"] == "python_qa/f0")["flagged"] == [2]


def test_two_labelers_see_their_agreement(files):
    to_rank, out = files
    with app_server(to_rank, out, "alice") as a, app_server(to_rank, out, "bob") as b:
        http(a + "/api/rank", {"id": "python_qa/f0", "ranking": [0, 1, 2]})
        assert http(b + "/api/item?id=python_qa%2Ff0")[1]["others"] == []  # nothing shown before bob answers
        st = http(b + "/api/rank", {"id": "python_qa/f0", "ranking": [1, 0, 2], "ties": [[1, 0]]})[1]
        assert st["agreement"] == pytest.approx(2 / 3) and st["shared_prompts"] == 1 and st["labelers"] == {"alice": 1, "bob": 1}
        assert http(b + "/api/item?id=python_qa%2Ff0")[1]["others"] == [{"labeler": "alice", "same": 2, "pairs": 3}]
        assert (http(a + "/api/state")[1]["done"], http(b + "/api/state")[1]["done"]) == (1, 1)


@pytest.mark.parametrize("body, raw, headers, status, msg", [
    ({"id": "python_qa/f0", "ranking": [0, 0, 1]}, None, {}, 400, "permutation of 0..2"),
    ({"id": "python_qa/f0", "ranking": [0, 1]}, None, {}, 400, "permutation"),
    ({"id": "nope", "ranking": [0, 1, 2]}, None, {}, 400, "unknown prompt id 'nope'"),
    ({"id": "python_qa/f0", "ranking": [0, 1, 2], "ties": [[0, 2]]}, None, {}, 400, "not a run of neighbours"),
    ({"id": "python_qa/f0", "ranking": [0, 1, 2], "flagged": [7]}, None, {}, 400, "outside 0..2"),
    ({"id": "python_qa/f0", "ranking": [0, 1, 2], "labeler": "mallory"}, None, {}, 400, "unknown field"),
    (None, b'{"id": "python_qa/f0", "ranking": [0, 1', {}, 400, "not JSON"),
    (None, b"[0, 1, 2]", {}, 400, "must be a JSON object"),
    (None, b'{"id": "python_qa/f0", "ranking": [0, 1, 2]}', {"Content-Type": "text/plain"}, 415, "application/json"),
    (None, b"{" + b" " * (1 << 20), {}, 413, "bytes of JSON"),
    ({"id": "python_qa/f0", "ranking": [0, 1, 2]}, None, {"Host": "evil.example:80"}, 403, "127.0.0.1 or localhost"),
])
def test_bad_answers_get_a_clear_error_and_leave_the_file_as_it_was(files, body, raw, headers, status, msg):
    to_rank, out = files
    with app_server(to_rank, out, "alice") as url:
        http(url + "/api/rank", {"id": "python_qa/f1", "ranking": [0, 1, 2]})
        before = out.read_bytes()
        got, answer = http(url + "/api/rank", body, raw=raw, headers=headers)
        assert got == status and msg in answer["error"]
        assert out.read_bytes() == before
        assert http(url + "/api/item?id=nope")[0] == 404
    assert [p.name for p in out.parent.iterdir()] in (["rankings.jsonl", ".rankings.jsonl.lock"], [".rankings.jsonl.lock", "rankings.jsonl"])


def test_a_failed_write_keeps_the_previous_file_whole(files, monkeypatch):
    from tasks.lib import rankings

    to_rank, out = files
    store = RankingStore(out)
    store.upsert([{**ITEMS[0], "ranking": [0, 1, 2], "labeler": "alice"}])
    before = out.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rankings.os, "fsync", disk_full)
    from tasks.lib.errors import StageError

    with pytest.raises(StageError, match="disk is full"):
        store.upsert([{**ITEMS[1], "ranking": [0, 1, 2], "labeler": "alice"}])
    assert out.read_bytes() == before and not list(out.parent.glob(".rankings.jsonl.tmp-*"))


WRITER = """
import sys, time
from tasks.lib.rankings import RankingStore
store, who, start = RankingStore(sys.argv[1]), sys.argv[2], float(sys.argv[3])
while time.time() < start:
    pass
for i in range(30):
    store.upsert([{"id": f"p{i}", "prompt": "q", "completions": ["a", "b"], "ranking": [1, 0], "labeler": who}])
"""


def test_two_processes_writing_at_once_lose_no_answer(tmp_path):
    out = tmp_path / "rankings.jsonl"
    start = time.time() + 4  # both start writing at the same moment
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), who, str(start)], env=env) for who in ("alice", "bob")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    recs = RankingStore(out).read()
    assert len(recs) == 60 and {r["labeler"] for r in recs} == {"alice", "bob"}


# ------------------------------------------------------------------ the command line
def run_cli(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks.label", *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_the_app_serves_until_sigterm_and_resumes(files):
    to_rank, out = files
    write_jsonl(out, [{**ITEMS[0], "ranking": [0, 1, 2], "labeler": "alice"}])
    proc = subprocess.Popen([sys.executable, "-m", "tasks.label", "--labeler", "alice", "--port", "0", "--to-rank", str(to_rank),
                             "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "1 done, 3 left" in line, line + proc.stderr.read()
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        assert http(url + "/api/state")[1]["next_id"] == "python_qa/f1"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_bad_setups_fail_with_one_line_and_exit_2(files):
    to_rank, out = files
    res = run_cli("--labeler", "alice", "--to-rank", str(to_rank.with_name("missing.jsonl")), "--out", str(out))
    assert res.returncode == 2 and "missing.jsonl: no such file" in res.stderr and "dvc repro preferences" in res.stderr
    write_jsonl(out, [{**ITEMS[0], "ranking": [0, 1, 2], "labeler": "alice"}])
    out.write_text(out.read_text() + '{"prompt": "q", "completions": ["a", "b"], "ranking": [0, 0]}\n')
    before = out.read_bytes()
    res = run_cli("--labeler", "alice", "--to-rank", str(to_rank), "--out", str(out))
    assert res.returncode == 2 and "rankings.jsonl:2: 'ranking' must order" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == before
    res = run_cli("--labeler", "gold", "--to-rank", str(to_rank), "--out", str(out))
    assert res.returncode == 2 and "not 'gold'" in res.stderr
    write_jsonl(to_rank, [ITEMS[0], ITEMS[0]])
    res = run_cli("status", "--to-rank", str(to_rank), "--out", str(out))
    assert res.returncode == 2 and "appears twice" in res.stderr


def test_default_paths_come_from_params_yaml(tmp_path):
    raw = tiny_raw_params()
    raw["paths"].update(preferences="data/prefs", human_preferences="mine/ranked.jsonl")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    write_jsonl(tmp_path / "data/prefs/to_rank.jsonl", ITEMS)
    write_jsonl(tmp_path / "mine/ranked.jsonl", [{**ITEMS[1], "ranking": [0, 1, 2], "labeler": "bob"}])
    res = run_cli("status", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "4 prompts to rank" in res.stdout and "bob: 1 done, 3 left" in res.stdout and "mine/ranked.jsonl" in res.stdout


# ------------------------------------------------------------------ Label Studio and Argilla
def test_label_studio_export_is_a_task_list_and_a_ranker_config(files, tmp_path):
    to_rank, _ = files
    assert label.main(["export", "--format", "label-studio", "--to-rank", str(to_rank), "--out", "x", str(tmp_path / "ls")]) == 0
    tasks = json.loads((tmp_path / "ls/tasks.json").read_text())
    assert len(tasks) == 4 and tasks[0]["data"]["prompt_id"] == "python_qa/f0"
    assert tasks[0]["data"]["items"][2] == {"id": "c2", "title": "Completion 3", "body": "answer 0.2"}
    view = ET.fromstring((tmp_path / "ls/labeling_config.xml").read_text())
    lst, ranker = view.find("List"), view.find("Ranker")
    assert lst.get("value") == "$items" and ranker.get("toName") == lst.get("name") and view.find("Text").get("value") == "$prompt"
    assert [(b.get("name"), b.get("default")) for b in ranker.findall("Bucket")] == [("ranked", "true"), ("flagged", None)]


def ls_task(item: dict, annotations: list) -> dict:
    """A task as Label Studio's JSON export writes it (labelstud.io/guide/task_format)."""
    return {"id": 17, "project": 3, "created_at": "2026-11-20T10:00:00Z",
            "data": {"prompt_id": item["id"], "prompt": item["prompt"],
                     "items": [{"id": f"c{i}", "title": f"Completion {i + 1}", "body": c} for i, c in enumerate(item["completions"])]},
            "annotations": annotations, "predictions": []}


def ls_annotation(value, completed_by, cancelled=False) -> dict:
    return {"id": 1001, "completed_by": completed_by, "was_cancelled": cancelled, "ground_truth": False, "lead_time": 12.5,
            "result": [{"id": "r1", "from_name": "rank", "to_name": "completions", "type": "ranker", "origin": "manual", "value": value}]}


def test_label_studio_import_of_its_documented_export(files, tmp_path):
    to_rank, out = files
    export = tmp_path / "project-3-at-2026-11-20.json"
    export.write_text(json.dumps([
        ls_task(ITEMS[0], [ls_annotation({"ranker": {"ranked": ["c2", "c0"], "flagged": ["c1"]}}, {"id": 4, "email": "ann@example.org"}),
                           ls_annotation({"ranker": ["c1", "c0", "c2"]}, 5),  # a Ranker without buckets: the plain list
                           ls_annotation({"ranker": {"ranked": ["c0", "c1", "c2"]}}, 6, cancelled=True)]),
        ls_task(ITEMS[1], [])]))
    assert label.main(["import", "--format", "label-studio", "--to-rank", str(to_rank), "--out", str(out), str(export)]) == 0
    recs = {r["labeler"]: r for r in RankingStore(out).read()}
    assert set(recs) == {"ann@example.org", "label-studio:5"}
    ann = recs["ann@example.org"]
    assert (ann["id"], ann["ranking"], ann["flagged"], ann["ties"]) == ("python_qa/f0", [2, 0, 1], [1], [])
    assert ann["finished"] == [True, False, True] and ann["judge_scores"] == [0.5, 0.2, 0.9]  # joined back from to_rank
    assert recs["label-studio:5"]["ranking"] == [1, 0, 2]
    for value, msg in [({"ranker": {"ranked": ["c2", "c0"]}}, "place each of the 3 items once"),
                       ({"ranker": {"ranked": ["c2", "c0", "c9"]}}, "'c9' is not one of"),
                       ({"ranker": {"best": ["c0", "c1", "c2"]}}, "unknown bucket"), ({"choices": ["x"]}, "a ranker result needs")]:
        export.write_text(json.dumps([ls_task(ITEMS[0], [ls_annotation(value, 4)])]))
        with pytest.raises(RankingError, match=f"task 0, annotation 0: .*{msg}"):
            interop.import_label_studio(export)
    export.write_text('{"not": "a list"}')
    assert label.main(["import", "--format", "label-studio", "--to-rank", str(to_rank), "--out", str(out), str(export)]) == 2


def test_argilla_export_is_a_to_disk_dataset_with_a_ranking_question(files, tmp_path):
    to_rank, _ = files
    assert label.main(["export", "--format", "argilla", "--to-rank", str(to_rank), "--out", "x", str(tmp_path / "ds")]) == 0
    settings = json.loads((tmp_path / "ds/.argilla/settings.json").read_text())
    ranking = next(q for q in settings["questions"] if q["name"] == "ranking")
    assert ranking["settings"]["type"] == "ranking" and [o["value"] for o in ranking["settings"]["options"]] == [
        "completion_1", "completion_2", "completion_3"]
    assert [f["name"] for f in settings["fields"]] == ["prompt", "completion_1", "completion_2", "completion_3"]
    records = json.loads((tmp_path / "ds/records.json").read_text())
    assert records[1]["id"] == "python_qa/f1" and records[1]["fields"]["completion_2"] == "answer 1.1" and records[1]["responses"] == {}
    assert json.loads((tmp_path / "ds/.argilla/dataset.json").read_text())["name"]
    mixed = [ITEMS[0], {**ITEMS[1], "completions": ["a", "b"], "finished": [True, True], "judge_scores": [1, 2]}]
    with pytest.raises(RankingError, match="same number of completions"):
        interop.export_argilla(mixed, tmp_path / "bad")


def argilla_record(item: dict, responses: dict) -> dict:
    """A record as Argilla 2.x writes records.json (Dataset.to_disk, Record.to_dict)."""
    return {"id": item["id"], "_server_id": "8d0e2a3c-4a35-4c5e-9a53-6a7a1f0f0c11",
            "fields": {"prompt": item["prompt"], **{f"completion_{i + 1}": c for i, c in enumerate(item["completions"])}},
            "metadata": {}, "suggestions": {}, "vectors": {}, "responses": responses}


U1, U2, U3 = "0f4b1a52-1111-4c4e-8f0e-0a1b2c3d4e5f", "7c9e6679-2222-4a4f-b3c3-a0b1c2d3e4f5", "9a8b7c6d-3333-4d4e-8f8f-112233445566"


def test_argilla_import_of_its_documented_records(files, tmp_path):
    to_rank, out = files
    ds = tmp_path / "argilla-export"
    (ds / ".argilla").mkdir(parents=True)
    (ds / "records.json").write_text(json.dumps([
        argilla_record(ITEMS[0], {
            "ranking": [{"value": ["completion_3", "completion_1", "completion_2"], "user_id": U1, "status": "submitted"},  # the SDK's form
                        {"value": [{"value": "completion_2", "rank": 1}, {"value": "completion_1", "rank": 2},  # the API's form,
                                   {"value": "completion_3", "rank": 2}], "user_id": U2, "status": "submitted"},  # with a tie
                        {"value": ["completion_1", "completion_2", "completion_3"], "user_id": U3, "status": "draft"}],
            "flagged": [{"value": ["completion_2"], "user_id": U1, "status": "submitted"}]}),
        argilla_record(ITEMS[1], {})]))
    assert label.main(["import", "--format", "argilla", "--to-rank", str(to_rank), "--out", str(out), str(ds)]) == 0
    recs = {r["labeler"]: r for r in RankingStore(out).read()}
    assert set(recs) == {f"argilla:{U1}", f"argilla:{U2}"}  # the draft is not an answer
    one, two = recs[f"argilla:{U1}"], recs[f"argilla:{U2}"]
    assert (one["id"], one["ranking"], one["flagged"], one["ties"]) == ("python_qa/f0", [2, 0, 1], [1], [])
    assert (two["ranking"], two["ties"], two["flagged"]) == ([1, 0, 2], [[0, 2]], [])
    assert one["finished"] == [True, False, True]
    ok = {"user_id": U1, "status": "submitted"}
    bad = [({"ranking": [{"value": ["completion_1", "completion_2"], **ok}]}, "permutation"),
           ({"ranking": [{"value": ["completion_1", "completion_9", "completion_2"], **ok}]}, "'completion_9' is not one of"),
           ({"ranking": [{"value": "completion_1", **ok}]}, "a ranking value is a list"),
           ({"ranking": [{"value": ["completion_1", "completion_2", "completion_3"]}]}, "needs 'value' and 'user_id'"),
           ({"ranking": [{"value": ["completion_1", "completion_2", "completion_3"], "user_id": U1}]}, "says nothing of whether it was submitted")]
    for responses, msg in bad:
        (ds / "records.json").write_text(json.dumps([argilla_record(ITEMS[0], responses)]))
        with pytest.raises(RankingError, match=f"record 0, ranking response 0: .*{msg}"):
            interop.import_argilla(ds)
    with pytest.raises(RankingError, match="no such file"):
        interop.import_argilla(tmp_path)


def offline_argilla():
    """Argilla's SDK with a client that has no server: its parsing and serialisation are the
    real SDK's; nothing here sends a request (a call that did would fail on None)."""
    rg = pytest.importorskip("argilla")

    class NoServer:
        def __getattr__(self, name):
            return None

    client = rg.Argilla.__new__(rg.Argilla)
    client.api = NoServer()
    rg.Argilla._set_default(client)
    return rg


def test_argilla_round_trip_with_the_real_sdk(files, tmp_path):
    """Our export is a dataset the SDK loads (its DatasetModel, Settings and Record parsers);
    the SDK's own exports of ranked records come back with only the submitted responses and
    with ties, and its to_disk records (no response status) are refused unless asked."""
    import dataclasses  # noqa: F401

    rg = offline_argilla()
    from argilla._models import DatasetModel
    from argilla.records._io._generic import GenericIO
    from argilla.records._io._json import JsonIO

    to_rank, out = files
    assert label.main(["export", "--format", "argilla", "--to-rank", str(to_rank), "--out", "x", str(tmp_path / "ds")]) == 0
    DatasetModel(**json.loads((tmp_path / "ds/.argilla/dataset.json").read_text()))  # "status": null was refused here
    settings = rg.Settings.from_json(str(tmp_path / "ds/.argilla/settings.json"))
    assert [q.name for q in settings.questions] == ["ranking", "flagged"]
    assert [r.fields["completion_2"] for r in JsonIO._records_from_json(tmp_path / "ds/records.json")] == [it["completions"][1] for it in ITEMS]

    fields = {"prompt": ITEMS[0]["prompt"], **{f"completion_{i + 1}": c for i, c in enumerate(ITEMS[0]["completions"])}}
    responses = [rg.Response("ranking", ["completion_3", "completion_1", "completion_2"], user_id=U1, status="submitted"),
                 rg.Response("ranking", [{"value": "completion_2", "rank": 1}, {"value": "completion_1", "rank": 1},
                                         {"value": "completion_3", "rank": 2}], user_id=U2, status="submitted"),
                 rg.Response("ranking", ["completion_1", "completion_2", "completion_3"], user_id=U3, status="draft"),
                 rg.Response("flagged", ["completion_2"], user_id=U1, status="submitted")]
    discarded = rg.Record(fields={**fields}, id="python_qa/f1",
                          responses=[rg.Response("ranking", ["completion_1", "completion_2", "completion_3"], user_id=U1, status="discarded")])
    records = [rg.Record(fields=fields, id=ITEMS[0]["id"], responses=responses), discarded]
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps(GenericIO.to_list(records, flatten=True)))
    assert label.main(["import", "--format", "argilla", "--to-rank", str(to_rank), "--out", str(out), str(flat)]) == 0
    got = {r["labeler"]: r for r in RankingStore(out).read()}
    assert set(got) == {f"argilla:{U1}", f"argilla:{U2}"}  # 2 submitted of 4 responses: no draft, no discarded one
    assert (got[f"argilla:{U1}"]["ranking"], got[f"argilla:{U1}"]["flagged"]) == ([2, 0, 1], [1])
    assert got[f"argilla:{U2}"]["ties"] == [[1, 0]] and got[f"argilla:{U2}"]["ranking"][:2] == [1, 0]
    nested = tmp_path / "records.json"
    JsonIO.to_json(records, nested)  # what Dataset.to_disk writes: no response says its status
    with pytest.raises(RankingError, match="says nothing of whether it was submitted"):
        interop.import_argilla(nested)
    assert len(interop.import_argilla(nested, all_responses=True)) == 4  # asked for: every response


def test_export_then_import_round_trip_feeds_the_preferences_stage(files, tmp_path):
    """Prompts out to Label Studio, a labeler's answers back, the same JSONL the stage imports."""
    to_rank, out = files
    label.main(["export", "--format", "label-studio", "--to-rank", str(to_rank), "--out", str(out), str(tmp_path / "ls")])
    tasks = json.loads((tmp_path / "ls/tasks.json").read_text())
    for task in tasks:  # what Label Studio adds when someone ranks: best last item first
        ids = [it["id"] for it in task["data"]["items"]]
        task["annotations"] = [ls_annotation({"ranker": {"ranked": ids[::-1], "flagged": []}}, {"id": 1, "email": "ann@example.org"})]
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    label.main(["import", "--format", "label-studio", "--to-rank", str(to_rank), "--out", str(out), str(tmp_path / "export.json")])
    recs = preferences.read_human(out)
    assert [(r["id"], r["ranking"]) for r in recs] == [(it["id"], [2, 1, 0]) for it in ITEMS]
    assert run_cli("status", "--to-rank", str(to_rank), "--out", str(out)).stdout.count("ann@example.org: 4 done, 0 left") == 1


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_rankings_made_in_the_app_train_the_reward_model(tmp_path):
    """Sample with the gold labeler, rank every prompt through the app's HTTP API (the longer
    completion first, equal lengths tied), switch to labeler: file, `dvc repro reward`."""
    raw = tiny_raw_params()
    raw["preferences"]["labeler"] = "gold"
    raw["paths"]["human_preferences"] = "labels/rankings.jsonl"
    proj = make_project(tmp_path / "proj", raw)
    (proj / "labels").mkdir()
    (proj / "labels/rankings.jsonl").write_text("")  # committed, empty: what a fresh clone has
    git(proj, "add", "-A")
    git(proj, "commit", "-qm", "no rankings yet")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONPATH": str(proj)}
    dvc(proj, "repro", "preferences", env=env)
    items = [json.loads(line) for line in (proj / "data/preferences/to_rank.jsonl").read_text().splitlines()]
    assert len(items) == 12 and all(it["k"] == 2 and len(it["judge_scores"]) == 2 for it in items)

    proc = subprocess.Popen([sys.executable, "-m", "tasks.label", "--labeler", "tester", "--port", "0"], cwd=proj, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "0 done, 12 left" in line, line + proc.stderr.read()
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        while (nxt := http(url + "/api/state")[1]["next_id"]) is not None:
            comps = http(url + "/api/item?id=" + urllib.request.quote(nxt, safe=""))[1]["completions"]
            order = sorted(range(len(comps)), key=lambda i: (-len(comps[i]), i))
            ties = [order] if len(comps[0]) == len(comps[1]) else []
            assert http(url + "/api/rank", {"id": nxt, "ranking": order, "ties": ties})[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0

    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["preferences"]["labeler"] = "file"
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(proj, "add", "-A")
    git(proj, "commit", "-qm", "rankings from the app")
    res = dvc(proj, "repro", "reward", env=env)
    assert "Running stage 'preferences'" in res.stdout and "Running stage 'reward'" in res.stdout
    prefs = json.loads((proj / "reports/preferences.json").read_text())
    assert (prefs["labeler"], prefs["human_labels"], prefs["judge_labels"], prefs["labelers"]) == ("file", 12, 0, 1)
    assert 0 <= prefs["judge_agreement"] <= 1
    rm = json.loads((proj / "reports/reward.json").read_text())
    assert 0 <= rm["val_accuracy"] <= 1 and rm["val_pairs"] >= 1
    print(f"\nreward model on {prefs['usable_pairs']} usable pairs ranked in the app: val_accuracy {rm['val_accuracy']:.3f} "
          f"on {rm['val_pairs']} held-out pairs; people vs judge agreement {prefs['judge_agreement']:.3f}")


def test_imports_want_a_json_list(tmp_path):
    (tmp_path / "records.json").write_text('{"not": "a list"}')
    with pytest.raises(interop.RankingError, match=r"expected a JSON list of tasks \(Label Studio"):
        interop.import_label_studio(tmp_path / "records.json")
    with pytest.raises(interop.RankingError, match=r"expected a JSON list of records \(Argilla"):
        interop.import_argilla(tmp_path)
