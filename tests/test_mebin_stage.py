"""The mebin stage: manifest + maps in, crop store + metrics out."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from anomalyncd import mebin, paths
from anomalyncd.config import MebinParams
from anomalyncd.datasets import Manifest, Record
from anomalyncd.io import InputError, read_image, write_image
from anomalyncd.store import MapSet, read_crops, read_maps, write_maps
from stages import mebin as stage

SIZES = [(64, 64), (48, 80), (64, 64), (40, 40)]


def _map(blobs, size=32):
    m = np.zeros((size, size), np.uint8)
    for x, y, r, v in blobs:
        m[y - r : y + r, x - r : x + r] = v
    return m


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    """Four images with 32 x 32 maps: one blob, two blobs, nothing, one faint blob."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    maps = np.stack(
        [
            _map([(10, 12, 5, 220)]),
            _map([(8, 8, 4, 250), (24, 22, 5, 180)]),
            _map([]),
            _map([(16, 16, 6, 120)]),
        ]
    )
    records = []
    for i, (h, w) in enumerate(SIZES):
        img = Path(f"imgs/{i}.png")
        write_image(img, rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        mask = ""
        if i == 0:  # ground truth where the first map's blob is
            gt = np.zeros((h, w), np.uint8)
            gt[20:30, 16:26] = 255
            mask = f"imgs/{i}_mask.png"
            write_image(mask, gt)
        records.append(Record(f"cat/test/x/{i}", str(img), mask, "x", "test", "cat", h, w))
    Manifest(records).write(paths.MANIFEST)
    write_maps(
        paths.MAPS,
        MapSet(
            ids=[r.id for r in records],
            maps=maps.astype(np.float32),
            maps_u8=maps,
            scores=maps.reshape(4, -1).max(1).astype(np.float32),
            image_sizes=np.array(SIZES),
        ),
    )
    Path("params.yaml").write_text(yaml.safe_dump({"mebin": {"crop_size": 16, "workers": 1}, "train": {"image_size": 16}}))
    return tmp_path


def _inputs():
    records = {r.id: r for r in Manifest.read(paths.MANIFEST).records}
    return read_maps(paths.MAPS), records


def test_stage_writes_mebin_crops_and_metrics(project):
    result = CliRunner().invoke(stage.app, ["--params", "params.yaml"])
    assert result.exit_code == 0, result.output
    cs = read_crops(paths.CROPS)
    assert (cs.attrs["lo"], cs.attrs["hi"]) == (0, 250)  # the empty map peaks at 0
    assert cs.attrs["crop_size"] == 16 and cs.attrs["sample_rate"] == 4
    assert cs.est_counts.tolist() == [1, 2, 0, 1]
    assert cs.thresholds[2] == 255 and cs.count_seqs.shape == (4, 64)
    assert [m.shape for m in cs.masks] == SIZES and not cs.masks[2].any()
    assert cs.image_index.tolist() == [0, 1, 1, 2, 3]
    assert cs.crops.shape == (5, 16, 16, 3) and set(np.unique(cs.crop_masks)) <= {0, 1}
    assert cs.boxes[3].tolist() == [0, 0, 64, 64]  # no anomaly: the whole image
    assert ((cs.scores >= 0) & (cs.scores <= 1)).all()
    metrics = json.loads(Path(paths.METRICS / "mebin.json").read_text())
    assert metrics["images"] == 4 and metrics["crops"] == 5 and metrics["images_without_anomaly"] == 1
    assert metrics["erosion"] == "keep_thin" and metrics["gt_regions"] == 1
    assert metrics["gt_regions_found"] == metrics["gt_regions_whole_in_a_crop"] == metrics["gt_pixels_in_crops"] == 1.0
    assert metrics["gt_mask_iou"] == 1.0  # the blob's region, eroded by MEBin, is the true square


def test_stage_matches_the_per_image_function_used_by_predict(project):
    ms, records = _inputs()
    cs, _ = stage.build_crops(ms, records, MebinParams(crop_size=16, workers=1, core=0.0, refine="off"), progress=False)
    image = read_image(records[ms.ids[1]].image)
    res, crops = mebin.mebin_image(ms.maps_u8[1], image, 0, 250, MebinParams(crop_size=16, core=0.0, refine="off"))
    assert res.threshold == cs.thresholds[1] and np.array_equal(res.mask, cs.masks[1])
    np.testing.assert_array_equal(crops.crops, cs.crops[cs.image_index == 1])
    np.testing.assert_array_equal(crops.boxes, cs.boxes[cs.image_index == 1])


def test_several_workers_give_the_same_crops_as_one(project):
    ms, records = _inputs()
    one, _ = stage.build_crops(ms, records, MebinParams(crop_size=16, workers=1, core=0.0, refine="off"), progress=False)
    two, _ = stage.build_crops(ms, records, MebinParams(crop_size=16, workers=2, core=0.0, refine="off"), progress=False)
    for f in dataclasses.fields(one):
        if f.name not in ("masks", "ids", "attrs"):
            np.testing.assert_array_equal(getattr(one, f.name), getattr(two, f.name), err_msg=f.name)
    assert all(np.array_equal(a, b) for a, b in zip(one.masks, two.masks))


def test_a_single_map_warns_about_the_empty_search_range_and_still_runs(project):
    ms, records = _inputs()
    one = MapSet(ms.ids[:1], ms.maps[:1], ms.maps_u8[:1], ms.scores[:1], ms.image_sizes[:1])
    with pytest.warns(RuntimeWarning, match="lo = 0"):
        cs, _ = stage.build_crops(one, records, MebinParams(crop_size=16, workers=1, core=0.0, refine="off"), progress=False)
    assert cs.attrs["lo"] == 0 and cs.est_counts.tolist() == [1]


def test_nan_maps_are_an_error_naming_the_image(project):
    ms, records = _inputs()
    ms.maps[3, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN.*cat/test/x/3"):
        stage.build_crops(ms, records, MebinParams(workers=1, crop_size=256, core=0.0, refine="off"), progress=False)


def test_an_image_changed_since_detect_is_an_error(project):
    ms, records = _inputs()
    write_image(records[ms.ids[0]].image, np.zeros((10, 12, 3), np.uint8))
    with pytest.raises(InputError, match="rerun detect"):
        stage.build_crops(ms, records, MebinParams(workers=1, crop_size=256, core=0.0, refine="off"), progress=False)


def test_out_of_range_params_are_an_error_naming_the_key(project):
    ms, records = _inputs()
    with pytest.raises(InputError, match="mebin.min_crop_size"):
        stage.build_crops(ms, records, MebinParams(min_crop_size=0.9, core=0.0, refine="off"), progress=False)
