"""MuSc (Li et al., ICLR 2024, https://arxiv.org/abs/2401.16753): zero-shot anomaly maps, the unlabeled images score each other.

Normal patches find close matches in most other images; anomalous ones do not. For each
backbone layer and each aggregation degree r in (1, 3, 5), patch features are layer-normed,
averaged over their r x r neighbourhood (zero-padded) and L2-normalised. For a patch of image
i, the distance to the nearest patch of every other image j gives N - 1 values; the patch
scores the mean of the smallest 30 % of them. Maps are averaged over layers and degrees and
upsampled to the map size.

Cost is O(N^2) in the number of images: the set is split into seeded random subsets of at
most ``musc_subset_size`` images scored independently, and distances are computed in chunks.

New images (``anomalyncd predict``): the detector keeps the features of one random subset of
the images of its run as references; a new image is scored against those references with the
same rule (nearest patch per reference image, mean of the smallest 30 %).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..io import InputError
from .base import register
from .ops import CHUNK_ELEMENTS, batches, to_batch, upsample_maps
from .backbone import BackboneDetector

log = logging.getLogger(__name__)

DEGREES = (1, 3, 5)
MIN_IMAGES = 5
NEAREST_FRACTION = 0.3


def aggregate(f: torch.Tensor, r: int) -> torch.Tensor:
    """Layer-norm over channels, r x r neighbourhood mean (zero-padded), L2-normalise.

    ``f`` (N, C, h, w) -> (N, h * w, C).
    """
    f = F.layer_norm(f.permute(0, 2, 3, 1), f.shape[1:2]).permute(0, 3, 1, 2)
    if r > 1:
        f = F.avg_pool2d(f, r, stride=1, padding=r // 2, count_include_pad=True)
    return F.normalize(f.flatten(2).transpose(1, 2), dim=-1)


def nearest_patch_distances(query: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """For each patch of one image, its distance to the nearest patch of each reference image.

    ``query`` (P, C) and ``refs`` (R, Q, C), rows L2-normalised -> (P, R).
    """
    p, c = query.shape
    r, q, _ = refs.shape
    step = max(1, CHUNK_ELEMENTS // max(1, p * q))
    out = []
    for s in batches(r, step):
        sim = query @ refs[s].reshape(-1, c).T  # (P, r_s * Q)
        out.append(sim.view(p, -1, q).amax(dim=2))
    best = torch.cat(out, dim=1)
    return torch.sqrt((2.0 - 2.0 * best).clamp_min(0.0))


def mean_of_smallest(d: torch.Tensor, fraction: float = NEAREST_FRACTION) -> torch.Tensor:
    """Mean of the smallest ``ceil(fraction * K)`` values along the last axis of ``d`` (..., K)."""
    k = max(1, int(math.ceil(fraction * d.shape[-1])))
    return d.topk(k, dim=-1, largest=False).values.mean(dim=-1)


def mutual_scores(feats: torch.Tensor, fraction: float = NEAREST_FRACTION) -> torch.Tensor:
    """Transductive patch scores of a set of images scoring each other.

    ``feats`` (N, P, C) aggregated, normalised features -> (N, P): for patch p of image i, the
    mean of the smallest ``fraction`` of its N - 1 nearest-patch distances to the other images.
    """
    n = len(feats)
    out = torch.empty(feats.shape[:2], dtype=feats.dtype, device=feats.device)
    for i in range(n):
        d = nearest_patch_distances(feats[i], feats)
        d = torch.cat([d[:, :i], d[:, i + 1 :]], dim=1)
        out[i] = mean_of_smallest(d, fraction)
    return out


def reference_scores(feats: torch.Tensor, refs: torch.Tensor, fraction: float = NEAREST_FRACTION) -> torch.Tensor:
    """Patch scores ``(N, P)`` of new images ``(N, P, C)`` against reference images ``(R, Q, C)``."""
    return torch.stack([mean_of_smallest(nearest_patch_distances(f, refs), fraction) for f in feats])


def split_subsets(n: int, size: int, seed: int) -> list[np.ndarray]:
    """Seeded random split of ``range(n)`` into near-equal subsets of at most ``size`` images."""
    if size < MIN_IMAGES:
        raise InputError(f"params.yaml: detect.musc_subset_size {size} must be at least {MIN_IMAGES}")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(s) for s in np.array_split(perm, max(1, math.ceil(n / size)))]


@register("musc")
class MuSc(BackboneDetector):
    # The full-resolution filter bank is pooled to a grid of stride 8 (16 x 16 at 128 px,
    # as many patches as a ViT/14 at 224 px): the cost grows with the square of its size.
    filterbank_stride = 8
    maps_jointly = True

    def __init__(self, params, context=None) -> None:
        super().__init__(params, context)
        self.references: list[torch.Tensor] | None = None  # per layer (R, C, h, w), float16

    @torch.inference_mode()
    def layer_features(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Backbone features per layer ``[(N, C_l, h, w)]`` of RGB uint8 images."""
        chunks: list[list[torch.Tensor]] = []
        bs = self.params.batch_size
        for s in tqdm(list(batches(len(images), bs)), desc="detect: musc features", unit="batch"):
            layers = self.layers(to_batch(images[s], self.spec.image_size, self.device))
            if self.stride > 1:
                layers = [F.avg_pool2d(f, self.stride) for f in layers]
            # layers finer than detect.grid_layer's are pooled onto its grid, where the patches
            # are scored; coarser ones are upsampled there when scored (:meth:`_score`)
            size = layers[self.grid_layer].shape[-2:]
            layers = [F.adaptive_avg_pool2d(f, size) if f.shape[-1] > size[-1] else f for f in layers]
            chunks.append(layers)
        return [torch.cat(per_layer) for per_layer in zip(*chunks)]

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Maps of ``images``: scored against the stored references when this detector was
        loaded from a detect run, else transductively (the images score each other)."""
        layers = self.layer_features(images)
        if self.references is not None:
            grid = self._score(layers, self.references)
        else:
            if len(images) < MIN_IMAGES:
                raise InputError(
                    f"detect.method musc scores images against each other and needs at least {MIN_IMAGES} "
                    f"images, got {len(images)}; add images or use patchcore with normal training images"
                )
            grid = torch.zeros((len(images),) + layers[0].shape[-2:], device=self.device)
            subsets = split_subsets(len(images), self.params.musc_subset_size, self.params.seed)
            for idx in tqdm(subsets, desc="detect: musc subsets", unit="subset", disable=len(subsets) == 1):
                t = torch.as_tensor(idx, device=self.device)
                grid[t] = self._score([f[t] for f in layers], None)
            self.references = [f[torch.as_tensor(subsets[0], device=self.device)].half().cpu() for f in layers]
        return upsample_maps(grid, self.params.map_size).cpu().numpy().astype(np.float32)

    def _score(self, layers: list[torch.Tensor], refs: list[torch.Tensor] | None) -> torch.Tensor:
        """Average patch-score grid ``(N, h, w)`` over layers and degrees."""
        n, _, h, w = layers[0].shape
        total = torch.zeros((n, h * w), device=self.device)
        for li, f in enumerate(layers):
            if f.shape[-2:] != (h, w):
                f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
            for r in DEGREES:
                a = aggregate(f.float(), r)
                if refs is None:
                    total += mutual_scores(a)
                else:
                    ref = refs[li].to(self.device).float()
                    if ref.shape[-2:] != (h, w):
                        ref = F.interpolate(ref, size=(h, w), mode="bilinear", align_corners=False)
                    total += reference_scores(a, aggregate(ref, r))
        return (total / (len(layers) * len(DEGREES))).view(n, h, w)

    def state_dict(self) -> dict[str, Any]:
        if self.references is None:
            return {}
        return {"references": [r.cpu() for r in self.references]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        refs = state.get("references")
        if refs is None:
            raise InputError("this musc detector holds no reference features; rerun the detect stage")
        self.references = list(refs)
