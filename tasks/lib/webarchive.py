"""Web archives: WARC and WET files read into documents (FastWARC), HTML turned into its main
text (Resiliparse or trafilatura), and small archives written: the built-in one (`web_pages`:
pydoc's HTML pages of standard-library modules in site chrome, what the default run's
`web_archive` source reads through this module) and those of the tests.

    python -m tasks.lib.webarchive OUT.warc.gz    # write the built-in archive to a file, to
                                                  # read it with a `warc` source as your own

Reading yields (record id, text, meta) like every collect reader; a record that is not a
document yields text None and `meta["reason"]`, so collect counts it:

- `response` records: HTTP status 200 and an HTML content type, decoded with the charset the
  HTTP header or the page's <meta> declares (else the detected one), then extracted. Other
  statuses drop as `http_<status>`, other types as `not_html`, a page that does not decode
  with its declared charset as `undecodable_charset`, one whose extraction is empty as
  `no_main_text`.
- `conversion` records (WET files: the text Common Crawl extracted) are the text itself.
- `request`, `metadata`, `warcinfo`, `revisit`, `resource` ... drop as `warc_<type>`.
- a record whose block digest does not match drops as `bad_digest`; when it is the archive's
  last record the file was cut short, and the whole input is refused (`ArchiveError`).

A file that is not a WARC at all raises `ArchiveError` naming it.
"""

from __future__ import annotations

import gzip
import io
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

EXTRACTORS = ("resiliparse", "trafilatura")
HTML_TYPES = ("text/html", "application/xhtml+xml")
ARCHIVE_DATE = "2026-01-01T00:00:00Z"  # the built-in archive's capture date: fixed, so its bytes are


class ArchiveError(ValueError):
    """The whole archive is unreadable: not a WARC, or cut short."""


# --------------------------------------------------------------------------- HTML to text
def decode_html(body: bytes, charset: str | None) -> str | None:
    """The page as text, or None when it does not decode. The charset the server declared wins,
    then the page's own <meta charset>, then UTF-8, then detection (uchardet through
    Resiliparse). A declared charset is trusted strictly: a page that lies about it would
    become mojibake, so it is dropped."""
    from resiliparse.parse.encoding import detect_encoding

    declared = charset or _meta_charset(body)
    if declared:
        try:
            return body.decode(declared)
        except LookupError:  # a charset name Python does not know: fall back to detection
            pass
        except UnicodeDecodeError:
            return None
    try:  # bytes that are valid UTF-8 almost never are anything else; detection guesses on short pages
        return body.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return body.decode(detect_encoding(body))
    except (LookupError, UnicodeDecodeError):
        return None


def _meta_charset(body: bytes) -> str | None:
    from resiliparse.parse.encoding import detect_encoding

    head = body[:1024]
    if b"charset" not in head.lower():
        return None
    found = detect_encoding(head, from_html_meta=True, html5_compatible=True)
    return found or None


def html_to_text(html: str, extractor: str = "resiliparse") -> str:
    """The main text of a page: navigation, footers, banners and scripts left out."""
    if extractor == "resiliparse":
        from resiliparse.extract.html2text import extract_plain_text

        text = extract_plain_text(html, main_content=True, preserve_formatting=True, list_bullets=True,
                                  alt_texts=False, links=False, form_fields=False, noscript=False)
    elif extractor == "trafilatura":
        import trafilatura

        text = trafilatura.extract(html, include_comments=False, include_tables=True, deduplicate=False) or ""
    else:
        raise ValueError(f"unknown extractor {extractor!r} ({', '.join(EXTRACTORS)})")
    # &nbsp; becomes U+00A0: a plain space for the word rules and the tokenizer
    return text.replace("\xa0", " ").strip()


# --------------------------------------------------------------------------- reading
def read_warc(source: str | IO[bytes], name: str, extractor: str = "resiliparse") -> Iterator[tuple[str, Any, dict]]:
    """Documents of one WARC/WET file (plain, gzip or zstd): a path or an open binary stream;
    `name` is how errors refer to it."""
    from fastwarc.warc import ArchiveIterator

    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown extractor {extractor!r} ({', '.join(EXTRACTORS)})")
    stream = ArchiveIterator(source, parse_http=False, fsspec_args=False) if isinstance(source, str) else ArchiveIterator(source, parse_http=False)
    pending_bad = False  # the previous record failed its digest: fatal only if nothing follows
    seen = 0
    try:
        for rec in stream:
            if pending_bad:
                pending_bad = False
                yield f"bad-digest-{seen}", None, {"reason": "bad_digest"}
            seen += 1
            rid = rec.record_id.strip("<>").removeprefix("urn:") or f"record-{seen}"
            if "WARC-Block-Digest" in rec.headers and not rec.verify_block_digest(consume=False):
                pending_bad = True
                continue
            yield rid, *_document(rec, extractor)
    except OSError as err:  # FastWARC's parser: not a WARC header, a broken gzip member
        raise ArchiveError(f"{name}: not a readable WARC file ({err})") from None
    if pending_bad:
        raise ArchiveError(f"{name}: the last record is cut short (its block digest does not match): the file is truncated")
    if seen == 0:
        raise ArchiveError(f"{name}: no WARC record in the file (empty, or not a WARC file)")


def _document(rec, extractor: str) -> tuple[Any, dict]:
    kind = str(rec.record_type)
    meta: dict[str, Any] = {"url": rec.headers.get("WARC-Target-URI", ""), "date": rec.headers.get("WARC-Date", ""), "warc_type": kind}
    if kind == "conversion":  # WET: already text
        meta["content_type"] = rec.headers.get("Content-Type", "text/plain")
        return rec.reader.read(), meta
    if kind != "response" or not rec.headers.get("Content-Type", "").startswith("application/http"):
        return None, {"reason": f"warc_{kind}"}
    rec.parse_http()
    status = rec.http_headers.status_code
    ctype = (rec.http_content_type or "").lower()
    meta.update(http_status=status, content_type=ctype)
    if status != 200:
        return None, {"reason": f"http_{status}"}
    if ctype not in HTML_TYPES:
        return None, {"reason": "not_html"}
    html = decode_html(rec.reader.read(), rec.http_charset)
    if html is None:
        return None, {"reason": "undecodable_charset"}
    try:
        text = html_to_text(html, extractor)
    except Exception:  # a parser that gives up on this page: one record, counted
        return None, {"reason": "extraction_failed"}
    if not text:
        return None, {"reason": "no_main_text"}
    return text, meta


# --------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class Page:
    url: str
    status: int
    content_type: str  # the HTTP Content-Type header, charset included
    body: bytes
    reason: str = "OK"


def _record(kind: str, url: str, index: int, content_type: str, block: bytes, extra: dict[str, str] | None = None) -> bytes:
    from fastwarc.warc import WarcRecord, WarcRecordType

    rec = WarcRecord()
    rid = uuid.uuid5(uuid.NAMESPACE_URL, f"{kind}:{index}:{url}")  # stable ids: the same pages give the same bytes
    rec.init_headers(record_type=getattr(WarcRecordType, kind), record_urn=f"uuid:{rid}".encode())
    rec.headers["WARC-Date"] = ARCHIVE_DATE
    if url:
        rec.headers["WARC-Target-URI"] = url
    rec.headers["Content-Type"] = content_type
    for k, v in (extra or {}).items():
        rec.headers[k] = v
    rec.set_bytes_content(block)
    out = io.BytesIO()
    rec.write(out, checksum_data=True)
    return out.getvalue()


def wet_bytes(docs: Iterable[tuple[str, str]]) -> bytes:
    """A WET file (Common Crawl's extracted text): a conversion record per (url, text), gzip."""
    parts = [_record("warcinfo", "", 0, "application/warc-fields", b"software: gpt-pipeline\r\n")]
    parts += [_record("conversion", url, i, "text/plain", text.encode("utf-8")) for i, (url, text) in enumerate(docs, 1)]
    return b"".join(gzip.compress(part, mtime=0) for part in parts)


def warc_bytes(pages: Iterable[Page], compress: bool = True) -> bytes:
    """A WARC file as a crawler writes it: a warcinfo record, then a request and a response
    record per page, each its own gzip member (the .warc.gz convention) when `compress`."""
    parts = [_record("warcinfo", "", 0, "application/warc-fields", b"software: gpt-pipeline built-in archive\r\nformat: WARC File Format 1.1\r\n")]
    for i, p in enumerate(pages, 1):
        host = p.url.split("/")[2] if "://" in p.url else "localhost"
        path = "/" + p.url.split("/", 3)[3] if p.url.count("/") >= 3 else "/"
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: gpt-pipeline\r\n\r\n".encode()
        parts.append(_record("request", p.url, i, "application/http; msgtype=request", request))
        head = f"HTTP/1.1 {p.status} {p.reason}\r\nContent-Type: {p.content_type}\r\nContent-Length: {len(p.body)}\r\n\r\n".encode()
        parts.append(_record("response", p.url, i, "application/http; msgtype=response", head + p.body))
    if not compress:
        return b"".join(parts)
    return b"".join(gzip.compress(part, mtime=0) for part in parts)


# --------------------------------------------------------------------------- the built-in archive
# Pure-Python standard-library modules whose documentation pages (pydoc's HTML writer) make the
# built-in archive; only those in the crawl's half are used (see in_reference_half), so the
# reference source does not already hold their text.
WEB_MODULES = ("argparse", "base64", "bisect", "calendar", "cmd", "codecs", "colorsys", "configparser", "contextlib", "copy",
               "csv", "dataclasses", "datetime", "decimal", "difflib", "enum", "filecmp", "fileinput", "fnmatch", "fractions",
               "ftplib", "functools", "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html",
               "imaplib", "ipaddress", "json", "locale", "logging", "mailbox", "mimetypes", "netrc", "numbers", "operator",
               "optparse", "pathlib", "pickle", "pprint", "queue", "quopri", "random", "reprlib", "sched", "secrets", "selectors",
               "shlex", "shutil", "smtplib", "socketserver", "statistics", "string", "stringprep", "struct", "tarfile",
               "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "uuid", "wave", "weakref",
               "zipapp", "zipfile")
_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="{charset}"><title>{title} | {site}</title>
<script>window.dataLayer = window.dataLayer || []; function gtag(){{dataLayer.push(arguments);}}</script>
<style>body {{ font-family: sans-serif; }} .cookie-banner {{ position: fixed; bottom: 0; }}</style></head>
<body>
<header><nav class="site-nav"><ul>{menu}</ul></nav></header>
<div class="cookie-banner" id="cookie-consent"><p>{cookie}</p><button>Accept all</button> <button>Settings</button></div>
<main><article><h1>{title}</h1>
{content}
</article></main>
<aside class="sidebar"><h3>Related posts</h3><ul>{related}</ul></aside>
<footer><p>{footer}</p><nav><ul>{menu2}</ul></nav></footer>
</body></html>
"""


def _pydoc_page(module_name: str) -> tuple[str, str] | None:
    """(HTML body, plain text) of a module's pydoc page with machine paths and addresses
    removed, or None when the module does not import here."""
    import importlib
    import pydoc
    import re

    try:
        module = importlib.import_module(module_name)
    except Exception:  # a module this Python lacks (built without it): the page is skipped
        return None
    path = re.compile(r"(file:)?/[^\s\"<>]*/" + re.escape(module_name.split(".")[-1]) + r"(/__init__)?\.py")
    address = re.compile(r"(?: |&nbsp;)at(?: |&nbsp;)0x[0-9a-f]+")
    scrub = lambda s: address.sub("", path.sub(module_name + ".py", s))  # noqa: E731
    return scrub(pydoc.HTMLDoc().docmodule(module)), scrub(pydoc.plaintext.docmodule(module))


def _render(names: list[str]) -> dict[str, tuple[str, str] | None]:
    """pydoc's pages of `names`, rendered in a fresh interpreter: a page shows module-level
    values (a logger's level, a registry's contents) that whatever ran before in this
    process may have changed, so rendering here would make the archive depend on it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from tasks.lib.webarchive import _pydoc_page; "
            "print(json.dumps({n: _pydoc_page(n) for n in sys.argv[2:]}))")
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # set and dict reprs in the pages follow the hash seed
    out = subprocess.run([sys.executable, "-c", code, root, *names], capture_output=True, text=True, env=env, cwd=root)
    if out.returncode != 0:
        raise RuntimeError(f"rendering pydoc pages failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def web_pages(limit: int | None = None) -> list[tuple[Page, str | None]]:
    """The built-in web archive's pages: `(webarchive.Page, main text or None)`. Real HTML
    (pydoc's documentation pages of standard-library modules, PSF licence) inside site chrome
    (navigation, a cookie banner, related links, a footer), plus what a crawl also fetches: a
    robots.txt, an image, a 404, a redirect and a page served in ISO-8859-1. The second item
    is the page's main text as pydoc's plain-text writer gives it (None for the non-pages),
    the ground truth of the extractor comparison (bench/extract.py)."""
    import random

    from tasks.lib.corpora import COOKIE, FOOTER, MENU, SITES, SPAM_WORDS, in_reference_half

    rng = random.Random(1234)
    names = [m for m in WEB_MODULES if not in_reference_half(m)]
    rendered = _render(names if limit is None else names[: limit + 8])  # a few spare for modules this Python lacks
    pages: list[tuple[Page, str | None]] = []
    for k, name in enumerate(names):
        if limit is not None and len(pages) >= limit:
            break
        got = rendered.get(name)
        if got is None:
            continue
        html, text = got
        site = SITES[k % len(SITES)]
        charset = "iso-8859-1" if k == 3 else "utf-8"  # one page in a legacy charset: decoded by what it declares
        footer = rng.choice(FOOTER).format(year=2020 + k % 6, site=site) + (" \u00a9 caf\u00e9 r\u00e9sum\u00e9" if k == 3 else "")
        body = _PAGE.format(charset=charset, title=name, site=site, cookie=rng.choice(COOKIE), content=html,
                            menu="".join(f'<li><a href="/{m.lower()}">{m}</a></li>' for m in rng.sample(MENU, 7)),
                            menu2="".join(f'<li><a href="/{m.lower()}">{m}</a></li>' for m in rng.sample(MENU, 5)),
                            related="".join(f'<li><a href="/{w}-{rng.randint(1, 999)}">{w.title()} tips</a></li>' for w in rng.sample(SPAM_WORDS, 4)),
                            footer=footer)
        pages.append((Page(f"https://{site}.example/docs/{name}.html", 200, f"text/html; charset={charset}", body.encode(charset, "xmlcharrefreplace")), text))
    site = "https://docs.example"
    pages += [
        (Page(f"{site}/robots.txt", 200, "text/plain", b"User-agent: *\nDisallow: /private/\n"), None),
        (Page(f"{site}/logo.png", 200, "image/png", b"\x89PNG\r\n\x1a\n" + bytes(range(64))), None),
        (Page(f"{site}/missing.html", 404, "text/html; charset=utf-8", b"<html><body><h1>404 Not Found</h1></body></html>", "Not Found"), None),
        (Page(f"{site}/old.html", 301, "text/html; charset=utf-8", b"<html><body>Moved to <a href='/new.html'>new</a></body></html>", "Moved Permanently"), None),
    ]
    return pages


if __name__ == "__main__":
    import argparse
    from pathlib import Path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="where to write the archive (.warc.gz)")
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    data = warc_bytes(p for p, _ in web_pages(args.limit))
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(args.out)
    print(f"{args.out}: {len(data):,} bytes")
