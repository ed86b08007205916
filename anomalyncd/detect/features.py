"""Patch-feature backbones: timm models by name, or a weight-free filter bank.

Every backbone maps a float batch ``(B, 3, H, W)`` with values in ``[0, 1]`` to a list of
feature maps ``(B, C_l, h_l, w_l)``, one per requested layer, and does its own input
normalisation. ``build_backbone`` picks one from a :class:`BackboneSpec`:

- ``filterbank``: no learned weights at all (:mod:`anomalyncd.filterbank`). Multi-scale responses of the grayscale image
  (local mean and standard deviation, gradient magnitude, both Hessian eigenvalues at each
  Gaussian scale), the kind of hand-made texture descriptor that needs nothing downloaded.
- any timm model name: ``features_only`` feature maps (CNN stages, or ViT blocks reshaped to
  their patch grid). ``pretrained: true`` loads ImageNet weights (from an installed package
  for ``tf_efficientnet_lite0/1/2``, see :mod:`anomalyncd.weights`; timm's download for other
  names), ``checkpoint`` a local file, neither gives random weights (seeded, so a saved
  detector rebuilds them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..filterbank import FilterBank
from ..io import InputError
from ..weights import create_timm_model

log = logging.getLogger(__name__)

FILTERBANK = "filterbank"


@dataclass
class BackboneSpec:
    """Which backbone to build. ``layers``: timm ``out_indices`` (CNN stages or ViT blocks);
    for ``filterbank`` they are the Gaussian scales in pixels of the resized image."""

    name: str = FILTERBANK
    layers: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    pretrained: bool = False
    checkpoint: str = ""
    image_size: int = 256
    seed: int = 0


def build_backbone(spec: BackboneSpec) -> nn.Module:
    """Build the backbone described by ``spec`` in eval mode."""
    if spec.name == FILTERBANK:
        try:
            return FilterBank(sigmas=[float(s) for s in spec.layers])
        except ValueError as e:
            raise InputError(f"params.yaml: detect.layers {spec.layers} must be positive scales for the filter bank ({e})") from e
    return TimmFeatures(spec)


class TimmFeatures(nn.Module):
    """Intermediate feature maps of a timm model (``features_only``), ImageNet-normalised input."""

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        kwargs: dict = {"features_only": True, "out_indices": tuple(spec.layers)}
        if _is_vit(spec.name):
            kwargs["img_size"] = spec.image_size
        try:
            self.model, self.weights = create_timm_model(
                spec.name, spec.pretrained, spec.checkpoint, spec.seed, **kwargs
            )
        except InputError as e:
            raise InputError(f"params.yaml: detect.backbone / detect.checkpoint: {e}") from e
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise InputError(f"params.yaml: detect.backbone {spec.name!r} is not a timm model ({e})") from e
            raise
        except (IndexError, AssertionError) as e:
            raise InputError(
                f"params.yaml: detect.layers {spec.layers} out of range for {spec.name} ({e}); for a timm "
                "backbone they are feature indices, e.g. [2, 3] for wide_resnet50_2"
            ) from e
        cfg = self.model.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1))
        self.eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x`` (B, 3, H, W) in [0, 1] -> list of (B, C_l, h_l, w_l)."""
        return list(self.model((x - self.mean) / self.std))


def _is_vit(name: str) -> bool:
    return any(k in name for k in ("vit", "deit", "eva", "beit", "dino"))
