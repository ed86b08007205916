"""benchmarks/bench_regions.py: the chain detector -> MEBin -> crops of a run, against its masks."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from anomalyncd import paths
from anomalyncd.datasets import Manifest, Record
from anomalyncd.io import InputError, write_image
from anomalyncd.store import MapSet, write_maps
from benchmarks.bench_regions import chain, report

SIZE, MAP = 64, 32


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch) -> Path:
    """A run after detect: six 64-px images of two types (squares, bars) with their masks, and
    maps that are the masks at 32 px, blurred (no crops store yet)."""
    monkeypatch.chdir(tmp_path)  # chain() moves into the run: the test's cwd is put back
    rng = np.random.default_rng(0)
    records, maps = [], []
    for i in range(6):
        t = "square" if i % 2 else "bar"
        gt = np.zeros((SIZE, SIZE), np.uint8)
        x, y = 8 + 6 * i, 10 + 4 * i
        if t == "square":
            gt[y : y + 14, x : x + 14] = 255
        else:
            gt[y : y + 6, x : x + 30] = 255
        image = rng.integers(90, 110, (SIZE, SIZE, 3), dtype=np.uint8)
        image[gt > 0] = 200 if t == "square" else 30
        write_image(tmp_path / f"imgs/{i}.png", image)
        write_image(tmp_path / f"imgs/{i}_mask.png", gt)
        records.append(Record(f"c/test/{t}/{i}", f"imgs/{i}.png", f"imgs/{i}_mask.png", t, "test", "c", SIZE, SIZE))
        maps.append(cv2.GaussianBlur(cv2.resize(gt.astype(np.float32), (MAP, MAP), interpolation=cv2.INTER_AREA), (0, 0), 1.0))
    maps = np.stack(maps)
    maps_u8 = np.round(maps / maps.max() * 255).astype(np.uint8)
    Manifest(records).write(tmp_path / paths.MANIFEST)
    write_maps(tmp_path / paths.MAPS, MapSet([r.id for r in records], maps, maps_u8, maps.reshape(6, -1).max(1),
                                             np.full((6, 2), SIZE), {"method": "ground_truth"}))
    params = {"detect": {"method": "ground_truth"}, "mebin": {"crop_size": 32, "workers": 1},
              "train": {"image_size": 32, "num_classes": 2}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def test_a_run_whose_maps_are_its_masks_scores_every_link_near_perfect(run_dir):
    out = chain(run_dir, [], rerun=True, progress=False)
    assert out["images"] == 6 and out["mebin_rerun"]
    assert out["detect"]["pixel_auroc"] > 0.99 and out["detect"]["aupro"] > 0.9
    m = out["mebin_mask"]
    assert m["regions"] == 6 and m["regions_hit"] == 6 and m["extra_regions_per_image"] == 0
    assert m["iou"] > 0.5 and m["recall"] > 0.5 and m["precision"] > 0.5
    assert out["crop_mask"]["regions_hit"] == 6
    assert out["crops_cover"]["gt_regions_found"] == 1.0 and out["crops_cover"]["gt_pixels_in_crops"] == 1.0
    b = out["baseline"]["image"]
    assert b["n"] == 6 and all(0 <= b[k] <= 1 for k in ("nmi", "f1")) and "computed here, k = 2" in out["baseline_source"]
    text = report(out)
    assert "region IoU" in text and "baseline" in text and "pixel AUROC" in text


def test_the_chain_is_also_split_by_defect_type_and_the_types_add_up_to_the_whole(run_dir):
    out = chain(run_dir, [], rerun=True, progress=False)
    per = out["per_type"]
    assert list(per) == ["bar", "square"]
    assert [r["images"] for r in per.values()] == [3, 3]
    assert sum(r["gt_regions"] for r in per.values()) == out["mebin_mask"]["regions"] == 6
    for r in per.values():  # maps that are the masks: each type's pixels ranked above its own background
        assert r["pixel_auroc_within"] > 0.99 and r["gt_regions_found"] == 1.0 and r["mebin_iou"] > 0.5
    assert sum(r["images_without_stable_interval"] for r in per.values()) == out["crops_cover"]["images_without_stable_interval"]
    assert "per type" in report(out) and "square" in report(out)


def test_a_mebin_param_set_on_the_command_line_reruns_mebin_with_it(run_dir):
    wide = chain(run_dir, ["mebin.erosion=off"], progress=False)
    assert wide["overrides"] == ["mebin.erosion=off"] and wide["mebin_params"]["erosion"] == "off"
    assert wide["mebin_rerun"]


def test_a_run_without_crops_needs_rerun_mebin_and_bad_overrides_are_refused(run_dir):
    with pytest.raises(InputError, match="--rerun-mebin"):
        chain(run_dir, [], progress=False)
    with pytest.raises(InputError, match="section.key=value"):
        chain(run_dir, ["core=0"], progress=False)


def test_remap_sigma_maps_the_images_again_with_the_runs_detector_and_that_smoothing(run_dir):
    from anomalyncd.config import DetectParams
    from anomalyncd.detect import LazyImages, create_detector
    from anomalyncd.detect.base import save_detector

    with pytest.raises(InputError, match="detector not found"):
        chain(run_dir, [], remap_sigma=0.0, progress=False)
    det = create_detector(DetectParams(method="patchcore", backbone="filterbank", layers=[1, 2], image_size=64,
                                       map_size=MAP, bank_size=64, device="cpu", smooth_sigma=4.0))
    det.fit(LazyImages([str(run_dir / f"imgs/{i}.png") for i in range(6)]))
    save_detector(det, run_dir / paths.DETECTOR)
    params = yaml.safe_load((run_dir / "params.yaml").read_text())
    params["detect"] = {"method": "patchcore", "smooth_sigma": 4.0}
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params))
    out = chain(run_dir, [], remap_sigma=0.0, progress=False)
    assert out["remap_sigma"] == 0.0 and out["mebin_rerun"] and out["images"] == 6
    assert out["mebin_params"]["core"] == 0.0  # core: auto is 0 on unsmoothed maps (0.6 at the run's sigma 4)
    assert "smooth_sigma 0" in report(out)


def test_maps_from_a_file_replace_the_runs_maps_on_the_same_chain(run_dir, tmp_path):
    from anomalyncd.store import read_maps

    own = chain(run_dir, [], rerun=True, progress=False)
    maps = read_maps(run_dir / paths.MAPS).maps
    np.save(tmp_path / "same.npy", maps)
    same = chain(run_dir, [], maps_file=tmp_path / "same.npy", progress=False)
    assert same["mebin_rerun"] and same["maps_file"].endswith("same.npy") and "maps from" in report(same)
    for link in ("detect", "mebin_mask", "crop_mask", "crops_cover"):
        assert same[link] == own[link]
    np.save(tmp_path / "flipped.npy", maps[:, ::-1, ::-1].copy())  # every region on the wrong side
    flipped = chain(run_dir, [], maps_file=tmp_path / "flipped.npy", progress=False)
    assert flipped["detect"]["pixel_auroc"] < own["detect"]["pixel_auroc"]
    assert flipped["mebin_mask"]["iou"] < own["mebin_mask"]["iou"]


def test_maps_from_a_file_of_another_shape_or_with_remap_sigma_are_refused(run_dir, tmp_path):
    np.save(tmp_path / "five.npy", np.zeros((5, MAP, MAP), np.float32))
    with pytest.raises(InputError, match=r"five.npy: expected finite square maps \(N, S, S\) for the run's 6 images"):
        chain(run_dir, [], maps_file=tmp_path / "five.npy", progress=False)
    np.save(tmp_path / "text.npy", np.full((6, MAP, MAP), "x"))
    with pytest.raises(InputError, match="text.npy: expected finite square maps"):
        chain(run_dir, [], maps_file=tmp_path / "text.npy", progress=False)
    (tmp_path / "bad.npy").write_text("not a numpy file")
    with pytest.raises(InputError, match="bad.npy: cannot read these maps"):
        chain(run_dir, [], maps_file=tmp_path / "bad.npy", progress=False)
    np.save(tmp_path / "ok.npy", np.zeros((6, MAP, MAP), np.float32))
    with pytest.raises(InputError, match="give one"):
        chain(run_dir, [], remap_sigma=2.0, maps_file=tmp_path / "ok.npy", progress=False)
