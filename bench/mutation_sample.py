"""Score a seeded random sample of the mutants `make mutants` would check (the whole set takes
many hours on 2 cores; a sample of a few hundred gives the score with an interval).

    python bench/mutation_sample.py --n 310 --seed 18            # generate, draw, run, score
    python bench/mutation_sample.py --n 310 --seed 18 --score    # score what has run so far

1. generate every mutant and mutmut's test map (`mutmut run` on a name no mutant has: mutmut
   generates and collects its stats, then stops at the empty filter);
2. draw `--n` mutant names without replacement with `random.Random(seed)` from the sorted list
   of all of them, written to mutants/sample.txt (the same source and seed give the same draw);
3. `mutmut run` those names (mutmut checks them fastest first);
4. print the outcome over the sample by area (RLHF half, data half) with a Wilson 95% interval,
   and every mutant not caught, for reading. Exits 1 if nothing in the sample was checked or
   the share caught is below `--min`.
"""

import argparse
import json
import random
import re
import subprocess
import sys
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

from scipy.stats import binomtest

CAUGHT = {"killed", "timeout", "segfault", "caught by type check"}
DATA_HALF = ("tasks.collect", "tasks.quality", "tasks.dedup", "tasks.lib.minhash", "tasks.mix",
             "tasks.lib.mixture", "tasks.tokenize", "tasks.lib.tokens")
SAMPLE = Path("mutants/sample.txt")


def all_mutants() -> list[str]:
    """Every mutant's name, from mutmut's record beside each mutated file (only under the mutated
    source folders: tests run inside mutants/ may leave copies of the code elsewhere in it)."""
    sources = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["mutmut"]["source_paths"]
    names: set[str] = set()
    for folder in sources:
        for meta in Path("mutants", folder).rglob("*.meta"):
            names.update(json.loads(meta.read_text())["exit_code_by_key"])
    return sorted(names)


def area(name: str) -> str:
    return "data half" if name.startswith(tuple(m + "." for m in DATA_HALF)) else "RLHF half"


def interval(k: int, n: int) -> str:
    ci = binomtest(k, n).proportion_ci(method="wilson")
    return f"{k}/{n} = {k / n:.1%} [{ci.low:.1%}, {ci.high:.1%}]"


def score(names: list[str], floor: float = 0.0) -> int:
    out = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    status = {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s*(\S+__mutmut_\d+): (.+)$", out, re.M)}
    by_area: dict[str, Counter] = defaultdict(Counter)
    missed = []
    for name in names:
        s = status.get(name, "not checked")
        by_area[area(name)][s] += 1
        by_area["whole core"][s] += 1
        if s not in CAUGHT and s != "not checked":
            missed.append(f"{s:10s} {name}")
    for a in ("RLHF half", "data half", "whole core"):
        c = by_area[a]
        checked = sum(v for k, v in c.items() if k != "not checked")
        caught = sum(c[k] for k in CAUGHT)
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
        print(f"{a}: {outcomes}; caught " + (interval(caught, checked) if checked else "- (none checked)"))
    print("\n".join(sorted(missed)))
    whole = by_area["whole core"]
    checked = sum(v for k, v in whole.items() if k != "not checked")
    if not checked or sum(whole[k] for k in CAUGHT) / checked < floor:
        print(f"error: nothing checked or caught below the floor {floor:.0%}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=310, help="mutants to draw")
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--max-children", type=int, default=2, help="mutants checked at once")
    ap.add_argument("--score", action="store_true", help="only score the sample drawn before")
    ap.add_argument("--min", type=float, default=0.0, help="exit 1 when the share caught is below this")
    args = ap.parse_args()
    if args.score:
        if not SAMPLE.exists():
            sys.exit(f"error: {SAMPLE} does not exist: run without --score first")
        return score(SAMPLE.read_text().split(), args.min)
    # Phase 1: mutants and the map from functions to the tests that reach them.
    print("generating the mutants and mutmut's map from functions to tests (one run of the tests)...", flush=True)
    subprocess.run(["mutmut", "run", "--max-children", str(args.max_children), "__no_such_mutant__"],
                   capture_output=True)
    names = all_mutants()
    if not names or not Path("mutants/mutmut-stats.json").exists():
        sys.exit("error: mutmut generated no mutants or no stats (run `mutmut run` to see why)")
    # Phase 2: the draw.
    if args.n > len(names):
        sys.exit(f"error: --n {args.n} is more than the {len(names)} mutants there are")
    sample = random.Random(args.seed).sample(names, args.n)
    SAMPLE.write_text("\n".join(sample) + "\n")
    print(f"drew {len(sample)} of {len(names)} mutants (seed {args.seed}) into {SAMPLE}", flush=True)
    # Phase 3: check them.
    subprocess.run(["mutmut", "run", "--max-children", str(args.max_children), *sample], check=False)
    return score(sample, args.min)


if __name__ == "__main__":
    raise SystemExit(main())
