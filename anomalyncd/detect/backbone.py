"""Detectors on the patch features of a backbone (a timm model or the filter bank): the
shared base class of PatchCore, PaDiM and MuSc, and the patch features PatchCore and PaDiM
compare."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ..bnfold import folded
from ..device import autocast, resolve_device
from ..grids import common_grid
from .base import Detector
from .features import FILTERBANK, BackboneSpec, build_backbone


def backbone_spec(params) -> BackboneSpec:
    """The backbone described by the ``detect`` params."""
    return BackboneSpec(
        name=params.backbone,
        layers=list(params.layers),
        pretrained=params.pretrained,
        checkpoint=params.checkpoint,
        image_size=params.image_size,
        seed=params.seed,
    )


def patch_features(
    layers: list[torch.Tensor], stride: int, grid_layer: int, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Backbone outputs ``[(B, C_l, h_l, w_l)]`` -> patch features ``(B, sum C_l, h, w)``.

    Each layer is first pooled by ``stride`` (for full-resolution backbones such as the filter
    bank), averaged over its 3x3 neighbourhood, then brought onto the grid of layer
    ``grid_layer`` (an index into ``layers``; 0, the first and finest, is PatchCore's choice),
    or onto ``size = (h, w)`` when given: finer layers average-pooled onto it, coarser ones
    upsampled (:func:`anomalyncd.grids.common_grid`).
    """
    pooled = [F.avg_pool2d(F.avg_pool2d(f, stride) if stride > 1 else f, 3, stride=1, padding=1, count_include_pad=False) for f in layers]
    return torch.cat(common_grid(pooled, at=grid_layer, size=size), dim=1)


class BackboneDetector(Detector):
    """A detector on the patch features of a backbone (a timm model or the filter bank)."""

    #: The filter bank works at full resolution: it is pooled to a grid of this stride.
    filterbank_stride: ClassVar[int] = 4

    def __init__(self, params, context=None) -> None:
        super().__init__(params, context)
        self.spec = backbone_spec(params)
        self.device = torch.device(resolve_device(params.device))
        # frozen: its batch norms fold into its convolutions (same maps up to float rounding,
        # the trunk about 1.3x faster on CPU), checked on a small random image
        example = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(self.device)
        self.backbone = folded(build_backbone(self.spec).to(self.device), example)
        self.pretrained = self.spec.pretrained or bool(self.spec.checkpoint)
        self.weights = self.backbone.weights
        self.stride = self.filterbank_stride if self.spec.name == FILTERBANK else 1
        # the filter bank gives one full-resolution map of all its scales: one grid already
        self.grid_layer = 0 if self.spec.name == FILTERBANK else params.grid_layer

    def layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's layers ``[(B, C_l, h_l, w_l)]`` of a float batch ``x`` (B, 3, H, W), in
        float32; with ``detect.mixed_precision`` computed in half precision
        (:func:`anomalyncd.device.autocast`)."""
        with autocast(self.device, self.params.mixed_precision):
            out = self.backbone(x)
        return [f.float() for f in out]
