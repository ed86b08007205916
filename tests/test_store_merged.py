"""The merge store: what merge hands to evaluate (and predict's merge settings)."""

import numpy as np
import pytest

from anomalyncd import store
from anomalyncd.io import InputError


def _merged():
    return store.MergeSet(
        ids=["a", "b"],
        clusters=np.array([1, -1]),
        confidence=np.array([0.7, np.nan]),
        anomaly=np.array([True, False]),
        probs=np.array([[0.3, 0.7, 0.0], [np.nan] * 3]),
        crop_clusters=np.array([1, 0, -1]),
        crop_confidence=np.array([0.8, 0.6, np.nan]),
        weights=np.array([0.55, 0.45, 1.0]),
        attrs={"strategy": "weighted", "temperature": 50.0, "no_anomaly": -1},
    )


def test_merged_predictions_round_trip_with_nan_for_images_without_anomaly(tmp_path):
    ms = _merged()
    store.write_merged(tmp_path / "m.zarr.zip", ms)
    back = store.read_merged(tmp_path / "m.zarr.zip")
    assert back.ids == ms.ids and back.n_classes == 3
    assert back.attrs == {**ms.attrs, "n_classes": 3}
    for name in ("clusters", "confidence", "anomaly", "probs", "crop_clusters", "crop_confidence", "weights"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ms, name))
    assert back.anomaly.dtype == bool and back.clusters.dtype == np.int64


def test_merged_predictions_with_rows_missing_are_rejected():
    with pytest.raises(ValueError, match="weights has 2 rows, expected 3"):
        store.MergeSet(**{**_merged().__dict__, "weights": np.ones(2)})


def test_reading_another_kind_as_merged_predictions_names_the_file(tmp_path):
    store.write_group(tmp_path / "x.zarr.zip", "probs", {"probs": np.zeros((1, 1, 1))}, {})
    with pytest.raises(InputError, match="x.zarr.zip: holds 'probs' data, expected 'merged'"):
        store.read_merged(tmp_path / "x.zarr.zip")
