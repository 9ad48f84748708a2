"""The built-in offline corpora: real text every machine with Python has, plus a generated crawl.

- `python_docs` (a *reference* source): the 79 topics of Python's own documentation
  (`pydoc_data.topics`) and, per public standard-library module, its docstrings (module,
  classes, functions) read with `ast` from the installed sources. PSF licence.
- `python_code` (a *code* source): the standard library's source files, tests and generated
  tables excluded. PSF licence.
- `synthetic_crawl` (a *crawl* source): pages generated deterministically from a seed that
  imitate what a web crawl brings: decent articles (docstring prose inside page chrome),
  boilerplate pages (menus, cookie banners, link lists), keyword spam, machine garbage,
  very short pages, and exact and near duplicates (light edits, reordered paragraphs, added
  footers) of crawl pages and of reference documents. Every page carries its ground truth in
  `meta`: `kind`, `is_low_quality`, `duplicate_of` (the id of the original or null), so the
  quality and dedup stages can be scored.

Each corpus yields `(original_id, text, meta)`; the collect stage turns them into rows.
"""

from __future__ import annotations

import ast
import functools
import random
import string
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idle_test", "encodings", "site-packages", "dist-packages", "__pycache__", "turtledemo", "_bundled"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[tuple[str, Path], ...]:
    """(module name, path) of the standard library's Python files, sorted, tests excluded."""
    root = stdlib_root()
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts:
            continue
        out.append((".".join(parts), path))
    return tuple(out)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        args = ast.unparse(node.args)
    except Exception:  # pragma: no cover - ast.unparse is total on parsed code
        args = "..."
    return f"{node.name}({args})"


@functools.lru_cache(maxsize=1)
def stdlib_docstrings() -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    """Per public module: (module, ((qualified name or '', docstring), ...))."""
    modules = []
    for module, path in stdlib_files():
        if any(p.startswith("_") for p in module.split(".")):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        docs: list[tuple[str, str]] = []
        if (d := ast.get_docstring(tree)) :
            docs.append(("", d))
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                if (d := ast.get_docstring(node)):
                    head = node.name if isinstance(node, ast.ClassDef) else _signature(node)
                    docs.append((f"{module}.{head}", d))
                if isinstance(node, ast.ClassDef):
                    for sub in node.body:
                        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and not sub.name.startswith("_"):
                            if (d := ast.get_docstring(sub)):
                                docs.append((f"{module}.{node.name}.{_signature(sub)}", d))
        if docs:
            modules.append((module, tuple(docs)))
    return tuple(modules)


def in_reference_half(module: str) -> bool:
    """The public modules are split in two fixed halves: the reference source documents one,
    the crawl's articles are written from the other, so the two share no text and the
    quality classifier has to generalise rather than recognise documents it has seen."""
    return zlib.crc32(module.encode()) % 2 == 0


# ----------------------------------------------------------------------------- corpora
def python_docs(limit: int | None = None) -> Iterator[tuple[str, str, dict]]:
    from pydoc_data.topics import topics

    n = 0
    for name in sorted(topics):
        if limit is not None and n >= limit:
            return
        n += 1
        yield f"topic/{name}", topics[name].strip(), {"title": name, "origin": "pydoc_data.topics", "licence": "PSF-2.0"}
    for module, docs in stdlib_docstrings():
        if not in_reference_half(module):
            continue
        if limit is not None and n >= limit:
            return
        parts = []
        for head, doc in docs:
            parts.append(doc if not head else f"{head}\n\n{doc}")
        text = f"Module {module}\n\n" + "\n\n".join(parts)
        n += 1
        yield f"module/{module}", text, {"title": module, "origin": "docstrings", "licence": "PSF-2.0"}


def python_code(limit: int | None = None, seed: int = 0) -> Iterator[tuple[str, bytes | str, dict]]:
    files = list(stdlib_files())
    if limit is not None and limit < len(files):
        files = sorted(random.Random(seed).sample(files, limit))
    root = stdlib_root()
    for module, path in files:
        # raw bytes: the collect stage decodes and counts invalid UTF-8 like any other source
        yield f"file/{path.relative_to(root)}", path.read_bytes(), {"module": module, "language": "python", "licence": "PSF-2.0"}


# ----------------------------------------------------------------------------- the crawl
SITES = ["pyweekly", "devnotes", "codeplanet", "techdigest", "snakebytes", "learnhub", "byteforum", "stackgarden"]
MENU = ["Home", "About", "Blog", "Products", "Pricing", "Contact", "Careers", "Support", "Docs", "Login", "Sign up", "FAQ"]
COOKIE = [
    "We use cookies to improve your experience on our site. By continuing to browse you agree to our cookie policy.",
    "This website uses cookies and similar technologies. Accept all cookies or manage your preferences.",
    "Please enable JavaScript to view this page. Your browser does not support JavaScript.",
]
FOOTER = [
    "Copyright {year} {site}. All rights reserved. Privacy Policy | Terms of Use | Cookie Settings",
    "Subscribe to our newsletter! Sign up now and never miss an update from {site}.",
    "Share this: Facebook Twitter LinkedIn Email. Click here to read more posts from {site}.",
]
SPAM_WORDS = ["cheap", "best", "buy", "discount", "free", "online", "casino", "pills", "loans", "deal", "offer", "sale", "win", "bonus", "hosting", "seo", "followers", "crypto"]
SHORT = ["404 Not Found", "Loading...", "Page under construction", "Access denied", "Redirecting", "Untitled", "Coming soon!", "Error 500", "Login required"]


def _words(text: str) -> int:
    return len(text.split())


def _article_paragraphs(rng: random.Random, pool: list[str], min_words: int) -> list[str]:
    paras, n = [], 0
    while n < min_words:
        p = rng.choice(pool)
        paras.append(p)
        n += _words(p)
    return paras


def _chrome(rng: random.Random, site: str, title: str, paras: list[str]) -> str:
    if rng.random() < 0.5:
        return "\n\n".join([title, *paras])
    byline = f"Posted on 20{rng.randint(10, 25)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} by {rng.choice(['alice', 'bob', 'carol', 'dave', 'erin'])} on {site}"
    return "\n\n".join([title, byline, *paras])


def _boilerplate(rng: random.Random, site: str) -> str:
    lines = [" | ".join(rng.sample(MENU, rng.randint(5, 9))), rng.choice(COOKIE)]
    lines += [f"Related: {rng.choice(SITES)}.example/{rng.choice(SPAM_WORDS)}-{rng.randint(1, 999)}" for _ in range(rng.randint(3, 8))]
    lines.append(rng.choice(["Welcome!", "Latest news", "Top stories", "Popular posts"]))
    lines.append(rng.choice(FOOTER).format(year=rng.randint(2005, 2025), site=site))
    lines.append(" | ".join(rng.sample(MENU, rng.randint(4, 7))))
    return "\n".join(lines)


def _spam(rng: random.Random, topic_words: list[str]) -> str:
    kws = rng.sample(SPAM_WORDS, 4) + rng.sample(topic_words, 3)
    body = " ".join(rng.choice(kws) for _ in range(rng.randint(60, 200)))
    return f"{' '.join(kws[:3]).upper()}!!! {body} CLICK HERE NOW!!! {rng.choice(SPAM_WORDS)} {rng.choice(SPAM_WORDS)}"


def _garbage(rng: random.Random) -> str:
    style = rng.randrange(3)
    n = rng.randint(300, 2000)
    if style == 0:  # base64-ish blob
        alphabet = string.ascii_letters + string.digits + "+/="
        return "\n".join("".join(rng.choice(alphabet) for _ in range(76)) for _ in range(n // 76 + 1))
    if style == 1:  # hex dump
        return "\n".join(" ".join(f"{rng.randrange(256):02x}" for _ in range(16)) for _ in range(n // 48 + 1))
    # mojibake and symbol soup
    junk = ["Ã©", "Ã¨", "â€™", "Â", "ï»¿", "{}", "<>", "&#", ";;", "%%", "@@", "##", "$$"]
    return " ".join("".join(rng.choice(junk) for _ in range(rng.randint(1, 4))) for _ in range(n // 4))


def _light_edit(rng: random.Random, text: str, rate: float = 0.02) -> str:
    words = text.split(" ")
    for i in range(len(words)):
        r = rng.random()
        if r < rate / 2:
            words[i] = words[i].upper() if rng.random() < 0.5 else words[i] + ","
        elif r < rate:
            words[i] = ""
    return " ".join(w for w in words if w)


def _reorder(rng: random.Random, text: str) -> str:
    paras = text.split("\n\n")
    if len(paras) < 3:
        return _light_edit(rng, text)
    head, rest = paras[0], paras[1:]
    i = rng.randrange(len(rest) - 1)
    rest[i], rest[i + 1] = rest[i + 1], rest[i]  # swap two neighbouring paragraphs
    return "\n\n".join([head, *rest])


CRAWL_KINDS = ("good", "boilerplate", "spam", "garbage", "short", "exact_duplicate", "near_duplicate")


def synthetic_crawl(num_docs: int, mix: dict[str, float], seed: int, reference: list[tuple[str, str]] | None = None) -> Iterator[tuple[str, str, dict]]:
    """`num_docs` pages; `mix` gives the share of each kind in CRAWL_KINDS; `reference` is
    [(collected id, text)] of reference documents that the crawl may copy (cross-source
    duplicates); their ids go into `duplicate_of`."""
    rng = random.Random(seed)
    # Article material: documented functions and classes, in the same "signature, then
    # docstring" form as the reference documents, so that page chrome and junk, not the
    # format of the prose, is what tells a good page from a reference one.
    pool = [f"{head}\n\n{d}" for m, docs in stdlib_docstrings() if not in_reference_half(m) for head, d in docs if head and 25 <= _words(d) <= 250]
    topic_words = sorted({w.lower() for p in pool[:400] for w in p.split() if w.isalpha() and len(w) > 5})
    kinds = list(CRAWL_KINDS)
    weights = [float(mix.get(k, 0.0)) for k in kinds]
    if sum(weights) <= 0:
        raise ValueError("synthetic_crawl: crawl_mix shares are all zero")
    counts = {k: int(num_docs * w / sum(weights)) for k, w in zip(kinds, weights)}
    counts["good"] += num_docs - sum(counts.values())

    pages: list[tuple[str, str, dict]] = []  # (page id, text, meta)

    def add(text: str, kind: str, low: bool, dup_of: str | None = None) -> None:
        pid = f"page-{len(pages):06d}"
        site = rng.choice(SITES)
        meta = {"url": f"https://{site}.example/{pid}", "kind": kind, "is_low_quality": low, "duplicate_of": dup_of, "licence": "synthetic (from PSF-licensed docstrings)"}
        pages.append((pid, text, meta))

    for _ in range(counts["good"]):
        site = rng.choice(SITES)
        paras = _article_paragraphs(rng, pool, rng.randint(80, 400))
        title = paras[0].split("(")[0]
        add(_chrome(rng, site, title, paras), "good", False)
    for _ in range(counts["boilerplate"]):
        add(_boilerplate(rng, rng.choice(SITES)), "boilerplate", True)
    for _ in range(counts["spam"]):
        add(_spam(rng, topic_words), "spam", True)
    for _ in range(counts["garbage"]):
        add(_garbage(rng), "garbage", True)
    for _ in range(counts["short"]):
        add(rng.choice(SHORT), "short", True)

    # Originals to copy: good crawl pages (within-source) and long reference docs (cross-source).
    originals = [(f"@{pid}", text, False) for pid, text, meta in pages if meta["kind"] == "good"]
    originals += [(rid, text, False) for rid, text in (reference or []) if 80 <= _words(text) <= 20_000]
    if counts["exact_duplicate"] + counts["near_duplicate"] and not originals:
        raise ValueError("synthetic_crawl: no originals to duplicate (no good pages and no reference)")
    for _ in range(counts["exact_duplicate"]):
        oid, text, low = rng.choice(originals)
        add(text, "exact_duplicate", low, oid)
    for _ in range(counts["near_duplicate"]):
        oid, text, low = rng.choice(originals)
        how = rng.choice(["light_edit", "reorder", "footer"])
        if how == "light_edit":
            new = _light_edit(rng, text)
        elif how == "reorder":
            new = _reorder(rng, text)
        else:
            site = rng.choice(SITES)
            new = text + "\n\n" + rng.choice(FOOTER).format(year=rng.randint(2005, 2025), site=site)
        add(new, f"near_duplicate:{how}", low, oid)

    order = list(range(len(pages)))
    rng.shuffle(order)
    for i in order:
        yield pages[i]


@functools.lru_cache(maxsize=1)
def stdlib_fingerprint() -> str:
    """A hash of everything the built-in corpora read (the standard library's sources and
    documentation topics of this Python): another Python gives other documents."""
    import hashlib
    import pydoc_data.topics

    from tasks.lib.hashing import file_hash

    h = hashlib.sha256()
    root = stdlib_root()
    for _, path in stdlib_files():
        h.update(f"{path.relative_to(root)}\n".encode())
        file_hash(path, h)
    file_hash(pydoc_data.topics.__file__, h)
    return h.hexdigest()
