"""Summarise `mutmut results --all true` (read on stdin): mutants per outcome and the score.

    mutmut results --all true | python bench/mutation_score.py --min 0.9

Killed, timed-out and segfaulting mutants count as caught (a mutant that makes a test hang or
crash is detected). Survivors and mutants no test reaches ("no tests") count against the
score; they are listed by function so they can be explained or killed with a new test.
Mutants not checked yet (an interrupted run) are reported and left out of the score. Exits 1
when the score is below --min or nothing was checked.
"""

import argparse
import re
import sys
from collections import Counter

CAUGHT = {"killed", "timeout", "segfault", "caught by type check"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--min", type=float, default=0.0, help="fail below this share of caught mutants")
    args = ap.parse_args()
    outcome: Counter[str] = Counter()
    missed: Counter[str] = Counter()
    for line in sys.stdin:
        m = re.match(r"\s*(\S+)__mutmut_\d+: (.+)$", line)
        if not m:
            continue
        status = m.group(2).strip()
        outcome[status] += 1
        if status in ("survived", "no tests", "suspicious"):
            missed[m.group(1)] += 1
    checked = sum(v for k, v in outcome.items() if k != "not checked")
    caught = sum(outcome[k] for k in CAUGHT)
    score = caught / checked if checked else 0.0
    print(f"mutants: {sum(outcome.values())}; " + ", ".join(f"{k} {v}" for k, v in sorted(outcome.items())))
    print(f"score: {score:.1%} caught of {checked} checked (killed, timed out or crashed)")
    for name, n in missed.most_common(25):
        print(f"  {n:3d} not caught in {name}")
    if not checked or score < args.min:
        print(f"error: mutation score {score:.1%} is below the floor {args.min:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
