"""A weight-free multi-scale filter bank: hand-made texture descriptors of an image.

Shared by the ``filterbank`` detector backbone (:mod:`anomalyncd.detect.features`) and the
region descriptors that estimate the number of classes (:mod:`anomalyncd.auto_k`); it needs no
weights and nothing downloaded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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

    CHANNELS = ("intensity", "std", "dx", "dy", "hessian_max", "hessian_min", "red_green", "yellow_blue")
    per_scale = len(CHANNELS)
    weights = "none (weight-free filter bank)"

    def __init__(self, sigmas: list[float]) -> None:
        super().__init__()
        if not sigmas or min(sigmas) <= 0:
            raise ValueError(f"filter-bank scales {sigmas} must be positive")
        self.sigmas = list(sigmas)
        for i, s in enumerate(self.sigmas):
            self.register_buffer(f"g{i}", _gaussian_1d(s), persistent=False)
        # rows: gray, red-green, yellow-blue
        mix = torch.tensor([[0.299, 0.587, 0.114], [1.0, -1.0, 0.0], [0.5, 0.5, -1.0]])
        self.register_buffer("mix", mix.view(3, 3, 1, 1), persistent=False)

    @property
    def channels(self) -> int:
        return self.per_scale * len(self.sigmas)

    def channel_index(self, names: list[str], scale: int = 0) -> list[int]:
        """Indices in the output of the channels ``names`` (from :attr:`CHANNELS`) at the
        ``scale``-th sigma."""
        unknown = [n for n in names if n not in self.CHANNELS]
        if unknown or not 0 <= scale < len(self.sigmas):
            raise ValueError(f"no channel(s) {unknown} at scale {scale}; channels {self.CHANNELS}, {len(self.sigmas)} scale(s)")
        return [scale * self.per_scale + self.CHANNELS.index(n) for n in names]

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
