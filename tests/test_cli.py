import os
import subprocess
import sys

import pytest

from .conftest import ROOT

STAGES = ["demo", "prepare", "detect", "mebin", "train", "infer", "merge", "calibrate", "evaluate"]


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


def test_the_console_help_imports_no_stage_and_no_torch():
    # `anomalyncd --help` is instant: a stage's module (and torch) loads only when it is used
    code = ("import sys\nfrom stages import cli\ntry:\n    cli.app(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m in ('torch', 'timm', 'cv2', 'zarr') or m.startswith('stages.') and m != 'stages.cli'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "['cv2']"  # anomalyncd.io's image reading; not torch


def test_the_console_summaries_are_the_stage_modules_first_lines():
    import importlib

    from stages.cli import COMMANDS

    assert list(COMMANDS) == [*STAGES, "predict", "classes", "export", "exps"]
    for name, line in COMMANDS.items():
        assert importlib.import_module(f"stages.{name}").__doc__.splitlines()[0] == line


def test_a_subcommand_runs_its_stage(tmp_path):
    (tmp_path / "params.yaml").write_text("merge:\n  temperature: 0\n")
    out = subprocess.run([sys.executable, "-m", "stages.cli", "merge"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and out.stderr.startswith("error: params.yaml: merge.temperature"), out.stderr


@pytest.mark.parametrize("command", [["-m", "stages.mebin"], ["-m", "stages.cli", "mebin"]])
def test_a_stage_s_help_lists_the_params_it_reads_with_their_current_values(tmp_path, command):
    (tmp_path / "params.yaml").write_text("mebin:\n  padding: 0.2\ntrain:\n  model: resnet18\n")
    out = subprocess.run([sys.executable, *command, "--help"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("Params read (their values in params.yaml"))
    assert lines.index("  mebin.padding: 0.2") > head
    assert "  mebin.erosion: keep_thin" in lines  # a key params.yaml leaves out: its default
    assert "  train.model: resnet18" in lines and "  detect.method: patchcore" in lines
    assert not any(line.startswith("  train.epochs") for line in lines)  # only the keys mebin reads


def test_each_stage_s_help_lists_the_params_dvc_yaml_gives_it():
    import importlib

    import typer
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in STAGES:
        command = typer.main.get_command(importlib.import_module(f"stages.{name}").app)
        assert list(command.params_read) == stages[name].get("params", []), name


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
