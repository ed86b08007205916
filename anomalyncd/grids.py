"""Feature maps of several backbone layers brought onto one grid (pure functions on tensors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def common_grid(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Feature maps ``[(B, C_l, h_l, w_l)]`` -> the same maps on the grid of layer
    ``(L - 1) // 2`` (the first of two, the middle of three): finer maps average-pooled onto
    it, coarser ones upsampled bilinearly. PatchCore's ``[2, 3]`` keeps layer 2's grid; three
    layers such as EfficientNet's ``[1, 2, 3]`` (strides 4, 8, 16) meet on the stride-8 grid."""
    size = maps[(len(maps) - 1) // 2].shape[-2:]
    return [
        f if f.shape[-2:] == size
        else F.adaptive_avg_pool2d(f, size) if f.shape[-1] > size[-1]
        else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        for f in maps
    ]
