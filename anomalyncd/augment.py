"""Paired image/mask augmentations for training and the evaluation transform.

Geometric operations (resize, random crop, flips, rotations by multiples of 90°) are applied
identically to a crop and its mask, so the mask keeps marking the same pixels; photometric
operations (colour jitter, sharpness, blur, posterize) touch the image only. Everything is
driven by an explicit ``numpy.random.Generator``: a view is a pure function of
(crop, mask, image_size, crop_pct, seed), which keeps training deterministic whatever the number of
data-loading workers.

Inputs are RGB ``uint8`` crops ``(C, C, 3)`` (grayscale ``(C, C)`` is expanded to 3 channels)
and masks ``(C, C)`` in {0, 1}. Outputs are ``float32`` images ``(3, S, S)`` in [0, 1] (the
encoder applies its backbone's own mean and std) and ``float32`` masks ``(S, S)`` in {0, 1}.
"""

from __future__ import annotations

import cv2
import numpy as np

from .config import resize_size

BRIGHTNESS = (0.6, 1.4)
CONTRAST = (0.6, 1.4)
SATURATION = (0.6, 1.8)
SHARPNESS = (0.2, 2.0)
BLUR_KERNELS = tuple(range(9, 34, 4))  # the authors draw from 9, 13, ..., 33
BLUR_SIGMA = (0.1, 2.0)
POSTERIZE_BITS = (5, 8)
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0


def _rgb(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return img


def _resize(img: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    img = cv2.resize(_rgb(img), (size, size), interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
    return img, mask


def to_chw(img: np.ndarray) -> np.ndarray:
    """uint8/float (S, S, 3) RGB in 0..255 -> float32 (3, S, S) in [0, 1]."""
    return np.ascontiguousarray((img.astype(np.float32) / 255.0).transpose(2, 0, 1))


def eval_view(img: np.ndarray, mask: np.ndarray, image_size: int, crop_pct: float) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation transform: resize to ``image_size / crop_pct`` (the model's timm ``crop_pct``)
    and centre-crop ``image_size``."""
    size = resize_size(image_size, crop_pct)
    img, mask = _resize(img, mask, size)
    o = (size - image_size) // 2
    sl = np.s_[o : o + image_size, o : o + image_size]
    return to_chw(img[sl]), mask[sl].astype(np.float32)


def _gray(img: np.ndarray) -> np.ndarray:
    return img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _blend(img: np.ndarray, other: np.ndarray | float, factor: float) -> np.ndarray:
    return np.clip(factor * img + (1.0 - factor) * other, 0, 255)


def color_jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation factors, applied in a random order. float (S, S, 3)."""
    factors = (rng.uniform(*BRIGHTNESS), rng.uniform(*CONTRAST), rng.uniform(*SATURATION))
    for op in rng.permutation(3):
        f = factors[op]
        if op == 0:
            img = _blend(img, 0.0, f)
        elif op == 1:
            img = _blend(img, float(_gray(img).mean()), f)
        else:
            img = _blend(img, _gray(img)[:, :, None], f)
    return img


def adjust_sharpness(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with a smoothed copy (factor 0: smooth, 1: unchanged, 2: sharpened). Border kept."""
    smooth = cv2.filter2D(img, -1, _SMOOTH, borderType=cv2.BORDER_REFLECT)
    smooth[0, :], smooth[-1, :], smooth[:, 0], smooth[:, -1] = img[0, :], img[-1, :], img[:, 0], img[:, -1]
    return _blend(img, smooth, factor)


def posterize(img: np.ndarray, bits: int) -> np.ndarray:
    """Keep the ``bits`` most significant bits of each uint8 channel."""
    return img & np.uint8((0xFF << (8 - bits)) & 0xFF)


def paired_geometry(
    img: np.ndarray, mask: np.ndarray, image_size: int, crop_pct: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Resize to ``image_size / crop_pct``, random crop, flips (p = 0.5 each) and a rotation by
    0/90/180/270°, identical on image and mask. Returns uint8 (S, S, 3) and uint8 (S, S)."""
    size = resize_size(image_size, crop_pct)
    img, mask = _resize(img, mask, size)
    y, x = rng.integers(0, size - image_size + 1, size=2)
    img = img[y : y + image_size, x : x + image_size]
    mask = mask[y : y + image_size, x : x + image_size]
    if rng.random() < 0.5:
        img, mask = img[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        img, mask = img[::-1], mask[::-1]
    k = int(rng.integers(4))
    return np.ascontiguousarray(np.rot90(img, k)), np.ascontiguousarray(np.rot90(mask, k))


def train_view(
    img: np.ndarray, mask: np.ndarray, image_size: int, crop_pct: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One random training view of a crop and its mask.

    img: uint8 (C, C, 3) or (C, C); mask: (C, C) in {0, 1}. Returns float32 (3, S, S) and
    float32 (S, S) with S = ``image_size``.
    """
    img, mask = paired_geometry(img, mask, image_size, crop_pct, rng)
    out = color_jitter(img.astype(np.float32), rng)
    out = adjust_sharpness(out, rng.uniform(*SHARPNESS))
    ksize = int(rng.choice(BLUR_KERNELS))
    out = cv2.GaussianBlur(out, (ksize, ksize), rng.uniform(*BLUR_SIGMA), borderType=cv2.BORDER_REFLECT)
    out = posterize(np.round(out).astype(np.uint8), int(rng.integers(POSTERIZE_BITS[0], POSTERIZE_BITS[1] + 1)))
    return to_chw(out), np.ascontiguousarray(mask, dtype=np.float32)


def view_rng(seed: int, epoch: int, index: int, view: int) -> np.random.Generator:
    """The generator for view ``view`` of crop ``index`` in ``epoch``: independent of batching."""
    return np.random.default_rng([seed, epoch, index, view])


def train_views(
    crops: np.ndarray,
    masks: np.ndarray,
    indices: np.ndarray,
    image_size: int,
    crop_pct: float,
    seed: int,
    epoch: int,
    view: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Training views of ``crops[indices]``: float32 (B, 3, S, S) and (B, S, S)."""
    pairs = [train_view(crops[i], masks[i], image_size, crop_pct, view_rng(seed, epoch, int(i), view)) for i in indices]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def eval_views(crops: np.ndarray, masks: np.ndarray, image_size: int, crop_pct: float) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation views of every crop: float32 (M, 3, S, S) and (M, S, S)."""
    pairs = [eval_view(c, m, image_size, crop_pct) for c, m in zip(crops, masks)]
    if not pairs:
        return np.zeros((0, 3, image_size, image_size), np.float32), np.zeros((0, image_size, image_size), np.float32)
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
