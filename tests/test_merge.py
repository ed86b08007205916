from pathlib import Path

import numpy as np
import pytest

from anomalyncd.io import InputError
from anomalyncd.merge import (
    NO_ANOMALY,
    Merger,
    clip_box,
    crop_rows,
    image_rows,
    merge_regions,
    merge_tables,
    no_anomaly_cluster,
    table_boxes,
    novel_probabilities,
    read_table,
    region_weights,
    softmax,
    write_table,
)


def test_weights_are_softmax_of_sqrt_area_over_temperature():
    areas = np.array([100.0, 400.0, 2500.0])
    w = region_weights(areas, np.zeros(3, int), 1, "weighted", temperature=10.0)
    expected = np.exp([1.0, 2.0, 5.0]) / np.exp([1.0, 2.0, 5.0]).sum()
    np.testing.assert_allclose(w, expected)


def test_weights_sum_to_one_per_image():
    rng = np.random.default_rng(0)
    idx = np.array([0, 0, 1, 2, 2, 2])
    w = region_weights(rng.uniform(1, 1e4, 6), idx, 3, "weighted", 50.0)
    np.testing.assert_allclose(np.bincount(idx, weights=w), 1.0)


def test_weights_stay_finite_for_huge_areas_and_small_temperature():
    w = region_weights(np.array([1e8, 4e8]), np.array([0, 0]), 1, "weighted", temperature=0.01)
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(w, [0.0, 1.0])


def test_mean_strategy_weights_crops_equally():
    w = region_weights(np.array([1.0, 1e6, 5.0]), np.array([0, 0, 1]), 2, "mean", 50.0)
    np.testing.assert_allclose(w, [0.5, 0.5, 1.0])


def test_single_crop_image_keeps_its_crop_prediction():
    probs = np.array([[0.1, 0.7, 0.2]])
    out = merge_regions(probs, np.array([30]), np.array([0]), 1, "weighted", 50.0)
    np.testing.assert_allclose(out.probs, probs)
    assert out.labels.tolist() == [1]
    assert out.confidence[0] == pytest.approx(0.7)


def test_large_region_outweighs_small_regions():
    # Two small crops vote class 0, one large crop votes class 1.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9]])
    areas = np.array([25, 25, 10000])
    idx = np.zeros(3, int)
    assert merge_regions(probs, areas, idx, 1, "weighted", temperature=10.0).labels[0] == 1
    assert merge_regions(probs, areas, idx, 1, "mean", 50.0).labels[0] == 0


def test_merged_probabilities_are_the_weighted_sum():
    probs = softmax(np.random.default_rng(1).normal(size=(5, 4)) / 0.1)
    idx = np.array([0, 1, 1, 1, 2])
    areas = np.array([10, 50, 80, 300, 7])
    out = merge_regions(probs, areas, idx, 3, "weighted", 50.0)
    w = np.exp(np.sqrt(areas[1:4]) / 50.0)
    w /= w.sum()
    np.testing.assert_allclose(out.probs[1], (w[:, None] * probs[1:4]).sum(0))
    np.testing.assert_allclose(out.probs.sum(1), 1.0)
    assert out.n_crops.tolist() == [1, 3, 1]


def test_image_without_crops_gets_no_label():
    out = merge_regions(np.array([[0.2, 0.8]]), np.array([4]), np.array([1]), 2, "weighted", 50.0)
    assert out.labels.tolist() == [-1, 1]
    assert np.isnan(out.probs[0]).all() and np.isnan(out.confidence[0])
    assert out.n_crops.tolist() == [0, 1]


def test_an_image_where_mebin_found_no_anomaly_gets_no_class_and_no_confidence():
    """Image 0's one crop is MEBin's whole-image crop (no mask pixels); the model is sure of it."""
    probs = np.array([[0.98, 0.02], [0.3, 0.7]])
    out = merge_regions(probs, np.array([0, 40]), np.array([0, 1]), 2, "weighted", 50.0)
    assert out.anomaly.tolist() == [False, True]
    assert out.labels.tolist() == [NO_ANOMALY, 1]
    assert np.isnan(out.confidence[0]) and np.isnan(out.probs[0]).all() and out.confidence[1] == pytest.approx(0.7)
    # with a normal class, "no anomaly found" is that class, still without a confidence
    out = merge_regions(probs, np.array([0, 40]), np.array([0, 1]), 2, "weighted", 50.0, no_anomaly=0)
    assert out.labels.tolist() == [0, 1] and np.isnan(out.confidence[0])


def test_no_anomaly_images_are_marked_in_both_tables():
    probs = np.array([[0.98, 0.02], [0.3, 0.7], [0.6, 0.4]])
    images, crops, merged = merge_tables(
        ["a", "b"], ["a.png", "b.png"], ["t", "t"], ["a#0", "b#0", "b#1"], np.array([0, 1, 1]),
        np.array([[0, 0, 64, 48], [1, 1, 9, 9], [20, 20, 30, 30]]), np.array([[0, 0, 0, 0], [3, 3, 8, 8], [22, 24, 27, 28]]),
        np.array([[48, 64], [48, 64]]), np.array([0, 30, 12]), np.ones(3), probs, Merger("weighted", 50.0, NO_ANOMALY),
    )
    images, crops = list(images), list(crops)
    assert [r["status"] for r in images] == ["no anomaly found", "anomaly found"]
    assert images[0]["cluster"] == -1 and images[0]["confidence"] == "" and images[0]["prob_0"] == ""
    assert images[0]["crop_clusters"] == "-1" and images[1]["cluster"] == 1
    # the image without anomaly has no defect box; its context crop is the whole image
    assert images[0]["boxes"] == "" and images[0]["crop_boxes"] == "0 0 64 48"
    assert images[1]["boxes"] == "3 3 8 8;22 24 27 28" and images[1]["crop_boxes"] == "1 1 9 9;20 20 30 30"
    assert crops[0]["cluster"] == -1 and crops[0]["confidence"] == ""
    assert crops[0]["prob_0"] == "0.980000"  # the model's output on the crop stays readable
    assert [c["cluster"] for c in crops[1:]] == [1, 0]
    # the store holds the same result as arrays
    assert merged.anomaly.tolist() == [False, True] and merged.clusters.tolist() == [-1, 1]
    assert np.isnan(merged.confidence[0]) and merged.crop_clusters.tolist() == [-1, 1, 0]
    assert np.isnan(merged.crop_confidence[0]) and merged.crop_confidence[1] == pytest.approx(0.7)
    assert merged.n_classes == 2 and merged.attrs == {"strategy": "weighted", "temperature": 50.0, "no_anomaly": -1}


def test_an_image_classed_as_the_normal_class_is_normal_not_anomaly_found():
    """dataset.include_normal: the model's normal class (here cluster 0) is no defect type."""
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    images, _, merged = merge_tables(
        ["good", "crack", "none"], ["g.png", "c.png", "n.png"], ["t"] * 3, ["g#0", "c#0", "n#0"], np.array([0, 1, 2]),
        np.array([[0, 0, 9, 9]] * 3), np.array([[1, 1, 5, 5], [1, 1, 5, 5], [0, 0, 0, 0]]),
        np.full((3, 2), 10), np.array([10, 10, 0]), np.ones(3), probs, Merger("weighted", 50.0, 0),
    )
    rows = list(images)
    assert [r["status"] for r in rows] == ["normal", "anomaly found", "no anomaly found"]
    assert [r["cluster"] for r in rows] == [0, 1, 0]
    assert merged.anomaly.tolist() == [True, True, False]  # the store keeps what MEBin found


def test_tables_are_written_from_generators_row_by_row_and_an_empty_one_has_no_columns(tmp_path):
    rows = ({"id": str(i), "cluster": i % 2} for i in range(3))
    write_table(tmp_path / "t.csv", rows)
    assert [r["cluster"] for r in read_table(tmp_path / "t.csv")] == ["0", "1", "0"]
    write_table(tmp_path / "e.csv", iter([]))
    assert (tmp_path / "e.csv").read_text().strip() == ""


def test_the_merger_travels_in_its_stores_attrs():
    m = Merger("mean", 100.0, 0)
    assert Merger.from_attrs({**m.attrs(), "n_classes": 3}, "merged.zarr.zip") == m
    with pytest.raises(InputError, match="merged.zarr.zip: has no merge settings .*rerun merge"):
        Merger.from_attrs({"strategy": "mean"}, "merged.zarr.zip")


def test_the_no_anomaly_cluster_is_the_normal_class_when_the_model_has_one():
    assert no_anomaly_cluster({"normal_slot": None, "num_labeled": 0}) == NO_ANOMALY
    assert no_anomaly_cluster({}) == NO_ANOMALY
    assert no_anomaly_cluster({"normal_slot": 2, "num_labeled": 2}) == 0  # first novel output


def test_bad_strategy_and_temperature_are_errors():
    with pytest.raises(ValueError, match="strategy"):
        region_weights(np.ones(1), np.zeros(1, int), 1, "max", 50.0)
    with pytest.raises(ValueError, match="temperature"):
        region_weights(np.ones(1), np.zeros(1, int), 1, "weighted", 0.0)
    with pytest.raises(ValueError, match="image_index"):
        region_weights(np.ones(1), np.array([3]), 2, "weighted", 50.0)


def test_a_crop_box_reaching_past_the_image_is_cut_to_it():
    # demo hole/004, 128 x 128: the padded square context crop 9 12 137 140
    assert clip_box((9, 12, 137, 140), (128, 128)) == (9, 12, 128, 128)
    # a 500 x 300 image (H 300, W 500) whose square crop is 500 wide
    assert clip_box((0, 0, 500, 500), (300, 500)) == (0, 0, 500, 300)
    assert clip_box((-6, -2, 20, 30), (40, 40)) == (0, 0, 20, 30)


def test_table_boxes_give_the_defect_box_and_the_context_crop_inside_the_image():
    boxes = np.array([[9, 12, 137, 140], [0, 0, 500, 500]])
    regions = np.array([[40, 50, 100, 75], [0, 0, 0, 0]])
    defect, context = table_boxes(boxes, regions, np.array([900, 0]), np.array([0, 1]), np.array([[128, 128], [300, 500]]))
    assert defect == [(40, 50, 100, 75), None]
    assert context == [(9, 12, 128, 128), (0, 0, 500, 300)]


def test_tables_round_trip_boxes_and_crop_classes(tmp_path):
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    idx = np.array([0, 0, 1])
    defect = [(2, 3, 8, 10), (6, 6, 8, 8), (2, 2, 3, 4)]
    context = [(0, 1, 10, 12), (5, 5, 9, 9), (2, 2, 4, 4)]
    merged = merge_regions(probs, np.array([100, 4, 9]), idx, 3, "weighted", 5.0)
    rows = image_rows(["a", "b", "c"], ["a.png", "b.png", "c.png"], ["t"] * 3, merged, defect, context, idx, probs.argmax(1))
    write_table(tmp_path / "p.csv", rows)
    back = read_table(tmp_path / "p.csv", required=("id", "cluster"))
    assert [r["cluster"] for r in back] == [str(merged.labels[0]), "0", "-1"]
    assert back[0]["boxes"] == "2 3 8 10;6 6 8 8" and back[0]["crop_boxes"] == "0 1 10 12;5 5 9 9"
    assert back[0]["crop_clusters"] == "0;1"
    assert back[2]["n_crops"] == "0" and back[2]["boxes"] == "" and back[2]["confidence"] == ""
    assert [c for c in back[0] if c.startswith("prob_")] == ["prob_0", "prob_1"]
    assert float(back[0]["prob_0"]) == pytest.approx(merged.probs[0, 0], abs=1e-6)


def test_crop_table_has_one_row_per_crop_with_its_two_boxes_and_weight(tmp_path):
    probs = np.array([[0.8, 0.2], [0.3, 0.7]])
    rows = list(crop_rows(["a#0", "a#1"], ["a", "a"], [(1, 1, 3, 4), None], [(0, 0, 4, 4), (1, 1, 3, 3)], np.array([16, 0]),
                          np.array([0.9, 0.5]), probs, np.array([0.6, 0.4]), probs.argmax(1)))
    assert [r["cluster"] for r in rows] == [0, 1]
    assert [rows[0][k] for k in ("x0", "y0", "x1", "y1", "crop_x0", "crop_y0", "crop_x1", "crop_y1")] == [1, 1, 3, 4, 0, 0, 4, 4]
    assert [rows[1][k] for k in ("x0", "y0", "x1", "y1")] == [""] * 4  # no region: no defect box
    assert rows[1]["confidence"] == "" and rows[0]["weight"] == "0.600000"


def test_reading_a_missing_table_names_the_stage(tmp_path):
    with pytest.raises(InputError, match="merge"):
        read_table(tmp_path / "nope.csv")


def test_novel_probabilities_take_the_selected_head_and_drop_base_classes():
    probs = np.zeros((2, 3, 5))
    probs[:, 1, 2:] = [[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]]
    probs[:, 0, 2:] = 1 / 3
    out = novel_probabilities(probs, head=1, num_labeled=2)
    np.testing.assert_allclose(out, probs[:, 1, 2:])


def test_novel_probabilities_reject_unnormalised_input():
    with pytest.raises(ValueError, match="sum to 1"):
        novel_probabilities(np.full((1, 1, 3), 0.5), head=0)


# -- the stage ---------------------------------------------------------------------------------

def test_merge_stage_writes_one_row_per_image_and_per_crop(tmp_path, monkeypatch):
    from anomalyncd import paths
    from stages import merge as stage

    from .synthetic_run import make_project

    made = make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    stage.main(params=Path("params.yaml"))
    images = read_table(paths.PREDICTIONS)
    crops = read_table(paths.CROP_PREDICTIONS)
    cs = made["crops"]
    assert [r["id"] for r in images] == cs.ids
    assert [r["crop_id"] for r in crops] == cs.crop_ids
    expected = merge_regions(made["probs"][:, 1], cs.areas, cs.image_index, len(cs.ids), "weighted", 10.0)
    assert [int(r["cluster"]) for r in images] == expected.labels.tolist()
    assert [int(r["n_crops"]) for r in images] == expected.n_crops.tolist()
    assert images[0]["image"] == made["records"][0].image
    # evaluate reads the same result from the store, with K and the settings it was merged with
    from anomalyncd.store import read_merged

    ms = read_merged(paths.MERGED)
    assert ms.ids == cs.ids and ms.clusters.tolist() == expected.labels.tolist()
    np.testing.assert_allclose(ms.weights, expected.weights)
    assert ms.n_classes == 3 and ms.attrs["temperature"] == 10.0 and ms.attrs["strategy"] == "weighted"


def test_merge_stage_rejects_probabilities_of_other_crops(tmp_path, monkeypatch):
    from anomalyncd import paths
    from anomalyncd.store import ProbSet, write_probs
    from stages import merge as stage

    from .synthetic_run import make_project

    make_project(tmp_path)
    write_probs(tmp_path / paths.PROBS, ProbSet(probs=np.full((2, 1, 3), 1 / 3), logits=np.zeros((2, 1, 3)), features=np.zeros((2, 1)), baseline_features=np.zeros((2, 1)), head=0))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="rerun infer"):
        stage.main(params=Path("params.yaml"))
