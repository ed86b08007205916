"""Built-in detectors on tiny data: PatchCore, MuSc, ground truth; saving and loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalyncd.config import DetectParams
from anomalyncd.datasets import Record
from anomalyncd.detect import DETECTORS, create_detector, load_detector, save_detector
from anomalyncd.detect.features import BackboneSpec, build_backbone
from anomalyncd.filterbank import FilterBank
from anomalyncd.detect.musc import mean_of_smallest, mutual_scores, split_subsets
from anomalyncd.detect.ops import (
    bank_index, greedy_coreset, nearest_distance, nearest_distance_full, nearest_index, query_blocks, upsample_maps,
)
from anomalyncd.detect.backbone import patch_features
from anomalyncd.detect.padim import gaussian_stats, mahalanobis
from anomalyncd.io import InputError, load_torch, read_image, save_torch, write_image

from .conftest import MTD, requires_mtd


def surface(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A smooth grey texture, RGB uint8 (size, size, 3)."""
    base = rng.normal(128, 6, (size, size)).astype(np.float32)
    return np.repeat(np.clip(base, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def with_spot(img: np.ndarray) -> np.ndarray:
    """``img`` with a dark 6x6 square at (8..14, 8..14)."""
    out = img.copy()
    out[8:14, 8:14] = 20
    return out


def params(**kw) -> DetectParams:
    base = dict(
        map_size=32, image_size=32, device="cpu", batch_size=4, bank_size=100, backbone="filterbank",
        layers=[1, 2, 4], pretrained=False, smooth_sigma=2.0,
    )
    return DetectParams(**{**base, **kw})


def spot_contrast(maps: np.ndarray) -> float:
    """Mean map inside the spot minus mean far from it (maps (N, 32, 32))."""
    return float(maps[:, 9:13, 9:13].mean() - maps[:, 20:, 20:].mean())


def test_registry_holds_the_four_methods():
    assert set(DETECTORS) == {"patchcore", "padim", "musc", "external", "ground_truth"}


def test_filter_bank_has_no_weights_and_keeps_resolution():
    fb = FilterBank([1.0, 2.0])
    (f,) = fb(torch.rand(2, 3, 24, 20))
    assert f.shape == (2, fb.channels, 24, 20)
    assert sum(p.numel() for p in fb.parameters()) == 0


def test_filter_bank_channels_are_found_by_name_at_each_scale():
    fb = FilterBank([1.0, 2.0])
    assert fb.channel_index(["intensity", "red_green", "yellow_blue"]) == [0, 6, 7]
    assert fb.channel_index(["std"], scale=1) == [fb.per_scale + 1]
    with pytest.raises(ValueError, match="colour"):
        fb.channel_index(["colour"])


def test_filter_bank_ignores_global_brightness_and_contrast():
    fb = FilterBank([1.0, 4.0])
    x = torch.rand(1, 3, 32, 32) * 0.5
    (a,) = fb(x)
    (b,) = fb(x * 1.5 + 0.2)
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("name, layers", [("resnet18", [1, 2]), ("vit_tiny_patch16_224", [1, 2])])
def test_timm_backbone_with_random_weights_gives_one_map_per_layer(name, layers):
    net = build_backbone(BackboneSpec(name=name, layers=layers, image_size=32))
    with torch.inference_mode():
        out = net(torch.rand(1, 3, 32, 32))
    assert len(out) == 2 and all(f.ndim == 4 for f in out)


def test_random_backbone_weights_depend_only_on_the_seed():
    a = build_backbone(BackboneSpec(name="resnet18", layers=[1], seed=3))
    b = build_backbone(BackboneSpec(name="resnet18", layers=[1], seed=3))
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(a(x)[0], b(x)[0])


def test_missing_checkpoint_is_an_error(tmp_path):
    with pytest.raises(InputError, match="checkpoint"):
        build_backbone(BackboneSpec(name="resnet18", layers=[1], checkpoint=str(tmp_path / "no.pth")))


def test_unknown_timm_model_is_an_error():
    with pytest.raises(InputError, match="not a timm model"):
        build_backbone(BackboneSpec(name="no_such_net", layers=[1]))


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_layers_out_of_range_for_the_backbone_is_an_error(name):
    with pytest.raises(InputError, match="detect.layers"):
        build_backbone(BackboneSpec(name=name, layers=[1, 2, 4, 8, 16], image_size=32))


def test_greedy_coreset_picks_the_far_points_first():
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [0.0, 10.0], [0.05, 0.05]])
    idx = greedy_coreset(x, 3, seed=0, progress=False).tolist()
    assert set(idx) >= {2, 3}


def test_nearest_distance_matches_brute_force(rng):
    q, b = torch.from_numpy(rng.normal(size=(50, 3))), torch.from_numpy(rng.normal(size=(40, 3)))
    torch.testing.assert_close(nearest_distance(q, b), torch.cdist(q, b).min(1).values)


@pytest.mark.parametrize("backbone, layers", [("filterbank", [1, 2, 4]), ("resnet18", [1, 2])])
def test_patchcore_scores_a_defect_above_its_surroundings(rng, backbone, layers):
    train = [surface(rng) for _ in range(6)]
    test = [with_spot(surface(rng)) for _ in range(3)]
    det = create_detector(params(method="patchcore", backbone=backbone, layers=layers))
    det.fit(train)
    maps = det.predict(test)
    assert maps.shape == (3, 32, 32) and maps.dtype == np.float32
    assert spot_contrast(maps) > 0


@pytest.mark.parametrize("grid_layer, side", [(0, 16), (1, 8), (2, 4)])
def test_patch_features_meet_on_the_grid_of_the_chosen_layer(grid_layer, side):
    layers = [torch.ones(2, 3, 16, 16), torch.ones(2, 5, 8, 8), torch.ones(2, 7, 4, 4)]
    assert patch_features(layers, 1, grid_layer).shape == (2, 15, side, side)


def test_patch_features_pool_a_finer_layer_onto_the_grid_as_its_mean():
    fine = torch.arange(16.0).view(1, 1, 4, 4)
    coarse = torch.zeros(1, 1, 2, 2)
    f = patch_features([fine, coarse], 1, 1)
    assert f.shape == (1, 2, 2, 2)
    # the 3x3 neighbourhood mean, then 2x2 averages: the grid keeps the finer layer's mean
    assert torch.isclose(f[0, 0].mean(), fine.mean())


def test_grid_layer_must_index_the_layers():
    with pytest.raises(InputError, match="detect.grid_layer"):
        params(grid_layer=3)  # layers [1, 2, 4]: indices 0..2
    with pytest.raises(InputError, match="detect.grid_layer"):
        params(grid_layer=-1)


def test_patchcore_on_the_second_layers_grid_maps_at_the_map_size(rng):
    det = create_detector(params(method="patchcore", backbone="resnet18", layers=[1, 2], grid_layer=1, image_size=64,
                                 pretrained=False))
    det.fit([surface(rng, 64) for _ in range(4)])
    assert det.patch_grid([surface(rng, 64)]).shape[-2:] == (8, 8)  # resnet18 index 2: stride 8 (index 1: 16 x 16)
    assert det.predict([with_spot(surface(rng, 64))]).shape == (1, 32, 32)


def test_patchcore_concatenates_the_features_of_each_scale_on_the_first_scales_grid(rng):
    one = create_detector(params(method="patchcore", backbone="resnet18", layers=[1, 2], image_size=64, scales=[1.0]))
    two = create_detector(params(method="patchcore", backbone="resnet18", layers=[1, 2], image_size=64, scales=[1.0, 0.5]))
    img = [surface(rng, 64)]
    f1, f2 = one.patch_grid(img), two.patch_grid(img)
    assert f2.shape[1] == 2 * f1.shape[1] and f2.shape[-2:] == f1.shape[-2:]
    torch.testing.assert_close(f2[:, : f1.shape[1]], f1)  # the first scale's features unchanged
    two.fit([surface(rng, 64) for _ in range(4)])
    assert two.bank.shape[1] == f2.shape[1]
    assert two.predict([with_spot(surface(rng, 64))]).shape == (1, 32, 32)


def test_with_two_scales_the_score_map_uses_both_and_the_region_map_the_first_of_the_same_bank(rng):
    det = create_detector(params(method="patchcore", backbone="resnet18", layers=[1, 2], image_size=64, scales=[1.0, 0.5]))
    det.fit([surface(rng, 64) for _ in range(6)])
    img = [with_spot(surface(rng, 64))]
    maps, scored = det.predict_scored(img)
    np.testing.assert_array_equal(det.predict(img), maps)
    # each is the nearest-neighbour distance over its features, upsampled and smoothed alike
    f = det.patch_grid(img)
    q = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
    d1 = f.shape[1] // 2
    sigma = det.params.smooth_sigma * det.params.map_size / 64
    region = det.bank[: det.params.bank_size, :d1]  # the first bank_size entries, the first scale's dims
    for got, dist in ((maps, nearest_distance_full(q[:, :d1], region)), (scored, nearest_distance_full(q, det.bank))):
        want = upsample_maps(dist.view(1, *f.shape[-2:]), det.params.map_size, sigma).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # both stay aligned with the image: the spot (px 8..14 of 64, map px 4..7 of 32) is each map's peak
    for m in (maps[0], scored[0]):
        assert np.unravel_index(m.argmax(), m.shape) in {(y, x) for y in range(3, 9) for x in range(3, 9)}


def test_with_two_scales_the_region_maps_are_those_of_the_one_scale_detector(rng):
    kw = dict(method="patchcore", backbone="resnet18", layers=[1, 2], image_size=64, bank_size=50)
    one, two = (create_detector(params(**kw, scales=s)) for s in ([1.0], [1.0, 0.5]))
    one.backbone.load_state_dict(two.backbone.state_dict())
    train, test = [surface(rng, 64) for _ in range(6)], [with_spot(surface(rng, 64)), surface(rng, 64)]
    one.fit(train)
    two.fit(train)
    # the coreset is chosen on the first scale's features: the same entries
    torch.testing.assert_close(two.bank[:, : one.bank.shape[1]], one.bank, rtol=0, atol=0)
    np.testing.assert_array_equal(two.predict(test), one.predict(test))
    assert not np.allclose(two.predict_scored(test)[1], one.predict(test))


def test_the_score_searches_the_coreset_run_on_and_the_regions_its_first_bank_size_entries(rng):
    kw = dict(method="patchcore", backbone="resnet18", layers=[1, 2], image_size=64, bank_size=50, scales=[1.0])
    one, more = (create_detector(params(**kw, score_bank_size=n)) for n in (0, 200))
    more.backbone.load_state_dict(one.backbone.state_dict())
    train, test = [surface(rng, 64) for _ in range(6)], [with_spot(surface(rng, 64)), surface(rng, 64)]
    one.fit(train)
    more.fit(train)
    assert (len(one.bank), len(more.bank)) == (50, 200)
    torch.testing.assert_close(more.bank[:50], one.bank, rtol=0, atol=0)  # the greedy coreset run on
    (maps_one, scored_one), (maps, scored) = one.predict_scored(test), more.predict_scored(test)
    np.testing.assert_array_equal(maps, maps_one)  # the regions: the 50 entries' map, bit for bit
    # the score: nearer normal entries, so a map nowhere higher (smoothing keeps the order) and lower somewhere
    assert (scored <= scored_one + 1e-6).all() and (scored < scored_one - 1e-3).any()
    # a detector file of one bank (before score_bank_size) loads as it was saved: one bank for both maps
    old = create_detector(params(**kw, score_bank_size=200))
    old.backbone.load_state_dict(one.backbone.state_dict())
    old.load_state_dict(one.state_dict())
    for got, want in zip(old.predict_scored(test), (maps_one, scored_one)):
        np.testing.assert_array_equal(got, want)


def test_a_batch_not_wanted_gets_its_score_maps_and_zero_region_maps(rng):
    det = create_detector(params(method="patchcore", backbone="resnet18", layers=[1, 2], image_size=64, scales=[1.0, 0.5]))
    det.fit([surface(rng, 64) for _ in range(6)])
    test = [with_spot(surface(rng, 64)), surface(rng, 64)]
    maps, scored = det.predict_scored(test)
    seen = []
    skipped, same = det.predict_scored(test, wanted=lambda m: seen.append(m.shape) or False)
    assert seen == [(1, 32, 32)] * 2  # asked once per batch (one image each: keep_aspect)
    np.testing.assert_array_equal(same, scored)
    assert not skipped.any() and maps.any()
    kept = det.predict_scored(test, wanted=lambda m: True)
    np.testing.assert_array_equal(kept[0], maps)


def test_with_one_scale_and_one_bank_the_score_map_is_the_region_map(rng):
    det = create_detector(params(method="patchcore", scales=[1.0], score_bank_size=100))  # not above bank_size
    det.fit([surface(rng) for _ in range(4)])
    maps, scored = det.predict_scored([with_spot(surface(rng))])
    assert np.shares_memory(scored, maps) and np.array_equal(scored, maps) and det.region_bank is None


@pytest.mark.parametrize("scales", [[], [0.0], [1.0, -0.5], [0.1]])  # [0.1]: 3 px of the 32-px images
def test_scales_must_be_positive_and_leave_enough_pixels(scales):
    with pytest.raises(InputError, match="detect.scales"):
        params(scales=scales)


def test_a_detector_saved_before_grid_layer_and_scales_loads_as_one_scale_on_the_first_layers_grid(rng, tmp_path):
    det = create_detector(params(method="patchcore", backbone="resnet18", layers=[1, 2], grid_layer=0, image_size=64, scales=[1.0]))
    det.fit([surface(rng, 64) for _ in range(4)])
    det.norm_min, det.norm_max = 0.0, 1.0
    save_detector(det, tmp_path / "d.pt")
    blob = load_torch(tmp_path / "d.pt", "")
    del blob["params"]["grid_layer"], blob["params"]["scales"]  # a file written before the knobs existed
    blob["params"]["score_top"] = 0.01  # and while the image score had a single top fraction
    save_torch(blob, tmp_path / "old.pt")
    old = load_detector(tmp_path / "old.pt")
    assert old.params.grid_layer == 0 and old.params.scales == [1.0]
    test = [with_spot(surface(rng, 64))]
    np.testing.assert_array_equal(old.predict(test), det.predict(test))


def test_patchcore_compares_network_features_as_they_are_and_standardises_the_filter_bank(rng):
    train = [surface(rng) for _ in range(4)]
    net = create_detector(params(method="patchcore", backbone="resnet18", layers=[1, 2]))
    net.fit(train)
    assert torch.all(net.mean == 0) and torch.all(net.std == 1)
    bank = create_detector(params(method="patchcore"))
    bank.fit(train)
    assert not torch.all(bank.std == 1)


def test_patchcore_without_training_images_is_an_error():
    with pytest.raises(InputError, match="normal training images"):
        create_detector(params(method="patchcore")).fit([])


def test_saved_patchcore_maps_new_images_identically(rng, tmp_path):
    det = create_detector(params(method="patchcore"))
    det.fit([surface(rng) for _ in range(4)])
    det.norm_min, det.norm_max = 0.5, 2.0
    test = [with_spot(surface(rng))]
    save_detector(det, tmp_path / "d.pt")
    again = load_detector(tmp_path / "d.pt")
    np.testing.assert_allclose(again.predict(test), det.predict(test), rtol=1e-5, atol=1e-6)
    assert (again.norm_min, again.norm_max) == (0.5, 2.0)
    assert again.to_u8(np.array([0.0, 1.25, 3.0])).tolist() == [0, 128, 255]


@pytest.mark.parametrize("method", ["patchcore", "padim"])
def test_mixed_precision_maps_are_float32_and_within_half_precision_rounding_of_the_full_precision_ones(rng, method):
    train = [surface(rng) for _ in range(6)]
    test = [with_spot(surface(rng)) for _ in range(3)]
    maps = {}
    for mixed in (False, True):
        det = create_detector(params(method=method, backbone="resnet18", layers=[1, 2], mixed_precision=mixed))
        det.fit(train)
        maps[mixed] = det.predict(test)
    assert maps[True].dtype == np.float32 and spot_contrast(maps[True]) > 0
    assert not np.array_equal(maps[True], maps[False])  # the backbone did run in bfloat16 on the CPU
    assert np.corrcoef(maps[True].ravel(), maps[False].ravel())[0, 1] > 0.99


def test_a_patchcore_saved_with_mixed_precision_maps_new_images_with_it(rng, tmp_path):
    det = create_detector(params(method="patchcore", backbone="resnet18", layers=[1, 2], mixed_precision=True))
    det.fit([surface(rng) for _ in range(4)])
    save_detector(det, tmp_path / "d.pt")
    again = load_detector(tmp_path / "d.pt")
    test = [with_spot(surface(rng))]
    assert again.params.mixed_precision
    np.testing.assert_array_equal(again.predict(test), det.predict(test))


def test_load_detector_missing_file_is_an_error(tmp_path):
    with pytest.raises(InputError, match="run the detect stage"):
        load_detector(tmp_path / "none.pt")


def test_mean_of_smallest_takes_thirty_percent():
    d = torch.tensor([[5.0, 1.0, 3.0, 2.0, 4.0, 9.0, 8.0, 7.0, 6.0, 10.0]])
    assert mean_of_smallest(d).item() == pytest.approx(2.0)  # 3 smallest: 1, 2, 3


def test_mutual_scores_single_out_the_odd_image():
    feats = torch.nn.functional.normalize(torch.ones(6, 4, 3), dim=-1).clone()
    feats[2, 1] = torch.nn.functional.normalize(torch.tensor([1.0, -1.0, 0.0]), dim=0)
    s = mutual_scores(feats)
    assert s[2, 1] > 0.5 and s.flatten().argmax().item() == 2 * 4 + 1
    assert torch.count_nonzero(s > 1e-3) == 1


def test_musc_subsets_cover_every_image_once():
    parts = split_subsets(23, 10, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(23))
    assert max(len(p) for p in parts) <= 10 and min(len(p) for p in parts) >= 5


@pytest.mark.parametrize("backbone, layers", [("filterbank", [1, 2]), ("vit_tiny_patch16_224", [1, 2])])
def test_musc_scores_a_defect_zero_shot(rng, backbone, layers):
    images = [surface(rng) for _ in range(4)] + [with_spot(surface(rng)) for _ in range(2)]
    det = create_detector(params(method="musc", backbone=backbone, layers=layers, musc_subset_size=6))
    maps = det.predict(images)
    assert maps.shape == (6, 32, 32)
    if backbone == "filterbank":  # random ViT weights at 32 px give a 2x2 grid: shape only
        assert spot_contrast(maps[4:]) > 0


def test_musc_needs_five_images(rng):
    det = create_detector(params(method="musc"))
    with pytest.raises(InputError, match="at least 5"):
        det.predict([surface(rng) for _ in range(4)])


def test_saved_musc_scores_new_images_against_its_references(rng, tmp_path):
    det = create_detector(params(method="musc", musc_subset_size=5))
    det.predict([surface(rng) for _ in range(5)])
    save_detector(det, tmp_path / "m.pt")
    again = load_detector(tmp_path / "m.pt")
    maps = again.predict([with_spot(surface(rng))])  # a single new image is fine now
    assert maps.shape == (1, 32, 32) and spot_contrast(maps) > 0


def test_ground_truth_maps_follow_the_masks(tmp_path):
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 10:20] = 255
    write_image(tmp_path / "m.png", mask)
    recs = [
        Record("a", "", str(tmp_path / "m.png"), "crack", "test", "t", 40, 40),
        Record("b", "", "", "good", "test", "t", 40, 40),
    ]
    maps = create_detector(params(method="ground_truth", map_size=20)).map_records(recs)
    assert maps.shape == (2, 20, 20)
    assert maps[0, 7, 7] > 0.9 and maps[0, 15, 15] < 0.1 and not maps[1].any()


def test_ground_truth_without_masks_is_an_error_on_the_set_but_a_chunk_of_normal_images_maps_to_zero():
    recs = [Record("a", "", "", "", "test", "t", 8, 8)]
    det = create_detector(params(method="ground_truth", map_size=8))
    with pytest.raises(InputError, match="masks"):
        det.check_records(recs)
    # the detect stage maps the set a chunk at a time: the normal images mapped for the
    # metrics, after the defect images, may fill a chunk on their own
    normal = [Record("b", "", "", "good", "test", "t", 8, 8)]
    assert not det.map_records(normal).any()


def test_filter_bank_sees_colour_that_gray_cannot():
    fb = FilterBank([2.0])
    grey = torch.full((1, 3, 16, 16), 0.5) + 0.05 * torch.rand(1, 1, 16, 16)
    tinted = grey.clone()
    tinted[:, 0, 4:12, 4:12] += 0.08  # redder patch, same gray level
    tinted[:, 1, 4:12, 4:12] -= 0.04
    (a,) = fb(grey)
    (b,) = fb(tinted)
    colour = fb.channel_index(["red_green", "yellow_blue"])  # the two opponent-colour channels of the only scale
    assert (b[:, colour] - a[:, colour]).abs().amax() > 10 * (a[:, colour]).abs().amax() + 1e-3


def test_gaussian_stats_match_torch_cov(rng):
    x = torch.from_numpy(rng.normal(size=(7, 3, 4)))  # 7 samples, 3 positions, 4 dims
    mean, cov = gaussian_stats(7, x.sum(0), torch.einsum("bpi,bpj->pij", x, x))
    for p in range(3):
        torch.testing.assert_close(mean[p], x[:, p].mean(0))
        torch.testing.assert_close(cov[p], torch.cov(x[:, p].T))


def test_mahalanobis_with_identity_precision_is_euclidean():
    x = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
    d = mahalanobis(x, torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2))
    torch.testing.assert_close(d, torch.tensor([[5.0, 1.0]]))


@pytest.mark.parametrize("backbone, layers", [("filterbank", [1, 2, 4]), ("resnet18", [1, 2])])
def test_padim_scores_a_defect_above_its_surroundings(rng, tmp_path, backbone, layers):
    det = create_detector(params(method="padim", backbone=backbone, layers=layers))
    det.fit([surface(rng) for _ in range(6)])
    test = [with_spot(surface(rng)) for _ in range(3)]
    maps = det.predict(test)
    assert maps.shape == (3, 32, 32) and spot_contrast(maps) > 0
    save_detector(det, tmp_path / "p.pt")
    np.testing.assert_allclose(load_detector(tmp_path / "p.pt").predict(test), maps, rtol=1e-4, atol=1e-5)


def test_padim_needs_two_training_images(rng):
    with pytest.raises(InputError, match="at least 2"):
        create_detector(params(method="padim")).fit([surface(rng)])


@pytest.mark.mtd
@requires_mtd()
def test_filterbank_padim_finds_mtd_blowholes():
    from anomalyncd.config import DatasetParams
    from anomalyncd.datasets import read_dataset
    from anomalyncd.detect.metrics import pixel_auroc, resize_masks
    from anomalyncd.io import read_mask

    recs = read_dataset(DatasetParams(layout="mtd", root=str(MTD)))
    train = [r for r in recs if r.split == "train"][:30]
    test = [r for r in recs if r.defect_type == "blowhole"][:10] + [r for r in recs if r.split == "test" and r.is_normal][:5]
    det = create_detector(DetectParams(method="padim", image_size=128, map_size=64, device="cpu"))
    det.fit([read_image(r.image) for r in train])
    maps = det.map_records(test)
    masks = resize_masks([read_mask(r.mask) if r.mask else np.zeros((8, 8), bool) for r in test], 64)
    assert pixel_auroc(maps, masks) > 0.7  # random-weight ResNet-18 PatchCore: 0.61 over all of MTD


def test_aspect_size_keeps_the_shorter_side_and_rounds_the_longer():
    from anomalyncd.detect.ops import aspect_size

    assert aspect_size((240, 606), 224) == (224, 576)
    assert aspect_size((606, 240), 224) == (576, 224)
    assert aspect_size((100, 100), 224) == (224, 224)


def test_patchcore_keeping_the_aspect_maps_images_of_any_shape_and_finds_the_spot():
    rng = np.random.default_rng(0)
    normal = [rng.integers(100, 140, (h, w, 3), dtype=np.uint8) for h, w in [(32, 64), (64, 32), (40, 40)] * 3]
    test = [with_spot(rng.integers(100, 140, (32, 32, 3), dtype=np.uint8)), rng.integers(100, 140, (32, 70, 3), dtype=np.uint8)]
    det = create_detector(params(method="patchcore", keep_aspect=True))
    det.fit(normal)
    maps = det.predict(test)
    assert maps.shape == (2, 32, 32) and np.isfinite(maps).all()
    assert spot_contrast(maps[:1]) > 0


@pytest.mark.parametrize("candidates, pending", [(4096, 256), (64, 16), (8, 4)])
def test_greedy_coreset_is_the_same_for_any_number_of_workers(monkeypatch, candidates, pending):
    from anomalyncd.detect import ops, parallel
    from anomalyncd.detect.ops import greedy_coreset_full

    # blocks of 4,096 rows instead of parallel.BLOCK_ROWS: several blocks, shared by the workers;
    # few candidates and few waiting centres: many passes over every point, both kinds of pass
    monkeypatch.setattr(ops, "row_blocks", lambda n: parallel.row_blocks(n, 4096))
    monkeypatch.setattr(ops, "COVER_CANDIDATES", candidates)
    monkeypatch.setattr(ops, "COVER_PENDING", pending)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(20000, 12)).astype(np.float32))
    ref = greedy_coreset_full(x, 200, seed=3)
    for workers in (1, 2, 3):
        assert torch.equal(greedy_coreset(x, 200, seed=3, progress=False, workers=workers), ref)


@pytest.mark.parametrize("candidates, pending", [(4096, 256), (8, 4)])
def test_greedy_coreset_breaks_ties_by_the_lowest_index_as_the_pass_over_every_point_does(monkeypatch, candidates, pending):
    from anomalyncd.detect import ops
    from anomalyncd.detect.ops import greedy_coreset_full

    monkeypatch.setattr(ops, "COVER_CANDIDATES", candidates)
    monkeypatch.setattr(ops, "COVER_PENDING", pending)
    # integer points, many of them equal: exact distances, many equally far points
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 4, size=(5000, 3)).astype(np.float32))
    got = greedy_coreset(x, 64, seed=1, progress=False, workers=2)
    assert torch.equal(got, greedy_coreset_full(x, 64, seed=1))
    assert len({tuple(row) for row in x[got].tolist()}) == 64  # each of the 4^3 distinct points once


def test_nearest_distance_finds_the_nearest_row_exactly(rng):
    q = torch.from_numpy(rng.normal(size=(300, 24)).astype(np.float32))
    bank = torch.from_numpy(rng.normal(size=(500, 24)).astype(np.float32))
    d = torch.cdist(q.double(), bank.double())
    got = nearest_distance(q, bank).double()
    torch.testing.assert_close(got, d.min(1).values, rtol=1e-6, atol=1e-6)
    assert torch.equal(nearest_distance(bank[:7], bank), torch.zeros(7))  # a bank row is at 0


def test_query_blocks_cover_the_queries_with_at_least_a_full_block_each():
    for n in (0, 1, 127, 128, 129, 255, 256, 300, 1568):
        blocks = query_blocks(n, 128)
        assert [i for s in blocks for i in range(s.start, s.stop)] == list(range(n))
        assert len(blocks) == 1 or all(s.stop - s.start >= 128 for s in blocks)
        assert all(s.stop - s.start < 256 for s in blocks) or len(blocks) == 1


@pytest.mark.parametrize("n_query", [1, 15, 127, 128, 255, 256, 300, 700])
def test_nearest_distance_in_query_blocks_is_the_one_product_search(rng, n_query):
    """The same bits as one product of every query (the kernel before the blocks), on
    queries laid out as PatchCore's (a permuted feature grid)."""
    bank = torch.from_numpy(np.abs(rng.normal(size=(600, 40))).astype(np.float32))
    grid = torch.from_numpy(rng.normal(size=(1, 40, 1, n_query)).astype(np.float32)) + bank[:n_query % 600].mean(0)[None, :, None, None]
    q = grid.permute(0, 2, 3, 1).reshape(-1, 40)
    assert torch.equal(nearest_distance(q, bank), nearest_distance_full(q, bank))
    assert torch.equal(nearest_distance(q.contiguous(), bank), nearest_distance_full(q.contiguous(), bank))


def brute_force_distance(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """The nearest row's distance (Q,): the squared distance by float64 brute force (exact for
    small integers), then torch's float32 square root, as the search takes it (torch's float32
    sqrt is not correctly rounded on every CPU: 1 ulp off on some AVX-512 machines)."""
    sq = (query.double()[:, None] - bank.double()[None]).square().sum(-1).min(1).values
    return sq.float().sqrt()


def test_nearest_distance_with_ties_is_the_brute_force_distance_exactly(rng):
    """Small integers: every product is exact, so are the ties (bank rows repeated, queries
    equidistant from several rows), and the squared distance is the float64 brute force's."""
    bank = torch.from_numpy(rng.integers(-3, 4, size=(90, 6)).astype(np.float32))
    bank = torch.cat([bank, bank[:30]])  # exact duplicates
    q = torch.from_numpy(rng.integers(-3, 4, size=(400, 6)).astype(np.float32))
    q[:20] = (bank[:20] + bank[20:40]) / 2  # midway between two rows
    assert torch.equal(nearest_distance(q, bank), brute_force_distance(q, bank))
    assert torch.equal(nearest_distance(q, bank), nearest_distance_full(q, bank))


def clustered(rng: np.random.Generator, n: int, dim: int = 48, centres: int = 6) -> torch.Tensor:
    """``n`` rows (n, dim) around a few centres, most of their spread on 8 dims (as patch
    features: a few principal axes carry most of it)."""
    c = rng.normal(size=(centres, dim)) * np.r_[np.full(8, 4.0), np.full(dim - 8, 0.5)]
    x = c[rng.integers(centres, size=n)] + rng.normal(size=(n, dim)) * np.r_[np.full(8, 1.0), np.full(dim - 8, 0.2)]
    return torch.from_numpy(np.abs(x).astype(np.float32))


@pytest.mark.parametrize("n_query", [1, 127, 128, 300, 700])
def test_pruned_nearest_distance_is_the_full_search_and_compares_a_part_of_the_bank(rng, monkeypatch, n_query):
    from anomalyncd.detect import ops

    bank = clustered(rng, 800)
    q = clustered(rng, n_query).T.contiguous().T  # column-major, as PatchCore's
    kept = []
    original = ops.candidates
    monkeypatch.setattr(ops, "candidates", lambda *a: kept.append(len(r := original(*a))) or r)
    index = bank_index(bank, 8)
    assert torch.equal(nearest_distance(q, bank, index=index), nearest_distance_full(q, bank))
    if n_query < ops.QUERY_BLOCK:  # fewer queries than a block: not pruned (see nearest_distance)
        assert kept == []
    else:
        assert len(kept) == len(query_blocks(n_query, ops.QUERY_BLOCK)) and max(kept) < len(bank)


@pytest.mark.parametrize("n_query", [1, 255, 300, 1100])
@pytest.mark.parametrize("workers", [2, 3])
def test_the_search_on_several_workers_finds_the_same_rows(rng, n_query, workers):
    """Whole query blocks to each worker: the same indices as one worker, pruned or not."""
    bank = clustered(rng, 800)
    q = clustered(rng, n_query).T.contiguous().T
    index = bank_index(bank, 8)
    for idx in (None, index):
        assert torch.equal(nearest_index(q, bank, index=idx, workers=workers), nearest_index(q, bank, index=idx))


def test_pruned_nearest_distance_with_ties_is_the_brute_force_distance_exactly(rng):
    """Small integers (exact products, exact ties: repeated bank rows, queries midway between
    two rows, queries on bank rows) through the pruned search."""
    bank = torch.from_numpy(rng.integers(0, 4, size=(300, 24)).astype(np.float32))
    bank = torch.cat([bank, bank[:100]])
    q = torch.from_numpy(rng.integers(0, 4, size=(400, 24)).astype(np.float32))
    q[:40] = (bank[:40] + bank[40:80]) / 2
    q[40:60] = bank[200:220]
    got = nearest_distance(q, bank, index=bank_index(bank, 4))
    assert torch.equal(got, brute_force_distance(q, bank)) and torch.equal(got, nearest_distance_full(q, bank))
    assert torch.equal(got[40:60], torch.zeros(20))


def test_no_pruning_index_where_the_bounds_would_cost_as_much_as_the_search():
    assert bank_index(torch.ones(50, 300), 159) is None
    assert bank_index(torch.rand(50, 318), 159) is not None


def test_ordered_map_keeps_the_order_of_the_items():
    from anomalyncd.detect.parallel import ordered_map

    assert list(ordered_map(lambda i: i * i, range(50), workers=3, ahead=1)) == [i * i for i in range(50)]


@pytest.mark.parametrize("pruned", [False, True])
def test_patchcore_bank_and_maps_are_bit_identical_for_any_thread_count(rng, monkeypatch, pruned):
    from anomalyncd.detect import ops, patchcore

    if pruned:  # the search pruned by lower bounds (ops.bank_index), here on 16 of the 192 dims
        monkeypatch.setattr(patchcore, "bank_index", lambda bank, basis=None: ops.bank_index(bank, 16, basis))
    normal = [surface(rng) for _ in range(5)]
    test = [with_spot(surface(rng)) for _ in range(3)]
    before = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            det = create_detector(params(method="patchcore", backbone="resnet18", layers=[1, 2], bank_size=200))
            det.fit(normal)
            out.append((det.bank.numpy().tobytes(), det.predict(test).tobytes()))
    finally:
        torch.set_num_threads(before)
    assert out[0] == out[1] == out[2]


def test_one_image_on_every_core_gets_the_maps_it_gets_among_others(rng, monkeypatch):
    """predict's one image: its scales' backbone passes and its search side by side on two
    threads give the bits of the one-thread pass each image of a folder gets."""
    from anomalyncd.detect import ops, patchcore

    monkeypatch.setattr(patchcore, "bank_index", lambda bank, basis=None: ops.bank_index(bank, 4, basis))
    monkeypatch.setattr(ops, "QUERY_BLOCK", 16)  # several blocks of queries in a small image
    det = create_detector(params(method="patchcore", backbone="filterbank", layers=[1, 2, 4], pretrained=False, bank_size=100,
                                 scales=[1.0, 0.5]))
    det.fit([surface(rng) for _ in range(4)])
    test = [with_spot(surface(rng)) for _ in range(2)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        among = det.predict_described(test)
        alone = [det.predict_described(test[i : i + 1]) for i in range(2)]
        scored = [det.predict_scored(test[i : i + 1]) for i in range(2)]
    finally:
        torch.set_num_threads(before)
    for i in range(2):
        np.testing.assert_array_equal(alone[i][0][0], among[0][i])
        np.testing.assert_array_equal(alone[i][1][0], among[1][i])
        np.testing.assert_array_equal(alone[i][2][0], among[2][i])
        np.testing.assert_array_equal(scored[i][0][0], among[0][i])
        np.testing.assert_array_equal(scored[i][1][0], among[1][i])


def test_a_saved_patchcore_loads_its_search_indexes_without_making_them_again(rng, monkeypatch, tmp_path):
    from anomalyncd.detect import ops, patchcore

    make = lambda bank, basis=None: ops.bank_index(bank, 4, basis)  # noqa: E731
    monkeypatch.setattr(patchcore, "bank_index", make)
    det = create_detector(params(method="patchcore", backbone="filterbank", layers=[1, 2, 4], pretrained=False, bank_size=100,
                                 scales=[1.0, 0.5]))
    det.fit([surface(rng) for _ in range(4)])
    test = [with_spot(surface(rng)) for _ in range(2)]
    save_detector(det, tmp_path / "detector.pt")

    def made_again(*_, **__):
        raise AssertionError("an index was made again: its axes or the bank's coordinates on them")

    monkeypatch.setattr(torch.linalg, "eigh", made_again)
    monkeypatch.setattr(patchcore, "bank_index", made_again)
    loaded = load_detector(tmp_path / "detector.pt")
    for got, fitted in ((loaded.index, det.index), (loaded.region_bank[2], det.region_bank[2])):
        assert all(torch.equal(getattr(got, f), getattr(fitted, f)) for f in ("mean", "basis", "coords", "coords_sq"))
        assert got.max_norm == fitted.max_norm
    for a, b in zip(loaded.predict_scored(test), det.predict_scored(test)):
        np.testing.assert_array_equal(a, b)
    # a detector file from before the coordinates were saved: they are computed on its saved axes
    monkeypatch.setattr(patchcore, "bank_index", make)
    old = det.state_dict()
    del old["index_coords"]
    monkeypatch.setattr(type(det), "state_dict", lambda self: old)
    save_detector(det, tmp_path / "old.pt")
    for a, b in zip(load_detector(tmp_path / "old.pt").predict_scored(test), det.predict_scored(test)):
        np.testing.assert_array_equal(a, b)
