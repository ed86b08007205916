"""Region descriptors from the detector's residuals (anomalyncd.residual)."""

from __future__ import annotations

import numpy as np
import torch

from anomalyncd.config import DetectParams
from anomalyncd.detect import create_detector
from anomalyncd.detect.patchcore import PatchCore
from anomalyncd.detect.ops import bank_index, nearest_distance, nearest_index
from anomalyncd.residual import pool_regions


def test_a_region_is_the_mean_of_the_cells_its_mask_covers_scaled_to_unit_length():
    grid = np.zeros((4, 4, 2), np.float32)
    grid[:2, :2] = [3.0, 0.0]  # the top-left quarter departs along the first axis
    grid[2:, 2:] = [0.0, 5.0]  # the bottom-right one along the second
    mask = np.zeros((40, 40), bool)
    mask[:20, :20] = mask[20:, 20:] = True
    out = pool_regions(grid, mask, np.array([[0, 0, 20, 20], [20, 20, 40, 40]]))
    np.testing.assert_allclose(out, [[1.0, 0.0], [0.0, 1.0]], atol=1e-6)


def test_a_region_without_its_mask_pools_its_box_and_no_box_pools_the_whole_mask():
    grid = np.zeros((4, 4, 2), np.float32)
    grid[:2, :2] = [1.0, 0.0]
    grid[2:, 2:] = [0.0, 1.0]
    mask = np.zeros((40, 40), bool)
    mask[20:, 20:] = True
    out = pool_regions(grid, mask, np.array([[0, 0, 20, 20], [0, 0, 0, 0]]))
    np.testing.assert_allclose(out, [[1.0, 0.0], [0.0, 1.0]], atol=1e-6)
    assert np.allclose(np.linalg.norm(out, axis=1), 1)


def test_the_strength_of_a_departure_does_not_change_its_descriptor():
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(6, 6, 8)).astype(np.float32)
    mask = np.zeros((60, 60), bool)
    mask[10:40, 20:50] = True
    box = np.array([[20, 10, 50, 40]])
    np.testing.assert_allclose(pool_regions(3 * grid, mask, box), pool_regions(grid, mask, box), atol=1e-6)


def test_nearest_index_is_the_row_nearest_distance_measures(rng):
    bank = torch.from_numpy(rng.normal(size=(300, 400)).astype(np.float32))
    query = torch.from_numpy(rng.normal(size=(200, 400)).astype(np.float32))
    idx = nearest_index(query, bank, index=bank_index(bank))
    torch.testing.assert_close(torch.cdist(query.double(), bank.double()).argmin(1), idx)
    torch.testing.assert_close((query - bank[idx]).norm(dim=1), nearest_distance(query, bank, index=bank_index(bank)))


def test_patchcore_residuals_are_each_patch_minus_its_nearest_bank_entry_on_the_region_maps_grid(rng):
    from .test_detect import surface, with_spot

    det = create_detector(DetectParams(method="patchcore", backbone="resnet18", layers=[1, 2], image_size=64, map_size=32,
                                       device="cpu", pretrained=False, bank_size=50, scales=[1.0, 0.5]))
    det.fit([surface(rng, 64) for _ in range(6)])
    img = with_spot(surface(rng, 64))
    r = det.residuals(img)
    f = det.patch_grid([img])
    d1 = f.shape[1] // 2
    assert r.shape == (*f.shape[-2:], d1)
    # the pass that maps the image gives the same grid, bit for bit
    np.testing.assert_array_equal(det.predict_described([img])[2][0], r)
    np.testing.assert_array_equal(det.predict_described([img])[0], det.predict([img]))
    # the residual's length is the region map's grid distance (its bank: the first bank_size entries)
    q = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])[:, :d1]
    np.testing.assert_allclose(np.linalg.norm(r.reshape(-1, d1), axis=1), nearest_distance(q, det.bank[:50, :d1]).numpy(), rtol=1e-4, atol=1e-4)


def test_an_image_whose_score_map_needs_no_regions_skips_its_region_search_and_keeps_its_score_map(rng):
    from .test_detect import surface, with_spot

    det = create_detector(DetectParams(method="patchcore", backbone="resnet18", layers=[1, 2], image_size=64, map_size=32,
                                       device="cpu", pretrained=False, bank_size=50, scales=[1.0, 0.5]))
    det.fit([surface(rng, 64) for _ in range(6)])
    images = [with_spot(surface(rng, 64)), surface(rng, 64), with_spot(surface(rng, 64))]
    maps, scored, grids = det.predict_described(images)
    asked = []
    # the second image declined (the images are mapped side by side: asked in any order)
    wanted = lambda m: asked.append(m) or not np.array_equal(m[0], scored[1])  # noqa: E731
    g_maps, g_scored, g_grids = det.predict_described(images, wanted)
    assert len(asked) == 3 and all(a.shape == (1, 32, 32) for a in asked)
    np.testing.assert_array_equal(g_scored, scored)  # every score map, as before
    for i in (0, 2):  # the wanted images: their regions and grids bit for bit
        np.testing.assert_array_equal(g_maps[i], maps[i])
        np.testing.assert_array_equal(g_grids[i], grids[i])
    assert g_grids[1] is None and not g_maps[1].any()


def test_the_mebin_stage_stores_each_crops_residual_descriptor_from_the_runs_memory_bank(tmp_path, tiny_demo, monkeypatch):
    import yaml

    from anomalyncd import paths
    from anomalyncd.config import DatasetParams
    from anomalyncd.datasets import Manifest, build_manifest, read_dataset
    from anomalyncd.detect import load_detector
    from anomalyncd.io import read_image
    from anomalyncd.store import read_crops
    from stages.detect import main as detect
    from stages.mebin import main as mebin

    monkeypatch.chdir(tmp_path)
    build_manifest(read_dataset(DatasetParams(layout="mvtec", root=str(tiny_demo))), progress=False).write(paths.MANIFEST)
    tiny = {"map_size": 32, "image_size": 32, "device": "cpu", "backbone": "filterbank", "layers": [1, 2, 4],
            "pretrained": False, "bank_size": 200}
    for method, residuals, dim in (("patchcore", True, None), ("patchcore", False, 0), ("ground_truth", True, None),
                                   ("musc", True, 0)):
        params = {"dataset": {"layout": "mvtec", "root": str(tiny_demo)}, "detect": {**tiny, "method": method},
                  "mebin": {"residuals": residuals, "workers": 1}}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        detect(params=tmp_path / "params.yaml")
        mebin(params=tmp_path / "params.yaml")
        cs = read_crops(paths.CROPS)
        if dim is not None:  # off, or a detector without a memory bank: none
            assert cs.residuals.shape == (len(cs.crops), 0)
            continue
        det = load_detector(paths.DETECTOR)
        if method == "ground_truth":  # the masks draw the regions; a bank of every normal training image describes them
            bank = PatchCore(det.params)
            bank.fit([read_image(r.image) for r in Manifest.read(paths.MANIFEST).train_normal()])
            # its coreset stops at bank_size: the region map's bank, which the descriptors read
            assert len(det.describer.bank) == min(200, len(bank.bank)) < len(bank.bank)
            np.testing.assert_array_equal(det.describer.bank.numpy(), bank.bank[:200].numpy())
        assert cs.residuals.shape == (len(cs.crops), det.residual_dim) and det.residual_dim > 0
        np.testing.assert_allclose(np.linalg.norm(cs.residuals, axis=1), 1.0, rtol=1e-5)
        records = Manifest.read(paths.MANIFEST).by_id()
        i = int(cs.image_index[0])
        rows = np.flatnonzero(cs.image_index == i)
        want = pool_regions(det.residuals(read_image(records[cs.ids[i]].image)), cs.masks[i], cs.regions[rows])
        np.testing.assert_allclose(cs.residuals[rows], want, rtol=1e-5, atol=1e-6)


def test_maps_made_elsewhere_are_described_by_a_bank_fitted_beside_them_and_saved_with_them(tmp_path):
    import pytest

    from anomalyncd.detect import load_detector, save_detector
    from anomalyncd.io import InputError

    p = DetectParams(method="external", image_size=32, device="cpu", backbone="filterbank", layers=[1, 2, 4], pretrained=False,
                     bank_size=50, scales=[1.0])
    rng = np.random.default_rng(0)
    normal = [rng.integers(100, 140, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    image = normal[0].copy()
    image[8:16, 8:16] = 255
    bare = create_detector(p)
    assert bare.residual_dim == 0  # no normal images: no descriptors, and asking for them says why
    with pytest.raises(InputError, match="no memory bank"):
        bare.residuals(image)
    det = create_detector(p)
    det.fit(normal)
    alone = PatchCore(p)
    alone.fit(normal)
    assert det.residual_dim == alone.residual_dim > 0
    np.testing.assert_array_equal(det.residuals(image), alone.residuals(image))
    save_detector(det, tmp_path / "detector.pt")
    np.testing.assert_array_equal(load_detector(tmp_path / "detector.pt").residuals(image), alone.residuals(image))
    save_detector(bare, tmp_path / "bare.pt")
    assert load_detector(tmp_path / "bare.pt").residual_dim == 0
