"""Web archives and remote inputs: `warc` sources (WARC and WET through FastWARC, HTML to main
text), the built-in archive of the default run, and `files` / `warc` sources on an S3 store
(a real moto_server on 127.0.0.1, started and stopped here)."""

from __future__ import annotations

import gzip
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import collect, sources
from tasks.config import ConfigError, parse_params
from tasks.lib import corpora
from tasks.lib.errors import StageError
from tasks.lib.storage import read_docs
from tasks.lib.webarchive import Page, decode_html, read_warc, warc_bytes, web_pages, wet_bytes
from tests.conftest import REPO, run_stage, tiny_raw_params

PARA1 = ("Web archives store what a crawler fetched: the request it sent, the response it got and metadata about both. "
         "Each record carries headers that say what kind of record it is, when it was captured and which address it came from. "
         "Reading them well means keeping the pages and counting everything else.")
PARA2 = ("An extractor turns the markup of a page into the text a person would read in the middle of it. "
         "Navigation menus, cookie banners and footers repeat on every page of a site and teach a language model little, "
         "so a good extractor leaves them out while keeping every paragraph of the article.")
LATIN = ("Un caf\u00e9 cr\u00e8me and a cr\u00eape were on the menu of the r\u00e9sum\u00e9 workshop, which met every week in the old library. "
         "The organisers wrote the page in a legacy encoding, and the server declared it in the header as a careful server should. "
         "Nothing in the text is lost when the declared charset is honoured by the reader.")
CHROME_NAV = "About our company"
CHROME_FOOT = "Copyright 2026 Example Corporation. All rights reserved."


def page_html(title: str, paras: list[str]) -> str:
    body = "".join(f"<p>{p}</p>" for p in paras)
    return (f"<!DOCTYPE html><html><head><title>{title}</title><script>var tracking = 1;</script></head><body>"
            f'<header><nav><ul><li><a href="/">Home</a></li><li><a href="/about">{CHROME_NAV}</a></li></ul></nav></header>'
            f"<main><article><h1>{title}</h1>{body}</article></main><footer><p>{CHROME_FOOT}</p></footer></body></html>")


def user_pages() -> list[Page]:
    return [
        Page("https://a.example/archives.html", 200, "text/html; charset=utf-8", page_html("Reading archives", [PARA1, PARA2]).encode()),
        Page("https://a.example/latin.html", 200, "text/html; charset=ISO-8859-1", page_html("Workshop", [LATIN, PARA1]).encode("latin-1")),
        Page("https://a.example/liar.html", 200, "text/html; charset=utf-8", page_html("Workshop", [LATIN]).encode("latin-1")),  # lies: not UTF-8
        Page("https://a.example/gone.html", 404, "text/html", b"<html><body><h1>Not found</h1></body></html>", "Not Found"),
        Page("https://a.example/moved.html", 301, "text/html", b"<html><body>moved</body></html>", "Moved Permanently"),
        Page("https://a.example/logo.png", 200, "image/png", b"\x89PNG\r\n\x1a\n" + bytes(40)),
        Page("https://a.example/robots.txt", 200, "text/plain", b"User-agent: *\nDisallow:\n"),
        Page("https://a.example/empty.html", 200, "text/html", b"<html><body><script>render()</script></body></html>"),
    ]


def params_with(srcs):
    raw = tiny_raw_params()
    raw["collect"]["sources"] = srcs
    raw["mix"]["weights"] = {s["name"]: 1.0 for s in srcs}
    return parse_params(raw)


@pytest.mark.parametrize("extractor", ["resiliparse", "trafilatura"])
def test_warc_source_keeps_main_text_and_counts_every_other_record(workdir, extractor):
    (workdir / "web").mkdir()
    (workdir / "web/crawl-0.warc.gz").write_bytes(warc_bytes(user_pages()))
    m = run_stage(collect, params_with([{"name": "web", "kind": "warc", "role": "crawl", "globs": ["web/*.warc.gz"], "extractor": extractor}]))
    # 1 warcinfo, 8 requests, 8 responses: two pages are documents, every other record has its reason
    assert m["sources"]["web"]["docs"] == 2
    assert m["sources"]["web"]["dropped"] == {"warc_warcinfo": 1, "warc_request": 8, "undecodable_charset": 1, "http_404": 1,
                                              "http_301": 1, "not_html": 2, "no_main_text": 1}
    rows = {json.loads(r["meta"])["url"]: r for r in read_docs(workdir / "data/raw/web")}
    assert sorted(rows) == ["https://a.example/archives.html", "https://a.example/latin.html"]
    first, latin = rows["https://a.example/archives.html"], rows["https://a.example/latin.html"]
    assert PARA1 in first["text"] and PARA2 in first["text"]
    assert LATIN in latin["text"]  # decoded by the charset the header declared
    for row in rows.values():
        assert CHROME_FOOT not in row["text"] and CHROME_NAV not in row["text"] and "tracking" not in row["text"]
    meta = json.loads(first["meta"])
    assert (meta["http_status"], meta["content_type"], meta["date"], meta["role"]) == (200, "text/html", "2026-01-01T00:00:00Z", "crawl")
    assert meta["path"] == "web/crawl-0.warc.gz" and first["id"].startswith("web/uuid:")


def test_wet_records_are_taken_as_text():
    docs = [("https://b.example/1", "First extracted text.\nSecond line."), ("https://b.example/2", "Caf\u00e9 au lait.")]
    got = [(meta["url"], text.decode()) for _, text, meta in read_warc(io.BytesIO(wet_bytes(docs)), "x.wet.gz") if text is not None]
    assert got == docs


def test_declared_charset_wins_and_a_lying_one_is_refused():
    assert decode_html("caf\u00e9".encode("latin-1"), "iso-8859-1") == "caf\u00e9"
    assert decode_html("caf\u00e9".encode("latin-1"), "utf-8") is None
    meta = '<html><head><meta charset="windows-1252"></head><body>\u201cquoted\u201d</body></html>'
    assert "\u201cquoted\u201d" in decode_html(meta.encode("cp1252"), None)  # the page's own <meta> when the header says nothing
    assert decode_html("caf\u00e9".encode("utf-8"), "no-such-charset") == "caf\u00e9"  # an unknown name: detected instead


def test_a_corrupt_record_is_counted_and_a_cut_archive_refused(workdir):
    plain = warc_bytes(user_pages()[:3], compress=False)
    # one byte changed inside the first page's paragraph: its block digest no longer matches
    at = plain.index(b"crawler fetched")
    broken = plain[:at] + b"X" + plain[at + 1 :]
    reasons = [meta.get("reason") for _, text, meta in read_warc(io.BytesIO(broken), "b.warc") if text is None]
    assert reasons.count("bad_digest") == 1
    packed = warc_bytes(user_pages()[:3])
    (workdir / "in").mkdir()
    (workdir / "in/cut.warc.gz").write_bytes(packed[: len(packed) - 200])  # the last record cut short
    with pytest.raises(StageError, match=r"in/cut\.warc\.gz.*truncated"):
        run_stage(collect, params_with([{"name": "w", "kind": "warc", "role": "crawl", "globs": ["in/*"]}]))
    (workdir / "in/cut.warc.gz").write_bytes(gzip.compress(b"this is a text file, not a web archive\n" * 20))
    with pytest.raises(StageError, match=r"in/cut\.warc\.gz.*not a readable WARC"):
        run_stage(collect, params_with([{"name": "w", "kind": "warc", "role": "crawl", "globs": ["in/*"]}]))
    assert not (workdir / "data/raw").exists()


def test_builtin_archive_is_real_html_read_through_the_archive_path(workdir):
    pages = web_pages(4)
    # the same bytes in every process (pydoc prints default values with their memory address)
    code = "import hashlib; from tasks.lib.webarchive import *; print(hashlib.sha256(warc_bytes(p for p, _ in web_pages())).hexdigest())"
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(digests) == 1
    html_pages = [p for p, truth in pages if truth is not None]
    assert len(html_pages) == 4 and all(b"<dl>" in p.body or b"<table" in p.body for p in html_pages)  # pydoc's own markup
    m = run_stage(collect, params_with([{"name": "arch", "kind": "builtin", "corpus": "web_archive", "role": "crawl", "limit": 4}]))
    src = m["sources"]["arch"]
    assert src["docs"] == 4
    assert src["dropped"] == {"warc_warcinfo": 1, "warc_request": 8, "not_html": 2, "http_404": 1, "http_301": 1}
    rows = read_docs(workdir / "data/raw/arch")
    for row, (page, truth) in zip(rows, pages):
        assert json.loads(row["meta"])["url"] == page.url
        assert not any(c in row["text"] for c in corpora.COOKIE)
        truth_words, got = set(truth.split()), set(row["text"].split())
        assert len(truth_words & got) / len(truth_words) > 0.6  # the documentation itself is there


def test_storage_options_refuse_credentials():
    with pytest.raises(ConfigError, match="secret_access_key.*environment"):
        params_with([{"name": "s", "kind": "files", "role": "crawl", "globs": ["s3://b/*.jsonl"],
                      "storage_options": {"endpoint_url": "http://127.0.0.1:1", "secret_access_key": "abc"}}])


# --------------------------------------------------------------------------- remote (S3)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(monkeypatch, tmp_path):
    """A moto S3 server on 127.0.0.1 (the stand-in infra/run-local.sh starts), stopped by PID."""
    port = _free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        import boto3

        client = boto3.client("s3", endpoint_url=url)
        client.create_bucket(Bucket="crawl")
        yield url, client
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_files_and_warc_sources_read_from_s3(workdir, s3):
    url, client = s3
    docs = [{"id": f"d{i}", "text": f"Remote document {i} read through fsspec."} for i in range(3)]
    client.put_object(Bucket="crawl", Key="json/a.jsonl.gz", Body=gzip.compress("".join(json.dumps(d) + "\n" for d in docs).encode()))
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["parquet row zero", "parquet row one"]}), buf)
    client.put_object(Bucket="crawl", Key="json/b.parquet", Body=buf.getvalue())
    client.put_object(Bucket="crawl", Key="web/0.warc.gz", Body=warc_bytes(user_pages()[:1]))
    so = {"endpoint_url": url}
    srcs = [{"name": "js", "kind": "files", "role": "crawl", "globs": ["s3://crawl/json/*.jsonl.gz"], "id_field": "id", "storage_options": so},
            {"name": "pq", "kind": "files", "role": "crawl", "globs": ["s3://crawl/json/*.parquet"], "storage_options": so},
            {"name": "web", "kind": "warc", "role": "crawl", "globs": ["s3://crawl/web/*.warc.gz"], "storage_options": so}]
    params = params_with(srcs)
    run_stage(sources, params)
    listing = json.loads((workdir / "data/sources.json").read_text())
    assert [f["path"] for f in listing["js"]["files"]] == ["s3://crawl/json/a.jsonl.gz"] and listing["js"]["files"][0]["version"]
    before = listing["web"]["files"][0]["version"]
    m = run_stage(collect, params)
    assert [r["text"] for r in read_docs(workdir / "data/raw/js")] == [d["text"] for d in docs]
    assert [r["text"] for r in read_docs(workdir / "data/raw/pq")] == ["parquet row zero", "parquet row one"]
    assert PARA1 in read_docs(workdir / "data/raw/web")[0]["text"] and m["sources"]["web"]["docs"] == 1
    # a rewritten object changes the fingerprint, so collect reruns
    client.put_object(Bucket="crawl", Key="web/0.warc.gz", Body=warc_bytes(user_pages()[:2]))
    run_stage(sources, params)
    assert json.loads((workdir / "data/sources.json").read_text())["web"]["files"][0]["version"] != before


def test_an_unreachable_store_is_one_error_naming_it(workdir, monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    params = params_with([{"name": "far", "kind": "files", "role": "crawl", "globs": ["s3://nowhere/*.jsonl"],
                           "storage_options": {"endpoint_url": dead, "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}}])
    t0 = time.monotonic()
    with pytest.raises(StageError, match=r"source 'far': cannot list s3://nowhere/\*\.jsonl"):
        run_stage(collect, params)
    with pytest.raises(StageError, match="cannot list s3://nowhere"):
        run_stage(sources, params)
    assert time.monotonic() - t0 < 120  # not an endless retry loop (a bound, not a timing target)
    assert not (workdir / "data/raw").exists()
