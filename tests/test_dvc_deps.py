"""dvc.yaml lists, for every stage, the project code the stage runs: a change to any module a
stage imports (directly or through another module) makes that stage stale."""

from pathlib import Path

import pytest
import yaml

from .conftest import ROOT
from .imports import project_imports

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
# Files every stage runs that hold no code a result depends on (checked below): listing them
# would rerun the whole pipeline for a version bump.
NO_CODE = {Path("anomalyncd/__init__.py"), Path("stages/__init__.py")}


def _covered(f: Path, deps: list[str]) -> bool:
    """``f`` is a listed dep, or inside a listed folder."""
    return any(f == Path(d) or Path(d) in f.parents for d in deps)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_each_stages_deps_cover_the_project_modules_it_imports(name):
    stage = STAGES[name]
    entry = stage["cmd"].split("-m ", 1)[1].split()[0]  # python -m stages.<name>
    deps = [str(d).split()[0] for d in stage.get("deps", [])]
    imported = project_imports(ROOT, ROOT / (entry.replace(".", "/") + ".py")) - NO_CODE
    missing = sorted(str(f) for f in imported if not _covered(f, deps))
    assert missing == [], f"dvc.yaml: stage {name} imports {missing} but does not list them in its deps"
    code = [d for d in deps if d.split("/")[0] in ("anomalyncd", "stages")]
    unused = [d for d in code if not any(_covered(f, [d]) for f in imported)]
    assert unused == [], f"dvc.yaml: stage {name} lists {unused} in its deps but does not import them (needless reruns)"


def test_the_files_left_out_of_the_deps_hold_only_a_docstring_and_the_version():
    import ast

    for f in NO_CODE:
        body = ast.parse((ROOT / f).read_text()).body
        kinds = [
            "docstring" if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
            else "version" if isinstance(n, ast.Assign) and [t.id for t in n.targets] == ["__version__"]
            else ast.dump(n)
            for n in body
        ]
        assert set(kinds) <= {"docstring", "version"}, f"{f} now holds code: list it in every stage's deps in dvc.yaml"


def test_the_import_walk_follows_packages_relative_imports_and_function_level_imports(tmp_path):
    pkg = tmp_path / "anomalyncd"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from ..late import x\n")
    (pkg / "late.py").write_text("x = 1\n")
    (pkg / "unused.py").write_text("")
    (tmp_path / "main.py").write_text("import os\nfrom anomalyncd.sub import leaf\n")
    assert project_imports(tmp_path, tmp_path / "main.py") == {
        Path(p) for p in ("main.py", "anomalyncd/__init__.py", "anomalyncd/sub/__init__.py", "anomalyncd/sub/leaf.py", "anomalyncd/late.py")
    }
