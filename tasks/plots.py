"""plots: dvc.yaml's plots as PNG files, with no internet (a tool, not a stage).

    python -m tasks.plots                       # reports/plots/<name>.png for every plot in dvc.yaml (make plots)
    python -m tasks.plots --out /tmp/plots

`dvc plots show` writes an HTML page whose chart library loads from a CDN, so it is blank on
a machine without internet; `dvc plots show --json` gives the data. This draws the same
definitions (x, y per file, line or scatter template) with matplotlib from the same files.
A plot whose files are missing (its stage has not run) is skipped and named.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml


def resolve(text: str, params: dict) -> str:
    """`${paths.reports}` and the like, from params.yaml."""
    def value(m: re.Match) -> str:
        node = params
        for part in m.group(1).split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", value, text)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:80]


def render(name: str, spec: dict, params: dict, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = spec.get("x", "step")
    series = []
    for file, ys in (spec.get("y") or {}).items():
        path = Path(resolve(file, params))
        if not path.is_file():
            continue
        rows = json.loads(path.read_text())
        for y in [ys] if isinstance(ys, str) else ys:
            pts = [(r[x], r[y]) for r in rows if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))]
            if pts:
                series.append((f"{path.parent.name}/{path.stem}: {y}" if len(spec["y"]) > 1 else y, pts))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, pts in series:
        xs, ys = zip(*pts)
        if spec.get("template") == "scatter":
            ax.scatter(xs, ys, s=8, alpha=0.6, label=label)
        else:
            ax.plot(xs, ys, label=label)
    ax.set_xlabel(x)
    ax.set_title(name, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{slug(name)}.png"
    fig.savefig(target, dpi=80, metadata={"Software": None})
    plt.close(fig)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tasks.plots", description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--dvc-yaml", default="dvc.yaml")
    ap.add_argument("--out", default=None, help="folder for the PNGs (default: <paths.reports>/plots)")
    args = ap.parse_args(argv)
    try:
        params = yaml.safe_load(Path(args.params).read_text())
        plots = yaml.safe_load(Path(args.dvc_yaml).read_text()).get("plots") or []
    except (OSError, yaml.YAMLError) as err:
        print(f"error: plots: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or Path(params["paths"]["reports"]) / "plots")
    for item in plots:
        (name, spec), = item.items()
        target = render(name, spec, params, out)
        print(f"{name}: {target if target else 'skipped (its stage has not run)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
