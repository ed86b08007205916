"""Calibration of predict's decisions: normal or defect, then known or unknown type."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from anomalyncd.calibrate import (
    Calibration,
    calibrate,
    class_prototypes,
    crop_distances,
    image_unknown_scores,
    threshold,
)
from anomalyncd.config import load_params
from anomalyncd.detect.holdout import split_holdout
from anomalyncd.io import InputError


def test_the_normal_threshold_flags_about_one_minus_the_quantile_of_new_normal_images():
    rng = np.random.default_rng(0)
    held, new_normal, defects = rng.normal(0, 1, 2000), rng.normal(0, 1, 5000), rng.normal(4, 1, 5000)
    t = threshold(held, 0.95)
    assert t == pytest.approx(1.645, abs=0.1)
    assert np.mean(new_normal > t) == pytest.approx(0.05, abs=0.015)
    assert np.mean(defects > t) > 0.95
    assert np.isnan(threshold(np.zeros(0), 0.95))


def test_held_back_normals_are_a_seeded_share_disjoint_from_the_fit():
    fit, held = split_holdout(50, 0.2, seed=3)
    assert len(held) == 10 and len(fit) == 40
    assert not set(fit) & set(held) and sorted([*fit, *held]) == list(range(50))
    assert np.array_equal(held, split_holdout(50, 0.2, seed=3)[1])  # deterministic
    assert not np.array_equal(held, split_holdout(50, 0.2, seed=4)[1])
    assert [len(x) for x in split_holdout(2, 0.1, 0)] == [1, 1]  # at least one held back, one fitted on
    assert [len(x) for x in split_holdout(1, 0.5, 0)] == [1, 0]
    assert [len(x) for x in split_holdout(30, 0.0, 0)] == [30, 0]


def _clusters(rng, centres: np.ndarray, n: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(len(centres)), n)
    return centres[labels] + rng.normal(0, spread, (len(labels), centres.shape[1])), labels


def test_a_far_away_cluster_is_an_unknown_type_and_new_crops_of_known_classes_are_not():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (4, 32))  # 3 known classes and a new one
    run_f, run_y = _clusters(rng, centres[:3], 60, 0.25)
    head = centres[:3] * 5.0  # a head's weights: the known classes' directions, any length
    cal = calibrate(np.zeros(0), {}, run_f, class_prototypes(head, 0, run_y), np.ones(len(run_f)),
                    np.arange(len(run_f)), np.ones(len(run_f), bool), 0.95, 0.95)
    assert cal.normal_threshold is None and cal.unknown_threshold is not None
    new_known, _ = _clusters(rng, centres[:3], 100, 0.25)
    new_type, _ = _clusters(rng, centres[3:], 100, 0.25)
    s_known = crop_distances(new_known, cal.prototypes)[0]
    s_new, nearest = crop_distances(new_type, cal.prototypes)
    assert np.mean(s_new > cal.unknown_threshold) > 0.95
    assert np.mean(s_known > cal.unknown_threshold) < 0.15
    assert set(nearest) <= {0, 1, 2}  # the nearest known class is still named


def test_prototypes_are_the_heads_unit_novel_class_rows_and_a_class_without_crops_has_none():
    head = np.array([[9.0, 9, 9], [2.0, 2.0, 0], [0, 3.0, 0], [0, 0, 0.5]])  # one base class first
    p = class_prototypes(head, 1, np.array([0, 0, 2, -1, 3]))  # -1 and 3: no class of the head's novel ones
    assert p.shape == (3, 3) and p.dtype == np.float32
    np.testing.assert_allclose(p[0], [2**-0.5, 2**-0.5, 0], atol=1e-6)
    np.testing.assert_allclose(p[2], [0, 0, 1], atol=1e-6)
    assert np.isnan(p[1]).all()  # no crop of the run is of class 1: not a known type
    d, k = crop_distances(np.array([[0, 0, 5.0], [1.0, 1.0, 0], [0, 1.0, 0]]), p)
    np.testing.assert_allclose(d, [0, 0, 1 - 2**-0.5], atol=1e-6)
    assert k.tolist() == [2, 0, 0]  # class 1 is never the nearest, though its row would be


def test_a_crops_unknown_score_is_one_minus_its_largest_cosine_logit():
    from anomalyncd.model import ClusterHead
    import torch

    torch.manual_seed(0)
    head = ClusterHead(16, 4, n_head=2, proj_hidden=8, proj_dim=4)
    f = torch.randn(10, 16)
    logits = head.logits(f)[1].detach().numpy()
    d, k = crop_distances(f.numpy(), class_prototypes(head.weight[1].detach().numpy(), 0, np.arange(4)))
    np.testing.assert_allclose(d, 1 - logits.max(1), atol=1e-6)
    assert k.tolist() == logits.argmax(1).tolist()


def test_an_image_scores_the_merge_weighted_mean_of_its_crops_and_none_without_anomaly():
    s = image_unknown_scores(np.array([0.2, 0.6, 0.9, 0.0]), np.array([0.5, 0.5, 1.0, 1.0]),
                             np.array([0, 0, 1, 2]), np.array([True, True, False]))
    np.testing.assert_allclose(s[:2], [0.4, 0.9])
    assert np.isnan(s[2])


def test_the_calibration_file_round_trips_and_quantiles_can_be_overridden(tmp_path):
    cal = Calibration({}, np.array([1.0, 2.0, 3.0]), np.array([[1.0, 0.0], [np.nan, np.nan]]), np.array([0.1, 0.3]),
                      0.5, 0.5, method="patchcore")
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())), "x")
    assert back.normal_threshold == cal.normal_threshold == 2.0 and back.unknown_threshold == pytest.approx(0.2)
    assert np.isnan(back.prototypes[1]).all() and back.prototypes[0].tolist() == [1.0, 0.0]
    assert cal.with_quantiles(normal=1.0).normal_threshold == 3.0
    assert cal.with_quantiles(unknown=0.0).unknown_threshold == pytest.approx(0.1)
    with pytest.raises(InputError, match=r"--normal-quantile must be in \[0, 1\]"):
        cal.with_quantiles(normal=1.5)
    with pytest.raises(InputError, match="calibration.json: not a calibration file.*dvc repro calibrate"):
        Calibration.from_dict({"format": "old"}, "calibration.json")
    with pytest.raises(InputError, match="calibration.json: damaged"):
        Calibration.from_dict({"format": cal.to_dict()["format"], "normal": {}}, "calibration.json")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("detect: {holdout: 0.7}", r"detect.holdout must be in \[0, 0.5\]"),
        ("detect: {holdout: -0.1}", r"detect.holdout must be in \[0, 0.5\]"),
        ("calibrate: {normal_quantile: 0.2}", r"calibrate.normal_quantile must be in \[0.5, 1\]"),
        ("calibrate: {unknown_quantile: 1.5}", r"calibrate.unknown_quantile must be in \[0.5, 1\]"),
        ("calibrate: {unknown_quantile: high}", r"calibrate.unknown_quantile: expected a number"),
        ("calibrate: {quantile: 0.9}", r"calibrate: unknown key\(s\) \['quantile'\]"),
    ],
)
def test_bad_calibration_params_are_one_clear_error(tmp_path, text, message):
    (tmp_path / "params.yaml").write_text(text + "\n")
    section = text.split(":")[0]
    with pytest.raises(InputError, match=message):
        load_params(section, Path(tmp_path / "params.yaml"))


def _calibrated_run(tmp_path, monkeypatch, method: str, holdout_scores: list[float]) -> dict:
    """The synthetic run of tests/synthetic_run.py with random crop features, a maps store and a
    tiny classifier (3 classes, 192-dim features, head 1 of 2), after the merge and calibrate
    stages (calibrate: normal_quantile 0.5, unknown_quantile 0.9)."""
    import torch
    import yaml

    from anomalyncd import paths
    from anomalyncd.model import MGViTClassifier, ModelConfig, save_model
    from anomalyncd.store import MapSet, read_probs, write_maps, write_probs
    from stages import calibrate as calibrate_stage
    from stages import merge as merge_stage

    from .synthetic_run import make_project

    cs = make_project(tmp_path)["crops"]
    ps = read_probs(tmp_path / paths.PROBS)
    ps.features = np.random.default_rng(0).normal(size=(len(ps.probs), 192)).astype(np.float32)
    write_probs(tmp_path / paths.PROBS, ps)
    torch.manual_seed(0)
    cfg = ModelConfig(model="vit_tiny_patch16_224", image_size=32, crop_pct=0.875, mask_layers=1, grad_from_block=11,
                      n_head=2, num_unlabeled=3)
    save_model(tmp_path / paths.MODEL, MGViTClassifier(cfg), head=1)
    n = len(cs.ids)
    attrs = {"method": method, "params": {"score_top": 0.02, "holdout": 0.2}, "norm_min": 0.0, "norm_max": 1.0,
             "holdout_scores": holdout_scores}
    write_maps(tmp_path / paths.MAPS, MapSet(ids=cs.ids, maps=np.zeros((n, 8, 8)), maps_u8=np.zeros((n, 8, 8)),
                                             scores=np.zeros(n), image_sizes=cs.image_sizes, attrs=attrs))
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["calibrate"] = {"normal_quantile": 0.5, "unknown_quantile": 0.9}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    merge_stage.main(params=Path("params.yaml"))
    calibrate_stage.main(params=Path("params.yaml"))
    return json.loads((tmp_path / paths.CALIBRATION).read_text())


def test_the_calibrate_stage_stores_both_thresholds_and_what_they_are_quantiles_of(tmp_path, monkeypatch):
    saved = _calibrated_run(tmp_path, monkeypatch, "patchcore", [4.0, 1.0, 3.0, 2.0])
    assert saved["normal"]["threshold"] == 2.5 and saved["normal"]["holdout_images"] == 4
    assert saved["normal"]["scores"] == [1.0, 2.0, 3.0, 4.0]
    assert saved["normal"]["image_score"] == {"tops": [0.02], "centre": None, "scale": None}  # the maps store's
    unknown = saved["unknown"]
    assert unknown["images"] == 6 and unknown["threshold"] == pytest.approx(np.quantile(unknown["scores"], 0.9))
    cal = Calibration.from_dict(saved, "calibration.json")
    from anomalyncd.model import load_model

    net, _ = load_model(tmp_path / "models" / "mgvit.pt")
    w = net.head.weight[1].detach().numpy()  # the selected head's class rows are the prototypes
    np.testing.assert_allclose(cal.prototypes, w / np.linalg.norm(w, axis=1, keepdims=True), atol=1e-6)


def test_without_held_back_normal_images_the_normal_decision_is_off_and_says_why(tmp_path, monkeypatch):
    saved = _calibrated_run(tmp_path, monkeypatch, "ground_truth", [])
    assert saved["normal"]["threshold"] is None and "ground_truth scores images without a model of normal ones" in saved["normal"]["note"]
    assert saved["unknown"]["threshold"] is not None


def test_a_maps_store_from_before_the_holdout_is_refused_naming_the_stage_to_rerun(tmp_path, monkeypatch):
    from anomalyncd import paths
    from anomalyncd.store import read_maps, write_maps
    from stages import calibrate as calibrate_stage

    _calibrated_run(tmp_path, monkeypatch, "patchcore", [1.0])
    ms = read_maps(tmp_path / paths.MAPS)
    del ms.attrs["holdout_scores"]
    write_maps(tmp_path / paths.MAPS, ms)
    with pytest.raises(InputError, match=r"maps.zarr.zip: has no holdout_scores .*rerun detect"):
        calibrate_stage.main(params=Path("params.yaml"))


def test_a_classifier_of_another_number_of_classes_than_the_merge_is_refused(tmp_path, monkeypatch):
    import torch

    from anomalyncd import paths
    from anomalyncd.model import MGViTClassifier, ModelConfig, save_model
    from stages import calibrate as calibrate_stage

    _calibrated_run(tmp_path, monkeypatch, "patchcore", [1.0])
    torch.manual_seed(0)
    cfg = ModelConfig(model="vit_tiny_patch16_224", image_size=32, crop_pct=0.875, mask_layers=1, grad_from_block=11,
                      n_head=1, num_unlabeled=4)
    save_model(tmp_path / paths.MODEL, MGViTClassifier(cfg), head=0)
    with pytest.raises(InputError, match=r"mgvit.pt has 4 classes and data/merge/merged.zarr.zip 3; rerun infer and merge"):
        calibrate_stage.main(params=Path("params.yaml"))


def test_a_classifier_file_without_the_heads_weights_is_refused_naming_the_stage_to_rerun(tmp_path, monkeypatch):
    from anomalyncd import paths
    from anomalyncd.model import read_model
    from anomalyncd.io import save_torch
    from stages import calibrate as calibrate_stage

    _calibrated_run(tmp_path, monkeypatch, "patchcore", [1.0])
    payload = read_model(tmp_path / paths.MODEL)
    del payload["state_dict"]["head.weight"]
    save_torch(payload, tmp_path / paths.MODEL)  # a valid file (its digest matches) of a damaged model
    with pytest.raises(InputError, match=r"mgvit.pt: damaged .*KeyError.*rerun the train stage"):
        calibrate_stage.main(params=Path("params.yaml"))
