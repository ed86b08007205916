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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

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
        _check_rows(self, len(self.ids), "maps", "maps_u8", "scores", "image_sizes")


@dataclass
class CropSet:
    """Anomaly-centred crops and MEBin results (written by ``mebin``).

    Per image (N): ids, image_sizes int32 (N, 2), thresholds int32 (N,) chosen MEBin threshold
    on the 0..255 map, est_counts int32 (N,) estimated region count, count_seqs int32 (N, T)
    component counts along the threshold sweep, masks: N bool arrays (H_i, W_i) full size.
    Per crop (M): crops uint8 (M, C, C, 3) RGB, crop_masks uint8 (M, C, C) in {0, 1},
    image_index int32 (M,), boxes int32 (M, 4) as (x0, y0, x1, y1) in image pixels (x1, y1
    exclusive; the context crop, which may reach outside the image), regions int32 (M, 4) the
    defect's own box inside the image (zeros: no region; :class:`anomalyncd.mebin.Crops`),
    areas int64 (M,) anomaly pixels in the box, scores float32 (M,) in [0, 1], residuals float32
    (M, D) the regions' residual descriptors (:mod:`anomalyncd.residual`; D = 0: none, a store
    without them). attrs: lo, hi (the MEBin search range), crop_size, params.
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
    regions: np.ndarray
    areas: np.ndarray
    scores: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    residuals: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.residuals is None:
            self.residuals = np.zeros((len(self.crops), 0), np.float32)
        _check_rows(self, len(self.ids), "image_sizes", "thresholds", "est_counts", "count_seqs", "masks")
        _check_rows(self, len(self.crops), "crop_masks", "image_index", "boxes", "regions", "areas", "scores", "residuals")

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
        _check_rows(self, len(self.probs), "logits", "features", "baseline_features")


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
        _check_rows(self, len(self.ids), "clusters", "confidence", "anomaly", "probs")
        _check_rows(self, len(self.crop_clusters), "crop_confidence", "weights")

    @property
    def n_classes(self) -> int:
        return int(self.probs.shape[1])


def _check_rows(obj: Any, n: int, *names: str) -> None:
    """Each named array of ``obj`` has ``n`` rows (a ValueError naming the first that has not)."""
    for name in names:
        arr = getattr(obj, name)
        if len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} rows, expected {n}")


# -- generic group I/O -----------------------------------------------------------------------

#: A stored chunk holds about this many bytes (rows of one array), at most MAX_CHUNK_ROWS rows.
CHUNK_BYTES = 16 << 20
MAX_CHUNK_ROWS = 1 << 16


def chunk_rows(row_shape: tuple[int, ...], dtype: Any) -> int:
    """Rows per stored chunk of an array whose rows are ``row_shape`` of ``dtype``: a function
    of the row alone, so that the same rows give the same chunks however they were appended."""
    row = int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize or 1
    return max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES // row))


class _Column:
    """One array being appended to: rows buffered up to a whole chunk, then written once."""

    def __init__(self, group: zarr.Group, name: str, row_shape: tuple[int, ...], dtype: Any) -> None:
        self.row_shape, self.dtype = tuple(int(s) for s in row_shape), np.dtype(dtype)
        self.chunk = chunk_rows(self.row_shape, self.dtype)
        chunks = (self.chunk,) + tuple(max(s, 1) for s in self.row_shape)
        self.array = group.create_array(name, shape=(0,) + self.row_shape, dtype=self.dtype, chunks=chunks)
        self.written = 0
        self.buffer: list[np.ndarray] = []
        self.buffered = 0

    def append(self, name: str, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        if len(rows) == 0:
            return
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{name}: rows of shape {rows.shape[1:]} appended to rows of shape {self.row_shape}")
        self.buffer.append(rows.astype(self.dtype, copy=False))
        self.buffered += len(rows)
        while self.buffered >= self.chunk:
            self._write(self.chunk)

    def flush(self) -> None:
        if self.buffered:
            self._write(self.buffered)

    def _write(self, n: int) -> None:
        data = np.concatenate(self.buffer) if len(self.buffer) > 1 else self.buffer[0]
        head, rest = data[:n], data[n:]
        self.buffer, self.buffered = ([rest] if len(rest) else []), len(rest)
        self.array.resize((self.written + n,) + self.row_shape)
        self.array[self.written : self.written + n] = np.ascontiguousarray(head)
        self.written += n


class StoreWriter:
    """Build one store array by array and row chunk by row chunk, in bounded memory.

    Arrays are grown as rows are appended (``append``) or written whole (``put``); ``commit``
    zips the group and renames it onto ``path`` (the same rows and attrs give the same bytes,
    however they were appended). Used as a context manager it commits on success and on an
    exception removes what it built, leaving any previous ``path`` untouched; a killed process
    leaves only temporaries beside ``path`` (``.<name>.tmp-<pid>*``) that the next write removes.
    """

    def __init__(self, path: str | os.PathLike, kind: str, attrs: dict | None = None) -> None:
        self.path, self.kind = Path(path), kind
        self.attrs = dict(attrs or {})
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        self.build = self._tmp.with_name(self._tmp.name + ".d")
        self._columns: dict[str, _Column] = {}
        self._open = True
        try:
            self.group = zarr.open_group(LocalStore(self.build), mode="w")
        except BaseException as e:
            self.abort(e)
            raise

    def declare(self, name: str, row_shape: tuple[int, ...], dtype: Any) -> None:
        """Create an empty array of rows ``row_shape`` (so that a store with no rows has it)."""
        if name not in self._columns:
            self._columns[name] = _Column(self.group, name, row_shape, dtype)

    def append(self, name: str, rows: np.ndarray, dtype: Any = None) -> None:
        """Append ``rows`` (b, ...) to array ``name`` (created with their row shape and ``dtype``)."""
        rows = np.asarray(rows)
        self.declare(name, rows.shape[1:], dtype or rows.dtype)
        self._columns[name].append(name, rows)

    def put(self, name: str, arr: np.ndarray) -> None:
        """Write a whole (small) array now: e.g. one image's full-size mask."""
        arr = np.ascontiguousarray(arr)
        a = self.group.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=_chunks(arr))
        if arr.size:
            a[...] = arr

    def rows(self, name: str) -> int:
        c = self._columns[name]
        return c.written + c.buffered

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of an appended array, read back from what is built so far."""
        c = self._columns[name]
        c.flush()
        return c.array[start:stop]

    def commit(self) -> None:
        """Write the buffered rows and the attrs, zip the group and rename it onto ``path``."""
        try:
            for c in self._columns.values():
                c.flush()
            self.group.attrs.update({"kind": self.kind, "layout_version": LAYOUT_VERSION, **_jsonable(self.attrs)})
            _zip_folder(self.build, self._tmp)
        except BaseException as e:
            self.abort(e)
            raise
        self._close(None)

    def abort(self, exc: BaseException | None = None) -> None:
        """Remove what was built; ``path`` is left as it was."""
        if self._open:
            self._close(exc or RuntimeError("aborted"))

    def _close(self, exc: BaseException | None) -> None:
        self._open = False
        shutil.rmtree(self.build, ignore_errors=True)
        if exc is None:
            self._atomic.__exit__(None, None, None)
        else:
            try:
                self._atomic.__exit__(type(exc), exc, exc.__traceback__)
            except BaseException:  # noqa: BLE001 - the caller raises the original error
                pass

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.commit()
        else:
            self.abort(exc)


def _zip_folder(build: Path, zip_path: Path) -> None:
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for f in sorted(build.rglob("*")):
            if f.is_file():
                # A fixed date: the same arrays give the same bytes, so DVC sees no change.
                info = zipfile.ZipInfo(f.relative_to(build).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
                zf.writestr(info, f.read_bytes())


def write_group(path: str | os.PathLike, kind: str, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    """Write ``arrays`` (names may contain ``/``) and ``attrs`` as one zipped zarr group.

    The group is built in a folder beside the zip's temporary (``.<name>.tmp-<pid>.d``), so
    that what a killed run leaves behind is found and removed by the next write of ``path``.
    Arrays under ``masks/`` are written whole, the others as rows (:class:`StoreWriter`).
    """
    with StoreWriter(path, kind, attrs) as w:
        for name, arr in arrays.items():
            if name.startswith("masks/") or np.ndim(arr) == 0:
                w.put(name, arr)
            else:
                w.append(name, arr)


class LazyRows:
    """The rows of one stored array, read on access: ``len``, ``shape``, ``dtype``,
    ``rows[a:b]`` -> numpy and ``for row in rows`` (one read per stored chunk), so a stage can
    walk a large array chunk by chunk."""

    def __init__(self, reader: "StoreReader", name: str) -> None:
        self._reader, self._name = reader, name
        self._array = reader.group[name]
        self.shape, self.dtype, self.ndim = tuple(self._array.shape), self._array.dtype, len(self._array.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        try:
            return self._array[key]
        except Exception as e:  # noqa: BLE001 - any zarr/zip failure is a broken store
            raise InputError(
                f"{self._reader.path}: not a readable anomalyncd store ({e}); rerun the stage that writes it"
            ) from e

    def __iter__(self) -> Iterator[np.ndarray]:
        # without it Python iterates by index until an IndexError, which a row past the end
        # does not raise here: it is reported as a broken store
        step = self._array.chunks[0]
        for a in range(0, len(self), step):
            yield from self[a : a + step]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self[...], dtype=dtype)


class StoreReader:
    """An open store: ``attrs`` (user attrs), ``names`` (its arrays) and ``reader[name]`` a
    :class:`LazyRows`. Checks the kind and layout version on opening; a missing or damaged
    store is an ``InputError`` naming it."""

    def __init__(self, path: str | os.PathLike, kind: str) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: store not found; run the stage that writes it first (dvc repro)")
        try:
            self._store = ZipStore(self.path, mode="r")
            self.group = zarr.open_group(self._store, mode="r")
            attrs = dict(self.group.attrs)
        except Exception as e:  # noqa: BLE001 - any zarr/zip failure is a broken store
            raise InputError(f"{self.path}: not a readable anomalyncd store ({e}); rerun the stage that writes it") from e
        _check_header(self.path, attrs, kind)
        del attrs["kind"], attrs["layout_version"]
        self.attrs = attrs
        try:
            self.names = _array_names(self.path)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{self.path}: not a readable anomalyncd store ({e}); rerun the stage that writes it") from e

    def __getitem__(self, name: str) -> LazyRows:
        return LazyRows(self, name)

    def read(self, name: str) -> np.ndarray:
        return self[name][...]

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> "StoreReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _array_names(path: Path) -> list[str]:
    """The arrays of a zipped group, from the zip's list of files: every node with a
    ``zarr.json`` that holds no other node (listing them through zarr would open every array
    at once: one per image under ``masks/``)."""
    with zipfile.ZipFile(path) as zf:
        nodes = {n[: -len("/zarr.json")] for n in zf.namelist() if n.endswith("/zarr.json")}
    groups = {n.rsplit("/", 1)[0] for n in nodes if "/" in n}
    return sorted(nodes - groups, key=lambda n: (n.count("/"), len(n), n))


def read_group(path: str | os.PathLike, kind: str) -> tuple[dict[str, np.ndarray], dict]:
    """Read every array and the user attrs (without ``kind``/``layout_version``) of a store
    written by :func:`write_group`. A damaged store (bad zip, bad CRC, missing chunk) is an
    ``InputError`` naming it."""
    with StoreReader(path, kind) as r:
        return {name: r.read(name) for name in r.names}, r.attrs


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


def read_maps(path: str | os.PathLike, lazy: bool = False) -> MapSet:
    """The maps store; ``lazy``: ``maps`` and ``maps_u8`` are :class:`LazyRows` read on access."""
    if not lazy:
        arrays, attrs = read_group(path, "maps")
        ids = attrs.pop("ids")
        return MapSet(ids=ids, attrs=attrs, **arrays)
    r = StoreReader(path, "maps")
    attrs = dict(r.attrs)
    ids = attrs.pop("ids")
    return MapSet(
        ids=ids, maps=r["maps"], maps_u8=r["maps_u8"], scores=r.read("scores"), image_sizes=r.read("image_sizes"), attrs=attrs
    )


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
        "regions": cs.regions.astype(np.int32),
        "areas": cs.areas.astype(np.int64),
        "scores": cs.scores.astype(np.float32),
    }
    if cs.residuals.shape[1]:
        arrays["residuals"] = cs.residuals.astype(np.float32)
    arrays.update({f"masks/{i}": m.astype(np.uint8) for i, m in enumerate(cs.masks)})
    write_group(path, "crops", arrays, {"ids": list(cs.ids), **cs.attrs})


class LazyMasks(Sequence[np.ndarray]):
    """The full-size bool masks (H_i, W_i) of a crops store, read on access."""

    def __init__(self, reader: StoreReader, n: int) -> None:
        self._reader, self._n = reader, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._reader[f"masks/{i % self._n}"][...].astype(bool)


#: The per-crop arrays holding pixels: left in the store by ``read_crops(lazy=True)``.
CROP_PIXELS = ("crops", "crop_masks")


def _check_crop_arrays(path: str | os.PathLike, names: Iterable[str]) -> None:
    missing = sorted({f.name for f in fields(CropSet)} - {"ids", "masks", "attrs", "residuals"} - set(names))
    if missing:
        raise InputError(f"{path}: written by an older mebin, no {missing}; rerun mebin (dvc repro)")


def read_crops(path: str | os.PathLike, lazy: bool = False) -> CropSet:
    """The crops store; ``lazy``: the pixels (``crops``, ``crop_masks`` as :class:`LazyRows`,
    ``masks`` as :class:`LazyMasks`) stay in the file until read, the rest is loaded."""
    if not lazy:
        arrays, attrs = read_group(path, "crops")
        ids = attrs.pop("ids")
        masks = [arrays.pop(f"masks/{i}").astype(bool) for i in range(len(ids))]
        _check_crop_arrays(path, arrays)
        return CropSet(ids=ids, masks=masks, attrs=attrs, **arrays)
    r = StoreReader(path, "crops")
    attrs = dict(r.attrs)
    ids = attrs.pop("ids")
    arrays = {n: (r[n] if n in CROP_PIXELS else r.read(n)) for n in r.names if not n.startswith("masks/")}
    _check_crop_arrays(path, arrays)
    return CropSet(ids=ids, masks=LazyMasks(r, len(ids)), attrs=attrs, **arrays)


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


#: The per-crop arrays of a probs store that only ``evaluate`` and the plots need: left in the
#: store by ``read_probs(lazy=True)``.
PROB_FEATURES = ("logits", "features", "baseline_features")


def read_probs(path: str | os.PathLike, lazy: bool = False) -> ProbSet:
    """The probs store; ``lazy``: ``logits``, ``features`` and ``baseline_features`` are
    :class:`LazyRows` read on access (``merge`` needs only the probabilities)."""
    if lazy:
        r = StoreReader(path, "probs")
        attrs = dict(r.attrs)
        head = attrs.pop("head")
        return ProbSet(probs=r.read("probs"), head=head, attrs=attrs, **{n: r[n] for n in PROB_FEATURES})
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
