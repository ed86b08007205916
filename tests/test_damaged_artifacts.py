"""A damaged artifact of an earlier stage is one ``<file>: damaged (...); rerun <stage>`` error,
not a ``KeyError`` / ``ValueError`` / ``JSONDecodeError`` traceback, and a stage that meets one
writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomalyncd import paths
from anomalyncd.datasets import Manifest
from anomalyncd.detect import load_detector
from anomalyncd.io import InputError, save_torch
from anomalyncd.model import MODEL_FORMAT, load_model
from anomalyncd.predict import class_names

HEADER = "id,image,mask,defect_type,split,category,height,width\n"


@pytest.mark.parametrize(
    "text, what",
    [
        ("id,image,mask,defect_type,split,category,height\na,a.png,,crack,test,t,8\n", r"no column width"),
        (HEADER + "a,a.png,,crack,test,t,eight,8\n", r"line 2: size 'eight' x '8' is not two positive integers"),
        (HEADER + "a,a.png,,crack,test,t,8,8\nb,b.png,,crack,test\n", r"line 3 has fewer fields than the header"),
        (HEADER + "a,a.png,,crack,test,t,8,8,extra\n", r"line 2 has more fields than the header"),
    ],
)
def test_a_damaged_manifest_names_the_file_the_problem_and_the_stage_to_rerun(tmp_path, text, what):
    (tmp_path / "manifest.csv").write_text(text)
    with pytest.raises(InputError, match=rf"manifest.csv: damaged \({what}\); rerun the prepare stage"):
        Manifest.read(tmp_path / "manifest.csv")


def test_a_detector_file_without_its_keys_is_damaged(tmp_path):
    save_torch({"format": 1, "method": "padim"}, tmp_path / "detector.pt")
    with pytest.raises(InputError, match=r"detector.pt: damaged \(no 'params' in it\); rerun the detect stage"):
        load_detector(tmp_path / "detector.pt")


def test_a_model_file_without_its_keys_is_damaged(tmp_path):
    save_torch({"format": MODEL_FORMAT, "head": 0}, tmp_path / "mgvit.pt")
    with pytest.raises(InputError, match=r"mgvit.pt: damaged .*KeyError.*'config'.*rerun the train stage"):
        load_model(tmp_path / "mgvit.pt")


@pytest.mark.parametrize(
    "text, what",
    [("{\"clusters\": ", r"damaged \(not JSON"), ("[1, 2]", r"damaged \(a JSON list, not an object\)"),
     ('{"clusters": {"x": {"matched": "crack"}}}', r"damaged \(its clusters are not")],
)
def test_predict_names_a_damaged_evaluate_metrics_file(tmp_path, text, what):
    (tmp_path / "evaluate.json").write_text(text)
    with pytest.raises(InputError, match=rf"evaluate.json: {what}.*rerun the evaluate stage"):
        class_names(tmp_path / "evaluate.json")


def test_evaluate_refuses_a_damaged_mebin_metrics_file_before_writing_anything(tmp_path, monkeypatch):
    from stages import evaluate, merge

    from .synthetic_run import make_project

    make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    merge.main(params=Path("params.yaml"))
    (tmp_path / paths.METRICS).mkdir(exist_ok=True)
    (tmp_path / paths.METRICS / "mebin.json").write_text('{"lo": 3,')
    with pytest.raises(InputError, match=r"metrics/mebin.json: damaged \(not JSON.*\); rerun the mebin stage \(dvc repro mebin\)"):
        evaluate.main(params=Path("params.yaml"))
    assert not (tmp_path / paths.METRICS / "evaluate.json").exists()
    assert not (tmp_path / evaluate.CONFUSION).exists()
    assert not (tmp_path / paths.REPORT).exists()


def test_evaluate_writes_no_metrics_when_the_report_cannot_read_an_image(tmp_path, monkeypatch):
    from stages import evaluate, merge

    from .synthetic_run import make_project

    written = make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    merge.main(params=Path("params.yaml"))
    for r in written["records"]:
        Path(r.image).write_bytes(b"")  # emptied after prepare
    with pytest.raises(InputError, match=r"\.png: cannot read this image \(empty or not an image file\)"):
        evaluate.main(params=Path("params.yaml"))
    assert not (tmp_path / paths.EVALUATE_METRICS).exists() and not (tmp_path / paths.EVALUATE_DETAIL).exists()
    assert not (tmp_path / evaluate.CONFUSION).exists()
