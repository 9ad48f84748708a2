"""What a stage's code depends on: the import closure of its module inside `tasks/`.

    python -m tasks.lib.deps tasks.ppo        # the files dvc.yaml must list as ppo's code deps
    python -m tasks.lib.deps --fix            # rewrite the code part of every stage's deps in dvc.yaml

Imports are read with `ast` (anywhere in a file, function-level ones included), so nothing is
executed. Package `__init__.py` files hold only docstrings and are left out. The same closure
feeds the resume fingerprint of the training stages (`code_hash`), so changed code never
resumes old weights, and a test checks every stage's `deps` in dvc.yaml against it.
"""

from __future__ import annotations

import ast
import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def module_file(name: str, root: Path = ROOT) -> Path | None:
    base = root.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def direct_imports(path: Path, root: Path = ROOT) -> set[Path]:
    tree = ast.parse(path.read_bytes(), filename=str(path))
    found: set[Path] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n == "tasks" or n.startswith("tasks."):
                f = module_file(n, root)
                if f is not None:
                    found.add(f)
    return found


def closure(module: str, root: Path = ROOT) -> list[Path]:
    """The module's own file and every project file it imports, transitively (sorted)."""
    start = module_file(module, root)
    if start is None:
        raise ValueError(f"no module file for {module}")
    seen: set[Path] = set()
    todo = [start]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo.extend(direct_imports(f, root) - seen)
    return sorted(seen)


def closure_relative(module: str, root: Path = ROOT) -> list[str]:
    return [str(p.relative_to(root)) for p in closure(module, root)]


def code_hash(module: str, root: Path = ROOT) -> str:
    h = hashlib.sha256()
    for f in closure(module, root):
        h.update(f"{f.relative_to(root)}\n".encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def fix_dvc_yaml(path: Path = ROOT / "dvc.yaml") -> list[str]:
    """Rewrite each stage's one-line `deps: [...]`: its import closure, then its INPUTS;
    returns the stages that changed."""
    import re

    lines, stage, changed = path.read_text().splitlines(keepends=True), None, []
    for i, line in enumerate(lines):
        if m := re.match(r"^  (\w+):\s*$", line):
            stage = m.group(1)
        elif stage and (m := re.match(r"^(    deps: \[)(.*)(\]\s*)$", line)):
            import importlib

            per_stage = {"report": "${paths.reports}/%s", "checkpoints": "${paths.checkpoints}/%s"}
            inputs = importlib.import_module(f"tasks.{stage}").INPUTS
            data = [f'"{per_stage[k] % stage}"' if k in per_stage else f'"${{paths.{k}}}"' for k in inputs]
            new = f"{m.group(1)}{', '.join(closure_relative(f'tasks.{stage}') + data)}{m.group(3)}"
            if new != line:
                lines[i], changed = new, changed + [stage]
    path.write_text("".join(lines))
    return changed


if __name__ == "__main__":
    if sys.argv[1:] == ["--fix"]:
        print("updated:", ", ".join(fix_dvc_yaml()) or "nothing")
    for m in sys.argv[1:]:
        if m != "--fix":
            print(f"{m}: [{', '.join(closure_relative(m))}]")
