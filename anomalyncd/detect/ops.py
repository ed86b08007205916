"""Tensor operations shared by the detectors (pure functions on torch tensors)."""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

# Elements of one chunk of a distance matrix: bounds memory (about 256 MB of float32).
CHUNK_ELEMENTS = 1 << 26


def to_batch(images: Sequence[np.ndarray], size: int, device: torch.device, keep_aspect: bool = False) -> torch.Tensor:
    """RGB ``uint8`` images ``(H_i, W_i, 3)`` -> float ``(B, 3, h, w)`` in [0, 1] (area resize).

    ``h = w = size``, or with ``keep_aspect`` the first image's shape scaled so that its shorter
    side is ``size`` and the longer one a multiple of ``ASPECT_MULTIPLE`` (every image of the
    batch is resized to it: batch images of one shape).
    """
    h, w = aspect_size(images[0].shape[:2], size) if keep_aspect else (size, size)
    arr = np.stack([cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA) for im in images])
    return torch.from_numpy(arr).to(device).permute(0, 3, 1, 2).float().div_(255.0)


ASPECT_MULTIPLE = 32  # the coarsest stride of common CNN backbones


def aspect_size(shape: tuple[int, int], size: int) -> tuple[int, int]:
    """(h, w) of an image of ``shape`` scaled so that its shorter side is ``size``, the longer
    one rounded to a multiple of ``ASPECT_MULTIPLE`` (at least ``size``)."""
    h, w = shape
    scale = size / min(h, w)
    long = max(size, int(round(max(h, w) * scale / ASPECT_MULTIPLE)) * ASPECT_MULTIPLE)
    return (size, long) if h <= w else (long, size)


def batches(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def nearest_distance(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of each row of ``query`` (Q, D) to its nearest row of ``bank`` (M, D).

    Computed in chunks of queries so that at most ``CHUNK_ELEMENTS`` distances exist at once.
    Returns (Q,).
    """
    step = max(1, CHUNK_ELEMENTS // max(1, len(bank)))
    out = [torch.cdist(query[s], bank).amin(dim=1) for s in batches(len(query), step)]
    return torch.cat(out) if out else query.new_zeros(0)


def greedy_coreset(
    features: torch.Tensor, n: int, seed: int = 0, proj_dim: int = 128, progress: bool = True
) -> torch.Tensor:
    """Indices ``(n,)`` of a greedy k-center coreset of ``features`` (M, D).

    Iteratively adds the point farthest from the points chosen so far (the PatchCore
    coreset), starting from a seeded random point. Distances are taken after a seeded random
    projection to ``proj_dim`` dimensions when D is larger, as in the PatchCore paper.
    """
    m, d = features.shape
    if n >= m:
        return torch.arange(m, device=features.device)
    g = torch.Generator().manual_seed(seed)
    x = features
    if d > proj_dim:
        proj = torch.randn(d, proj_dim, generator=g) / math.sqrt(proj_dim)
        x = features @ proj.to(features.device, features.dtype)
    xt = x.T.contiguous()  # (D, M): a row vector times it is the fastest product on CPU
    sq = (x * x).sum(dim=1)
    start = int(torch.randint(m, (1,), generator=g))
    chosen = torch.empty(n, dtype=torch.long, device=features.device)
    chosen[0] = start
    # Squared distances, as |a|^2 + |b|^2 - 2 a.b: one matrix-vector product per step.
    dist = (sq + sq[start] - 2 * (x[start] @ xt)).clamp_min_(0)
    for k in tqdm(range(1, n), desc="detect: coreset", unit="pt", disable=not progress, mininterval=1.0):
        i = torch.argmax(dist)
        chosen[k] = i
        torch.minimum(dist, (sq + sq[i]).sub_(x[i] @ xt, alpha=2), out=dist)
    return chosen


def upsample_maps(grid: torch.Tensor, size: int, sigma: float = 0.0) -> torch.Tensor:
    """Patch-grid scores ``(B, h, w)`` -> maps ``(B, size, size)``: bilinear, then an optional
    Gaussian blur of ``sigma`` pixels of the output."""
    maps = F.interpolate(grid[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
    if sigma > 0:
        maps = gaussian_blur(maps, sigma)
    return maps[:, 0]


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, 1, H, W)`` (reflect padding, replicate if too small)."""
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    mode = "reflect" if r < min(x.shape[-2:]) else "replicate"
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1))


def image_scores(maps: np.ndarray, top: float) -> np.ndarray:
    """Image anomaly scores ``(N,)`` of maps ``(N, H, W)``: the mean of each map's ``top``
    fraction of highest pixels (at least one), or its maximum for ``top = 0``.

    A mean over the top pixels is steadier than the single highest one, which a speck of
    noise on a normal image can set.
    """
    flat = np.asarray(maps, dtype=np.float32).reshape(len(maps), -1)
    k = max(1, int(round(top * flat.shape[1])))
    if k == 1:
        return flat.max(axis=1)
    return np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:].mean(axis=1, dtype=np.float64).astype(np.float32)
