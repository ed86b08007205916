"""Feature maps of several backbone layers brought onto one grid (pure functions on tensors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def common_grid(maps: list[torch.Tensor], at: int | None = None, size: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """Feature maps ``[(B, C_l, h_l, w_l)]`` -> the same maps on the grid of layer ``at``
    (by default ``(L - 1) // 2``: the first of two, the middle of three): finer maps
    average-pooled onto it, coarser ones upsampled bilinearly. EfficientNet's ``[2, 3, 4]``
    (strides 8, 16, 32) meet on the stride-16 grid by default, on the stride-8 grid with
    ``at=0`` (PatchCore's choice: the grid of its first layer). ``size = (h, w)``: onto that
    grid instead (another pass's, e.g. of the same image at another scale)."""
    size = size or maps[(len(maps) - 1) // 2 if at is None else at].shape[-2:]
    return [
        f if f.shape[-2:] == size
        else F.adaptive_avg_pool2d(f, size) if f.shape[-1] > size[-1]
        else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        for f in maps
    ]
