"""Tensor operations shared by the detectors (pure functions on torch tensors)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .parallel import blocked, row_blocks, single_threaded

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


#: Queries per matrix product of :func:`nearest_distance`: a block of 128 to 255 rows of
#: scores (5-10 MB for a bank of 10,000) is reused from the cache by the argmin, where one
#: product of every query wrote them all to memory and read them back.
QUERY_BLOCK = 128


def query_blocks(n: int, rows: int) -> list[slice]:
    """Slices of ``rows`` rows covering ``range(n)``, the remainder joined to the last one
    (every block has at least ``rows`` rows, or there is one block of all ``n``)."""
    starts = list(range(0, max(1, n - rows + 1), rows))
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [n])]


def nearest_distance(query: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean distance of each row of ``query`` (Q, D) to its nearest row of ``bank`` (M, D).

    Exact search by one matrix product per block of queries (:func:`query_blocks` of
    ``QUERY_BLOCK``), written
    into one reused (rows, M) buffer: the nearest row is the argmin of ``|b|^2 - 2 q.b``
    (first index on a tie), and its distance is then taken directly as ``|q - b|``, without
    the cancellation of the expanded form. ``bank_sq`` (M,): the bank's squared row norms, if
    already known. Returns (Q,).
    """
    if len(bank) == 0:
        raise ValueError("nearest_distance: empty bank")
    if bank_sq is None:
        bank_sq = (bank * bank).sum(dim=1)
    blocks = query_blocks(len(query), QUERY_BLOCK)
    scores = query.new_empty(max(s.stop - s.start for s in blocks), len(bank))
    nearest = torch.empty(len(query), dtype=torch.long, device=query.device)
    for s in blocks:
        block = torch.addmm(bank_sq, query[s], bank.T, alpha=-2, out=scores[: s.stop - s.start])
        nearest[s] = block.min(dim=1).indices
    return (query - bank[nearest]).square_().sum(dim=1).sqrt_()


def nearest_distance_full(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """:func:`nearest_distance` by one matrix product of every query (the kernel before the
    query blocks, the same results): the reference its tests and
    ``benchmarks/bench_search.py`` compare with. Returns (Q,)."""
    nearest = torch.addmm((bank * bank).sum(dim=1), query, bank.T, alpha=-2).argmin(dim=1)
    return (query - bank[nearest]).square_().sum(dim=1).sqrt_()


def project(features: torch.Tensor, dim: int, generator: torch.Generator, workers: int = 1) -> torch.Tensor:
    """Random projection of ``features`` (M, D) to (M, dim) by a Gaussian matrix (D, dim) of
    ``generator``'s next draws; computed a block of rows at a time (the same bits for any
    ``workers``)."""
    proj = (torch.randn(features.shape[1], dim, generator=generator) / math.sqrt(dim)).to(features.device, features.dtype)
    return blocked(lambda x: x @ proj, features, workers)


def greedy_coreset(
    features: torch.Tensor, n: int, seed: int = 0, proj_dim: int = 128, progress: bool = True, workers: int = 1
) -> torch.Tensor:
    """Indices ``(n,)`` of a greedy k-center coreset of ``features`` (M, D).

    Iteratively adds the point farthest from the points chosen so far (the PatchCore coreset;
    the first index among equally far ones), starting from a seeded random point. Distances
    are taken after a seeded random projection to ``proj_dim`` dimensions when D is larger,
    as in the PatchCore paper.

    Every step updates the M squared distances block of rows by block of rows
    (``parallel.BLOCK_ROWS``, a fixed cut), each block by one single-threaded product, the
    blocks shared by ``workers`` threads; the farthest point is the first maximum of the
    blocks' maxima in row order. The same indices for any ``workers``, and as
    :func:`greedy_coreset_full`.
    """
    m = len(features)
    if n >= m:
        return torch.arange(m, device=features.device)
    g = torch.Generator().manual_seed(seed)
    x = project(features, proj_dim, g, workers) if features.shape[1] > proj_dim else features
    start = int(torch.randint(m, (1,), generator=g))
    blocks = row_blocks(m)
    workers = max(1, min(workers, len(blocks)))
    with single_threaded():
        sq = (x * x).sum(dim=1)  # (M,)
        dist = torch.full((m,), math.inf, dtype=x.dtype, device=x.device)  # squared, (M,)
        top = [(0.0, 0)] * len(blocks)  # per block: its largest distance and its row

        def update(group: list[int], c: torch.Tensor, sq_c: torch.Tensor) -> None:
            for b in group:
                s = blocks[b]
                new = (sq[s] + sq_c).sub_(x[s] @ c, alpha=2).clamp_min_(0)
                d = torch.minimum(dist[s], new, out=dist[s])
                j = int(torch.argmax(d))
                top[b] = (float(d[j]), s.start + j)

        groups = [list(range(w, len(blocks), workers)) for w in range(workers)]
        chosen = torch.empty(n, dtype=torch.long, device=x.device)
        pool = ThreadPoolExecutor(workers - 1) if workers > 1 else None
        try:
            i = start
            for k in tqdm(range(n), desc="detect: coreset", unit="pt", disable=not progress, mininterval=1.0):
                chosen[k] = i
                if k == n - 1:
                    break
                c, sq_c = x[i], sq[i]
                futures = [pool.submit(update, grp, c, sq_c) for grp in groups[1:]] if pool else []
                update(groups[0], c, sq_c)
                for f in futures:
                    f.result()
                # the largest distance; among equal ones the first block, i.e. the first row
                i = top[max(range(len(blocks)), key=lambda b: (top[b][0], -b))][1]
        finally:
            if pool:
                pool.shutdown()
    return chosen


def greedy_coreset_full(features: torch.Tensor, n: int, seed: int = 0, proj_dim: int = 128) -> torch.Tensor:
    """:func:`greedy_coreset` in one piece (all M distances by one product per step, one
    thread): the reference its tests compare with."""
    m = len(features)
    if n >= m:
        return torch.arange(m, device=features.device)
    g = torch.Generator().manual_seed(seed)
    x = project(features, proj_dim, g) if features.shape[1] > proj_dim else features
    with single_threaded():
        sq = (x * x).sum(dim=1)
        start = int(torch.randint(m, (1,), generator=g))
        chosen = torch.empty(n, dtype=torch.long, device=x.device)
        chosen[0] = start
        dist = (sq + sq[start]).sub_(x @ x[start], alpha=2).clamp_min_(0)
        for k in range(1, n):
            i = int(torch.argmax(dist))
            chosen[k] = i
            torch.minimum(dist, (sq + sq[i]).sub_(x @ x[i], alpha=2).clamp_min_(0), out=dist)
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
