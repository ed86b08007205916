"""Imports go one way: stages use the library, the library never uses the stages; shared
pieces live in modules of their own."""

from pathlib import Path

from .conftest import ROOT
from .imports import project_imports


def _library_files() -> list[Path]:
    return sorted((ROOT / "anomalyncd").rglob("*.py"))


def test_no_library_module_imports_the_stages():
    offenders = {
        str(f.relative_to(ROOT)): sorted(str(p) for p in project_imports(ROOT, f) if p.parts[0] == "stages")
        for f in _library_files()
    }
    assert {f: s for f, s in offenders.items() if s} == {}


def test_the_console_command_lives_with_the_stages():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["anomalyncd"].split(":")[0].startswith("stages.")
    assert not (ROOT / "anomalyncd" / "cli.py").exists()


def test_the_number_of_classes_estimate_does_not_load_the_detectors():
    """auto_k needs the filter bank only, not every detector of anomalyncd.detect."""
    imported = project_imports(ROOT, ROOT / "anomalyncd" / "auto_k.py")
    assert not [p for p in imported if p.parts[:2] == ("anomalyncd", "detect")]
    assert Path("anomalyncd/filterbank.py") in imported
