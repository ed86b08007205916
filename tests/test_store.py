import dataclasses
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
        regions=np.array([[0, 0, 4, 4], [4, 4, 7, 8], [0, 0, 0, 0]]),
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
    np.testing.assert_array_equal(back.regions, cs.regions)
    assert back.crop_ids == ["a#0", "a#1", "b#0"]
    assert back.attrs["lo"] == 10


def test_a_crops_store_without_the_defect_boxes_names_the_stage_to_rerun(tmp_path):
    path = tmp_path / "c.zarr.zip"
    arrays = {f.name: getattr(_crops(), f.name) for f in dataclasses.fields(store.CropSet)
              if f.name not in ("ids", "masks", "attrs", "regions")}
    store.write_group(path, "crops", {**arrays, "masks/0": np.zeros((10, 12), np.uint8), "masks/1": np.zeros((7, 9), np.uint8)},
                      {"ids": ["a", "b"]})
    for lazy in (False, True):
        with pytest.raises(InputError, match=r"no \['regions'\]; rerun mebin"):
            store.read_crops(path, lazy=lazy)


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


# -- streaming: rows appended chunk by chunk -------------------------------------------------


def _write_rows(path, rows, splits):
    """Append ``rows`` to array ``x`` of a store at ``path`` in pieces ending at ``splits``."""
    with store.StoreWriter(path, "test", {"n": len(rows)}) as w:
        w.declare("x", rows.shape[1:], rows.dtype)
        a = 0
        for b in [*splits, len(rows)]:
            w.append("x", rows[a:b])
            a = b


def test_rows_appended_in_any_pieces_give_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "CHUNK_BYTES", 3 * 4 * 4)  # 3 rows per chunk: many chunks, a partial last one
    rows = np.arange(10 * 4, dtype=np.float32).reshape(10, 4)
    _write_rows(tmp_path / "one.zarr.zip", rows, [])
    _write_rows(tmp_path / "ones.zarr.zip", rows, list(range(1, 10)))
    _write_rows(tmp_path / "odd.zarr.zip", rows, [2, 7])
    one = (tmp_path / "one.zarr.zip").read_bytes()
    assert (tmp_path / "ones.zarr.zip").read_bytes() == one and (tmp_path / "odd.zarr.zip").read_bytes() == one
    with store.StoreReader(tmp_path / "one.zarr.zip", "test") as r:
        np.testing.assert_array_equal(r.read("x"), rows)
        assert r.attrs == {"n": 10} and len(r["x"]) == 10
        np.testing.assert_array_equal(r["x"][3:5], rows[3:5])


def test_a_writer_holds_at_most_a_chunk_of_rows_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "CHUNK_BYTES", 4 * 8)  # 4 rows of 8 bytes
    with store.StoreWriter(tmp_path / "s.zarr.zip", "test") as w:
        for i in range(10):
            w.append("x", np.full((1, 2), i, np.float32))
            assert w._columns["x"].buffered < 4
        assert w.rows("x") == 10
        np.testing.assert_array_equal(w.read("x", 8, 10), [[8, 8], [9, 9]])


def test_an_error_mid_stream_leaves_no_store_and_the_previous_one_untouched(tmp_path):
    path = tmp_path / "s.zarr.zip"
    _write_rows(path, np.zeros((4, 2)), [])
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk on fire"):
        with store.StoreWriter(path, "test") as w:
            w.append("x", np.ones((3, 2)))
            raise RuntimeError("disk on fire")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr.zip"]


KILLED_STREAM = """
import os, signal, sys
import numpy as np
from anomalyncd import store
with store.StoreWriter(sys.argv[1], "test") as w:
    for i in range(100):
        w.append("x", np.full((1, 1000), i, np.float32))
        if i == 50:
            os.kill(os.getpid(), signal.SIGKILL)  # killed mid-stream
"""


def test_a_store_killed_mid_stream_is_never_there_for_a_later_stage(tmp_path):
    out = tmp_path / "out" / "s.zarr.zip"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_STREAM, str(out)], cwd=ROOT, env=env)
    assert proc.wait() == -signal.SIGKILL
    assert not out.exists()
    assert {p.name for p in out.parent.iterdir()} <= {f".s.zarr.zip.tmp-{proc.pid}", f".s.zarr.zip.tmp-{proc.pid}.d"}
    with pytest.raises(InputError, match="store not found"):
        store.StoreReader(out, "test")
    _write_rows(out, np.zeros((2, 2)), [])  # the next write removes what the killed one left
    assert [p.name for p in out.parent.iterdir()] == ["s.zarr.zip"]


def test_lazy_crops_read_their_pixels_on_access_only(tmp_path):
    store.write_crops(tmp_path / "c.zarr.zip", _crops())
    eager, lazy = store.read_crops(tmp_path / "c.zarr.zip"), store.read_crops(tmp_path / "c.zarr.zip", lazy=True)
    assert isinstance(lazy.crops, store.LazyRows) and isinstance(lazy.masks, store.LazyMasks)
    assert len(lazy.crops) == 3 and lazy.crops.shape == (3, 4, 4, 3)
    np.testing.assert_array_equal(lazy.crops[1:3], eager.crops[1:3])
    np.testing.assert_array_equal(lazy.boxes, eager.boxes)
    assert lazy.crop_ids == eager.crop_ids
    assert all(np.array_equal(a, b) for a, b in zip(lazy.masks, eager.masks))
    assert lazy.masks[0].dtype == bool


def test_lazy_maps_read_chunks_of_rows(tmp_path):
    ms = _maps(5)
    store.write_maps(tmp_path / "m.zarr.zip", ms)
    lazy = store.read_maps(tmp_path / "m.zarr.zip", lazy=True)
    np.testing.assert_array_equal(lazy.maps_u8[1:4], ms.maps_u8[1:4])
    np.testing.assert_array_equal(lazy.scores, ms.scores)


def test_lazy_rows_iterate_to_their_last_row(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "MAX_CHUNK_ROWS", 2)  # rows over several chunks, the last one short
    ms = _maps(5)
    store.write_maps(tmp_path / "m.zarr.zip", ms)
    rows = list(store.read_maps(tmp_path / "m.zarr.zip", lazy=True).maps_u8)
    assert len(rows) == 5 and all(np.array_equal(a, b) for a, b in zip(rows, ms.maps_u8))


def test_lazy_probs_load_the_probabilities_and_leave_the_features_in_the_store(tmp_path):
    rng = np.random.default_rng(0)
    ps = store.ProbSet(probs=rng.random((4, 2, 3), np.float32), logits=rng.random((4, 2, 3), np.float32),
                       features=rng.random((4, 8), np.float32), baseline_features=rng.random((4, 5), np.float32),
                       head=1, attrs={"num_labeled": 0})
    store.write_probs(tmp_path / "p.zarr.zip", ps)
    lazy = store.read_probs(tmp_path / "p.zarr.zip", lazy=True)
    assert isinstance(lazy.probs, np.ndarray) and lazy.head == 1 and lazy.attrs == {"num_labeled": 0}
    assert all(isinstance(getattr(lazy, n), store.LazyRows) for n in store.PROB_FEATURES)
    np.testing.assert_array_equal(lazy.probs, ps.probs)
    np.testing.assert_array_equal(lazy.features[1:3], ps.features[1:3])
