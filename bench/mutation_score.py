"""Summarise `mutmut results` (read on stdin): mutants per outcome and the score.

    mutmut results | python bench/mutation_score.py

Killed and timed-out mutants count as caught (a mutant that makes a test hang is detected);
survivors are listed by function so they can be explained or killed with a new test.
"""

import re
import sys
from collections import Counter


def main() -> int:
    outcome: Counter[str] = Counter()
    survivors: Counter[str] = Counter()
    for line in sys.stdin:
        m = re.match(r"\s*(\S+)__mutmut_\d+: (.+)$", line)
        if not m:
            continue
        outcome[m.group(2).strip()] += 1
        if m.group(2).strip() == "survived":
            survivors[m.group(1)] += 1
    total = sum(outcome.values())
    caught = outcome["killed"] + outcome["timeout"]
    print(f"mutants: {total}; " + ", ".join(f"{k} {v}" for k, v in sorted(outcome.items())))
    print(f"score: {caught / max(total, 1):.1%} caught (killed or timed out)")
    for name, n in survivors.most_common(20):
        print(f"  {n:3d} survived in {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
