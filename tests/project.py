"""A fresh copy of the project, as a user's git + DVC checkout, for end-to-end tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import ROOT

COPY = ["anomalyncd", "stages", "dvc.yaml", "params.yaml", "classes.yaml", ".dvc/config", ".dvcignore", ".gitignore", "pyproject.toml"]

# Small enough for a 2-core CI machine; the real defaults are in params.yaml.
TINY = {
    "demo": {"image_size": 64, "n_train": 8, "n_test_normal": 2, "n_per_type": 4},
    "detect": {"map_size": 64, "image_size": 64},
    "mebin": {"crop_size": 36},
    "train": {"image_size": 32, "epochs": 1, "batch_size": 16, "num_classes": 4},  # 16 crops: too few to estimate K
}


def run(args: list[str], cwd: Path, returncode: int = 0) -> str:
    """Run a command as a user would (this venv's python and dvc first on PATH); check its exit
    code and return its output (stdout, then stderr)."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == returncode, f"{' '.join(map(str, args))} exited with {proc.returncode}:\n{out[-4000:]}"
    return out


def tiny_project(dest: Path, overrides: dict[str, dict] = TINY) -> Path:
    """Copy the project to ``dest`` with ``overrides`` applied to params.yaml, as one git commit."""
    for name in COPY:
        src, dst = ROOT / name, dest / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "init"], dest)
    return dest
