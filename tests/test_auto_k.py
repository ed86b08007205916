"""train.num_classes: auto: the resolve step of the train stage (tiny ViT, random weights)."""

from __future__ import annotations

import json
import warnings

import cv2
import numpy as np
import pytest
import torch

from anomalyncd import auto_k
from anomalyncd.config import TrainParams
from anomalyncd.io import InputError, InputWarning
from anomalyncd.num_classes import KEstimate, estimate_summary


def tiny_params(**kw) -> TrainParams:
    """A random-weight tiny ViT; the estimate on the weight-free descriptor with BIC, which
    separates these synthetic crops without pretrained weights."""
    base = {"model": "vit_tiny_patch16_224", "pretrained": False, "image_size": 32, "auto_max": 4,
            "auto_features": "filterbank", "auto_method": "bic"}
    return TrainParams(**{**base, **kw})


def test_by_default_the_number_of_classes_is_estimated_on_the_fused_features_by_consensus():
    p = TrainParams()
    assert (p.num_classes, p.auto_features, p.auto_method) == ("auto", "fused", "consensus")


def two_kinds_of_crops(n: int = 12, size: int = 37) -> tuple[np.ndarray, np.ndarray]:
    """Half bright round spots, half dark bars on grey: uint8 (n, S, S, 3), masks (n, S, S)."""
    rng = np.random.default_rng(0)
    crops = np.full((n, size, size, 3), 128, np.uint8) + rng.integers(0, 10, (n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        region = (yy - size // 2) ** 2 + (xx - size // 2) ** 2 < 100 if i % 2 else np.abs(yy - size // 2) < 5
        masks[i][region] = 1
        crops[i][region] = 240 if i % 2 else 20
    return crops, masks


def resolve(tmp_path, p: TrainParams) -> tuple[int, dict, list]:
    crops, masks = two_kinds_of_crops()
    k = auto_k.resolve_num_classes(p, crops, masks, tmp_path / "m.json", tmp_path / "p.json")
    return k, json.loads((tmp_path / "m.json").read_text()), json.loads((tmp_path / "p.json").read_text())


def test_a_given_num_classes_is_used_and_the_estimate_logged(tmp_path):
    k, metrics, plot = resolve(tmp_path, tiny_params(num_classes=3))
    assert k == 3
    assert metrics["num_classes"] == 3 and metrics["auto"] is False
    assert 1 <= metrics["estimate"] <= 4
    assert metrics["method"] == "bic" and metrics["features"] == "filterbank"


def test_auto_trains_with_the_estimate(tmp_path):
    k, metrics, _ = resolve(tmp_path, tiny_params(num_classes="auto"))
    assert k == metrics["estimate"] == metrics["num_classes"]
    assert metrics["auto"] is True


def test_two_kinds_of_region_are_two_classes(tmp_path):
    k, _, _ = resolve(tmp_path, tiny_params(num_classes="auto"))
    assert k == 2


def test_plot_has_a_score_per_defined_candidate(tmp_path):
    _, metrics, plot = resolve(tmp_path, tiny_params(num_classes="auto"))
    assert [row["k"] for row in plot] == [1, 2, 3, 4]
    assert {f"k{row['k']}": row["score"] for row in plot} == metrics["scores"]
    _, metrics, plot = resolve(tmp_path, tiny_params(num_classes="auto", auto_method="silhouette"))
    assert [row["k"] for row in plot] == [2, 3, 4]  # silhouette is undefined for K = 1


def test_crops_without_a_region_are_left_out(tmp_path, monkeypatch):
    """Whole-image crops of images where MEBin found nothing (defect-free ones among them) are no class."""
    crops, masks = two_kinds_of_crops()
    masks[:3] = 0
    seen = []
    monkeypatch.setattr(auto_k, "estimate_num_classes", lambda f, **kw: seen.append(len(f)) or KEstimate(2, [1, 2, 3], [0, 1, 0], "bic"))
    auto_k.resolve_num_classes(tiny_params(num_classes="auto"), crops, masks, tmp_path / "m.json", tmp_path / "p.json")
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert seen == [9]
    assert metrics["crops"] == 9 and metrics["crops_without_region"] == 3


def test_no_region_at_all_is_one_class(tmp_path):
    crops, masks = two_kinds_of_crops()
    with pytest.warns(InputWarning, match="the estimate 1 means"):
        k = auto_k.resolve_num_classes(
            tiny_params(num_classes="auto"), crops, np.zeros_like(masks), tmp_path / "m.json", tmp_path / "p.json"
        )
    assert k == 1


def test_the_estimate_is_echoed_with_its_score_curve(tmp_path):
    crops, masks = two_kinds_of_crops()
    lines = []
    auto_k.resolve_num_classes(tiny_params(num_classes=3), crops, masks, tmp_path / "m.json", tmp_path / "p.json", echo=lines.append)
    assert len(lines) == 1 and lines[0].startswith("estimated K = 2, runner-up 3 (bic over 12 region crops; score by K")
    assert "2: " in lines[0] and "*" in lines[0] and lines[0].endswith("training with K = 3 (train.num_classes)")


def test_an_auto_estimate_of_one_warns_that_no_structure_was_found(tmp_path):
    crops, masks = two_kinds_of_crops()
    lines = []
    with pytest.warns(InputWarning, match="the estimate 1 means the crops' regions show no cluster structure"):
        auto_k.resolve_num_classes(
            tiny_params(num_classes="auto"), crops, np.zeros_like(masks), tmp_path / "m.json", tmp_path / "p.json", echo=lines.append
        )
    assert lines[0].startswith("estimated K = 1 (bic over 0 region crops") and len(lines) == 1  # no runner-up: one K


def test_estimate_summary_reads_the_metrics_file_format():
    metrics = {"num_classes": 5, "estimate": 7, "auto": False, "auto_max": 10, "largest_k": 10, "method": "bic",
               "crops": 344, "scores": {"k6": 9314.2, "k7": 9331.0, "k8": 9199.5}}
    line = ("estimated K = 7 (bic over 344 region crops; score by K, higher is better: 6: 9314, 7: 9331*, 8: 9200); "
            "training with K = 5 (train.num_classes)")
    assert estimate_summary(metrics) == (line, [])
    line, warns = estimate_summary({**metrics, "auto": True, "num_classes": 10, "estimate": 10})
    assert line.endswith("training with K = 10 (train.num_classes: auto)")
    assert warns == ["params.yaml: train.num_classes auto: the estimate 10 is the largest number considered "
                     "(train.auto_max=10), so there may be more classes; raise train.auto_max to check"]


def test_estimate_summary_names_the_runner_up_and_the_confidence():
    metrics = {"num_classes": 5, "estimate": 5, "runner_up": 4, "confidence": 0.8, "auto": True, "auto_max": 10,
               "largest_k": 10, "method": "null_stability", "crops": 400, "scores": {"k1": 0.0, "k4": 0.3, "k5": 0.4}}
    line, warns = estimate_summary(metrics)
    assert line.startswith("estimated K = 5, runner-up 4, confidence 0.80 (null_stability over 400 region crops")
    assert warns == []


def test_an_uncertain_auto_estimate_warns_and_names_the_runner_up():
    metrics = {"num_classes": 6, "estimate": 6, "runner_up": 9, "confidence": 0.3, "auto": True, "auto_max": 10,
               "largest_k": 10, "method": "null_stability", "crops": 413, "scores": {"k6": 0.35, "k9": 0.34}}
    _, warns = estimate_summary(metrics)
    assert warns == ["params.yaml: train.num_classes auto: the estimate 6 is uncertain: 30 % of the resamplings "
                     "agree, the runner-up is 9; compare with dvc exp run -S train.num_classes=9"]
    assert estimate_summary({**metrics, "auto": False})[1] == []  # a given K: the line only


def test_the_metrics_file_holds_the_runner_up_and_the_confidence(tmp_path, monkeypatch):
    est = KEstimate(3, [1, 2, 3, 4], [0.0, 0.2, 0.5, 0.4], "null_stability", runner_up=4, confidence=0.7)
    monkeypatch.setattr(auto_k, "estimate_num_classes", lambda f, **kw: est)
    k, metrics, _ = resolve(tmp_path, tiny_params(num_classes="auto", auto_method="null_stability"))
    assert k == 3
    assert (metrics["estimate"], metrics["runner_up"], metrics["confidence"]) == (3, 4, 0.7)
    assert metrics["scores"] == {"k1": 0.0, "k2": 0.2, "k3": 0.5, "k4": 0.4}


def test_mgvit_features_are_the_mask_guided_cls_tokens():
    crops, masks = two_kinds_of_crops(4)
    p = tiny_params(auto_features="mgvit")
    np.testing.assert_array_equal(auto_k.estimation_features(p, crops, masks), auto_k.region_features(p, crops, masks))


def test_region_descriptors_describe_the_masked_region_only():
    crops, masks = two_kinds_of_crops(4)
    d = auto_k.region_descriptors(crops, masks)
    assert d.shape == (4, 32) and d.dtype == np.float32
    assert np.linalg.norm(d[0] - d[2]) < 0.1 * np.linalg.norm(d[0] - d[1])  # same kind close, other kind far
    np.testing.assert_array_equal(auto_k.region_descriptors(crops, np.zeros_like(masks)), 0)


def test_region_descriptors_do_not_depend_on_the_crop_size():
    small, small_masks = two_kinds_of_crops(4, size=37)
    large = np.stack([cv2.resize(c, (256, 256), interpolation=cv2.INTER_NEAREST) for c in small])
    large_masks = np.stack([cv2.resize(m, (256, 256), interpolation=cv2.INTER_NEAREST) for m in small_masks])
    a, b = auto_k.region_descriptors(small, small_masks), auto_k.region_descriptors(large, large_masks)
    assert np.linalg.norm(a - b, axis=1).max() < 0.2 * np.linalg.norm(a[0] - a[1])


def test_features_leave_the_global_torch_rng_alone():
    crops, masks = two_kinds_of_crops(4)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    auto_k.region_features(tiny_params(), crops, masks)
    assert torch.equal(state, torch.random.get_rng_state())


def test_features_are_deterministic_for_a_seed():
    crops, masks = two_kinds_of_crops(4)
    a = auto_k.region_features(tiny_params(seed=1), crops, masks)
    b = auto_k.region_features(tiny_params(seed=1), crops, masks)
    assert a.shape == (4, 192)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [{"num_classes": 0}, {"auto_max": 0}])
def test_bad_params_are_errors_naming_the_key(tmp_path, bad):
    with pytest.raises(InputError, match="train\\.(num_classes|auto_max)"):
        resolve(tmp_path, tiny_params(**bad))


def test_more_classes_than_crops_is_an_error(tmp_path):
    with pytest.raises(InputError, match="train.num_classes=13 but there are only 12 crops"):
        resolve(tmp_path, tiny_params(num_classes=13))


def test_an_auto_estimate_at_auto_max_warns_that_there_may_be_more(tmp_path):
    with pytest.warns(InputWarning, match=r"estimate 2 is the largest number considered \(train.auto_max=2\)"):
        k, _, _ = resolve(tmp_path, tiny_params(num_classes="auto", auto_max=2))
    assert k == 2


def test_an_auto_estimate_at_what_the_crops_can_tell_warns_too(tmp_path, monkeypatch):
    monkeypatch.setattr(auto_k, "estimate_num_classes", lambda f, **kw: KEstimate(3, [1, 2, 3], [0, 1, 2], "bic"))
    with pytest.warns(InputWarning, match="estimate 3 is the most that 12 crops with a region can tell apart"):
        resolve(tmp_path, tiny_params(num_classes="auto", auto_max=10))


def test_an_estimate_below_its_bound_gives_no_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        k, _, _ = resolve(tmp_path, tiny_params(num_classes="auto", auto_max=4))
    assert k == 2


def test_fused_features_put_the_region_and_its_descriptor_at_equal_weight():
    rng = np.random.default_rng(0)
    f, d = rng.normal(size=(5, 8)) * 30, rng.normal(size=(5, 3)) * 0.01
    x = auto_k.fused_features(f, d)
    assert x.shape == (5, 11)
    np.testing.assert_allclose(np.linalg.norm(x[:, :8], axis=1), 1)  # each part unit length, whatever its scale
    np.testing.assert_allclose(np.linalg.norm(x[:, 8:], axis=1), 1)
    np.testing.assert_allclose(auto_k.fused_features(f, np.zeros((5, 0))), f / np.linalg.norm(f, axis=1, keepdims=True))


def test_fused_estimate_reads_the_crops_descriptors(tmp_path):
    crops, masks = two_kinds_of_crops()
    desc = np.repeat(np.eye(2)[np.arange(12) % 2], 3, axis=1).astype(np.float32)  # (12, 6): the two kinds
    p = tiny_params(num_classes="auto", auto_features="fused", auto_method="eigengap")
    x = auto_k.estimation_features(p, crops, masks, descriptors=desc)
    assert x.shape == (12, auto_k.region_features(p, crops[:1], masks[:1]).shape[1] + 6)
    np.testing.assert_allclose(x[:, -6:], desc / np.sqrt(3))
    k = auto_k.resolve_num_classes(p, crops, masks, tmp_path / "m.json", tmp_path / "p.json", descriptors=desc)
    assert json.loads((tmp_path / "m.json").read_text())["features"] == "fused" and k >= 1
