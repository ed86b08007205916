"""PaDiM (Defard et al., ICPR 2021, https://arxiv.org/abs/2011.08785): a Gaussian of normal patch features at every position.

Patch features are those of PatchCore (layers averaged over their 3x3 neighbourhood, on one
grid). At each grid position the normal training images give a mean and a covariance; a test
patch scores its Mahalanobis distance to the Gaussian of its position. Unlike PatchCore's
memory bank, the model knows *where* an appearance is normal, which suits objects and
surfaces photographed in a fixed pose (MTD tiles: darker edges are normal, a dark blob in the
middle is not). Channels beyond ``MAX_DIMS`` are subsampled at random (seeded), as in the
paper. The covariance is regularised by ``REG`` times each channel's overall variance.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..io import InputError
from .base import register
from .ops import batches, to_batch, upsample_maps
from .backbone import BackboneDetector, patch_features
from .parallel import single_threaded

log = logging.getLogger(__name__)

MAX_DIMS = 200
REG = 0.01


def gaussian_stats(count: int, total: torch.Tensor, outer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(P, D)`` and unbiased covariance ``(P, D, D)`` from running sums over ``count``
    samples: ``total`` (P, D) = sum x, ``outer`` (P, D, D) = sum x x^T (float64)."""
    mean = total / count
    cov = (outer - count * mean[:, :, None] * mean[:, None, :]) / max(1, count - 1)
    return mean, cov


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Distance of ``x`` (B, P, D) to per-position Gaussians ``mean`` (P, D), ``precision``
    (P, D, D) -> (B, P)."""
    d = x - mean
    return torch.einsum("bpi,pij,bpj->bp", d, precision, d).clamp_min(0).sqrt()


@register("padim")
class PaDiM(BackboneDetector):
    needs_training_images = True

    def __init__(self, params, context=None) -> None:
        super().__init__(params, context)
        self.dims: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.precision: torch.Tensor | None = None
        self.grid: tuple[int, int] = (0, 0)

    def _features(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Selected patch features ``(B, P, D)`` of a batch."""
        f = patch_features(self.layers(to_batch(images, self.spec.image_size, self.device)), self.stride, self.grid_layer)
        if self.dims is None:
            d = f.shape[1]
            g = torch.Generator().manual_seed(self.params.seed)
            self.dims = torch.sort(torch.randperm(d, generator=g)[:MAX_DIMS]).values if d > MAX_DIMS else torch.arange(d)
        self.grid = tuple(f.shape[-2:])
        return f[:, self.dims.to(f.device)].flatten(2).transpose(1, 2)

    @torch.inference_mode()
    def fit(self, images: Sequence[np.ndarray]) -> None:
        """Per-position Gaussians from normal RGB uint8 images (running sums, bounded memory)."""
        if len(images) < 2:
            raise InputError(
                f"detect.method padim needs at least 2 normal training images, got {len(images)}; "
                "use a dataset with a train/good folder or detect.method musc (zero-shot)"
            )
        n = self.params.train_images
        if 0 < n < len(images):
            pick = np.sort(np.random.default_rng(self.params.seed).choice(len(images), n, replace=False))
            images = [images[int(i)] for i in pick]
        count, total, outer = 0, None, None
        bs = self.params.batch_size
        for s in tqdm(list(batches(len(images), bs)), desc="detect: fit padim", unit="batch"):
            x = self._features(images[s]).double()
            if total is None:
                total = torch.zeros(x.shape[1:], dtype=torch.float64, device=self.device)
                outer = torch.zeros(x.shape[1:] + x.shape[2:], dtype=torch.float64, device=self.device)
            count += len(x)
            total += x.sum(0)
            outer += torch.einsum("bpi,bpj->pij", x, x)
        mean, cov = gaussian_stats(count, total, outer)
        var = torch.diagonal(cov, dim1=1, dim2=2).mean(0)  # each channel's variance, over positions
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        cov = cov + (REG * torch.diag(var) + 1e-4 * float(var.mean()) * eye)
        self.mean = mean.float()
        with single_threaded():  # see parallel.single_threaded; also the same bits for any thread count
            self.precision = torch.linalg.inv(cov).float()
        log.info("padim: %d images, %d positions, %d dims", count, *mean.shape)

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if self.mean is None:
            raise RuntimeError("PaDiM.predict before fit")
        size = self.params.map_size
        sigma = self.params.smooth_sigma * size / self.spec.image_size
        out = np.zeros((len(images), size, size), dtype=np.float32)
        bs = self.params.batch_size
        for s in tqdm(list(batches(len(images), bs)), desc="detect: padim maps", unit="batch"):
            x = self._features(images[s])
            grid = mahalanobis(x, self.mean, self.precision).view(len(x), *self.grid)
            out[s] = upsample_maps(grid, size, sigma).cpu().numpy()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"dims": self.dims, "mean": self.mean.cpu(), "precision": self.precision.cpu(), "grid": self.grid}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dims = state["dims"]
        self.mean = state["mean"].to(self.device)
        self.precision = state["precision"].to(self.device)
        self.grid = tuple(state["grid"])
