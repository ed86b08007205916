"""Paired augmentations keep the mask on the same pixels; the eval transform is a centre crop."""

import numpy as np
import pytest

from anomalyncd import augment

PCT = 0.875  # the share of the resized crop that the crop keeps (tf_efficientnet_lite0's timm crop_pct)


def coded_crop(size: int = 73, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A crop whose red channel is 255 exactly where the mask is 1."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), np.uint8)
    mask[10:40, 5:30] = 1
    mask[50:60, 45:70] = 1
    img = rng.integers(0, 100, (size, size, 3), dtype=np.uint8)
    img[..., 0] = mask * 255
    return img, mask


@pytest.mark.parametrize("seed", range(8))
def test_geometry_moves_image_and_mask_together(seed):
    img, mask = coded_crop()
    out_img, out_mask = augment.paired_geometry(img, mask, 64, PCT, np.random.default_rng(seed))
    assert out_img.shape == (64, 64, 3) and out_mask.shape == (64, 64)
    np.testing.assert_array_equal(out_img[..., 0] > 127, out_mask.astype(bool))


def test_train_view_is_a_function_of_the_generator_seed():
    img, mask = coded_crop()
    a = augment.train_view(img, mask, 64, PCT, np.random.default_rng(3))
    b = augment.train_view(img, mask, 64, PCT, np.random.default_rng(3))
    c = augment.train_view(img, mask, 64, PCT, np.random.default_rng(4))
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (3, 64, 64) and a[0].dtype == np.float32
    assert set(np.unique(a[1])) <= {0.0, 1.0}


def test_train_views_do_not_depend_on_batch_composition():
    crops = np.stack([coded_crop(seed=s)[0] for s in range(3)])
    masks = np.stack([coded_crop(seed=s)[1] for s in range(3)])
    alone = augment.train_views(crops, masks, np.array([2]), 32, PCT, seed=0, epoch=1, view=0)
    batch = augment.train_views(crops, masks, np.array([0, 2]), 32, PCT, seed=0, epoch=1, view=0)
    np.testing.assert_array_equal(alone[0][0], batch[0][1])


def test_grayscale_crop_becomes_three_channels():
    img, mask = coded_crop()
    x, _ = augment.train_view(img[..., 1], mask, 32, PCT, np.random.default_rng(0))
    assert x.shape == (3, 32, 32)


def test_eval_view_is_resize_then_centre_crop():
    img, mask = coded_crop(size=augment.resize_size(64, PCT))  # already at the resize size: only the crop
    x, m = augment.eval_view(img, mask, 64, PCT)
    o = (augment.resize_size(64, PCT) - 64) // 2
    np.testing.assert_allclose(x, augment.to_chw(img[o : o + 64, o : o + 64]), atol=1e-6)
    np.testing.assert_array_equal(m, mask[o : o + 64, o : o + 64])


def test_posterize_keeps_the_high_bits():
    assert augment.posterize(np.array([255, 7, 200], np.uint8), 5).tolist() == [248, 0, 200]


def test_sharpness_factor_one_is_identity():
    img = np.random.default_rng(0).uniform(0, 255, (16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(augment.adjust_sharpness(img, 1.0), img, atol=1e-4)


def test_color_jitter_stays_in_range():
    img = np.random.default_rng(0).uniform(0, 255, (16, 16, 3)).astype(np.float32)
    out = augment.color_jitter(img, np.random.default_rng(1))
    assert out.min() >= 0 and out.max() <= 255 and not np.allclose(out, img)


def test_blur_kernel_is_drawn_from_the_authors_sizes(monkeypatch):
    seen = []
    blur = augment.cv2.GaussianBlur

    def recording_blur(img, ksize, sigma, **kw):
        seen.append(ksize)
        return blur(img, ksize, sigma, **kw)

    monkeypatch.setattr(augment.cv2, "GaussianBlur", recording_blur)
    img, mask = coded_crop()
    for seed in range(200):
        augment.train_view(img, mask, 64, PCT, np.random.default_rng(seed))
    assert {k for k, _ in seen} == {9, 13, 17, 21, 25, 29, 33}  # step 4, not every odd size
    assert all(w == h for w, h in seen)
