"""The synthetic demo dataset: textured surfaces with four kinds of defect, in MVTec layout.

Everything is drawn from one seed, so ``demo`` makes the same dataset on every machine. The
defect types differ in shape and appearance on purpose, so that class discovery has something
real to find: thin straight ``scratch`` es, round dark ``hole`` s, branching dark ``crack`` s and
soft coloured ``stain`` s. A defect image holds 1 to 3 regions of one type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from .config import DemoParams
from .io import InputError, write_image


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A brushed-metal-like surface: RGB ``uint8`` ``(size, size, 3)``."""
    base = rng.uniform(110, 150)
    low = cv2.resize(rng.normal(0, 1, (8, 8)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    grain = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), sigmaX=3.0, sigmaY=0.6)
    img = base + 8 * low + 10 * grain + rng.normal(0, 2.5, (size, size))
    tint = np.array([1.0, 0.98, 0.94]) * rng.uniform(0.95, 1.05, 3)
    return np.clip(img[:, :, None] * tint, 0, 255).astype(np.uint8)


def _scratch(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray) -> None:
    s = img.shape[0]
    length = rng.uniform(0.3, 0.6) * s
    angle = rng.uniform(0, np.pi)
    c = rng.uniform(0.25, 0.75, 2) * s
    d = np.array([np.cos(angle), np.sin(angle)]) * length / 2
    p0, p1 = tuple(int(v) for v in c - d), tuple(int(v) for v in c + d)
    m = np.zeros_like(mask, dtype=np.uint8)
    cv2.line(m, p0, p1, 1, thickness=2, lineType=cv2.LINE_8)
    img[m > 0] = np.clip(img[m > 0].astype(int) + 90, 0, 255)
    mask |= m > 0


def _hole(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray) -> None:
    s = img.shape[0]
    r = int(rng.uniform(0.04, 0.07) * s) + 1
    c = tuple(int(v) for v in rng.uniform(0.15, 0.85, 2) * s)
    m = np.zeros_like(mask, dtype=np.uint8)
    cv2.circle(m, c, r, 1, thickness=-1)
    shade = np.clip(img.astype(int) * 0.25, 0, 255).astype(np.uint8)
    img[m > 0] = shade[m > 0]
    mask |= m > 0


def _crack(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray) -> None:
    s = img.shape[0]
    m = np.zeros_like(mask, dtype=np.uint8)
    stack = [(rng.uniform(0.3, 0.7, 2) * s, rng.uniform(0, 2 * np.pi), 3)]
    while stack:
        p, a, depth = stack.pop()
        for _ in range(int(rng.integers(4, 8))):
            a += rng.normal(0, 0.5)
            q = p + np.array([np.cos(a), np.sin(a)]) * s * 0.04
            cv2.line(m, tuple(int(v) for v in p), tuple(int(v) for v in q), 1, thickness=2)
            p = q
            if depth > 0 and rng.random() < 0.25:
                stack.append((p.copy(), a + rng.choice([-1, 1]) * rng.uniform(0.6, 1.2), depth - 1))
    img[m > 0] = (img[m > 0] * 0.35).astype(np.uint8)
    mask |= m > 0


def _stain(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray) -> None:
    s = img.shape[0]
    c = rng.uniform(0.2, 0.8, 2) * s
    axes = rng.uniform(0.06, 0.11, 2) * s
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    ang = rng.uniform(0, np.pi)
    dx, dy = xx - c[0], yy - c[1]
    u = (dx * np.cos(ang) + dy * np.sin(ang)) / axes[0]
    v = (-dx * np.sin(ang) + dy * np.cos(ang)) / axes[1]
    w = np.exp(-(u**2 + v**2))
    colour = np.array([16.0, -4.0, -14.0]) * rng.uniform(0.9, 1.1)
    img[:] = np.clip(img + w[:, :, None] * colour, 0, 255).astype(np.uint8)
    mask |= w > 0.35


DEFECTS: dict[str, Callable[[np.random.Generator, np.ndarray, np.ndarray], None]] = {
    "scratch": _scratch,
    "hole": _hole,
    "crack": _crack,
    "stain": _stain,
}


def defect_image(rng: np.random.Generator, size: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """One image with 1-3 regions of defect ``kind``: RGB ``(size, size, 3)``, bool mask."""
    img = texture(rng, size)
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        DEFECTS[kind](rng, img, mask)
    return img, mask


def generate(root: str | Path, p: DemoParams) -> dict[str, int]:
    """Write the demo dataset under ``root/<category>`` in MVTec layout; return image counts."""
    unknown = sorted(set(p.types) - set(DEFECTS))
    if unknown:
        raise InputError(f"params.yaml: demo.types {unknown} unknown; choose from {sorted(DEFECTS)}")
    rng = np.random.default_rng(p.seed)
    base = Path(root) / p.category
    counts: dict[str, int] = {}
    for i in range(p.n_train):
        write_image(base / "train" / "good" / f"{i:03d}.png", texture(rng, p.image_size))
    counts["train/good"] = p.n_train
    for i in range(p.n_test_normal):
        write_image(base / "test" / "good" / f"{i:03d}.png", texture(rng, p.image_size))
    counts["test/good"] = p.n_test_normal
    for kind in p.types:
        for i in range(p.n_per_type):
            img, mask = defect_image(rng, p.image_size, kind)
            write_image(base / "test" / kind / f"{i:03d}.png", img)
            write_image(base / "ground_truth" / kind / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
        counts[f"test/{kind}"] = p.n_per_type
    return counts
