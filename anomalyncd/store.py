"""The artifact store: the one module that knows how stages exchange arrays.

Every artifact is a zarr v3 group packed into a single ``*.zarr.zip`` file, so DVC hashes one
file per artifact however many images there are. A store is built in a temporary folder beside
it, zipped to a temporary file and renamed into place: a failed stage leaves no store behind,
and a killed one leaves temporaries that the next write removes.

Per-image arrays are in the order of ``ids`` (the images to classify, see
``Manifest.to_classify``); per-crop arrays are in crop order and point at their image through
``image_index``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore, ZipStore

from .io import InputError, atomic_path

LAYOUT_VERSION = 1


@dataclass
class MapSet:
    """Anomaly maps of the images to classify (written by ``detect``).

    ids: N image ids. maps: float32 (N, S, S) raw detector output. maps_u8: uint8 (N, S, S),
    min-max normalised over the whole set to 0..255 (what MEBin reads). scores: float32 (N,)
    image anomaly scores. image_sizes: int32 (N, 2) original (H, W).
    """

    ids: list[str]
    maps: np.ndarray
    maps_u8: np.ndarray
    scores: np.ndarray
    image_sizes: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.ids)
        _check_len("maps", self.maps, n)
        _check_len("maps_u8", self.maps_u8, n)
        _check_len("scores", self.scores, n)
        _check_len("image_sizes", self.image_sizes, n)


@dataclass
class CropSet:
    """Anomaly-centred crops and MEBin results (written by ``mebin``).

    Per image (N): ids, image_sizes int32 (N, 2), thresholds int32 (N,) chosen MEBin threshold
    on the 0..255 map, est_counts int32 (N,) estimated region count, count_seqs int32 (N, T)
    component counts along the threshold sweep, masks: N bool arrays (H_i, W_i) full size.
    Per crop (M): crops uint8 (M, C, C, 3) RGB, crop_masks uint8 (M, C, C) in {0, 1},
    image_index int32 (M,), boxes int32 (M, 4) as (x0, y0, x1, y1) in image pixels (x1, y1
    exclusive), areas int64 (M,) anomaly pixels in the box, scores float32 (M,) in [0, 1].
    attrs: lo, hi (the MEBin search range), crop_size, params.
    """

    ids: list[str]
    image_sizes: np.ndarray
    thresholds: np.ndarray
    est_counts: np.ndarray
    count_seqs: np.ndarray
    masks: list[np.ndarray]
    crops: np.ndarray
    crop_masks: np.ndarray
    image_index: np.ndarray
    boxes: np.ndarray
    areas: np.ndarray
    scores: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, m = len(self.ids), len(self.crops)
        for name in ("image_sizes", "thresholds", "est_counts", "count_seqs", "masks"):
            _check_len(name, getattr(self, name), n)
        for name in ("crop_masks", "image_index", "boxes", "areas", "scores"):
            _check_len(name, getattr(self, name), m)

    @property
    def crop_ids(self) -> list[str]:
        """``<image id>#<k>``: the k-th crop of its image."""
        return crop_ids_of(self.ids, self.image_index)


def crop_ids_of(ids: list[str], image_index: np.ndarray) -> list[str]:
    """``<image id>#<k>`` of every crop (``image_index`` (M,)): the k-th crop of its image."""
    out, seen = [], {}
    for i in np.asarray(image_index).tolist():
        k = seen.get(i, 0)
        seen[i] = k + 1
        out.append(f"{ids[i]}#{k}")
    return out


@dataclass
class ProbSet:
    """Crop-level predictions (written by ``infer``).

    probs: float32 (M, n_head, K) class probabilities of every head; logits: float32
    (M, n_head, K); features: float32 (M, D) the encoder's features; baseline_features: float32
    (M, D0) the frozen backbone's mask-pooled features (the k-means baseline); head: the
    selected head.
    """

    probs: np.ndarray
    logits: np.ndarray
    features: np.ndarray
    baseline_features: np.ndarray
    head: int
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        m = len(self.probs)
        _check_len("logits", self.logits, m)
        _check_len("features", self.features, m)
        _check_len("baseline_features", self.baseline_features, m)


@dataclass
class MergeSet:
    """Image-level predictions of region merging (written by ``merge``, read by ``evaluate``;
    ``data/merge/predictions.csv`` is the same result as a table for people).

    Per image (N, in the order of the crop store's ids): ids, clusters int64 (N,) (the
    no-anomaly cluster for an image without anomaly region), confidence float64 (N,) (NaN
    without anomaly), anomaly bool (N,), probs float64 (N, K) (NaN rows without anomaly). Per
    crop (M, in the crop store's order): crop_clusters int64 (M,), crop_confidence float64 (M,)
    (NaN for a crop without region), weights float64 (M,) each crop's weight in its image.
    attrs: the merge settings (strategy, temperature, no_anomaly) and n_classes (K).
    """

    ids: list[str]
    clusters: np.ndarray
    confidence: np.ndarray
    anomaly: np.ndarray
    probs: np.ndarray
    crop_clusters: np.ndarray
    crop_confidence: np.ndarray
    weights: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, m = len(self.ids), len(self.crop_clusters)
        for name in ("clusters", "confidence", "anomaly", "probs"):
            _check_len(name, getattr(self, name), n)
        for name in ("crop_confidence", "weights"):
            _check_len(name, getattr(self, name), m)

    @property
    def n_classes(self) -> int:
        return int(self.probs.shape[1])


def _check_len(name: str, arr: Any, n: int) -> None:
    if len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} rows, expected {n}")


# -- generic group I/O -----------------------------------------------------------------------


def write_group(path: str | os.PathLike, kind: str, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    """Write ``arrays`` (names may contain ``/``) and ``attrs`` as one zipped zarr group.

    The group is built in a folder beside the zip's temporary (``.<name>.tmp-<pid>.d``), so
    that what a killed run leaves behind is found and removed by the next write of ``path``.
    """
    with atomic_path(path) as tmp:
        build = tmp.with_name(tmp.name + ".d")
        try:
            _build_group(build, kind, arrays, attrs)
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for f in sorted(build.rglob("*")):
                    if f.is_file():
                        # A fixed date: the same arrays give the same bytes, so DVC sees no change.
                        info = zipfile.ZipInfo(f.relative_to(build).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
                        zf.writestr(info, f.read_bytes())
        finally:
            shutil.rmtree(build, ignore_errors=True)


def _build_group(folder: Path, kind: str, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    group = zarr.open_group(
        LocalStore(folder),
        mode="w",
        attributes={"kind": kind, "layout_version": LAYOUT_VERSION, **_jsonable(attrs)},
    )
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        a = group.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=_chunks(arr))
        if arr.size:
            a[...] = arr


def read_group(path: str | os.PathLike, kind: str) -> tuple[dict[str, np.ndarray], dict]:
    """Read every array and the user attrs (without ``kind``/``layout_version``) of a store
    written by :func:`write_group`. A damaged store (bad zip, bad CRC, missing chunk) is an
    ``InputError`` naming it."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: store not found; run the stage that writes it first (dvc repro)")
    try:
        store = ZipStore(path, mode="r")
        try:
            group = zarr.open_group(store, mode="r")
            attrs = dict(group.attrs)
            _check_header(path, attrs, kind)
            arrays = {name: arr[...] for name, arr in group.arrays()}
            if "masks" in {n for n, _ in group.groups()}:
                arrays.update({f"masks/{n}": a[...] for n, a in group["masks"].arrays()})
        finally:
            store.close()
    except (InputError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - any zarr/zip failure is a broken store
        raise InputError(f"{path}: not a readable anomalyncd store ({e}); rerun the stage that writes it") from e
    del attrs["kind"], attrs["layout_version"]
    return arrays, attrs


def _check_header(path: Path, attrs: dict, kind: str) -> None:
    if attrs.get("kind") != kind:
        raise InputError(f"{path}: holds {attrs.get('kind')!r} data, expected {kind!r}")
    if attrs.get("layout_version") != LAYOUT_VERSION:
        raise InputError(
            f"{path}: store layout version {attrs.get('layout_version')} != {LAYOUT_VERSION}; "
            "rerun the stage that writes it"
        )


def _chunks(arr: np.ndarray) -> tuple[int, ...]:
    if arr.ndim == 0:
        return ()
    row = int(np.prod(arr.shape[1:])) * arr.dtype.itemsize or 1
    n = max(1, min(arr.shape[0], (16 << 20) // row))  # about 16 MB per chunk
    return (max(n, 1),) + tuple(max(s, 1) for s in arr.shape[1:])


def _jsonable(attrs: dict) -> dict:
    out = {}
    for k, v in attrs.items():
        if dataclasses.is_dataclass(v):
            v = dataclasses.asdict(v)
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, np.ndarray):
            v = v.tolist()
        out[k] = v
    return out


# -- typed artifacts -------------------------------------------------------------------------


def write_maps(path: str | os.PathLike, ms: MapSet) -> None:
    write_group(
        path,
        "maps",
        {
            "maps": ms.maps.astype(np.float32),
            "maps_u8": ms.maps_u8.astype(np.uint8),
            "scores": ms.scores.astype(np.float32),
            "image_sizes": ms.image_sizes.astype(np.int32),
        },
        {"ids": list(ms.ids), **ms.attrs},
    )


def read_maps(path: str | os.PathLike) -> MapSet:
    arrays, attrs = read_group(path, "maps")
    ids = attrs.pop("ids")
    return MapSet(ids=ids, attrs=attrs, **arrays)


def write_crops(path: str | os.PathLike, cs: CropSet) -> None:
    arrays = {
        "image_sizes": cs.image_sizes.astype(np.int32),
        "thresholds": cs.thresholds.astype(np.int32),
        "est_counts": cs.est_counts.astype(np.int32),
        "count_seqs": cs.count_seqs.astype(np.int32),
        "crops": cs.crops.astype(np.uint8),
        "crop_masks": cs.crop_masks.astype(np.uint8),
        "image_index": cs.image_index.astype(np.int32),
        "boxes": cs.boxes.astype(np.int32),
        "areas": cs.areas.astype(np.int64),
        "scores": cs.scores.astype(np.float32),
    }
    arrays.update({f"masks/{i}": m.astype(np.uint8) for i, m in enumerate(cs.masks)})
    write_group(path, "crops", arrays, {"ids": list(cs.ids), **cs.attrs})


def read_crops(path: str | os.PathLike) -> CropSet:
    arrays, attrs = read_group(path, "crops")
    ids = attrs.pop("ids")
    masks = [arrays.pop(f"masks/{i}").astype(bool) for i in range(len(ids))]
    return CropSet(ids=ids, masks=masks, attrs=attrs, **arrays)


def write_probs(path: str | os.PathLike, ps: ProbSet) -> None:
    write_group(
        path,
        "probs",
        {
            "probs": ps.probs.astype(np.float32),
            "logits": ps.logits.astype(np.float32),
            "features": ps.features.astype(np.float32),
            "baseline_features": ps.baseline_features.astype(np.float32),
        },
        {"head": int(ps.head), **ps.attrs},
    )


def read_probs(path: str | os.PathLike) -> ProbSet:
    arrays, attrs = read_group(path, "probs")
    head = attrs.pop("head")
    return ProbSet(head=head, attrs=attrs, **arrays)


def write_merged(path: str | os.PathLike, ms: MergeSet) -> None:
    write_group(
        path,
        "merged",
        {
            "clusters": ms.clusters.astype(np.int64),
            "confidence": ms.confidence.astype(np.float64),
            "anomaly": ms.anomaly.astype(bool),
            "probs": ms.probs.astype(np.float64),
            "crop_clusters": ms.crop_clusters.astype(np.int64),
            "crop_confidence": ms.crop_confidence.astype(np.float64),
            "weights": ms.weights.astype(np.float64),
        },
        {"ids": list(ms.ids), **ms.attrs, "n_classes": ms.n_classes},
    )


def read_merged(path: str | os.PathLike) -> MergeSet:
    arrays, attrs = read_group(path, "merged")
    ids = attrs.pop("ids")
    try:
        return MergeSet(ids=ids, attrs=attrs, **arrays)
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: inconsistent merge store ({e}); rerun merge (dvc repro)") from e
