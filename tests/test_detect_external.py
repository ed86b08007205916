"""The ``external`` detector: map files in every supported layout and format, and its errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from anomalyncd.config import DetectParams
from anomalyncd.datasets import Record
from anomalyncd.detect import DetectContext, create_detector, normalise_u8
from anomalyncd.detect.external import read_map_file
from anomalyncd.io import InputError, InputWarning


def record(i: int, root: Path, h: int = 20, w: int = 30) -> Record:
    image = root / "data" / "tile" / "test" / "crack" / f"{i:03d}.png"
    return Record(f"tile/test/crack/{i:03d}", str(image), "", "crack", "test", "tile", h, w)


def ramp(h: int = 20, w: int = 30) -> np.ndarray:
    """A float map in [0, 1] rising left to right."""
    return np.tile(np.linspace(0, 1, w, dtype=np.float32), (h, 1))


def detect(records, maps_dir: Path, dataset_root: str = "", size: int = 16) -> np.ndarray:
    params = DetectParams(method="external", external_dir=str(maps_dir), map_size=size)
    return create_detector(params, DetectContext(dataset_root=dataset_root)).map_records(records)


def write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, arr)
    else:
        assert cv2.imwrite(str(path), arr)


def test_maps_match_by_image_id(tmp_path):
    recs = [record(i, tmp_path) for i in range(2)]
    for r in recs:
        write(tmp_path / "maps" / f"{r.id}.npy", ramp())
    out = detect(recs, tmp_path / "maps")
    assert out.shape == (2, 16, 16) and out.dtype == np.float32
    assert out[0, 0, 0] < 0.1 and out[0, 0, -1] > 0.9


def test_maps_match_by_path_under_dataset_root(tmp_path):
    r = record(0, tmp_path)
    write(tmp_path / "maps" / "tile" / "test" / "crack" / "000.npy", ramp())
    assert detect([r], tmp_path / "maps", dataset_root=str(tmp_path / "data")).shape == (1, 16, 16)


def test_maps_match_the_anomalyncd_published_layout(tmp_path):
    r = record(7, tmp_path)
    write(tmp_path / "maps" / "tile" / "crack" / "007.png", (ramp() * 255).astype(np.uint8))
    out = detect([r], tmp_path / "maps")
    assert out[0, 0, -1] > 0.9


def test_maps_match_by_unique_name_and_ignore_case(tmp_path):
    r = record(3, tmp_path)
    write(tmp_path / "maps" / "elsewhere" / "003.npy", ramp())
    write(tmp_path / "maps" / "TILE" / "Crack" / "004.npy", ramp())
    assert detect([r, record(4, tmp_path)], tmp_path / "maps").shape == (2, 16, 16)


@pytest.mark.parametrize(
    "name, arr, top",
    [
        ("a.png", (ramp() * 255).astype(np.uint8), 1.0),
        ("b.png", (ramp() * 65535).astype(np.uint16), 1.0),
        ("c.tif", (ramp() * 65535).astype(np.uint16), 1.0),
        ("d.tiff", ramp() * 7.0, 7.0),
        ("e.npy", ramp() * 3.0, 3.0),
    ],
)
def test_map_files_are_read_as_float_in_their_range(tmp_path, name, arr, top):
    write(tmp_path / name, arr)
    m = read_map_file(tmp_path / name)
    assert m.dtype == np.float32 and m.shape == (20, 30)
    assert m.min() == pytest.approx(0.0) and m.max() == pytest.approx(top, rel=1e-3)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16, np.uint8])
def test_integer_npy_maps_keep_their_values(tmp_path, dtype):
    arr = (ramp() * 200).astype(dtype)
    write(tmp_path / "m.npy", arr)
    np.testing.assert_array_equal(read_map_file(tmp_path / "m.npy"), arr.astype(np.float32))


def test_int64_maps_give_the_same_0_to_255_maps_as_float_maps(tmp_path):
    """int64 maps divided by 9.2e18 became all zero after normalisation, with a perfect AUROC."""
    recs = [record(i, tmp_path) for i in range(2)]
    for kind, dtype in (("int", np.int64), ("float", np.float32)):
        for i, r in enumerate(recs):
            write(tmp_path / kind / f"{r.id}.npy", np.round(ramp() * 100 * (i + 1)).astype(dtype))
    a, b = detect(recs, tmp_path / "int"), detect(recs, tmp_path / "float")
    np.testing.assert_allclose(a, b)
    u8 = normalise_u8(a, float(a.min()), float(a.max()))
    assert u8.max() == 255 and (u8[1] > 128).sum() > 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_maps_are_an_error_naming_the_file(tmp_path, bad):
    arr = ramp()
    arr[3, 4] = bad
    write(tmp_path / "m.npy", arr)
    with pytest.raises(InputError, match="m.npy: map has 1 NaN or infinite values"):
        read_map_file(tmp_path / "m.npy")


def test_two_images_with_one_name_in_different_folders_do_not_share_a_map(tmp_path):
    a = Record("ds/a/000", str(tmp_path / "ds" / "a" / "000.png"), "", "", "test", "ds")
    b = Record("ds/b/000", str(tmp_path / "ds" / "b" / "000.png"), "", "", "test", "ds")
    write(tmp_path / "maps" / "000.npy", ramp())
    with pytest.raises(InputError, match=r"000.npy: the one map of 2 images \(ds/a/000, ds/b/000\)"):
        detect([a, b], tmp_path / "maps")


def test_two_categories_do_not_share_a_defect_type_map(tmp_path):
    tile = record(0, tmp_path)
    wood = Record("wood/test/crack/000", str(tmp_path / "data/wood/test/crack/000.png"), "", "crack", "test", "wood")
    write(tmp_path / "maps" / "crack" / "000.npy", ramp())  # key 4: <defect_type>/<image_name>
    with pytest.raises(InputError, match="the one map of 2 images"):
        detect([tile, wood], tmp_path / "maps")


def test_colour_heat_map_is_an_error(tmp_path):
    arr = np.zeros((20, 30, 3), np.uint8)
    arr[..., 2] = 255
    write(tmp_path / "m.png", arr)
    with pytest.raises(InputError, match="one-channel"):
        read_map_file(tmp_path / "m.png")


def test_missing_maps_are_an_error_listing_the_first_ids(tmp_path):
    recs = [record(i, tmp_path) for i in range(9)]
    write(tmp_path / "maps" / f"{recs[0].id}.npy", ramp())
    with pytest.raises(InputError) as e:
        detect(recs, tmp_path / "maps")
    msg = str(e.value)
    assert "8 of 9" in msg and "tile/test/crack/001" in msg and "tile/test/crack/005" in msg
    assert "tile/test/crack/008" not in msg and "..." in msg


def test_map_of_another_size_is_resized_with_a_warning(tmp_path):
    r = record(0, tmp_path)
    write(tmp_path / "maps" / f"{r.id}.npy", ramp(40, 60))
    with pytest.warns(InputWarning, match="resized"):
        out = detect([r], tmp_path / "maps")
    assert out.shape == (1, 16, 16)


def test_missing_folder_and_empty_folder_are_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        detect([record(0, tmp_path)], tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no map files"):
        detect([record(0, tmp_path)], tmp_path / "empty")


def test_external_detector_cannot_map_new_images(tmp_path):
    det = create_detector(DetectParams(method="external", external_dir=str(tmp_path)))
    with pytest.raises(InputError, match="cannot map new images"):
        det.predict([np.zeros((8, 8, 3), np.uint8)])
