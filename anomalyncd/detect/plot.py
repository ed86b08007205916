"""A PNG-ready grid of a few images with their anomaly maps and ground-truth masks."""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np


def pick_examples(labels: Sequence[str], n: int) -> list[int]:
    """Up to ``n`` indices taking the first images of each label in turn (round robin), so
    every defect type shows up before any repeats."""
    groups: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(lab, []).append(i)
    out: list[int] = []
    queues = [list(v) for v in groups.values()]
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def detection_grid(
    images: Sequence[np.ndarray],
    maps_u8: np.ndarray,
    masks: Sequence[np.ndarray | None],
    titles: Sequence[str],
    tile: int = 160,
) -> np.ndarray:
    """One row per image: the image, its map as a heat overlay, its mask (grey if none).

    ``images`` RGB uint8 ``(H_i, W_i, 3)``; ``maps_u8`` uint8 ``(N, S, S)`` (0..255 over the
    whole set); ``masks`` bool ``(H_i, W_i)`` or None. Returns RGB uint8 ``(N * tile + 20 * N,
    3 * tile, 3)``.
    """
    rows = []
    for img, m, mask, title in zip(images, maps_u8, masks, titles):
        im = cv2.resize(img, (tile, tile), interpolation=cv2.INTER_AREA)
        heat = cv2.applyColorMap(cv2.resize(m, (tile, tile)), cv2.COLORMAP_JET)[:, :, ::-1]
        over = cv2.addWeighted(im, 0.5, heat, 0.5, 0)
        if mask is None:
            mk = np.full((tile, tile, 3), 64, np.uint8)
        else:
            mk = cv2.resize(mask.astype(np.uint8) * 255, (tile, tile), interpolation=cv2.INTER_NEAREST)
            mk = np.repeat(mk[:, :, None], 3, axis=2)
        band = np.full((20, 3 * tile, 3), 255, np.uint8)
        cv2.putText(band, title[:60], (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        rows += [band, np.hstack([im, over, mk])]
    return np.vstack(rows) if rows else np.zeros((20, 3 * tile, 3), np.uint8)
