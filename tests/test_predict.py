"""``anomalyncd predict``: classify new images with a finished run."""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from anomalyncd import paths
from anomalyncd.io import InputError, write_image
from anomalyncd.predict import class_names, find_images, find_maps, load_run

from .project import TINY as PIPELINE_TINY
from .project import run as _run
from .project import tiny_project


def _img(path: Path) -> Path:
    write_image(path, np.zeros((8, 8, 3), np.uint8))
    return path


def test_folder_images_are_found_recursively_with_ids_from_the_folder(tmp_path):
    _img(tmp_path / "new" / "a.png")
    _img(tmp_path / "new" / "sub" / "b.jpg")
    (tmp_path / "new" / "notes.txt").write_text("x")
    found = find_images([tmp_path / "new"])
    assert [i for i, _ in found] == ["new/a", "new/sub/b"]


def test_single_files_keep_their_names_as_ids(tmp_path):
    found = find_images([_img(tmp_path / "x.png"), _img(tmp_path / "y.bmp")])
    assert [i for i, _ in found] == ["x", "y"]


def test_two_images_with_one_name_are_an_error(tmp_path):
    a, b = _img(tmp_path / "a" / "img.png"), _img(tmp_path / "b" / "img.png")
    with pytest.raises(InputError, match="same name"):
        find_images([a, b])


def test_missing_inputs_and_empty_folders_are_errors(tmp_path):
    with pytest.raises(InputError, match="no such image"):
        find_images([tmp_path / "nope.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        find_images([tmp_path / "empty"])


def test_map_files_are_matched_to_images_by_id(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((4, 4), np.float32))
    (tmp_path / "test" / "crack").mkdir(parents=True)
    write_image(tmp_path / "test" / "crack" / "b.png", np.full((4, 4), 7, np.uint8))
    files = find_maps(tmp_path, ["a", "test/crack/b", "other/a"])
    assert [f.name for f in files] == ["a.npy", "b.png", "a.npy"]
    with pytest.raises(InputError, match="no anomaly map"):
        find_maps(tmp_path, ["c"])


def test_an_unfinished_run_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="run directory not found"):
        load_run(tmp_path / "nope")
    (tmp_path / "params.yaml").write_text("merge: {}\n")
    with pytest.raises(InputError, match="dvc repro"):
        load_run(tmp_path)


def test_a_run_is_read_from_its_artifacts_not_from_its_params_file(tmp_path, monkeypatch):
    """Every fitted range and setting predict uses comes from the stores the stages wrote, so
    that editing params.yaml after the run changes nothing."""
    from dataclasses import asdict

    from anomalyncd import paths
    from anomalyncd.config import MebinParams
    from anomalyncd.merge import NO_ANOMALY, Merger
    from anomalyncd.store import MapSet, write_crops, write_maps
    from stages import merge as merge_stage

    from .synthetic_run import make_project

    cs = make_project(tmp_path)["crops"]  # params.yaml: merge weighted, temperature 10
    # a store of a version before mebin.refine: predict draws no outlines, so it needs none
    cs.attrs["params"] = {k: v for k, v in asdict(MebinParams(padding=0.3, crop_size=16, core=0.0)).items() if k != "refine"}
    write_crops(tmp_path / paths.CROPS, cs)
    n = len(cs.ids)
    write_maps(tmp_path / paths.MAPS, MapSet(ids=cs.ids, maps=np.zeros((n, 20, 20)), maps_u8=np.zeros((n, 20, 20)),
                                             scores=np.zeros(n), image_sizes=cs.image_sizes,
                                             attrs={"norm_min": 0.5, "norm_max": 2.0}))
    monkeypatch.chdir(tmp_path)
    merge_stage.main(params=Path("params.yaml"))
    (tmp_path / paths.MODEL).parent.mkdir(parents=True)
    (tmp_path / paths.MODEL).write_bytes(b"")
    (tmp_path / "params.yaml").write_text(
        "mebin: {padding: 0.0, crop_size: 64}\nmerge: {strategy: mean, temperature: 99.0}\ndetect: {map_size: 7}\n"
    )
    run = load_run(tmp_path)
    assert run.mebin == MebinParams(padding=0.3, crop_size=16, core=0.0, refine="off")
    assert run.merger == Merger("weighted", 10.0, NO_ANOMALY)
    assert (run.map_size, run.norm_min, run.norm_max, run.lo, run.hi) == (20, 0.5, 2.0, 10, 240)
    (tmp_path / "params.yaml").unlink()
    assert load_run(tmp_path).merger == run.merger  # a run needs no params file at all


def test_class_names_come_from_the_evaluate_metrics(tmp_path):
    m = tmp_path / "evaluate.json"
    m.write_text(json.dumps({"clusters": {"0": {"size": 2, "matched": "crack"}, "1": {"size": 0, "matched": None}}}))
    assert class_names(m) == {0: "crack"}
    assert class_names(tmp_path / "absent.json") == {}


# -- end to end ------------------------------------------------------------------------------

TINY = {**PIPELINE_TINY, "demo": {**PIPELINE_TINY["demo"], "n_per_type": 3}, "mebin": {"crop_size": 36, "workers": 1}}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny demo project after ``dvc repro``."""
    proj = tiny_project(tmp_path_factory.mktemp("predict") / "run", TINY)
    _run([sys.executable, "-m", "dvc", "repro", "--no-commit"], proj)
    return proj


def _defect_folders(proj: Path) -> list[Path]:
    test_dir = proj / "data" / "demo" / "tile" / "test"
    return [d for d in sorted(test_dir.iterdir()) if d.name != "good"]


def _assert_same_predictions(proj: Path, out: Path) -> None:
    with open(proj / "data" / "merge" / "predictions.csv", newline="") as fh:
        run_rows = {str((proj / r["image"]).resolve()): r for r in csv.DictReader(fh)}
    with open(out, newline="") as fh:
        new_rows = {str(Path(r["image"]).resolve()): r for r in csv.DictReader(fh)}
    assert set(new_rows) == set(run_rows)
    for key, r in run_rows.items():
        n = new_rows[key]
        assert n["cluster"] == r["cluster"] and n["status"] == r["status"], key
        assert n["n_crops"] == r["n_crops"] and n["boxes"] == r["boxes"] and n["crop_boxes"] == r["crop_boxes"], key
        if r["confidence"]:  # empty for an image without anomaly
            assert float(n["confidence"]) == pytest.approx(float(r["confidence"]), abs=1e-4), key
        else:
            assert n["confidence"] == "", key
        assert n["name"] == r["name"], key  # the run's catalog names the classes of both


@pytest.mark.slow
def test_predicting_the_runs_own_images_reproduces_its_predictions(finished_run, tmp_path):
    out = tmp_path / "preds.csv"
    folders = [str(d) for d in _defect_folders(finished_run)]
    _run([sys.executable, "-m", "stages.cli", "predict", "--run", str(finished_run), *folders, "--out", str(out), "--no-normal-gate"], finished_run)
    _assert_same_predictions(finished_run, out)


@pytest.mark.slow
def test_predict_scores_images_as_the_run_did_and_says_which_thresholds_it_applied(finished_run, tmp_path):
    """The image score is the detect stage's; the calibrate stage's thresholds are applied."""
    from anomalyncd.store import read_maps

    ms = read_maps(finished_run / "data" / "detect" / "maps.zarr.zip")
    cal = json.loads((finished_run / "models" / "calibration.json").read_text())
    assert cal["normal"]["holdout_images"] == 2 and cal["normal"]["threshold"] is not None  # 20 % of 8 normal images
    out = tmp_path / "preds.csv"
    test_dir = finished_run / "data" / "demo" / "tile" / "test"
    page = tmp_path / "page"
    log = _run([sys.executable, "-m", "stages.cli", "predict", "--run", str(finished_run), str(test_dir), "--out", str(out),
                "--report", str(page)], finished_run)
    assert f"page: {page / 'index.html'}" in log and "all images" in (page / "index.html").read_text()
    assert f"normal if image_score <= {cal['normal']['threshold']:.4g} (quantile 0.9 of 2 held-back normal images)" in log
    rows = {r["id"]: r for r in _rows(out)}
    for id_, score in zip(ms.ids, ms.scores):  # tile/test/crack/000 -> test/crack/000
        r = rows[id_.split("/", 1)[1]]
        assert float(r["image_score"]) == pytest.approx(float(score), rel=1e-4), id_
        assert (r["status"] == "normal") == (float(score) <= cal["normal"]["threshold"]), id_
    assert {r["open_set"] for r in rows.values() if r["status"] == "anomaly found"} <= {"known type", "unknown type"}


@pytest.mark.slow
def test_predicting_from_given_maps_reproduces_the_runs_predictions(finished_run, tmp_path):
    from anomalyncd.store import read_maps

    ms = read_maps(finished_run / "data" / "detect" / "maps.zarr.zip")
    maps_dir = tmp_path / "maps"
    for id_, m in zip(ms.ids, ms.maps):  # tile/test/crack/000 -> <maps>/crack/000.npy
        f = maps_dir / (id_.split("/", 2)[2] + ".npy")
        f.parent.mkdir(parents=True, exist_ok=True)
        np.save(f, m)
    out = tmp_path / "preds.csv"
    folders = [str(d) for d in _defect_folders(finished_run)]
    args = ["predict", "--run", str(finished_run), *folders, "--maps", str(maps_dir), "--out", str(out), "--no-normal-gate"]
    _run([sys.executable, "-m", "stages.cli", *args], finished_run)
    _assert_same_predictions(finished_run, out)


@pytest.mark.slow
def test_given_maps_draw_the_regions_though_the_detector_makes_the_crops_descriptors(finished_run, tmp_path):
    from anomalyncd.model import load_model

    assert load_model(finished_run / paths.MODEL)[0].cfg.side_dim > 0  # the run's classifier reads them
    from anomalyncd.store import read_maps

    attrs = read_maps(finished_run / "data" / "detect" / "maps.zarr.zip").attrs
    folder = _defect_folders(finished_run)[0]
    maps_dir = tmp_path / "maps"
    (maps_dir / folder.name).mkdir(parents=True)
    for f in sorted(folder.glob("*.png")):  # one blob in the bottom-right corner of every map
        m = np.full((64, 64), attrs["norm_min"], np.float32)
        m[44:60, 44:60] = attrs["norm_max"]
        np.save(maps_dir / folder.name / f"{f.stem}.npy", m)
    out = tmp_path / "preds.csv"
    args = ["predict", "--run", str(finished_run), str(folder), "--maps", str(maps_dir), "--out", str(out), "--no-normal-gate"]
    _run([sys.executable, "-m", "stages.cli", *args], finished_run)
    rows = _rows(out)
    assert rows and all(r["n_crops"] == "1" and r["cluster"] != "" for r in rows)
    for r in rows:  # the region is the given blob, whatever the detector would have found
        x0, y0, x1, y1 = map(int, r["boxes"].split())
        assert 40 <= x0 and 40 <= y0 and x1 <= 64 and y1 <= 64, r["boxes"]


@pytest.mark.slow
def test_predictions_are_reproduced_after_params_yaml_was_edited_following_the_run(finished_run, tmp_path):
    params = finished_run / "params.yaml"
    kept = params.read_text()
    import yaml

    edited = yaml.safe_load(kept)
    edited["detect"].update(map_size=64, image_size=96, method="padim")
    edited["mebin"].update(padding=0.3, crop_size=48, erosion="off", sample_rate=8)
    edited["merge"].update(strategy="mean", temperature=1.0)
    edited["infer"].update(batch_size=3)
    try:
        params.write_text(yaml.safe_dump(edited))
        out = tmp_path / "preds.csv"
        folders = [str(d) for d in _defect_folders(finished_run)]
        _run([sys.executable, "-m", "stages.cli", "predict", "--run", str(finished_run), *folders, "--out", str(out), "--no-normal-gate"], finished_run)
        _assert_same_predictions(finished_run, out)
    finally:
        params.write_text(kept)


@pytest.mark.slow
def test_predict_rows_are_those_of_the_one_product_search(finished_run, monkeypatch):
    """The detector's blocked and pruned nearest-neighbour search gives the rows (and image
    scores) of the search before it, one product of all queries (blocks of 32 cut the demo's
    64-patch grids in two; its bank of 472 dims is pruned)."""
    from anomalyncd.detect import ops, patchcore
    from anomalyncd.predict import Predictor

    run = load_run(finished_run)
    images = find_images([str(d) for d in _defect_folders(finished_run)])
    p = Predictor(run, "cpu", workers=2)
    assert p.detector.index is not None
    monkeypatch.setattr(ops, "QUERY_BLOCK", 32)
    blocked = p.classify(images)
    monkeypatch.setattr(patchcore, "nearest_distance", lambda q, bank, bank_sq, index, workers=1: ops.nearest_distance_full(q, bank))
    full = p.classify(images)
    assert np.array_equal(blocked.image_scores, full.image_scores)
    assert p.merge([blocked]) == p.merge([full])


def _rows(out: Path) -> list[dict]:
    with open(out, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_unreadable_images_are_reported_and_the_others_classified(finished_run, tmp_path):
    new = tmp_path / "new"
    good = sorted(_defect_folders(finished_run)[0].glob("*.png"))
    for f in good:
        _img(new / f.name).write_bytes(f.read_bytes())
    (new / "broken.png").write_bytes(b"not an image")
    jpg = new / "cut.jpg"
    write_image(jpg, np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    jpg.write_bytes(jpg.read_bytes()[:-1000])  # cut inside the scan: OpenCV alone would grey the rest
    out = tmp_path / "preds.csv"
    log = _run([sys.executable, "-m", "stages.cli", "predict", "--run", str(finished_run), str(new), "--out", str(out)],
               finished_run, returncode=2)
    assert f"error: {new / 'broken.png'}: cannot read this image" in log
    assert f"error: {new / 'cut.jpg'}: truncated JPEG" in log
    assert "error: 2 of 5 images not classified" in log
    assert [r["id"] for r in _rows(out)] == [f"new/{f.stem}" for f in good]


@pytest.mark.slow
def test_nan_maps_given_to_predict_are_refused_naming_the_file(finished_run, tmp_path):
    folder = _defect_folders(finished_run)[0]
    images = sorted(folder.glob("*.png"))
    maps_dir = tmp_path / "maps"
    for i, f in enumerate(images):
        m = np.ones((64, 64), np.float32)
        m[10:20, 10:20] = 5.0
        if i == 1:
            m[0, 0] = np.nan
        (maps_dir / folder.name).mkdir(parents=True, exist_ok=True)
        np.save(maps_dir / folder.name / f"{f.stem}.npy", m)
    out = tmp_path / "preds.csv"
    args = ["predict", "--run", str(finished_run), str(folder), "--maps", str(maps_dir), "--out", str(out)]
    log = _run([sys.executable, "-m", "stages.cli", *args], finished_run, returncode=2)
    assert f"{maps_dir / folder.name / images[1].stem}.npy: map has 1 NaN or infinite values" in log
    assert [r["id"] for r in _rows(out)] == [f"{folder.name}/{f.stem}" for i, f in enumerate(images) if i != 1]


# -- the Predictor: chunks and threads -------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> tuple[Path, list[tuple[str, Path]], Path]:
    """A finished run of synthetic stores and a tiny untrained classifier (no detector: maps
    are given), its images and a folder of their maps."""
    from dataclasses import asdict

    import torch

    from anomalyncd import paths
    from anomalyncd.config import MebinParams
    from anomalyncd.model import MGViTClassifier, ModelConfig, save_model
    from anomalyncd.store import MapSet, write_crops, write_maps
    from stages import merge as merge_stage

    from .synthetic_run import SIZE, make_project

    root = tmp_path_factory.mktemp("small_run")
    made = make_project(root)
    cs = made["crops"]
    cs.attrs["params"] = asdict(MebinParams(crop_size=36, core=0.0, refine="off", fallback="none"))
    write_crops(root / paths.CROPS, cs)
    n = len(cs.ids)
    write_maps(root / paths.MAPS, MapSet(ids=cs.ids, maps=np.zeros((n, 32, 32)), maps_u8=np.zeros((n, 32, 32)),
                                         scores=np.zeros(n), image_sizes=cs.image_sizes,
                                         attrs={"norm_min": 0.0, "norm_max": 1.0}))
    with contextlib.chdir(root):
        merge_stage.main(params=Path("params.yaml"))
    torch.manual_seed(0)
    cfg = ModelConfig(model="vit_tiny_patch16_224", image_size=32, crop_pct=0.875, mask_layers=1, grad_from_block=11,
                      n_head=2, num_unlabeled=3)
    save_model(root / paths.MODEL, MGViTClassifier(cfg), head=1)
    rng = np.random.default_rng(1)
    images, maps_dir = [], root / "maps"
    maps_dir.mkdir()
    for r in made["records"]:
        m = rng.random((32, 32)).astype(np.float32) * 0.2
        for _ in range(rng.integers(0, 3)):  # 0 to 2 blobs: images without anomaly too
            y, x = rng.integers(4, 28, 2)
            m[y - 3 : y + 3, x - 4 : x + 4] += rng.uniform(0.5, 0.8)
        name = r.id.replace("/", "_")
        np.save(maps_dir / f"{name}.npy", m)
        images.append((name, root / r.image))
    return root, images, maps_dir


def _same_rows(a: list[dict], b: list[dict]) -> None:
    """Equal rows, numbers within 1e-5 (crops batched otherwise round otherwise in the last bits)."""
    assert [list(r) for r in a] == [list(r) for r in b]
    for ra, rb in zip(a, b):
        for k, v in ra.items():
            if isinstance(v, float) or k.startswith(("prob_", "confidence")):
                assert float(rb[k] or "nan") == pytest.approx(float(v or "nan"), abs=1e-5, nan_ok=True), (ra["id"], k)
            else:
                assert rb[k] == v, (ra["id"], k)


def test_predictions_do_not_depend_on_chunks_or_threads(small_run, monkeypatch):
    from anomalyncd import predict
    from anomalyncd.predict import Predictor, find_maps, load_run, predict_images

    root, images, maps_dir = small_run
    run = load_run(root)
    one = predict_images(run, images, maps_dir, "cpu", workers=1, progress=False).rows
    assert [r["id"] for r in one] == [i for i, _ in images]
    assert {r["status"] for r in one} == {"anomaly found", "no anomaly found"}
    assert predict_images(run, images, maps_dir, "cpu", workers=3, progress=False).rows == one  # threads: exact
    monkeypatch.setattr(predict, "CHUNK", 4)
    _same_rows(one, predict_images(run, images, maps_dir, "cpu", batch_size=3, workers=3, progress=False).rows)
    p = Predictor(run, "cpu", maps=True, workers=2)
    files = find_maps(maps_dir, [i for i, _ in images])
    parts = [p.classify(images[s : s + 1], files[s : s + 1]) for s in range(len(images))]
    _same_rows(one, p.merge(parts))
    assert set(p.timings) == {"read", "mebin", "classifier"}


def test_new_images_are_read_on_the_bit_range_of_the_runs_16_bit_images(small_run, tmp_path):
    """A run on a 12-bit camera's images (16-bit files, at most 4095) reads new ones on that
    range, as its stages read its own: the same rows as the same pixels saved as 8-bit."""
    import shutil
    from dataclasses import replace

    import cv2

    from anomalyncd.datasets import Manifest
    from anomalyncd.predict import load_run, predict_images

    root, images, maps_dir = small_run
    run12 = tmp_path / "run12"
    shutil.copytree(root, run12)
    m = Manifest.read(run12 / paths.MANIFEST)
    Manifest([replace(r, bits=12) for r in m.records]).write(run12 / paths.MANIFEST)
    assert load_run(root).bits == 16 and load_run(run12).bits == 12
    twelve = []
    for name, f in images:
        img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(tmp_path / f"{name}.png"), np.round(img * (4095 / 255)).astype(np.uint16))
        twelve.append((name, tmp_path / f"{name}.png"))
    rows = predict_images(load_run(root), images, maps_dir, "cpu", progress=False).rows
    got = predict_images(load_run(run12), twelve, maps_dir, "cpu", progress=False).rows
    _same_rows([{k: v for k, v in r.items() if k != "image"} for r in rows], [{k: v for k, v in r.items() if k != "image"} for r in got])


def test_on_the_cpu_crops_are_classified_in_small_batches_unless_told(small_run):
    from anomalyncd.predict import CPU_BATCH, Predictor, load_run

    run = load_run(small_run[0])
    assert Predictor(run, "cpu", maps=True).batch_size == CPU_BATCH == 8  # the same time per crop, 1/8 the memory of infer's 64
    assert Predictor(run, "cpu", batch_size=3, maps=True).batch_size == 3


# -- normal or defect, then known or unknown type ---------------------------------------------


def _with_calibration(small_run, dest: Path, normal_scores, known_scores) -> tuple[Path, "object"]:
    """A copy of ``small_run`` with a calibration file: these score distributions, the
    prototypes of its classifier's selected head, both quantiles 0.5."""
    import shutil

    from anomalyncd import paths
    from anomalyncd.calibrate import Calibration, class_prototypes
    from anomalyncd.io import write_json
    from anomalyncd.predict import Predictor

    root, images, maps_dir = small_run
    shutil.copytree(root, dest)
    p = Predictor(load_run(dest), "cpu", maps=True, workers=1)
    c = p.classify(images, find_maps(maps_dir, [i for i, _ in images]))
    weight = p.net.head.weight[p.head].detach().numpy()
    protos = class_prototypes(weight, p.net.cfg.num_labeled, c.probs[c.areas > 0].argmax(1))
    cal = Calibration({}, np.asarray(normal_scores, float), protos, np.asarray(known_scores, float), 0.5, 0.5)
    write_json(dest / paths.CALIBRATION, cal.to_dict())
    return dest, load_run(dest)


def test_images_not_above_the_normal_threshold_are_normal_with_their_score(small_run, tmp_path):
    from anomalyncd.image_score import ImageScore
    from anomalyncd.store import read_maps

    _, images, maps_dir = small_run
    ids = [i for i, _ in images]
    scores = ImageScore.from_attrs(read_maps(small_run[0] / paths.MAPS).attrs)(np.stack([np.load(f) for f in find_maps(maps_dir, ids)]))
    t = float(np.median(scores))
    _, run = _with_calibration(small_run, tmp_path / "run", [t], [0.0])
    rows = predict_images_quiet(run, images, maps_dir)
    assert list(rows[0])[:8] == ["id", "image", "cluster", "name", "status", "open_set", "image_score", "unknown_score"]
    np.testing.assert_allclose([float(r["image_score"]) for r in rows], scores, atol=1e-5)
    for r, s in zip(rows, scores):
        if s <= t:
            assert r["status"] == "normal" and r["cluster"] == -1 and r["open_set"] == "" and r["unknown_score"] == ""
            assert r["confidence"] == r["boxes"] == r["crop_clusters"] == r["prob_0"] == "" and r["n_crops"] == 0
        else:
            assert r["status"] != "normal"
    assert sum(r["status"] == "normal" for r in rows) == int((scores <= t).sum()) >= 1
    # the threshold can be moved without a rerun, or the decision left out
    assert not any(r["status"] == "normal" for r in predict_images_quiet(run, images, maps_dir, normal_gate=False))
    assert all(r["status"] == "normal" for r in predict_images_quiet(run, images, maps_dir, normal_quantile=1.0)
               if float(r["image_score"]) <= t)


def test_anomalous_images_farther_from_every_class_than_the_threshold_are_an_unknown_type(small_run, tmp_path):
    _, images, maps_dir = small_run
    _, run = _with_calibration(small_run, tmp_path / "first", [], [0.0])  # the decision on normal images off
    unknown = [float(r["unknown_score"]) for r in predict_images_quiet(run, images, maps_dir) if r["unknown_score"]]
    assert len(unknown) >= 4 and min(unknown) >= 0
    _, run = _with_calibration(small_run, tmp_path / "second", [], unknown)  # the median of these: the threshold
    rows = [r for r in predict_images_quiet(run, images, maps_dir) if r["status"] == "anomaly found"]
    t = float(np.median(unknown))
    assert [r["open_set"] for r in rows] == ["unknown type" if float(r["unknown_score"]) > t else "known type" for r in rows]
    assert {r["open_set"] for r in rows} == {"known type", "unknown type"}
    assert all(int(r["cluster"]) >= 0 for r in rows)  # an unknown type keeps its nearest class
    flagged = predict_images_quiet(run, images, maps_dir, unknown_quantile=1.0)
    assert not any(r["open_set"] == "unknown type" for r in flagged)


def predict_images_quiet(run, images, maps_dir, **kw) -> list[dict]:
    from anomalyncd.predict import predict_images

    return predict_images(run, images, maps_dir, "cpu", workers=1, progress=False, **kw).rows


def test_images_the_normal_gate_passes_go_to_no_classifier_and_the_others_rows_do_not_change(small_run, tmp_path):
    from anomalyncd.image_score import ImageScore
    from anomalyncd.predict import Predictor
    from anomalyncd.store import read_maps

    _, images, maps_dir = small_run
    ids = [i for i, _ in images]
    files = find_maps(maps_dir, ids)
    scores = ImageScore.from_attrs(read_maps(small_run[0] / paths.MAPS).attrs)(np.stack([np.load(f) for f in files]))
    t = float(np.median(scores))
    _, run = _with_calibration(small_run, tmp_path / "run", [t], [0.0])
    c = Predictor(run, "cpu", maps=True, workers=1).classify(images, files)
    assert not c.counts[scores <= t].any() and c.counts[scores > t].any()  # crops of the anomalous images only
    assert len(c.areas) == len(c.probs) == len(c.features) == c.counts.sum()
    gated = predict_images_quiet(run, images, maps_dir)
    every = predict_images_quiet(run, images, maps_dir, normal_gate=False)
    _same_rows([r for r, s in zip(every, scores) if s > t], [r for r, s in zip(gated, scores) if s > t])
    # a chunk whose every image is normal: no crops at all
    _, quiet = _with_calibration(small_run, tmp_path / "quiet", [float(scores.max())], [0.0])
    assert {r["status"] for r in predict_images_quiet(quiet, images, maps_dir)} == {"normal"}
