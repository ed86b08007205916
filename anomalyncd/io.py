"""Small I/O helpers shared by every stage: atomic outputs, images, JSON."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np


class InputError(ValueError):
    """Bad user input: the message names the file or param and the fix."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only on success.

    Works for files and directories. On an exception the temporary is removed and any
    previous ``path`` is left untouched, so no later stage can trust a half-written output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as RGB ``uint8`` ``(H, W, 3)``; grayscale becomes 3 channels."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise InputError(f"{path}: cannot read this image (missing, empty or not an image file)")
    if img.dtype != np.uint8:
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[2] == 4:
        img = img[:, :, :3]
    return np.ascontiguousarray(img[:, :, ::-1])


def read_mask(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a binary mask as ``bool`` ``(H, W)`` (any non-zero pixel is foreground).

    ``shape`` (H, W), when given, must match: a mask of another size is an error.
    """
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise InputError(f"{path}: cannot read this mask (missing, empty or not an image file)")
    if shape is not None and m.shape != tuple(shape):
        raise InputError(
            f"{path}: mask is {m.shape[1]}x{m.shape[0]} but its image is {shape[1]}x{shape[0]}; "
            "masks must have their image's size"
        )
    return m > 0


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """Return ``(H, W)`` of an image file, raising ``InputError`` if unreadable."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise InputError(f"{path}: cannot read this image (missing, empty or not an image file)")
    return int(img.shape[0]), int(img.shape[1])


def write_image(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an RGB or grayscale ``uint8`` image (format from the extension)."""
    arr = rgb[:, :, ::-1] if rgb.ndim == 3 else rgb
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(arr)):
        raise OSError(f"{path}: could not write image")
