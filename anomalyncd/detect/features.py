"""Patch-feature backbones: timm models by name, or a weight-free filter bank.

Every backbone maps a float batch ``(B, 3, H, W)`` with values in ``[0, 1]`` to a list of
feature maps ``(B, C_l, h_l, w_l)``, one per requested layer, and does its own input
normalisation. ``build_backbone`` picks one from a :class:`BackboneSpec`:

- ``filterbank``: no learned weights at all. Multi-scale responses of the grayscale image
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
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

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
        return FilterBank(sigmas=[float(s) for s in spec.layers])
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
            raise InputError(f"params.yaml: detect.backbone: {e}") from e
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


class FilterBank(nn.Module):
    """Weight-free multi-scale features of the image.

    The image is converted to gray and standardised per image (zero median, unit robust
    spread), so that lighting differences between photographs do not count as anomalies; two
    opponent-colour channels (red-green, yellow-blue) are centred the same way and share the
    gray spread. At each Gaussian scale sigma the bank gives eight channels, scaled to be
    comparable across scales: the smoothed intensity, the local standard deviation (window
    sigma), the absolute horizontal and vertical derivatives (times sigma; they tell streak
    direction apart), the two Hessian eigenvalues (times sigma^2; spots and thin lines such as
    cracks) and the two smoothed colour channels (zero for grayscale images). Output: one map
    ``(B, 8 * len(sigmas), H, W)`` at full resolution; the detectors pool it onto their grid.
    """

    per_scale = 8
    weights = "none (weight-free filter bank)"

    def __init__(self, sigmas: list[float]) -> None:
        super().__init__()
        if not sigmas or min(sigmas) <= 0:
            raise InputError(f"params.yaml: detect.layers {sigmas} must be positive scales for the filter bank")
        self.sigmas = list(sigmas)
        for i, s in enumerate(self.sigmas):
            self.register_buffer(f"g{i}", _gaussian_1d(s), persistent=False)
        # rows: gray, red-green, yellow-blue
        mix = torch.tensor([[0.299, 0.587, 0.114], [1.0, -1.0, 0.0], [0.5, 0.5, -1.0]])
        self.register_buffer("mix", mix.view(3, 3, 1, 1), persistent=False)

    @property
    def channels(self) -> int:
        return self.per_scale * len(self.sigmas)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x`` (B, 3, H, W) in [0, 1] -> ``[(B, 8 * n_sigmas, H, W)]``."""
        x = F.conv2d(x, self.mix)
        flat = x.flatten(2)
        med = flat.median(dim=2).values[:, :, None, None]  # (B, 3, 1, 1)
        spread = (flat[:, 0] - med[:, 0, 0]).abs().median(dim=1).values.view(-1, 1, 1, 1) * 1.4826
        x = (x - med) / spread.clamp_min(1e-3)
        g, color = x[:, :1], x[:, 1:]
        out = []
        for i, s in enumerate(self.sigmas):
            k = getattr(self, f"g{i}")
            m = _blur(g, k)
            var = (_blur(g * g, k) - m * m).clamp_min(0)
            gy, gx = _grad(m)
            hyy, hyx = _grad(gy)
            hxy, hxx = _grad(gx)
            hxy = 0.5 * (hxy + hyx)
            half_tr = 0.5 * (hxx + hyy)
            root = torch.sqrt((0.5 * (hxx - hyy)) ** 2 + hxy**2)
            c = _blur(color.reshape(-1, 1, *color.shape[-2:]), k).view_as(color)
            out += [m, var.sqrt(), gx.abs() * s, gy.abs() * s, (half_tr + root) * s * s, (half_tr - root) * s * s, c]
        return [torch.cat(out, dim=1)]


def _gaussian_1d(sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _blur(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) with reflect padding (replicate if too small)."""
    r = k.numel() // 2
    mode = "reflect" if r < min(x.shape[-2:]) else "replicate"
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1))


def _grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences (d/dy, d/dx) of (B, 1, H, W), replicate-padded."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return 0.5 * (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]), 0.5 * (p[..., 1:-1, 2:] - p[..., 1:-1, :-2])
