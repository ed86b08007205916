"""The project modules a file imports, found by reading its source (no import runs).

Every ``import`` statement counts, at module level or inside a function, and importing
``a.b.c`` also runs ``a/__init__.py`` and ``a/b/__init__.py``: what a stage may execute.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = ("anomalyncd", "stages")


def module_file(root: Path, module: str) -> Path | None:
    """``anomalyncd.x.y`` -> ``anomalyncd/x/y.py`` or ``anomalyncd/x/y/__init__.py`` (None if
    it is not a project module)."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _module_name(root: Path, f: Path) -> str:
    parts = f.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def direct_imports(root: Path, f: Path) -> set[str]:
    """Dotted names of the project modules ``f`` imports, with every parent package."""
    name = _module_name(root, f)
    package = name if f.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}  # submodules imported by name
    out = set()
    for mod in found:
        parts = mod.split(".")
        out |= {".".join(parts[: i + 1]) for i in range(len(parts))}
    return {m for m in out if module_file(root, m) is not None}


def project_imports(root: Path, f: Path) -> set[Path]:
    """Every project file that importing ``f`` may execute, ``f`` included (relative to root)."""
    seen: set[Path] = set()
    todo = [f]
    while todo:
        cur = todo.pop()
        if cur in seen:
            continue
        seen.add(cur)
        todo += [module_file(root, m) for m in direct_imports(root, cur)]
    return {p.relative_to(root) for p in seen}
