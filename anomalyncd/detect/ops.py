"""Tensor operations shared by the detectors (pure functions on torch tensors)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, NamedTuple, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .parallel import blocked, ordered_map, row_blocks, single_threaded

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


def scaled_size(size: int, scale: float) -> int:
    """``size`` times ``scale``, rounded, at least 1 (the side a multi-scale pass works at)."""
    return max(1, int(round(size * scale)))


def batches(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


#: Queries per matrix product of :func:`nearest_distance`: a block of 128 to 255 rows of
#: scores (5-10 MB for a bank of 10,000) is reused from the cache by the argmin, where one
#: product of every query wrote them all to memory and read them back.
QUERY_BLOCK = 128
#: Principal axes of a :class:`BankIndex`: of Lite0's 472 dims, 159 and the norm of the rest
#: leave ~9 % of the demo run's 10,000-patch bank to compare in full per block of MTD queries
#: (127: ~20 %, slower; 191: ~4 %, no faster).
PRUNE_DIMS = 159
#: Rounding allowance of the pruning, relative to ``(|q| + max |b|)^2`` (float32's ~1e-5 of
#: a 472-term dot product, 100 times over).
PRUNE_SLACK = 1e-3


def query_blocks(n: int, rows: int) -> list[slice]:
    """Slices of ``rows`` rows covering ``range(n)``, the remainder joined to the last one
    (every block has at least ``rows`` rows, or there is one block of all ``n``)."""
    starts = list(range(0, max(1, n - rows + 1), rows))
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [n])]


class BankIndex(NamedTuple):
    """A bank's rows ``b`` (M, D) as (M, k + 1) coordinates ``[P'(b - mean), |rest|]``: their
    first ``k`` principal coordinates and the norm of what is left. The distance of two such
    coordinate rows is a lower bound of the distance of the rows they stand for (Pythagoras on
    the principal part, the triangle inequality on the rest)."""

    mean: torch.Tensor  # (D,)
    basis: torch.Tensor  # (D, k), orthonormal columns P
    coords: torch.Tensor  # (M, k + 1)
    coords_sq: torch.Tensor  # (M,) squared norms of coords
    max_norm: float  # the largest |b|


def bank_index(bank: torch.Tensor, dims: int = PRUNE_DIMS, basis: torch.Tensor | None = None) -> BankIndex | None:
    """The :class:`BankIndex` of ``bank`` (M, D) on its ``dims`` first principal axes; None
    when D < 2 * dims (the bounds would cost about as much as the search they prune).
    ``basis`` (D, dims): those axes, as an earlier index of the same bank found them (saved
    with a detector: the eigendecomposition is most of the index's cost, a second of start-up)."""
    if bank.shape[1] < 2 * dims:
        return None
    mean = bank.double().mean(dim=0)
    if basis is None:
        x = bank.double() - mean
        basis = torch.linalg.eigh(x.T @ x).eigenvectors[:, -dims:]  # eigenvalues ascending
    elif tuple(basis.shape) != (bank.shape[1], dims):
        raise ValueError(f"bank_index: a basis of shape {tuple(basis.shape)} for a bank of {bank.shape[1]} dims and {dims} axes")
    basis = basis.to(bank)
    index = BankIndex(mean.to(bank.dtype), basis, bank.new_zeros(0, 0), bank.new_zeros(0), float(bank.norm(dim=1).max()))
    coords = bound_coords(bank, index)
    return index._replace(coords=coords, coords_sq=(coords * coords).sum(dim=1))


def saved_index(index: BankIndex) -> dict[str, torch.Tensor]:
    """What :func:`restore_index` needs besides the bank and its axes: the mean, the bank rows'
    coordinates and the largest norm (saved with a detector: computing them is most of its
    start-up once the axes are saved)."""
    return {"mean": index.mean.cpu(), "coords": index.coords.cpu(), "max_norm": torch.tensor(index.max_norm)}


def restore_index(bank: torch.Tensor, basis: torch.Tensor, saved: dict[str, torch.Tensor]) -> BankIndex:
    """The :class:`BankIndex` of ``bank`` (M, D) on ``basis`` (D, k) from :func:`saved_index`'s
    tensors, as :func:`bank_index` made it for the same bank."""
    coords = saved["coords"].to(bank)
    if tuple(coords.shape) != (len(bank), basis.shape[1] + 1) or tuple(saved["mean"].shape) != (bank.shape[1],):
        raise ValueError(f"restore_index: coordinates {tuple(coords.shape)} for a bank of {tuple(bank.shape)} on {basis.shape[1]} axes")
    return BankIndex(saved["mean"].to(bank), basis.to(bank), coords, (coords * coords).sum(dim=1), float(saved["max_norm"]))


def bound_coords(x: torch.Tensor, index: BankIndex) -> torch.Tensor:
    """Rows ``x`` (N, D) -> their (N, k + 1) coordinates in ``index``'s terms."""
    centred = x - index.mean
    principal = centred @ index.basis
    rest = (centred - principal @ index.basis.T).norm(dim=1, keepdim=True)
    return torch.cat([principal, rest], dim=1)


def nearest_distance(
    query: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor | None = None, index: BankIndex | None = None,
    workers: int = 1,
) -> torch.Tensor:
    """Euclidean distance of each row of ``query`` (Q, D) to its nearest row of ``bank`` (M, D)
    (:func:`nearest_index`), taken directly as ``|q - b|``, without the cancellation of the
    expanded form. Returns (Q,)."""
    nearest = nearest_index(query, bank, bank_sq, index, workers)
    return (query - bank[nearest]).square_().sum(dim=1).sqrt_()


def nearest_index(
    query: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor | None = None, index: BankIndex | None = None,
    workers: int = 1,
) -> torch.Tensor:
    """Index int64 (Q,) of the nearest row of ``bank`` (M, D) to each row of ``query`` (Q, D).

    Exact search by matrix products, one block of queries at a time (:func:`query_blocks` of
    ``QUERY_BLOCK``): the nearest row is the argmin of ``|b|^2 - 2 q.b`` (first index on a
    tie). ``bank_sq`` (M,): the bank's squared row norms, if already known.
    With ``index`` (:func:`bank_index`) and at least ``QUERY_BLOCK`` queries, only the bank
    rows that can be the argmin of some query of the block are compared in full
    (:func:`candidates`): the same argmin, as the product over those rows gives the same
    float32 scores as over the whole bank (MKL here, for blocks of 8 queries or more and at
    least 2 bank rows, not for fewer; tests/test_detect.py).
    ``workers`` > 1 (from a thread that is not itself a worker of :func:`.parallel.ordered_map`):
    whole blocks go to that many single-threaded workers, each block the same rows as in one
    call, so the same indices (one image's queries on two cores: ``anomalyncd predict``).
    """
    if len(bank) == 0:
        raise ValueError("nearest_distance: empty bank")
    if len(query) == 0:
        return torch.zeros(0, dtype=torch.long, device=query.device)
    if bank_sq is None:
        bank_sq = (bank * bank).sum(dim=1)
    blocks = query_blocks(len(query), QUERY_BLOCK)
    if workers > 1 and len(blocks) > 1:
        starts = [b.start for b in blocks[:: math.ceil(len(blocks) / workers)]] + [len(query)]

        def part(s: slice) -> torch.Tensor:
            with torch.inference_mode():
                return nearest_index(query[s], bank, bank_sq, index)

        return torch.cat(list(ordered_map(part, [slice(a, b) for a, b in zip(starts, starts[1:])], workers)))
    rows = max(s.stop - s.start for s in blocks)
    nearest = torch.empty(len(query), dtype=torch.long, device=query.device)
    if index is None or len(query) < QUERY_BLOCK:
        scores = query.new_empty(rows, len(bank))
        for s in blocks:
            block = torch.addmm(bank_sq, query[s], bank.T, alpha=-2, out=scores[: s.stop - s.start])
            nearest[s] = block.min(dim=1).indices
    else:
        coords = bound_coords(query, index)
        slack = PRUNE_SLACK * (query.norm(dim=1) + index.max_norm).square_() - (coords * coords).sum(dim=1)  # (Q,)
        bounds = query.new_empty(rows, len(bank))
        for s in blocks:
            keep = candidates(query[s], bank, coords[s], slack[s], index, bounds[: s.stop - s.start])
            scores = torch.addmm(bank_sq[keep], query[s], bank.index_select(0, keep).T, alpha=-2)
            nearest[s] = keep[scores.min(dim=1).indices]
    return nearest


def candidates(
    query: torch.Tensor, bank: torch.Tensor, coords: torch.Tensor, slack: torch.Tensor, index: BankIndex, out: torch.Tensor
) -> torch.Tensor:
    """Sorted indices of the bank rows that may be the nearest (by ``|b|^2 - 2 q.b`` in float32)
    to some row of ``query`` (B, D); ``coords`` (B, k + 1) its :func:`bound_coords`, ``slack``
    (B,) the rounding allowance minus ``|coords|^2``, ``out`` a (B, M) buffer.

    A row is dropped when, for every query of the block, its lower bound (the distance of the
    coordinates, ``index``) exceeds the query's upper bound (its true distance to the row of
    smallest bound) plus the allowance for float32 rounding of the bounds and of the scores
    (``PRUNE_SLACK (|q| + max |b|)^2``, far above either). At least two rows are kept (a product
    with one column takes another kernel, with other bits).
    """
    bound = torch.addmm(index.coords_sq, coords, index.coords.T, alpha=-2, out=out)  # lower bound^2 - |coords|^2
    upper = (query - bank[bound.min(dim=1).indices]).square_().sum(dim=1)
    keep = bound.sub_((upper + slack)[:, None]).amin(dim=0).le_(0).nonzero()[:, 0]
    return keep if len(keep) > 1 else torch.arange(len(bank), device=bank.device)


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


#: Candidates of :func:`greedy_coreset` kept between two passes over every point: the points
#: farthest from the centres at the last pass, whose distances to the newer centres are taken
#: as the centres come.
COVER_CANDIDATES = 2048
#: Centres that :func:`greedy_coreset` applies to every point in one pass, at most (a pass
#: holds two ``BLOCK_ROWS`` x this float32 blocks per worker: 32 MB). These two measured
#: fastest on the MTD fit (1,024-8,192 and 32-256 tried; the same indices for all).
COVER_PENDING = 64


def greedy_coreset(
    features: torch.Tensor, n: int, seed: int = 0, proj_dim: int = 128, progress: bool = True, workers: int = 1
) -> torch.Tensor:
    """Indices ``(n,)`` of a greedy k-center coreset of ``features`` (M, D).

    Iteratively adds the point farthest from the points chosen so far (the PatchCore coreset;
    the first index among equally far ones), starting from a seeded random point. Distances
    are taken after a seeded random projection to ``proj_dim`` dimensions when D is larger,
    as in the PatchCore paper.

    The farthest point is found lazily, the point a pass over every point per centre
    (:func:`greedy_coreset_full`) finds: each point's distance to the centres of the last pass
    is an upper bound of its distance to all of them, so the ``COVER_CANDIDATES`` points of the
    largest bounds, their distances to the newer centres taken one centre at a time, hold the
    farthest point whenever its distance exceeds every other point's bound. When it does not
    (or ``COVER_PENDING`` centres wait), one pass applies the waiting centres to every point by
    a matrix product: a memory-bound product per centre over all M points becomes one
    compute-bound product per pass, 12x faster on the MTD fit's 200,000 candidates. Its
    distances are rounded otherwise than the one-centre products', so two almost equally far
    points may be taken in the other order (the MTD fit: the same 10,000 points, 89 pairs of
    consecutive ones swapped; the detect stage's maps byte for byte the same; docs/detect.md).
    The passes cut the points in fixed blocks of rows (``parallel.BLOCK_ROWS``), each block one
    single-threaded product, the blocks shared by ``workers`` threads: the same indices for any
    ``workers``.
    """
    m = len(features)
    if n >= m:
        return torch.arange(m, device=features.device)
    g = torch.Generator().manual_seed(seed)
    x = project(features, proj_dim, g, workers) if features.shape[1] > proj_dim else features
    start = int(torch.randint(m, (1,), generator=g))
    blocks = row_blocks(m)
    workers = max(1, min(workers, len(blocks)))
    n_cand = min(COVER_CANDIDATES, m - 1)
    with single_threaded():
        sq = (x * x).sum(dim=1)  # (M,)
        bound = torch.full((m,), math.inf, dtype=x.dtype, device=x.device)  # squared distance to the applied centres
        chosen = torch.empty(n, dtype=torch.long, device=x.device)
        pending: list[int] = []  # centres not yet applied to ``bound``

        def apply(group: list[int], x_c: torch.Tensor, sq_c: torch.Tensor) -> None:
            for b in group:
                s = blocks[b]
                d = torch.addmm(sq[s, None] + sq_c, x[s], x_c.T, alpha=-2).clamp_min_(0)
                torch.minimum(bound[s], d.amin(dim=1), out=bound[s])

        pool = ThreadPoolExecutor(workers - 1) if workers > 1 else None
        groups = [list(range(w, len(blocks), workers)) for w in range(workers)]

        def flush() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
            """Apply the waiting centres to every point; the candidates (the points of the
            largest bounds, by index), their rows of ``x`` and of ``sq``, their distances, and
            the largest bound left out."""
            if pending:
                c = torch.tensor(pending, dtype=torch.long, device=x.device)
                x_c, sq_c = x[c], sq[c]
                futures = [pool.submit(apply, grp, x_c, sq_c) for grp in groups[1:]] if pool else []
                apply(groups[0], x_c, sq_c)
                for f in futures:
                    f.result()
                pending.clear()
            top = torch.topk(bound, n_cand + 1)
            cand, out_bound = top.indices[:n_cand], float(top.values[n_cand])
            order = torch.argsort(cand)
            cand = cand[order]
            return cand, x[cand], sq[cand], top.values[:n_cand][order].clone(), out_bound

        try:
            i, cand = start, None
            for k in tqdm(range(n), desc="detect: coreset", unit="pt", disable=not progress, mininterval=1.0):
                chosen[k] = i
                if k == n - 1:
                    break
                pending.append(i)
                if cand is None or len(pending) >= COVER_PENDING:
                    cand, x_cand, sq_cand, dist, out_bound = flush()
                else:
                    new = (sq_cand + sq[i]).sub_(x_cand @ x[i], alpha=2).clamp_min_(0)
                    torch.minimum(dist, new, out=dist)
                j = int(torch.argmax(dist))  # the first of equal maxima: the lowest index
                if not float(dist[j]) > out_bound:
                    cand, x_cand, sq_cand, dist, out_bound = flush()
                    j = int(torch.argmax(dist))
                    if not float(dist[j]) > out_bound:  # ties beyond the candidates
                        i = int(torch.argmax(bound))
                        continue
                i = int(cand[j])
        finally:
            if pool:
                pool.shutdown()
    return chosen


def greedy_coreset_full(features: torch.Tensor, n: int, seed: int = 0, proj_dim: int = 128) -> torch.Tensor:
    """:func:`greedy_coreset` as its definition runs it: all M distances updated by one
    product per centre, one thread; the reference its tests and ``benchmarks/bench_coreset.py``
    compare with."""
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
