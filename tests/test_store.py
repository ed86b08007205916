import os
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from anomalyncd import store
from anomalyncd.io import InputError

from .conftest import ROOT


def _maps(n=3, s=8):
    rng = np.random.default_rng(0)
    return store.MapSet(
        ids=[f"cat/test/x/{i}" for i in range(n)],
        maps=rng.random((n, s, s), dtype=np.float32),
        maps_u8=rng.integers(0, 256, (n, s, s), dtype=np.uint8),
        scores=rng.random(n, dtype=np.float32),
        image_sizes=np.array([[10, 12]] * n),
        attrs={"method": "test", "norm_min": 0.0},
    )


def _crops():
    return store.CropSet(
        ids=["a", "b"],
        image_sizes=np.array([[10, 12], [7, 9]]),
        thresholds=np.array([100, 255]),
        est_counts=np.array([2, 0]),
        count_seqs=np.array([[1, 2, 2], [0, 0, 0]]),
        masks=[np.eye(10, 12, dtype=bool), np.zeros((7, 9), bool)],
        crops=np.full((3, 4, 4, 3), 7, np.uint8),
        crop_masks=np.ones((3, 4, 4), np.uint8),
        image_index=np.array([0, 0, 1]),
        boxes=np.array([[0, 0, 4, 4], [4, 4, 8, 8], [0, 0, 7, 7]]),
        areas=np.array([4, 3, 0]),
        scores=np.array([0.9, 0.5, 0.1]),
        attrs={"lo": 10, "hi": 200},
    )


def test_maps_round_trip(tmp_path):
    ms = _maps()
    store.write_maps(tmp_path / "m.zarr.zip", ms)
    back = store.read_maps(tmp_path / "m.zarr.zip")
    assert back.ids == ms.ids and back.attrs == ms.attrs
    np.testing.assert_array_equal(back.maps, ms.maps)
    np.testing.assert_array_equal(back.maps_u8, ms.maps_u8)


def test_crops_round_trip_keeps_ragged_full_size_masks(tmp_path):
    cs = _crops()
    store.write_crops(tmp_path / "c.zarr.zip", cs)
    back = store.read_crops(tmp_path / "c.zarr.zip")
    assert [m.shape for m in back.masks] == [(10, 12), (7, 9)]
    np.testing.assert_array_equal(back.masks[0], cs.masks[0])
    np.testing.assert_array_equal(back.boxes, cs.boxes)
    assert back.crop_ids == ["a#0", "a#1", "b#0"]
    assert back.attrs["lo"] == 10


def test_a_store_is_a_single_file(tmp_path):
    store.write_crops(tmp_path / "c.zarr.zip", _crops())
    assert [p.name for p in tmp_path.iterdir()] == ["c.zarr.zip"]


def test_failed_write_leaves_the_previous_store_untouched(tmp_path):
    path = tmp_path / "m.zarr.zip"
    store.write_maps(path, _maps())
    before = path.read_bytes()
    bad = _maps()
    bad.maps = object()  # not an array: writing fails midway
    with pytest.raises(Exception):
        store.write_maps(path, bad)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.zarr.zip"]


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="scores has 2 rows, expected 3"):
        store.MapSet(ids=["a", "b", "c"], maps=np.zeros((3, 2, 2)), maps_u8=np.zeros((3, 2, 2)),
                     scores=np.zeros(2), image_sizes=np.zeros((3, 2)))


def test_reading_the_wrong_kind_names_the_file(tmp_path):
    store.write_maps(tmp_path / "m.zarr.zip", _maps())
    with pytest.raises(InputError, match="m.zarr.zip.*holds 'maps' data, expected 'crops'"):
        store.read_crops(tmp_path / "m.zarr.zip")


def test_missing_store_says_which_stage_to_run(tmp_path):
    with pytest.raises(InputError, match="store not found"):
        store.read_maps(tmp_path / "nope.zarr.zip")


def test_corrupt_store_is_a_clear_error(tmp_path):
    (tmp_path / "m.zarr.zip").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable anomalyncd store"):
        store.read_maps(tmp_path / "m.zarr.zip")


def test_same_arrays_give_byte_identical_stores(tmp_path):
    import time

    store.write_crops(tmp_path / "a.zarr.zip", _crops())
    time.sleep(2.1)  # zip entries carry a modification time with 2-second resolution
    store.write_crops(tmp_path / "b.zarr.zip", _crops())
    assert (tmp_path / "a.zarr.zip").read_bytes() == (tmp_path / "b.zarr.zip").read_bytes()


def _flip_a_byte_of(path, member: str) -> None:
    """Change one byte inside ``member``'s stored data: the zip stays readable, its CRC does not match."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_store_whose_data_fails_its_crc_is_a_clear_error(tmp_path):
    path = tmp_path / "m.zarr.zip"
    store.write_maps(path, _maps())
    with zipfile.ZipFile(path) as zf:
        member = next(n for n in zf.namelist() if n.startswith("maps/c/"))
    _flip_a_byte_of(path, member)
    with pytest.raises(InputError, match="m.zarr.zip: not a readable anomalyncd store .*CRC"):
        store.read_maps(path)


KILLED_WRITE = """
import os, signal, sys, zipfile
from tests.test_store import _maps
from anomalyncd import store
zipfile.ZipFile.writestr = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # killed while zipping
store.write_maps(sys.argv[1], _maps())
"""


def test_what_a_killed_write_leaves_is_beside_the_store_and_removed_by_the_next(tmp_path):
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "out" / "m.zarr.zip"
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITE, str(out)], cwd=ROOT, env=env)
    assert proc.wait() == -signal.SIGKILL
    assert list((tmp_path / "tmp").iterdir()) == []  # nothing in $TMPDIR, where no later run would look
    left = {p.name for p in out.parent.iterdir()}
    assert left == {f".m.zarr.zip.tmp-{proc.pid}", f".m.zarr.zip.tmp-{proc.pid}.d"}
    store.write_maps(out, _maps())
    assert [p.name for p in out.parent.iterdir()] == ["m.zarr.zip"]
