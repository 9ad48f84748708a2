"""profile: a set of params.yaml overrides (profiles/*.yaml), checked and turned into DVC flags (a tool, not a stage).

    python -m tasks.profile profiles/gpu.yaml                 # check: the merged values parse and agree with each other
    dvc exp run $(python -m tasks.profile profiles/gpu.yaml --flags)   # run the pipeline with them (params.yaml unchanged)

A profile lists only the keys that change, nested as in params.yaml. Merged over params.yaml it
must pass the same validation as params.yaml itself, including the relations between values
(tasks/config.py: consistency_problems); a profile that contradicts itself is one error per
value, exit code 2, and no flags.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml


def merge(base: dict, overlay: dict, where: str = "") -> dict:
    """`overlay` over `base`, key by key (a list or a value replaces; a mapping merges). A key
    params.yaml does not have is an error, as in params.yaml itself."""
    out = copy.deepcopy(base)
    for k, v in overlay.items():
        if k not in out:
            raise KeyError(f"{where}{k}: not a key of params.yaml")
        out[k] = merge(out[k], v, f"{where}{k}.") if isinstance(v, dict) and isinstance(out[k], dict) else v
    return out


def leaves(overlay: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in overlay.items():
        if isinstance(v, dict):
            out += leaves(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def load(profile: Path, params: Path) -> tuple[dict, dict]:
    """(the profile's overrides, params.yaml with them merged), both checked."""
    from tasks.config import ConfigError, consistency_problems, parse_params

    try:
        overlay = yaml.safe_load(profile.read_text(encoding="utf-8")) or {}
        raw = yaml.safe_load(params.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{profile}: {err}") from None
    if not isinstance(overlay, dict):
        raise ConfigError(f"{profile}: expected a mapping of params.yaml keys")
    try:
        merged = merge(raw, overlay)
    except KeyError as err:
        raise ConfigError(f"{profile}: {err.args[0]}") from None
    p = parse_params(merged, f"{params} + {profile}")
    problems = consistency_problems(p)
    if problems:
        raise ConfigError(f"{profile}: {len(problems)} value(s) contradict each other\n" + "\n".join(f"  {x}" for x in problems))
    return overlay, merged


def main(argv: list[str] | None = None) -> int:
    from tasks.config import ConfigError

    ap = argparse.ArgumentParser(prog="python -m tasks.profile", description=__doc__.split("\n")[0])
    ap.add_argument("profile", type=Path)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--flags", action="store_true", help="print `-S key=value` flags for dvc exp run")
    args = ap.parse_args(argv)
    try:
        overlay, _ = load(args.profile, args.params)
    except ConfigError as err:
        print(f"error: profile: {err}", file=sys.stderr)
        return 2
    pairs = leaves(overlay)
    if args.flags:
        def value(v: Any) -> str:  # YAML in one word: dvc exp run -S parses it as YAML
            return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip().replace(" ", "")

        print(" ".join(f"-S {k}={value(v)}" for k, v in pairs))
    else:
        print(f"{args.profile}: {len(pairs)} values, merged over {args.params}, valid and consistent")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
