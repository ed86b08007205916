import os
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
    out = subprocess.run([sys.executable, "-m", "stages.cli", "--help"], cwd=ROOT, capture_output=True, text=True)
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


@pytest.mark.parametrize(
    "stage, params, says",
    [
        ("merge", "merge:\n  temperature: 0\n", "merge.temperature must be > 0, got 0.0"),
        ("train", "train:\n  epoch: 5\n", "train: unknown key(s) ['epoch']"),
    ],
)
def test_bad_params_end_in_one_error_line_and_exit_2_with_nothing_written(tmp_path, stage, params, says):
    (tmp_path / "params.yaml").write_text(params)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"error: params.yaml: {says}") and out.stderr.count("\n") == 1, out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]
