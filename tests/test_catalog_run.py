"""The catalog applied to a run: merge names its tables, evaluate scores and reports the curated
classes, `anomalyncd classes` edits the file, `anomalyncd export` writes the labelled set that
train.base_dir reads back, and editing the catalog reruns only the stages after infer."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from anomalyncd import paths
from anomalyncd.io import InputError

from .conftest import ROOT
from .synthetic_run import CROP, make_project


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _merge(tmp_path: Path, monkeypatch, catalog: str | None = None, evaluate: bool = False) -> list[dict]:
    from stages import evaluate as evaluate_stage
    from stages import merge

    if not (tmp_path / paths.MANIFEST).exists():
        make_project(tmp_path)  # K = 3 clusters: 0 crack, 1 hole, 2 stain (two images each)
    if catalog is not None:
        (tmp_path / "classes.yaml").write_text(catalog)
    monkeypatch.chdir(tmp_path)
    merge.main(params=Path("params.yaml"))
    if evaluate:
        evaluate_stage.main(params=Path("params.yaml"))
    return _rows(paths.PREDICTIONS)


def _cli(args: list[str], cwd: Path, returncode: int = 0) -> str:
    out = subprocess.run([sys.executable, "-m", "stages.cli", *args], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == returncode, out.stdout + out.stderr
    return out.stdout + out.stderr


# -- names in the tables ---------------------------------------------------------------------


def test_without_a_catalog_the_tables_name_each_cluster_by_its_matched_type(tmp_path, monkeypatch):
    rows = _merge(tmp_path, monkeypatch)
    assert list(rows[0])[:5] == ["id", "image", "category", "cluster", "name"]  # the cluster id stays
    assert {(r["cluster"], r["name"]) for r in rows} == {("0", "crack"), ("1", "hole"), ("2", "stain")}
    crops = _rows(paths.CROP_PREDICTIONS)
    assert {(r["cluster"], r["name"]) for r in crops} == {("0", "crack"), ("1", "hole"), ("2", "stain")}


def test_the_catalog_names_merges_and_rejects_in_the_tables(tmp_path, monkeypatch):
    rows = _merge(tmp_path, monkeypatch, "0: {name: fissure}\n2: {same_as: 1}\n")
    assert {(r["cluster"], r["name"]) for r in rows} == {("0", "fissure"), ("1", "hole"), ("2", "hole")}
    rows = _merge(tmp_path, monkeypatch, "2: {reject: true}\n")
    assert {(r["cluster"], r["name"]) for r in rows} == {("0", "crack"), ("1", "hole"), ("2", "not a defect")}


def test_predict_names_a_run_s_clusters_by_its_stored_catalog(tmp_path, monkeypatch):
    from anomalyncd.predict import catalog_names
    from anomalyncd.store import StoreReader

    _merge(tmp_path, monkeypatch, "0: {name: fissure}\n2: {reject: true}\n")
    with StoreReader(paths.MERGED, "merged") as r:
        assert catalog_names(r.attrs, paths.MERGED) == {0: "fissure", 1: "hole", 2: "not a defect"}
    assert catalog_names({}, paths.MERGED) == {}  # a run from before the catalog: evaluate's matched types


def test_a_bad_catalog_stops_merge_before_it_writes(tmp_path, monkeypatch):
    _merge(tmp_path, monkeypatch)
    before = paths.PREDICTIONS.read_bytes()
    with pytest.raises(InputError, match=r"^classes.yaml: 5: cluster 5 does not exist \(the run has clusters 0..2\)"):
        _merge(tmp_path, monkeypatch, "5: {name: dent}\n")
    assert paths.PREDICTIONS.read_bytes() == before
    out = _cli(["merge"], tmp_path, returncode=2)
    assert out.strip().splitlines()[-1].startswith("error: classes.yaml: 5: cluster 5 does not exist")


# -- evaluate and the report -----------------------------------------------------------------


def test_evaluate_scores_the_curated_classes_and_the_report_shows_the_catalog(tmp_path, monkeypatch):
    _merge(tmp_path, monkeypatch, "0: {name: fissure}\n2: {same_as: 1}\n", evaluate=True)
    detail = json.loads((tmp_path / paths.EVALUATE_DETAIL).read_text())
    cur = detail["curated"]
    assert cur["n_classes"] == 2 and cur["rejected_images"] == 0
    assert cur["classes"]["fissure"] == {"clusters": [0], "size": 2, "mean_confidence": pytest.approx(detail["clusters"]["0"]["mean_confidence"]), "matched": "crack"}
    assert cur["classes"]["hole"]["clusters"] == [1, 2] and cur["classes"]["hole"]["size"] == 4
    assert cur["image"]["f1"] == pytest.approx(4 / 6)  # the two stains went into the holes' class
    assert detail["image"]["f1"] == 1.0  # the clusters themselves are scored as before
    head = json.loads((tmp_path / paths.EVALUATE_METRICS).read_text())
    assert head["curated"] == {"n_classes": 2, "rejected_images": 0, "image": {k: cur["image"][k] for k in ("nmi", "ari", "f1")}}
    assert {r["predicted"] for r in _rows(tmp_path / "plots" / "confusion.csv")} == {"fissure", "hole"}
    page = (tmp_path / "reports" / "index.html").read_text()
    assert "class 0 (fissure): 2 images" in page and "class 1 (hole): 4 images" in page
    assert "id='class-2'" not in page  # merged into class 1
    assert "Discovered clusters 1, 2, merged by the catalog." in page
    assert "<h3 id='catalog'>Catalog</h3>" in page and "<td>1, 2</td><td>4</td><td>hole, stain</td><td>merged</td>" in page
    assert "<th>class 0 (fissure)</th>" in page  # the confusion matrix's columns
    nxt = page[page.index("What to do next") :]
    assert "anomalyncd classes name|merge|reject" in nxt and "anomalyncd export --out labelled" in nxt


def test_rejected_clusters_are_reported_as_not_a_defect(tmp_path, monkeypatch):
    _merge(tmp_path, monkeypatch, "2: {reject: true}\n", evaluate=True)
    cur = json.loads((tmp_path / paths.EVALUATE_DETAIL).read_text())["curated"]
    assert cur["n_classes"] == 2 and cur["rejected_images"] == 2 and cur["classes"]["not a defect"]["clusters"] == [2]
    assert cur["image"]["f1"] == pytest.approx(4 / 6)  # a rejected image is not classified
    page = (tmp_path / "reports" / "index.html").read_text()
    assert "<h2 id='rejected'>not a defect: 2 images</h2>" in page
    assert "rejected: not a defect" in page and "<b>2 defect types</b>" in page
    assert "not a defect" in {r["predicted"] for r in _rows(tmp_path / "plots" / "confusion.csv")}


# -- the classes command ---------------------------------------------------------------------


def test_the_classes_command_shows_and_edits_the_catalog(tmp_path, monkeypatch):
    _merge(tmp_path, monkeypatch)
    out = _cli(["classes", "show"], tmp_path)
    lines = out.splitlines()
    assert lines[0].split() == ["cluster", "images", "confidence", "matched", "type", "class"]
    assert lines[1].split()[:2] == ["0", "2"] and lines[1].split()[-2:] == ["crack", "crack"]
    _cli(["classes", "name", "0", "fine crack"], tmp_path)
    _cli(["classes", "merge", "2", "1"], tmp_path)
    out = _cli(["classes", "reject", "1"], tmp_path)
    assert "`dvc repro` applies it" in out
    assert yaml.safe_load((tmp_path / "classes.yaml").read_text()) == {0: {"name": "fine crack"}, 1: {"reject": True}, 2: {"same_as": 1}}
    out = _cli(["classes", "show"], tmp_path)
    assert "fine crack" in out and "not a defect (merged into 1)" in out and "classes.yaml changed since" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["merge", "1", "1"], "error: classes.yaml: 1.same_as: merged into itself"),
        (["name", "7", "dent"], "error: classes.yaml: 7: cluster 7 does not exist"),
        (["name", "1", "crack"], "error: classes.yaml: 1.name: 'crack' is the name cluster 0 has by its matched true type"),
        (["name", "1", "a/b"], "error: classes.yaml: 1.name: 'a/b' cannot name a class"),
    ],
)
def test_a_bad_edit_is_one_error_and_leaves_the_file_as_it_was(tmp_path, monkeypatch, args, message):
    _merge(tmp_path, monkeypatch, "2: {same_as: 1}\n")
    out = _cli(["classes", *args], tmp_path, returncode=2)
    assert out.strip().splitlines() == [message + out.strip().split(message, 1)[1]], out
    assert (tmp_path / "classes.yaml").read_text() == "2: {same_as: 1}\n"


# -- export ----------------------------------------------------------------------------------


def _export(out: Path) -> None:
    from stages import export

    export.main(out=out, classes=Path("classes.yaml"))


def test_export_writes_the_curated_classes_in_the_layout_train_base_dir_reads(tmp_path, monkeypatch):
    from stages.train import read_base_set

    _merge(tmp_path, monkeypatch, "0: {name: fissure}\n2: {reject: true}\n")
    out = tmp_path / "labelled"
    _export(out)
    assert (out / ".anomalyncd-export").is_file()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["fissure", "hole"]  # no folder for the rejected
    table = _rows(out / "labels.csv")
    crops = _rows(paths.CROP_PREDICTIONS)
    kept = [c for c in crops if c["name"] != "not a defect"]
    assert [r["class"] for r in table] == [c["name"] for c in kept]
    assert [r["box"] for r in table] == [" ".join(c[k] for k in ("x0", "y0", "x1", "y1")) for c in kept]
    assert table[0]["file"] == "fissure/tile__test__crack__000_0.png" and table[0]["mask"] == "fissure/tile__test__crack__000_0_mask.png"
    assert table[0]["image"] == "data/images/tile/crack/000.png" and table[0]["image_id"] == "tile/test/crack/000"
    for r in table:
        assert (out / r["file"]).is_file() and (out / r["mask"]).is_file()
    # fed back as a labelled base set: the same crops, one class per folder
    images, masks, labels, names = read_base_set(out, CROP)
    assert names == ["fissure", "hole"]
    assert np.bincount(labels).tolist() == [sum(r["class"] == n for r in table) for n in names]
    assert images.shape == (len(table), CROP, CROP, 3) and set(np.unique(masks)) <= {0, 1} and masks.any()


def test_export_replaces_its_own_folder_but_never_a_folder_it_did_not_write(tmp_path, monkeypatch):
    _merge(tmp_path, monkeypatch)
    out = tmp_path / "labelled"
    _export(out)
    (out / "crack" / "stale.png").write_bytes(b"x")
    _export(out)  # an earlier export is replaced whole
    assert not (out / "crack" / "stale.png").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match=r"mine: folder not empty and not written by anomalyncd export"):
        _export(mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    _export(tmp_path / "empty")
    assert (tmp_path / "empty" / "labels.csv").is_file()


def test_export_refuses_a_catalog_edited_since_the_last_merge(tmp_path, monkeypatch):
    _merge(tmp_path, monkeypatch)
    (tmp_path / "classes.yaml").write_text("0: {name: fissure}\n")
    with pytest.raises(InputError, match=r"classes.yaml: changed since the run's last merge; run `dvc repro` first"):
        _export(tmp_path / "labelled")
    assert not (tmp_path / "labelled").exists()


# -- rerun scope -----------------------------------------------------------------------------


def test_only_the_stages_after_infer_depend_on_the_catalog():
    """dvc.yaml: the stages that read classes.yaml, or an output of one that does."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

    def outs(s):
        return {str(next(iter(o))) if isinstance(o, dict) else str(o) for key in ("outs", "metrics", "plots") for o in s.get(key, [])}

    def deps(s):
        return {str(d).split()[0] for d in s.get("deps", [])}

    tainted = {"classes.yaml"}
    affected: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, s in stages.items():
            if name not in affected and deps(s) & tainted:
                affected.add(name)
                tainted |= outs(s)
                changed = True
    assert affected == {"merge", "calibrate", "evaluate"}
    assert "classes.yaml" in deps(stages["merge"])
