"""The data half at scale: generate a corpus of a given size and run every data stage on it.

    python bench/data_scale.py --sizes 0.3 1.2 5 --workers 2          # GB of generated JSONL
    python bench/data_scale.py --sizes 0.3 --workers 1 2              # throughput vs workers
    python bench/data_scale.py --sizes 5 --work /big/tmp --generate-only   # then again without it: reused
    python bench/data_scale.py --sizes 1.2 --work /big/tmp --keep          # keep each run's outputs, then
    python bench/data_scale.py --sizes 1.2 --work /big/tmp --stages dedup tokenize   # rerun some stages on them
    python bench/data_scale.py --sizes 0.3 --format warc              # the same pages as HTML in .warc.gz files

The corpus is JSONL files of crawl-like documents built from real text (paragraphs of
Python's documentation, recombined and lightly edited, so the vocabulary is real), with
boilerplate lines, junk pages and 15% near-duplicates; the built-in `python_docs` source is
the classifier's reference. With `--format warc` the same pages are HTML (menus in <nav>,
footers in <footer>, paragraphs in <article>) in gzipped WARC files of about 100 MB, read by
a `warc` source: the archive path (FastWARC, charset, Resiliparse) at scale. Each stage runs as the pipeline runs it (`python -m
tasks.<stage> --params ...` in a work folder, MLflow to a throwaway SQLite file), and the
script prints per stage: seconds, MB/s and docs/s of input, peak RSS of the stage's whole
process tree (workers included), and the disk its outputs take. At the end: peak RSS per
GB of input, the disk the whole data half takes, and, on a sample of the corpus in the same
run, the dedup signatures' speed against the plain datasketch loop (bench/dedup_speed.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ["sources", "collect", "quality", "dedup", "mix", "tokenizer", "tokenize"]
OUTPUT_OF = {"sources": ["data/sources.json"], "collect": ["data/raw"], "quality": ["data/filtered", "data/dropped", "models/quality"],
             "dedup": ["data/dedup"], "mix": ["data/mix"], "tokenizer": ["models/tokenizer"], "tokenize": ["data/tokens"]}
INPUT_OF = {"sources": None, "collect": "corpus", "quality": "data/raw", "dedup": "data/filtered", "mix": "data/dedup",
            "tokenizer": "data/dedup", "tokenize": "data/dedup"}


def documents(gigabytes: float, seed: int):
    """Crawl-like texts until about `gigabytes` GB of them (first and last line: page chrome)."""
    from tasks.lib import corpora

    rng = random.Random(seed)
    paras = [p.strip() for _, t, _ in corpora.python_docs() for p in t.split("\n\n") if 15 <= len(p.split()) <= 150]
    menus = ["Home | About | Blog | Contact", "We use cookies to improve your experience.", "Subscribe to our newsletter",
             "Copyright 2024. All rights reserved.", "Share: Twitter | Facebook | Email"]
    target, written = int(gigabytes * 1e9), 0
    recent: list[str] = []
    while written < target:
        r = rng.random()
        if r < 0.15 and recent:  # a near-duplicate: light edits and an appended footer
            words = rng.choice(recent).split(" ")
            text = " ".join(w for w in words if rng.random() > 0.02) + "\n" + rng.choice(menus)
        elif r < 0.25:  # junk
            text = " ".join(rng.choice(["cheap", "deal", "click", "win", "casino", "free", "bonus"]) for _ in range(rng.randint(50, 300)))
        else:
            body = [rng.choice(paras) for _ in range(rng.randint(3, 12))]
            text = "\n".join([rng.choice(menus)] + body + [rng.choice(menus)])
            recent.append(text)
            if len(recent) > 2000:
                recent.pop(rng.randrange(len(recent)))
        written += len(text.encode())
        yield text


def as_html(text: str, title: str) -> bytes:
    from html import escape

    lines = text.split("\n")
    nav, body, foot = (lines[0], lines[1:-1], lines[-1]) if len(lines) >= 3 else ("", lines, "")
    paras = "".join(f"<p>{escape(p)}</p>" for p in body)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title></head><body><nav>{escape(nav)}</nav>"
            f"<main><article><h1>{title}</h1>{paras}</article></main><footer>{escape(foot)}</footer></body></html>").encode()


def generate(folder: Path, gigabytes: float, seed: int, fmt: str = "jsonl") -> tuple[int, int]:
    """JSONL (or WARC) files of about `gigabytes` GB of text; returns (documents, bytes on disk)."""
    from tasks.lib.webarchive import Page, warc_bytes

    folder.mkdir(parents=True, exist_ok=True)
    docs = part = 0
    if fmt == "warc":
        pages: list = []
        size = 0

        def flush() -> None:
            nonlocal pages, size, part
            (folder / f"part-{part:04d}.warc.gz").write_bytes(warc_bytes(pages))
            pages, size, part = [], 0, part + 1

        for text in documents(gigabytes, seed):
            body = as_html(text, f"d{docs}")
            pages.append(Page(f"https://site{docs % 97}.example/d{docs}.html", 200, "text/html; charset=utf-8", body))
            size += len(body)
            docs += 1
            if size > 300_000_000:  # about 100 MB of gzipped WARC per file
                flush()
        if pages:
            flush()
        return docs, sum(f.stat().st_size for f in folder.glob("*.warc.gz"))
    fh = open(folder / f"part-{part:04d}.jsonl", "w", encoding="utf-8")
    written = 0
    for text in documents(gigabytes, seed):
        line = json.dumps({"id": f"d{docs}", "text": text}, ensure_ascii=False) + "\n"
        fh.write(line)
        written += len(line.encode())
        docs += 1
        if fh.tell() > 100_000_000:  # 100 MB files
            fh.close()
            part += 1
            fh = open(folder / f"part-{part:04d}.jsonl", "w", encoding="utf-8")
    fh.close()
    return docs, written


def tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def du(paths: list[Path]) -> int:
    return sum(f.stat().st_size for p in paths if p.exists() for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())


def run_stage(stage: str, work: Path, env: dict) -> tuple[float, int, int]:
    """(seconds, peak RSS of the stage's process tree, the main process's RSS at that peak)."""
    import psutil

    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", f"tasks.{stage}", "--params", "params.yaml"], cwd=work, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(work / f"{stage}.log", "w"))
    peak = peak_main = 0
    while proc.poll() is None:
        total = tree_rss(proc.pid)
        if total > peak:
            try:
                peak, peak_main = total, psutil.Process(proc.pid).memory_info().rss
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed: see {work / f'{stage}.log'}\n" + (work / f"{stage}.log").read_text()[-2000:])
    return time.time() - t0, peak, peak_main


def params_for(corpus: Path, workers: int, fmt: str = "jsonl") -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["executor"]["workers"] = workers
    crawl = ({"name": "crawl", "kind": "warc", "role": "crawl", "globs": [str(corpus / "*.warc.gz")]} if fmt == "warc" else
             {"name": "crawl", "kind": "files", "role": "crawl", "globs": [str(corpus / "*.jsonl")]})
    raw["collect"]["sources"] = [
        {"name": "python_docs", "kind": "builtin", "corpus": "python_docs", "role": "reference"},
        crawl,
    ]
    raw["mix"]["weights"] = {"python_docs": 0.2, "crawl": 0.8}
    raw["tokenizer"]["max_train_bytes"] = 200_000_000  # BPE on a 200 MB sample, as large corpora do
    return raw


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.3])
    ap.add_argument("--workers", type=int, nargs="+", default=[0])
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one, removed at the end)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", choices=["jsonl", "warc"], default="jsonl", help="the generated crawl's files: JSONL, or HTML in WARC")
    ap.add_argument("--generate-only", action="store_true", help="only generate the corpora (into --work, for a later run)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=STAGES,
                    help="stages to run (the others' outputs must be in the run folder: see --keep)")
    ap.add_argument("--raw-as-filtered", action="store_true",
                    help="skip quality: the later stages read collect's output as if filtered (their memory at a size "
                         "where quality would take hours on a small machine)")
    ap.add_argument("--keep", action="store_true", help="keep each run's outputs in --work (default: removed after the run)")
    args = ap.parse_args()
    base = Path(args.work or tempfile.mkdtemp(prefix="data-scale-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow.db'}"}
    summary = []
    try:
        for size in args.sizes:
            corpus = base / f"corpus-{size}-{args.seed}" if args.format == "jsonl" else base / f"corpus-{size}-{args.seed}-warc"
            made = corpus / "generated.json"  # a corpus generated earlier in this work folder is reused
            t0 = time.time()
            if made.exists():
                docs, nbytes = json.loads(made.read_text())
            else:
                docs, nbytes = generate(corpus, size, args.seed, args.format)
                made.write_text(json.dumps([docs, nbytes]))
            print(f"\n== corpus of {nbytes / 1e9:.2f} GB, {docs} documents (ready in {time.time() - t0:.0f} s)")
            if args.generate_only:
                continue
            for workers in args.workers:
                work = base / f"run-{size}-{workers}"
                work.mkdir(exist_ok=True)
                (work / "params.yaml").write_text(yaml.safe_dump(params_for(corpus, workers, args.format), sort_keys=False))
                print(f"-- executor: local, workers {workers or 'all cores'}")
                print(f"{'stage':>10} | {'seconds':>8} | {'MB/s':>7} | {'docs/s':>8} | {'peak RSS MB':>11} | {'main MB':>7} | {'disk MB':>8}")
                peak_all, total_s = 0, 0.0
                for stage in [s for s in STAGES if s in args.stages and not (args.raw_as_filtered and s == "quality")]:
                    if stage == "dedup" and args.raw_as_filtered and not (work / "data/filtered").exists():
                        (work / "data/filtered").symlink_to("raw")
                    seconds, peak, main_rss = run_stage(stage, work, env)
                    src = INPUT_OF[stage]
                    in_bytes = nbytes if src == "corpus" else du([work / src]) if src else 0
                    metrics = json.loads((work / "reports" / f"{stage}.json").read_text())
                    in_docs = docs if stage == "collect" else metrics.get("docs_in") or metrics.get("train_docs") or metrics.get("splits", {}).get("train", {}).get("docs", 0)
                    disk = du([work / p for p in OUTPUT_OF[stage]])
                    print(f"{stage:>10} | {seconds:8.1f} | {in_bytes / 1e6 / seconds:7.1f} | {in_docs / seconds:8.0f} | {peak / 1e6:11.0f} | {main_rss / 1e6:7.0f} | {disk / 1e6:8.0f}")
                    peak_all, total_s = max(peak_all, peak), total_s + seconds
                disk_all = du([work / "data", work / "models"])
                print(f"{'all':>10} | {total_s:8.1f} | {nbytes / 1e6 / total_s:7.1f} |          | {peak_all / 1e6:11.0f} |         | {disk_all / 1e6:8.0f}"
                      f"   (peak RSS {peak_all / 1e6 / (nbytes / 1e9):.0f} MB per GB of input; outputs {disk_all / nbytes:.1f}x the input)")
                summary.append((size, workers, total_s, peak_all, disk_all, nbytes))
                if not args.keep:
                    shutil.rmtree(work / "data")  # keep the next run's disk free
            if not args.work:
                shutil.rmtree(corpus)
        if args.generate_only:
            return 0
        print("\n== summary")
        for size, workers, secs, peak, disk, nbytes in summary:
            print(f"{nbytes / 1e9:5.2f} GB, workers {workers or 'all'}: {secs:7.0f} s, peak RSS {peak / 1e9:.2f} GB, outputs {disk / 1e9:.2f} GB")
        if set(args.stages) != set(STAGES):
            return 0
        print("\n== dedup signatures against the datasketch loop, same documents (bench/dedup_speed.py)")
        subprocess.run([sys.executable, str(ROOT / "bench/dedup_speed.py"), "--docs", "100000"], check=True)
    finally:
        if not args.work:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
