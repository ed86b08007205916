"""End to end: the pipeline as a user runs it, through `dvc repro` in a fresh copy of the
project, on a tiny demo. Checks the outputs and that DVC reruns exactly what changed."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from .project import run as _run
from .project import tiny_project

pytestmark = pytest.mark.slow

STAGES = ["demo", "prepare", "detect", "mebin", "train", "infer", "merge", "calibrate", "evaluate"]


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def _assert_reran_from(output: str, first: str) -> None:
    """``first`` reran, nothing upstream of it did, and downstream stages reran in order while
    their inputs kept changing (DVC skips a stage whose inputs came out identical)."""
    ran = _ran(output)
    downstream = STAGES[STAGES.index(first):]
    assert ran == downstream[: len(ran)] and ran[:1] == [first], ran


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh git+DVC copy of the project with tiny params, after one full `dvc repro`."""
    proj = tiny_project(tmp_path_factory.mktemp("project"))
    out = _run([sys.executable, "-m", "dvc", "repro"], proj)
    assert _ran(out) == STAGES
    _run(["git", "add", "-A"], proj)
    _run(["git", "commit", "-qm", "first run"], proj)
    return proj


def test_full_run_writes_predictions_and_metrics(project):
    metrics = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert metrics["ground_truth"] is True
    for key in ("nmi", "ari", "f1"):
        assert 0.0 <= metrics["image"][key] <= 1.0 or key == "ari"
    lines = (project / "data/merge/predictions.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 4 * 4  # header + one row per defect image


def test_second_repro_runs_nothing(project):
    out = _run([sys.executable, "-m", "dvc", "repro"], project)
    assert _ran(out) == []


def test_a_rerun_in_a_fresh_clone_leaves_git_status_clean(project, tmp_path):
    """Every tracked output comes out the same on a rerun: no timings in the metrics or dvc.lock."""
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    out = _run([sys.executable, "-m", "dvc", "repro"], clone)
    assert _ran(out) == STAGES
    assert _run(["git", "status", "--porcelain"], clone) == ""


def test_a_key_added_to_train_is_refused_not_ignored(project):
    params = project / "params.yaml"
    original = params.read_text()
    try:
        out = _run([sys.executable, "-m", "dvc", "exp", "run", "-S", "+train.epoch=5"], project, returncode=255)
        assert "error: params.yaml: train: unknown key(s) ['epoch']" in out
    finally:
        params.write_text(original)


def test_train_param_change_reruns_train_and_what_follows_only(project):
    out = _run([sys.executable, "-m", "dvc", "exp", "run", "-S", "train.epochs=2"], project)
    _assert_reran_from(out, "train")
    assert "infer" in _ran(out)  # a new model always gives new probabilities


def test_mebin_param_change_reruns_mebin_onwards_not_detect(project):
    out = _run([sys.executable, "-m", "dvc", "exp", "run", "-S", "mebin.padding=0.2"], project)
    _assert_reran_from(out, "mebin")
    assert "train" in _ran(out)  # other boxes, other crops


def test_a_predict_threshold_change_reruns_calibrate_only(project):
    out = _run([sys.executable, "-m", "dvc", "exp", "run", "-S", "calibrate.unknown_quantile=0.9"], project)
    assert _ran(out) == ["calibrate"]


def test_code_change_of_one_stage_reruns_it_and_what_follows(project):
    merge = project / "stages" / "merge.py"
    original = merge.read_text()
    try:
        merge.write_text(original + "\n# a change\n")
        out = _run([sys.executable, "-m", "dvc", "repro"], project)
        _assert_reran_from(out, "merge")
    finally:
        merge.write_text(original)
        _run([sys.executable, "-m", "dvc", "repro"], project)


def test_a_catalog_edit_reruns_only_the_stages_after_infer_and_names_every_output(project):
    """Naming, merging and rejecting clusters (`anomalyncd classes`) reruns no stage before merge."""
    import csv

    catalog = project / "classes.yaml"
    original = catalog.read_text()
    try:
        _run([sys.executable, "-m", "stages.cli", "classes", "name", "0", "first"], project)
        _run([sys.executable, "-m", "stages.cli", "classes", "merge", "3", "2"], project)
        _run([sys.executable, "-m", "stages.cli", "classes", "reject", "1"], project)
        out = _run([sys.executable, "-m", "dvc", "repro"], project)
        assert sorted(_ran(out)) == ["calibrate", "evaluate", "merge"]  # never detect, mebin, train or infer
        with open(project / "data/merge/predictions.csv", newline="") as fh:
            names = {(r["cluster"], r["name"]) for r in csv.DictReader(fh)}
        two = next(n for c, n in names if c == "2")
        assert names <= {("0", "first"), ("1", "not a defect"), ("2", two), ("3", two)}
        assert "first" in (project / "reports" / "index.html").read_text()
        assert json.loads((project / "metrics" / "evaluate.json").read_text())["curated"]["n_classes"] == 2
    finally:
        catalog.write_text(original)
        _run([sys.executable, "-m", "dvc", "repro"], project)


def test_new_images_under_the_same_names_rerun_detection(project):
    out = _run([sys.executable, "-m", "dvc", "exp", "run", "-S", "demo.seed=1"], project)
    assert _ran(out)[:3] == ["demo", "prepare", "detect"]  # the manifest is the same, the images are not


def test_single_stage_reruns_alone_from_cached_inputs(project):
    out = _run([sys.executable, "-m", "dvc", "repro", "-s", "-f", "mebin"], project)
    assert _ran(out) == ["mebin"]


def test_exp_show_lists_nmi_ari_f1(project):
    out = _run([sys.executable, "-m", "dvc", "exp", "show", "--md", "--no-pager"], project)
    header = out.splitlines()[0]
    for column in ("image.nmi", "image.ari", "image.f1", "train.epochs"):
        assert f" {column} " in header
