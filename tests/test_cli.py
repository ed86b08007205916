import subprocess
import sys

import pytest

from .conftest import ROOT

STAGES = ["demo", "prepare", "detect", "mebin", "train", "infer", "merge", "evaluate"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_runs_alone_with_help(stage):
    out = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--params" in out.stdout


def test_console_entry_point_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "anomalyncd.cli", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for stage in STAGES:
        assert stage in out.stdout


def test_a_stage_with_a_bad_param_fails_with_a_message_naming_it(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("demo:\n  n_trian: 3\n")
    out = subprocess.run(
        [sys.executable, "-m", "stages.demo", "--params", str(params), "--out", str(tmp_path / "d")],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert out.returncode != 0
    assert "n_trian" in out.stderr + out.stdout
    assert not (tmp_path / "d").exists()
