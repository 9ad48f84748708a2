"""label: people rank the sampled completions in the browser (a tool, not a pipeline stage).

    python -m tasks.label --labeler alice                 # http://127.0.0.1:8765/ (make label LABELER=alice)
    python -m tasks.label --labeler bob --port 8766       # a second labeler, same rankings file
    python -m tasks.label status                          # progress and agreement, per labeler
    python -m tasks.label export --format label-studio OUT   # or argilla: the prompts to rank, for those tools
    python -m tasks.label import --format label-studio FILE  # or argilla: their rankings, into the rankings file

It shows each prompt of `data/preferences/to_rank.jsonl` (written by `dvc repro preferences`
with `preferences.labeler: gold`: the K completions sampled per prompt) and its
completions; the labeler orders them by dragging or with the keyboard, marks ties and flags
unusable ones, and saves. Every answer is written at once to the rankings file,
`paths.human_preferences` (default `labels/rankings.jsonl`), which `preferences.labeler:
file` imports: the file is rewritten whole into a synced temporary and renamed over the old
one, under a lock, so an interrupted session loses nothing, and the page resumes at the
first prompt this labeler has not ranked. Each answer carries the labeler's name; the page
shows progress (done / left) and, where two people ranked the same prompt, their pairwise
agreement. Bad input (a ranking that is not a permutation, an unknown prompt id, bad JSON)
is answered with HTTP 400 and a one-line message, and the file is left as it was.

The server binds 127.0.0.1 only (standard library `http.server`, a thread per request),
answers only requests addressed to 127.0.0.1/localhost (no DNS rebinding), and takes
answers only as `application/json` (so another web site cannot post a form into it).

HTTP API (what the page uses; the tests too):
    GET  /api/state             labeler, total, done, left, next_id, agreement, labelers
    GET  /api/item?id=ID        the prompt, its completions, this labeler's earlier answer
    POST /api/rank              {"id", "ranking": [best..worst], "ties": [[i, j]], "flagged": [i]}
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from tasks.lib.errors import StageError
from tasks.lib.rankings import (JUDGE, LABELER_RE, MAX_K, RankingError, RankingStore, agreement_counts, check_labels, compare,
                                read_jsonl)

PAGE = Path(__file__).with_name("label.html")
MAX_BODY = 1 << 20
FORMATS = ("label-studio", "argilla")


def parse_item(rec) -> dict:
    """One line of to_rank.jsonl: {"id", "prompt", "completions", "finished"?, "judge_scores"?}."""
    if not isinstance(rec, dict):
        raise RankingError(f"expected a JSON object, got {type(rec).__name__}")
    if not (isinstance(rec.get("id"), str) and rec["id"] and isinstance(rec.get("prompt"), str)):
        raise RankingError("needs an 'id' and a 'prompt' string")
    comps = rec.get("completions")
    if not (isinstance(comps, list) and 2 <= len(comps) <= MAX_K and all(isinstance(c, str) for c in comps)):
        raise RankingError(f"'completions' must be a list of 2 to {MAX_K} strings")
    finished = rec.get("finished", [True] * len(comps))
    if not (isinstance(finished, list) and len(finished) == len(comps) and all(isinstance(f, bool) for f in finished)):
        raise RankingError(f"'finished' must be a list of {len(comps)} booleans")
    item = {"id": rec["id"], "prompt": rec["prompt"], "completions": comps, "finished": finished}
    if rec.get("judge_scores") is not None:
        item["judge_scores"] = rec["judge_scores"]
    return item


def load_items(path: Path) -> list[dict]:
    if not path.is_file():
        raise StageError(f"{path}: no such file: sample the completions to rank first "
                         "(`dvc repro preferences` with preferences.labeler: gold writes it), or pass --to-rank FILE")
    items = read_jsonl(path, parse_item)
    ids = [it["id"] for it in items]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup is not None:
        raise StageError(f"{path}: prompt id {dup!r} appears twice")
    if not items:
        raise StageError(f"{path}: no prompts to rank")
    return items


def key(rec: dict) -> tuple:
    """A prompt as ranked: its id and its exact completions (resampled completions under the
    same id are a new item; rankings of the old ones stay valid data)."""
    return (rec["id"], tuple(rec["completions"]))


class Labeling:
    """The app's logic, without HTTP: what to show, progress, agreement, saving an answer."""

    def __init__(self, items: list[dict], store: RankingStore, labeler: str):
        self.items, self.store, self.labeler = items, store, labeler
        self.by_id = {it["id"]: it for it in items}
        self.keys = {key(it) for it in items}
        self.lock = threading.Lock()
        store.read()  # a corrupt rankings file stops the app before anything is served

    def _records(self) -> list[dict]:
        return [r for r in self.store.read() if key(r) in self.keys]

    def state(self) -> dict:
        records = self._records()
        done = {r["id"] for r in records if r["labeler"] == self.labeler}
        same, total, shared = agreement_counts(records)
        per = {}
        for r in records:
            per[r["labeler"]] = per.get(r["labeler"], 0) + 1
        nxt = next((it["id"] for it in self.items if it["id"] not in done), None)
        return {"labeler": self.labeler, "total": len(self.items), "done": len(done), "left": len(self.items) - len(done),
                "next_id": nxt, "first_id": self.items[0]["id"], "agreement": same / total if total else None, "agreement_pairs": total,
                "shared_prompts": shared, "labelers": per, "file": str(self.store.path)}

    def item(self, item_id: str) -> dict:
        it = self.by_id.get(item_id)
        if it is None:
            raise RankingError(f"unknown prompt id {item_id!r}")
        records = [r for r in self._records() if r["id"] == item_id]
        mine = next((r for r in records if r["labeler"] == self.labeler), None)
        index = self.items.index(it)
        others = []
        if mine is not None:  # shown only after this labeler answered: no anchoring on others
            for r in records:
                if r["labeler"] != self.labeler:
                    same, total = compare(mine, r)
                    others.append({"labeler": r["labeler"], "same": same, "pairs": total})
        return {"id": it["id"], "index": index, "total": len(self.items), "prompt": it["prompt"], "completions": it["completions"],
                "finished": it["finished"], "mine": None if mine is None else {k: mine[k] for k in ("ranking", "ties", "flagged")},
                "others": others, "prev_id": self.items[index - 1]["id"] if index > 0 else None,
                "next_item_id": self.items[index + 1]["id"] if index + 1 < len(self.items) else None}

    def answer(self, body) -> dict:
        if not isinstance(body, dict):
            raise RankingError("the answer must be a JSON object {id, ranking, ties, flagged}")
        unknown = set(body) - {"id", "ranking", "ties", "flagged"}
        if unknown:
            raise RankingError(f"unknown field(s) {sorted(unknown)}: an answer has id, ranking, ties, flagged")
        it = self.by_id.get(body.get("id")) if isinstance(body.get("id"), str) else None
        if it is None:
            raise RankingError(f"unknown prompt id {body.get('id')!r}")
        ranking, ties, flagged = check_labels(len(it["completions"]), body.get("ranking"), body.get("ties", []), body.get("flagged", []))
        rec = {"id": it["id"], "labeler": self.labeler, "prompt": it["prompt"], "completions": it["completions"],
               "finished": it["finished"], "ranking": ranking, "ties": ties, "flagged": flagged,
               "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if "judge_scores" in it:
            rec["judge_scores"] = it["judge_scores"]
        with self.lock:
            self.store.upsert([rec])
        return self.state()


# ------------------------------------------------------------------ HTTP
def make_handler(app: Labeling, page: bytes):
    class Handler(BaseHTTPRequestHandler):
        server_version = "gpt-pipeline-label/1"

        def log_message(self, fmt, *args):  # only failures: a quiet terminal for the labeler
            if len(args) > 1 and str(args[1]).startswith(("4", "5")):
                sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj) -> None:
            self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json; charset=utf-8")

        def _host_ok(self) -> bool:
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
            if host in ("127.0.0.1", "localhost"):
                return True
            self._json(403, {"error": f"requests must be addressed to 127.0.0.1 or localhost, not {host!r}"})
            return False

        def do_GET(self):  # noqa: N802
            if not self._host_ok():
                return
            url = urlparse(self.path)
            try:
                if url.path in ("/", "/index.html"):
                    self._send(200, page, "text/html; charset=utf-8")
                elif url.path == "/api/state":
                    self._json(200, app.state())
                elif url.path == "/api/item":
                    self._json(200, app.item((parse_qs(url.query).get("id") or [""])[0]))
                else:
                    self._json(404, {"error": f"no such page: {url.path}"})
            except RankingError as err:
                self._json(404 if "unknown prompt id" in str(err) else 400, {"error": str(err)})
            except StageError as err:  # the rankings file went bad under us
                self._json(500, {"error": str(err)})

        def do_POST(self):  # noqa: N802
            if not self._host_ok():
                return
            if urlparse(self.path).path != "/api/rank":
                return self._json(404, {"error": f"no such endpoint: {self.path}"})
            if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
                return self._json(415, {"error": "send the answer as Content-Type: application/json"})
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 < length <= MAX_BODY:
                if MAX_BODY < length <= 16 * MAX_BODY:
                    self.rfile.read(length)  # drained, so the client reads the answer rather than a reset
                return self._json(400 if length <= 0 else 413, {"error": f"the body must be 1 to {MAX_BODY} bytes of JSON"})
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                return self._json(400, {"error": f"the body is not JSON ({getattr(err, 'msg', err)})"})
            try:
                self._json(200, app.answer(body))
            except RankingError as err:
                self._json(400, {"error": str(err)})
            except StageError as err:
                self._json(500, {"error": str(err)})

    return Handler


def make_server(app: Labeling, port: int) -> ThreadingHTTPServer:
    """The HTTP server on 127.0.0.1:`port` (0: any free port), not yet serving."""
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(app, PAGE.read_bytes()))
    server.daemon_threads = True
    return server


def serve(app: Labeling, port: int) -> None:
    """Serve until SIGTERM or Ctrl-C, after one line with the address on stdout."""
    server = make_server(app, port)

    def stop(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    st = app.state()
    print(f"labeling as {app.labeler}: http://127.0.0.1:{server.server_address[1]}/  ({st['done']} done, {st['left']} left; "
          f"answers go to {app.store.path})", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# ------------------------------------------------------------------ CLI
def default_paths(params_file: str) -> tuple[Path, Path]:
    from tasks.config import load_params

    params = load_params(params_file)
    return Path(params.paths.preferences) / "to_rank.jsonl", Path(params.paths.human_preferences)


def status(items: list[dict], store: RankingStore) -> str:
    keys = {key(it) for it in items}
    records = [r for r in store.read() if key(r) in keys]
    lines = [f"{len(items)} prompts to rank in total; rankings in {store.path}"]
    for who in sorted({r["labeler"] for r in records}):
        done = sum(r["labeler"] == who for r in records)
        lines.append(f"  {who}: {done} done, {len(items) - done} left")
    same, total, shared = agreement_counts(records)
    lines.append(f"agreement: {same / total:.3f} on {total} pairs of {shared} prompts ranked by 2+ people" if total
                 else "agreement: no prompt ranked by two people yet")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv.pop(0) if argv and argv[0] in ("serve", "status", "export", "import") else "serve"
    usage = __doc__.split("\n\n")[1]  # the command lines at the top of this module
    ap = argparse.ArgumentParser(prog=f"python -m tasks.label {cmd}".replace(" serve", ""), description=__doc__.split("\n")[0],
                                 epilog=f"commands:\n{usage}", formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="where the default paths come from (default: params.yaml)")
    ap.add_argument("--to-rank", help="prompts and completions to rank (default: <paths.preferences>/to_rank.jsonl)")
    ap.add_argument("--out", help="the rankings file (default: paths.human_preferences)")
    if cmd == "serve":
        ap.add_argument("--labeler", required=True, help="your name: every answer carries it")
        ap.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765; 0: any free port)")
    elif cmd in ("export", "import"):
        ap.add_argument("--format", required=True, choices=FORMATS)
        ap.add_argument("path", help="export: the folder to write; import: the tool's export (file or folder)")
        if cmd == "import":
            ap.add_argument("--all-responses", action="store_true",
                            help="argilla: take every response, also drafts and discarded ones (for exports that do not say which were submitted)")
    args = ap.parse_args(argv)
    try:
        to_rank, out = (Path(args.to_rank) if args.to_rank else None), (Path(args.out) if args.out else None)
        if to_rank is None or out is None:
            d_rank, d_out = default_paths(args.params)
            to_rank, out = to_rank or d_rank, out or d_out
        store = RankingStore(out)
        if cmd == "serve":
            if not LABELER_RE.match(args.labeler) or args.labeler in (JUDGE, "file"):
                raise StageError(f"--labeler {args.labeler!r}: a name of 1-100 letters, digits or _.@:+- (not '{JUDGE}' or 'file')")
            if not 0 <= args.port < 65536:
                raise StageError(f"--port {args.port}: not a port number")
            serve(Labeling(load_items(to_rank), store, args.labeler), args.port)
        elif cmd == "status":
            print(status(load_items(to_rank), store))
        elif cmd == "export":
            from tasks.lib import interop

            fn = interop.export_label_studio if args.format == "label-studio" else interop.export_argilla
            for f in fn(load_items(to_rank), Path(args.path)):
                print(f"wrote {f}")
        else:
            from tasks.lib import interop

            if args.format == "label-studio":
                records = interop.import_label_studio(Path(args.path))
            else:
                records = interop.import_argilla(Path(args.path), all_responses=args.all_responses)
            if not records:
                raise StageError(f"{args.path}: no finished rankings in this {args.format} export")
            known = {it["id"]: it for it in load_items(to_rank)} if to_rank.is_file() else {}
            for r in records:  # what the tools do not carry: whether each completion ended its turn
                it = known.get(r["id"])
                if it is not None and key(it) == key(r):
                    r["finished"] = it["finished"]
                    if "judge_scores" in it:
                        r["judge_scores"] = it["judge_scores"]
            store.upsert(records)
            labelers = sorted({r["labeler"] for r in records})
            print(f"imported {len(records)} rankings by {len(labelers)} labeler(s) ({', '.join(labelers)}) into {out}")
        return 0
    except (StageError, OSError) as err:
        print(f"error: label: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a bad params.yaml (ConfigError) and the like: one line, not a traceback
        from tasks.config import ConfigError

        if isinstance(err, ConfigError):
            print(f"error: label: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
