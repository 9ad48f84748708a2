"""HTML extraction: Resiliparse against trafilatura on the same pages, for speed and for how
much of the page's main text each keeps and how much site chrome each lets through.

    python bench/extract.py            # the built-in archive's pages (pydoc HTML in site chrome)
    python bench/extract.py --repeat 5

The pages are those of the built-in web archive (tasks/lib/webarchive.py `web_pages`): real HTML
from pydoc's HTML writer inside navigation, a cookie banner, related links and a footer. The
ground truth of each page's main text is what pydoc's plain-text writer gives for the same
module, an independent rendering of the same documentation. Measured per extractor:
- word recall / precision / F1: the multiset of words of the extract against the truth's;
- chrome leaked: the share of pages whose extract contains a chrome line (cookie banner,
  footer, related-links) — the boilerplate main-content extraction exists to remove;
- pages/s and MB/s of HTML on one core, HTML decoding included.
A copy of the whole page's visible text (Resiliparse without main-content detection) is
reported beside them as the baseline a trivial extractor gets.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.lib import corpora  # noqa: E402
from tasks.lib.webarchive import web_pages  # noqa: E402
from tasks.lib.webarchive import EXTRACTORS, decode_html, html_to_text  # noqa: E402

WORD = re.compile(r"\w+")


def words(text: str) -> Counter:
    return Counter(w.lower() for w in WORD.findall(text))


def chrome_lines() -> list[str]:
    lines = [c for c in corpora.COOKIE]
    lines += [f.split("{")[0].strip() for f in corpora.FOOTER]
    lines += ["Related posts", "Accept all"]
    return [c for c in lines if c]


def all_visible(html: str) -> str:
    from resiliparse.extract.html2text import extract_plain_text

    return extract_plain_text(html, main_content=False).replace("\xa0", " ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="timed passes over the pages (the best is kept)")
    args = ap.parse_args()
    pages = [(p, truth) for p, truth in web_pages() if truth is not None]
    htmls = [decode_html(p.body, p.content_type.split("charset=")[-1]) for p, _ in pages]
    mb = sum(len(p.body) for p, _ in pages) / 1e6
    chrome = chrome_lines()
    print(f"{len(pages)} pages, {mb:.2f} MB of HTML; ground truth: pydoc's plain-text rendering of the same modules\n")
    print(f"{'extractor':<26} {'recall':>7} {'precision':>9} {'F1':>6} {'chrome leaked':>14} {'pages/s':>8} {'MB/s':>6}")
    fns = [(name, lambda h, n=name: html_to_text(h, n)) for name in EXTRACTORS] + [("baseline: all visible text", all_visible)]
    speed = {}
    for name, fn in fns:
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            outs = [fn(h) for h in htmls]
            best = min(best, time.perf_counter() - t0)
        rec = prec = 0.0
        leaked = 0
        for out, (_, truth) in zip(outs, pages):
            got, want = words(out), words(truth)
            common = sum((got & want).values())
            rec += common / max(sum(want.values()), 1)
            prec += common / max(sum(got.values()), 1)
            leaked += any(c in out for c in chrome)
        n = len(pages)
        r, p = rec / n, prec / n
        f1 = 2 * r * p / (r + p) if r + p else 0.0
        speed[name] = n / best
        print(f"{name:<26} {r:7.3f} {p:9.3f} {f1:6.3f} {leaked:>8}/{n:<5} {n / best:8.1f} {mb / best:6.2f}")
    a, b = EXTRACTORS
    print(f"\n{a} is {speed[a] / speed[b]:.1f}x the speed of {b} (same pages, same run)")


if __name__ == "__main__":
    main()
