"""PatchCore (Roth et al., CVPR 2022): nearest-neighbour distance to a memory bank of normal
patch features.

Patch features: every backbone layer is averaged over its 3x3 neighbourhood, brought onto the
grid of layer ``grid_layer`` and concatenated (with several ``scales``, the features of each
resized image on the first one's grid, concatenated too). Filter-bank features are also standardised per
channel with the mean and standard deviation of the training patches (so that responses of
very different scale weigh alike; the standard deviation has a floor of ``STD_FLOOR`` times the
mean one); a pretrained network's features are compared as they are (standardising them
measured worse on MTD). The memory bank of ``bank_size`` patches is chosen by greedy coreset
selection among a random sample of the training patches; a test patch scores its distance to
the nearest bank entry (an exact search, pruned by lower bounds for banks of many dims:
:func:`.ops.nearest_distance`, :func:`.ops.bank_index`); the grid is upsampled to the map and
smoothed with a Gaussian of ``smooth_sigma`` px of the working image.

The two jobs of a map get different features and banks: the map that draws the regions is the
distance over the first scale's features alone (the finer cells: tighter regions) to the first
``bank_size`` entries, the image score's map the distance over every scale's features (a coarser
scale sees a large, faint region in one cell: image AUROC up) to ``score_bank_size`` entries (a
denser cover of the normal patches: fewer normal images far from it). One greedy coreset serves
both: it is chosen on the first scale's features and run on to the larger size, its first
``bank_size`` entries being the coreset of that size, so the region maps are those of a
one-scale detector with ``bank_size`` entries; every entry keeps its features at the other
scales, and both maps come from one forward pass.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..io import InputError
from .backbone import BackboneDetector, patch_features
from .base import register
from .features import FILTERBANK
from .ops import (
    BankIndex, bank_index, batches, greedy_coreset, nearest_distance, nearest_index, restore_index, saved_index, scaled_size, to_batch,
    upsample_maps,
)
from .parallel import ordered_map, pool_size, single_threaded

log = logging.getLogger(__name__)

CANDIDATES_PER_ENTRY = 20  # patches sampled from the training images per memory-bank entry
STD_FLOOR = 0.2  # channel standardisation: std at least this fraction of the mean std


@register("patchcore")
class PatchCore(BackboneDetector):
    needs_training_images = True

    def __init__(self, params, context=None) -> None:
        super().__init__(params, context)
        self.bank: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.bank_sq: torch.Tensor | None = None  # (bank_size,) squared norms of the bank
        self.index: BankIndex | None = None  # lower bounds that prune the search (ops.bank_index)
        # the region map's bank: the first scale's columns of the first bank_size entries (None: the whole bank)
        self.region_bank: tuple[torch.Tensor, torch.Tensor, BankIndex | None] | None = None

    def batches(self, n: int) -> list[slice]:
        """Batches of images: ``batch_size`` at a time, or one at a time with ``keep_aspect``
        (images of different shapes give feature grids of different shapes)."""
        return list(batches(n, 1 if self.params.keep_aspect else self.params.batch_size))

    def patch_grid(self, images: Sequence[np.ndarray], scales: Sequence[float] | None = None, workers: int = 1) -> torch.Tensor:
        """Patch features ``(B, D, h, w)`` of a batch of RGB uint8 images: the backbone's
        features of the images resized to ``image_size`` times each of ``scales`` (default:
        ``detect.scales``), those of every scale on the grid of the first (layer ``grid_layer``
        at the first scale), concatenated. ``workers`` > 1: the scales' backbone passes side by
        side, each single-threaded (the same features)."""
        scales = self.params.scales if scales is None else scales

        def trunk(scale: float) -> list[torch.Tensor]:
            with torch.inference_mode():
                return self.layers(to_batch(images, scaled_size(self.spec.image_size, scale), self.device, self.params.keep_aspect))

        out: list[torch.Tensor] = []
        for layers in ordered_map(trunk, scales, workers) if workers > 1 and len(scales) > 1 else map(trunk, scales):
            out.append(patch_features(layers, self.stride, self.grid_layer, out[0].shape[-2:] if out else None))
        return torch.cat(out, dim=1)

    def _batch_patches(self, images: Sequence[np.ndarray], s: slice) -> list[torch.Tensor]:
        """Patches ``(h * w, D)`` of each image of the batch ``s`` of ``images`` (read here)."""
        with torch.inference_mode():
            f = self.patch_grid(images[s])
            return list(f.permute(0, 2, 3, 1).reshape(len(f), -1, f.shape[1]))

    def _queries(self, images: Sequence[np.ndarray], scales: Sequence[float] | None = None, workers: int = 1) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """The standardised patch features ``(B * h * w, D)`` of ``images`` (:meth:`patch_grid`
        at ``scales``) and their grid ``(B, h, w)``."""
        f = self.patch_grid(images, scales, workers)
        b, d, h, w = f.shape
        return (f.permute(0, 2, 3, 1).reshape(-1, d) - self.mean[:d]) / self.std[:d], (b, h, w)

    def _residuals(self, q: torch.Tensor, workers: int = 1) -> torch.Tensor:
        """Queries ``(P, D)`` -> their first scale's features minus those of the nearest entry of
        the region map's bank ``(P, D1)``: the residuals, whose lengths are the region map's grid."""
        bank, bank_sq, index = self.region_bank or (self.bank, self.bank_sq, self.index)
        q = q[:, : bank.shape[1]].contiguous()
        return q - bank[nearest_index(q, bank, bank_sq, index, workers)]

    def _batch_maps(
        self, images: Sequence[np.ndarray], s: slice, with_grids: bool = False, workers: int = 1, wanted: Callable | None = None
    ) -> tuple:
        """Region maps and score maps ``(B, map_size, map_size)`` of the batch ``s`` of
        ``images`` (read here), the same array twice with one scale and one bank; ``with_grids``: also
        the batch's residual grids ``(B, h, w, D1)`` (:meth:`residuals`, from the same pass).
        ``workers``: threads for this one batch (the same maps for any number): more than one
        only when it is the only batch, not from a worker of a pool over batches.
        ``wanted(score maps) -> bool``: False skips the region search (zero region maps, no
        grids), for the images whose score already says they need no regions."""
        size = self.params.map_size
        sigma = self.params.smooth_sigma * size / self.spec.image_size
        with torch.inference_mode():
            q, (b, h, w) = self._queries(images[s], workers=workers)
            scored = upsample_maps(nearest_distance(q, self.bank, self.bank_sq, self.index, workers).view(b, h, w), size, sigma).cpu().numpy()
            if wanted is not None and not wanted(scored):
                return (np.zeros_like(scored), scored) + ((None,) if with_grids else ())
            if self.region_bank is None and not with_grids:
                return scored, scored
            r = self._residuals(q, workers)
            maps = scored if self.region_bank is None else upsample_maps(r.square().sum(dim=1).sqrt_().view(b, h, w), size, sigma).cpu().numpy()
            return (maps, scored, r.view(b, h, w, -1).cpu().numpy()) if with_grids else (maps, scored)

    def fit(self, images: Sequence[np.ndarray]) -> None:
        """Build the memory bank ``(bank_size, D)`` from normal RGB uint8 images.

        Memory stays bounded whatever the number of images: each image contributes a seeded
        random sample of its patches, ``CANDIDATES_PER_ENTRY * bank_size`` candidates in all,
        and the greedy coreset picks the bank among them (``bank_size: 0`` keeps every patch).
        """
        if len(images) == 0:
            raise InputError(
                "detect.method patchcore needs normal training images (manifest rows with split 'train'); "
                "use a dataset with a train/good folder or detect.method musc (zero-shot)"
            )
        n = self.params.train_images
        if 0 < n < len(images):
            pick = np.sort(np.random.default_rng(self.params.seed).choice(len(images), n, replace=False))
            images = [images[int(i)] for i in pick]
        bank_size = self.params.bank_size
        per_image = math.ceil(CANDIDATES_PER_ENTRY * bank_size / len(images)) if bank_size else 0
        rng = torch.Generator().manual_seed(self.params.seed)
        kept = []
        workers = pool_size(self.device)
        # Batches are computed single-threaded side by side (parallel.py); the sampling and
        # everything after it run single-threaded here, in image order.
        done = ordered_map(lambda s: self._batch_patches(images, s), self.batches(len(images)), workers)
        for patches in _progress(done, len(images), self.params.batch_size, "detect: fit patchcore"):
            if per_image and per_image < len(patches):
                patches = patches[torch.randperm(len(patches), generator=rng)[:per_image].sort().values]
            kept.append(patches)
        with single_threaded():
            self._fit_bank(torch.cat(kept), bank_size, workers)

    def _fit_bank(self, patches: torch.Tensor, bank_size: int, workers: int) -> None:
        """Standardisation (filter bank) and the coreset bank of the candidate patches (N, D)."""
        self.mean, self.std = patches.new_zeros(patches.shape[1]), patches.new_ones(patches.shape[1])
        if self.spec.name == FILTERBANK:
            self.mean = patches.mean(0)
            std = patches.std(0)
            # A floor keeps a channel that barely varies on normal images (the colour of a
            # uniformly tinted surface) from dominating every distance and the map's range.
            self.std = std.clamp_min(STD_FLOOR * float(std.mean()) + 1e-12)
            patches = (patches - self.mean) / self.std
        m = len(patches)
        n_region = min(bank_size, m) if bank_size else m
        # the score's bank: the greedy coreset run on, so that its first bank_size entries are the
        # coreset of that size (a greedy order is the same for any length)
        n_keep = min(max(bank_size, self.params.score_bank_size), m) if bank_size else m
        # the coreset covers the first scale's features, which draw the regions: the bank (and
        # so the region maps) of one scale, each entry keeping its features at the other scales
        first = patches[:, : self._first_dims(patches)].contiguous()
        idx = greedy_coreset(first, n_keep if n_keep < m else n_region, seed=self.params.seed, workers=workers)
        if n_keep == m > n_region:  # every candidate for the score: the region map's coreset first, then the rest
            rest = torch.ones(m, dtype=torch.bool, device=idx.device)
            rest[idx] = False
            idx = torch.cat([idx, rest.nonzero()[:, 0]])
        self._set_bank(patches[idx].contiguous())
        log.info("patchcore: memory bank %d of %d candidate patches (the region map's: the first %d), %d dims",
                 len(self.bank), len(patches), self._region_rows(), patches.shape[1])

    def _first_dims(self, features: torch.Tensor) -> int:
        """How many of the columns of ``features`` (N, D) are the first scale's: every scale's
        features have the same ``D / len(scales)`` dims, the first scale's first."""
        return features.shape[1] // len(self.params.scales)

    @property
    def residual_dim(self) -> int:
        """Dims of a :meth:`residuals` grid's cells: the first scale's features."""
        return self._first_dims(self.bank)

    def _set_bank(
        self, bank: torch.Tensor, bases: dict[str, torch.Tensor] | None = None, coords: dict[str, dict[str, torch.Tensor]] | None = None
    ) -> None:
        """The bank ``(M, D)`` with its squared norms and search indexes (``bases``: their
        principal axes as :meth:`_index_bases` saved them, else found anew; ``coords``: the
        rest of each index as :meth:`_index_coords` saved it, else computed)."""
        bases, coords = bases or {}, coords or {}

        def index(rows: torch.Tensor, name: str) -> BankIndex | None:
            if name in bases and name in coords:
                return restore_index(rows, bases[name], coords[name])
            return bank_index(rows, basis=bases.get(name))

        self.bank = bank
        self.bank_sq = (bank * bank).sum(dim=1)
        self.index = index(bank, "bank")
        self.region_bank = None
        rows = self._region_rows()
        if len(self.params.scales) > 1 or rows < len(bank):
            first = bank[:rows, : self._first_dims(bank)].contiguous()
            self.region_bank = (first, (first * first).sum(dim=1), index(first, "region"))

    def _region_rows(self) -> int:
        """How many of the bank's first entries make the region map's bank: ``bank_size`` (the
        coreset of that size; the rest continue it for the image score), all with ``bank_size: 0``
        or a bank as small (a detector file from before ``score_bank_size``)."""
        n = len(self.bank)
        return min(self.params.bank_size, n) if self.params.bank_size else n

    def _indexes(self) -> dict[str, BankIndex]:
        indexes = {"bank": self.index, "region": None if self.region_bank is None else self.region_bank[2]}
        return {k: v for k, v in indexes.items() if v is not None}

    def _index_bases(self) -> dict[str, torch.Tensor]:
        """The principal axes of the search indexes, saved so that loading skips their
        eigendecomposition."""
        return {k: v.basis.cpu() for k, v in self._indexes().items()}

    def _index_coords(self) -> dict[str, dict[str, torch.Tensor]]:
        """The rest of each search index (:func:`.ops.saved_index`), saved so that loading skips
        projecting the bank on its axes."""
        return {k: saved_index(v) for k, v in self._indexes().items()}

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.predict_scored(images)[0]

    def residuals(self, image: np.ndarray) -> np.ndarray:
        """float32 ``(h, w, D)`` for one RGB uint8 image: each patch's features (the first
        scale's, which draw the region map) minus those of its nearest bank entry, on the
        patch grid (:mod:`anomalyncd.residual`)."""
        if self.bank is None:
            raise RuntimeError("PatchCore.residuals before fit")
        with torch.inference_mode():
            # the first scale's features alone: the same values as in the pass over every scale
            q, (_, h, w) = self._queries([image], self.params.scales[:1])
            return self._residuals(q).view(h, w, -1).cpu().numpy()

    def _units_maps(
        self, images: Sequence[np.ndarray], units: list[slice], with_grids: bool = False, wanted: Callable | None = None
    ) -> Iterator[tuple]:
        """:meth:`_batch_maps` of each unit (a slice of ``images``), in order: the units side by
        side on the pool, one thread each, or a lone unit (predict's one image) with its scales
        and its search on every core; the same maps either way."""
        workers = pool_size(self.device)
        if len(units) == 1:
            with single_threaded():
                yield self._batch_maps(images, units[0], with_grids, workers, wanted)
        else:
            yield from ordered_map(lambda s: self._batch_maps(images, s, with_grids, wanted=wanted), units, workers)

    def predict_described(
        self, images: Sequence[np.ndarray], wanted: Callable[[np.ndarray], bool] | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray | None]]:
        """:meth:`predict_scored` and each image's :meth:`residuals` grid (the same values), from
        one pass per image. ``wanted``: called with each image's score map ``(1, S, S)``; where it
        says False the image's region search is skipped: its region map is zeros and its grid
        None (``anomalyncd predict``'s images that its normal gate passes: they get no regions)."""
        if self.bank is None:
            raise RuntimeError("PatchCore.predict before fit")
        out = list(self._units_maps(images, [slice(i, i + 1) for i in range(len(images))], True, wanted))
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out]), [None if o[2] is None else o[2][0] for o in out]

    def predict_scored(
        self, images: Sequence[np.ndarray], wanted: Callable[[np.ndarray], bool] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.bank is None:
            raise RuntimeError("PatchCore.predict before fit")
        size = self.params.map_size
        out = np.zeros((1 if self.region_bank is None else 2, len(images), size, size), dtype=np.float32)
        parts = self.batches(len(images))
        units = self._units_maps(images, parts, wanted=wanted)
        for s, (maps, scored) in zip(parts, tqdm(units, total=len(parts), desc="detect: patchcore maps", unit="batch")):
            out[0, s], out[-1, s] = maps, scored
        return out[0], out[-1]

    def state_dict(self) -> dict[str, Any]:
        return {"bank": self.bank.cpu(), "mean": self.mean.cpu(), "std": self.std.cpu(), "index_bases": self._index_bases(),
                "index_coords": self._index_coords()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = state["mean"].to(self.device)
        self.std = state["std"].to(self.device)
        with single_threaded():
            # files from before index_bases or index_coords: the indexes made anew (the same search either way)
            self._set_bank(state["bank"].to(self.device), state.get("index_bases"), state.get("index_coords"))


def _progress(batches_done: Iterator[list[torch.Tensor]], n: int, batch_size: int, desc: str) -> Iterator[torch.Tensor]:
    """The items of each batch of ``batches_done``, with a progress bar over the ``n`` images."""
    with tqdm(total=n, desc=desc, unit="img", disable=n <= batch_size) as bar:
        for batch in batches_done:
            yield from batch
            bar.update(len(batch))
