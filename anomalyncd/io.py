"""Small I/O helpers shared by every stage: atomic outputs, images, masks, JSON."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

import cv2
import numpy as np


class InputError(ValueError):
    """Bad user input: the message names the file or param and the fix."""


class InputWarning(UserWarning):
    """Input a stage goes on with, but the user should know about (a soft mask cut at half range,
    an estimate at its bound): names the file or param."""


#: OSError codes a user fixes (space, permissions), not a bug: one ``error:`` line, no traceback.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def disk_error_message(e: OSError, path: str | os.PathLike | None = None) -> str:
    """``<file>: <what>; <how to fix>`` for an OSError whose code is in :data:`DISK_ERRNOS`."""
    where = path if path is not None else (e.filename or "disk")
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    fix = "free some disk space" if full else f"make {Path(where).parent} writable"
    return f"{where}: cannot write ({e.strerror}); {fix} and run again (the previous output is kept)"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only on success.

    Works for files and directories. On an exception the temporary is removed and any
    previous ``path`` is left untouched, so no later stage can trust a half-written output.
    A folder is replaced only by a folder (a stage's own output folder, e.g. ``reports/``): a
    file written onto an existing folder is an :class:`InputError`, and the folder is kept.
    Temporaries of ``path`` left by killed processes are removed first; a full disk or a
    read-only folder is an :class:`InputError` naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        _remove(tmp)
        try:
            yield tmp
            if path.is_dir() and not path.is_symlink():
                if not tmp.is_dir():
                    raise InputError(f"{path}: is a folder, not a file; name a file to write (the folder is left as it is)")
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            _remove(tmp)
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        raise InputError(disk_error_message(e, path)) from e


def output_file(path: str | os.PathLike, default_name: str, option: str) -> Path:
    """Where to write an output file the user named with ``option``: ``path``, or
    ``path/default_name`` when ``path`` is an existing folder. A place that cannot be written
    (its nearest existing folder refuses a file, or is a file) is an ``InputError`` now, before
    any work is done."""
    import tempfile

    path = Path(path)
    if path.is_dir():
        path = path / default_name
    folder = next(p for p in (path.parent, *path.parent.parents) if p.exists() or p.is_symlink() or p == Path("."))
    try:
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder")
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"{path}: cannot write there ({folder}: {e.strerror or e}); choose another {option}") from e
    return path


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``path`` (``.<name>.tmp-<pid>`` and ``.<name>.tmp-<pid>.<x>``)
    whose process is gone.

    A run killed inside :func:`atomic_path` leaves its temporary behind (a checkpoint, a
    store being built); the next write of the same output removes it. Returns what was removed.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(path.name)}\.tmp-(\d+)(\..+)?")
    removed = []
    for p in sorted(path.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if m and not pid_alive(int(m.group(1))):
            _remove(p)
            removed.append(p)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (ours or another user's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


#: the wrapper :func:`save_torch` writes: the payload's bytes and their SHA-256
TORCH_FORMAT = "anomalyncd-sha256-1"


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """Save ``obj`` (tensors, numbers, strings, lists, tuples and dicts only) to ``path``
    atomically, with the SHA-256 of its bytes inside the file (:func:`load_torch` checks it).

    The file is ``torch.save({"format", "sha256", "payload"})``, ``payload`` being the bytes of
    ``torch.save(obj)`` as a ``uint8`` tensor. It is written through a Python file object: a full
    disk is then an ``OSError`` that :func:`atomic_path` reports.
    """
    import hashlib

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    raw = buf.getvalue()
    wrapper = {
        "format": TORCH_FORMAT,
        "sha256": hashlib.sha256(raw).hexdigest(),
        "payload": torch.frombuffer(bytearray(raw), dtype=torch.uint8),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(wrapper, fh)


def load_torch(path: str | os.PathLike, fix: str) -> Any:
    """What :func:`save_torch` saved to ``path``, read with ``weights_only=True`` (no code runs).

    A file holding other Python objects (a crafted pickle), a file whose payload does not match
    its hash (a flipped byte), or an unreadable one is an ``InputError`` naming ``path`` and
    ending with ``fix`` (e.g. "rerun the train stage (dvc repro train)").
    """
    import hashlib
    import pickle

    import torch

    path = Path(path)
    try:
        wrapper = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(wrapper, dict) and wrapper.get("format") == TORCH_FORMAT:
            raw = wrapper["payload"].numpy().tobytes()
            if hashlib.sha256(raw).hexdigest() != wrapper["sha256"]:
                raise InputError(f"{path}: damaged (its content does not match its SHA-256); {fix}")
            return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(
            f"{path}: refused: it holds Python objects other than tensors and plain values, which "
            f"could run code when loaded (only files written by anomalyncd are read); {fix}"
        ) from e
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, a wrapper without its keys
        first = str(e).split(". ")[0]
        raise InputError(f"{path}: damaged or not a file written by anomalyncd ({type(e).__name__}: {first}); {fix}") from e
    raise InputError(f"{path}: not written by this version of anomalyncd (no content hash); {fix}")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, strict JSON, atomically: a non-finite float (NaN, infinity),
    which JSON has no word for, is written as ``null``."""
    text = json.dumps(finite_or_none(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (also NumPy's, and in arrays) replaced by ``None``."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_or_none(obj.tolist())
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj


def read_json(path: str | os.PathLike, stage: str) -> dict:
    """A JSON object an earlier stage wrote; a file that does not parse, or holds no object,
    is an ``InputError`` "<file>: damaged (...); rerun <stage>"."""
    path = Path(path)
    fix = f"rerun the {stage} stage (dvc repro {stage})"
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: damaged (not JSON: {e.msg} at line {e.lineno}); {fix}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read it ({e}); {fix}") from e
    if not isinstance(data, dict):
        raise InputError(f"{path}: damaged (a JSON {type(data).__name__}, not an object); {fix}")
    return data


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def decode_image(path: str | os.PathLike, flags: int = cv2.IMREAD_UNCHANGED, what: str = "image") -> np.ndarray:
    """The pixels of an image file as OpenCV decodes them (BGR order, the file's bit depth).

    A missing, empty or undecodable file, and a truncated JPEG (OpenCV would fill its missing
    part with grey and only log a warning that names no file), are an ``InputError``.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read this {what} ({e.strerror or e}); check that the file exists") from e
    if jpeg_truncated(raw):
        raise InputError(f"{path}: truncated JPEG (the file ends before the image data does); replace the file")
    img = cv2.imdecode(np.frombuffer(raw, np.uint8), flags) if raw else None
    if img is None:
        raise InputError(f"{path}: cannot read this {what} (empty or not an image file)")
    return img


def jpeg_truncated(raw: bytes) -> bool:
    """Whether ``raw`` is a JPEG stream without its end-of-image marker after the last scan.

    Entropy-coded data never holds a marker (0xFF bytes are stuffed), so the last start-of-scan
    (FF DA) of a complete file is followed by an end-of-image (FF D9); a thumbnail's own EOI
    comes before the main scans and does not count.
    """
    return raw[:2] == b"\xff\xd8" and raw.rfind(b"\xff\xd9") < raw.rfind(b"\xff\xda")


#: The bit depths a 16-bit file's pixels may hold (cameras give 10, 12 or 14 bits in 16-bit files).
BIT_DEPTHS = (8, 10, 12, 14, 16)


def to_uint8(img: np.ndarray, path: str | os.PathLike, bits: int = 16) -> np.ndarray:
    """Pixels as ``uint8``, scaled by the bit depth so that intensities compare across images.

    8-bit stays as it is; 16-bit is scaled from ``bits`` significant bits (the data set's, see
    :func:`significant_bits`: 16 divides by 257, 65535 -> 255; 12 maps 4095 -> 255), a value
    above that range saturating at 255; floats in [0, 1] are multiplied by 255; any other pixel
    type is an ``InputError`` naming ``path``.
    """
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        top = (1 << bits) - 1
        return np.round(np.minimum(img, top) / (top / 255.0)).astype(np.uint8)
    if np.issubdtype(img.dtype, np.floating) and np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1:
        return np.round(img * 255.0).astype(np.uint8)
    raise InputError(
        f"{path}: pixels are {img.dtype}"
        + (" outside [0, 1]" if np.issubdtype(img.dtype, np.floating) else "")
        + "; save the image with 8 or 16 bits per channel (or as floats in [0, 1])"
    )


def significant_bits(peaks: Iterable[int | None]) -> int:
    """The smallest of :data:`BIT_DEPTHS` whose range holds the brightest of a data set's 16-bit
    images; ``peaks``: :func:`image_info`'s peak of each image (None for one that is not 16-bit),
    16 when none is. A 12-bit camera's images (at most 4095) read as 12-bit, not as 16-bit images
    that use 1/16 of their range and would keep 17 grey levels out of 256."""
    peak = max((p for p in peaks if p is not None), default=None)
    return 16 if peak is None else next((b for b in BIT_DEPTHS if peak < 1 << b), 16)


def read_image(path: str | os.PathLike, bits: int = 16) -> np.ndarray:
    """Read an image as RGB ``uint8`` ``(H, W, 3)``; grayscale becomes 3 channels, 16-bit is
    scaled from ``bits`` significant bits (the data set's, not per image: intensities stay
    comparable across images; :func:`to_uint8`)."""
    img = to_uint8(decode_image(path), path, bits)
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[2] == 4:
        img = img[:, :, :3]
    return np.ascontiguousarray(img[:, :, ::-1])


def read_mask_levels(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A mask's grey levels, ``uint8`` ``(H, W)``; ``shape`` (H, W), when given, must match."""
    m = decode_image(path, cv2.IMREAD_GRAYSCALE, "mask")
    if shape is not None and m.shape != tuple(shape):
        raise InputError(
            f"{path}: mask is {m.shape[1]}x{m.shape[0]} but its image is {shape[1]}x{shape[0]}; "
            "masks must have their image's size"
        )
    return m


def is_binary_mask(levels: np.ndarray) -> bool:
    """Whether a mask holds at most two grey levels, one of them 0 (e.g. {0, 255} or {0, 1})."""
    return bool(((levels == 0) | (levels == levels.max())).all())


def binarise_mask(levels: np.ndarray) -> np.ndarray:
    """``bool`` (H, W): any non-zero pixel of a binary mask; of a soft one (blurred,
    anti-aliased, JPEG), the pixels at half its peak or above (128 of 255), which would otherwise
    grow to everything its blur touches."""
    return levels > 0 if is_binary_mask(levels) else levels >= (int(levels.max()) + 1) // 2


def read_mask(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask as ``bool`` ``(H, W)`` (see :func:`binarise_mask`).

    ``shape`` (H, W), when given, must match: a mask of another size is an error.
    """
    return binarise_mask(read_mask_levels(path, shape))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """Return ``(H, W)`` of an image file, raising ``InputError`` if it is unreadable,
    truncated or of an unsupported pixel type."""
    h, w, _ = image_info(path)
    return h, w


def image_info(path: str | os.PathLike) -> tuple[int, int, int | None]:
    """``(H, W, peak)`` of an image file: ``peak`` the largest pixel value of a 16-bit image
    (None for any other), for the data set's :func:`significant_bits`; ``InputError`` if the
    file is unreadable, truncated or of an unsupported pixel type."""
    raw = decode_image(path)
    img = to_uint8(raw, path)
    return int(img.shape[0]), int(img.shape[1]), int(raw.max()) if raw.dtype == np.uint16 else None


def write_image(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an RGB or grayscale ``uint8`` image (format from the extension)."""
    arr = rgb[:, :, ::-1] if rgb.ndim == 3 else rgb
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(arr)):
        raise InputError(f"{path}: could not write this image; check that its folder is writable and the disk not full")
