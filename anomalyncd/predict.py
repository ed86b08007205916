"""Prediction on new images with a finished run (inductive use, no retraining).

A finished run's artifacts hold every fitted component and the settings it ran with, so that
editing ``params.yaml`` after the run changes nothing here: the detector with its params
(``models/detector.pt``) and the range its maps were normalised with (``norm_min``/``norm_max``
in the map store), MEBin's search range and settings (``lo``/``hi``/``params`` in the crop
store), the trained model with its selected head, class names and evaluation transform
(``models/mgvit.pt``), the merge settings and the class catalog (the merge store: each cluster's curated name, "not a
defect" for a rejected one; a run without it: the matched true type of each discovered class
from ``metrics/evaluate_detail.json``), the thresholds of the two decisions below
(``models/calibration.json``), and the bit depth its 16-bit images were read with (the
manifest's ``bits``; 16 without it). New images
go through the same functions as the stages (:func:`anomalyncd.mebin.mebin_image`,
:func:`anomalyncd.inference.crop_outputs`, :func:`anomalyncd.merge.merge_tables`), so
predicting the run's own images reproduces its image-level predictions.

Two decisions come on top (:mod:`anomalyncd.calibrate`): an image whose detector score is not
above the run's normal threshold is ``normal`` (no class), and an anomalous image whose features
lie farther from every class than the run's unknown threshold is an ``unknown type`` (its
cluster stays the nearest class).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from . import paths
from .calibrate import KNOWN, UNKNOWN, Calibration, crop_distances, image_unknown_scores
from .config import DetectParams, InferParams, MebinParams, from_dict
from .datasets import IMAGE_EXTENSIONS, manifest_bits
from .image_score import ImageScore
from .io import InputError, InputWarning, read_image, read_json
from .merge import NORMAL, STATUS, Merger, merge_tables, novel_probabilities
from .store import StoreReader, crop_ids_of

MAP_EXTENSIONS = (".npy", ".png", ".tif", ".tiff")  # what the external detector reads
CHUNK = 32  # images per detector / MEBin pass, bounds memory on large folders
#: crops per classifier batch on the CPU when none is given: on one thread a crop takes the same
#: time in a batch of 8 as of 64, and its activations 1/8 of the memory (issue 31)
CPU_BATCH = 8


@dataclass
class Run:
    """What :func:`predict_images` needs from a finished run's project directory, all of it
    read from the run's artifacts."""

    root: Path
    map_size: int  # the side of the run's maps (given maps are resized to it)
    norm_min: float
    norm_max: float
    lo: int
    hi: int
    mebin: MebinParams
    merger: Merger
    names: dict[int, str] = field(default_factory=dict)
    image_score: ImageScore = field(default_factory=lambda: ImageScore(tuple(DetectParams().score_tops)))  # the run's image score
    bits: int = 16  # the significant bits of the run's 16-bit images (its manifest): new ones are read the same way
    calibration: Calibration | None = None  # None: a run from before the calibrate stage

    @property
    def detector(self) -> Path:
        return self.root / paths.DETECTOR

    @property
    def model(self) -> Path:
        return self.root / paths.MODEL


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read a finished run's fitted ranges and settings from its stores (not ``params.yaml``);
    clear errors if the run is unfinished."""
    root = Path(run_dir)
    if not root.is_dir():
        raise InputError(f"{root}: run directory not found; pass the project directory of a finished run (--run)")
    for rel in (paths.MAPS, paths.CROPS, paths.MODEL, paths.MERGED):
        if not (root / rel).exists():
            raise InputError(f"{root / rel}: missing; finish the run first (cd {root} && dvc repro)")
    # attrs and shapes only: the run's pixels (every map and crop of its set) stay in the files
    with StoreReader(root / paths.MAPS, "maps") as r:
        map_attrs, map_size = r.attrs, int(r["maps"].shape[-1])
    with StoreReader(root / paths.CROPS, "crops") as r:
        cs_attrs = r.attrs
    with StoreReader(root / paths.MERGED, "merged") as r:
        merge_attrs = r.attrs
    for name, attrs, key in (
        ("norm_min", map_attrs, paths.MAPS),
        ("norm_max", map_attrs, paths.MAPS),
        ("lo", cs_attrs, paths.CROPS),
        ("hi", cs_attrs, paths.CROPS),
        ("params", cs_attrs, paths.CROPS),
    ):
        if name not in attrs:
            raise InputError(f"{root / key}: has no {name!r}; rerun the stage that writes it (dvc repro)")
    return Run(
        root=root,
        map_size=map_size,
        norm_min=float(map_attrs["norm_min"]),
        norm_max=float(map_attrs["norm_max"]),
        lo=int(cs_attrs["lo"]),
        hi=int(cs_attrs["hi"]),
        # predict gives boxes, not masks: no outline to redraw (mebin.refine changes nothing else)
        mebin=dataclasses.replace(from_dict(MebinParams, cs_attrs["params"], where=f"{root / paths.CROPS}: params"), refine="off"),
        merger=Merger.from_attrs(merge_attrs, str(root / paths.MERGED)),
        names=catalog_names(merge_attrs, root / paths.MERGED) or class_names(root / paths.EVALUATE_DETAIL),
        image_score=ImageScore.from_attrs(map_attrs, str(root / paths.MAPS)),
        calibration=load_calibration(root / paths.CALIBRATION),
        bits=manifest_bits(root / paths.MANIFEST) if (root / paths.MANIFEST).exists() else 16,
    )


def catalog_names(merge_attrs: dict, where: Path) -> dict[int, str]:
    """Cluster -> the name of its curated class, from the catalog the merge stage stored ({} if none)."""
    from .catalog import cluster_names, from_attrs

    return cluster_names(from_attrs(merge_attrs["catalog"], str(where))) if "catalog" in merge_attrs else {}


def load_calibration(path: Path) -> Calibration | None:
    """The run's calibration, or None (with a warning) for a run finished before there was one."""
    if not path.exists():
        warnings.warn(
            f"{path}: missing, so no image is judged normal and none an unknown type; "
            f"finish the run with the calibrate stage (cd {path.parent.parent} && dvc repro)",
            InputWarning,
            stacklevel=2,
        )
        return None
    return Calibration.from_dict(read_json(path, "calibrate"), str(path))


def class_names(metrics_path: Path) -> dict[int, str]:
    """Discovered class -> matched true type from an evaluate metrics file ({} if none)."""
    if not metrics_path.exists():
        return {}
    clusters = read_json(metrics_path, "evaluate").get("clusters", {})
    try:
        return {int(k): str(v["matched"]) for k, v in clusters.items() if v.get("matched")}
    except (AttributeError, TypeError, ValueError) as e:
        raise InputError(f"{metrics_path}: damaged (its clusters are not <class id>: {{matched: <type>}}); rerun the evaluate stage (dvc repro evaluate)") from e


def find_images(inputs: Sequence[str | os.PathLike]) -> list[tuple[str, Path]]:
    """(id, path) of every image named or found (recursively) in the given folders.

    A folder's images get ids ``<folder name>/<path inside it>`` without extension (so
    ``test/crack/000`` for ``.../test`` and ``crack/000`` for ``.../test/crack``); a file's id is
    its name without extension. Ids must be unique.
    """
    found: list[tuple[str, Path]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            found += [((item.resolve().name / p.relative_to(item)).with_suffix("").as_posix(), p) for p in files]
        elif item.is_file():
            found.append((item.stem, item))
        else:
            raise InputError(f"{item}: no such image or folder")
    if not found:
        raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {[str(i) for i in inputs]}")
    seen: dict[str, Path] = {}
    for id_, p in found:
        if id_ in seen:
            raise InputError(f"{p} and {seen[id_]} have the same name {id_!r}; pass them from one folder or rename one")
        seen[id_] = p
    return found


def find_maps(maps_dir: str | os.PathLike, ids: Sequence[str]) -> list[Path]:
    """The map file of each image id in ``maps_dir``: ``<id>.<npy|png|tif|tiff>`` (or the id's
    file name alone)."""
    root = Path(maps_dir)
    if not root.is_dir():
        raise InputError(f"{root}: maps folder not found (--maps)")
    out = []
    for id_ in ids:
        cands = [root / f"{id_}{e}" for e in MAP_EXTENSIONS] + [root / f"{Path(id_).name}{e}" for e in MAP_EXTENSIONS]
        hit = next((c for c in cands if c.is_file()), None)
        if hit is None:
            raise InputError(f"{root}: no anomaly map for image {id_!r} (expected {id_}.npy or .png)")
        out.append(hit)
    return out


@dataclass
class Predictions:
    """What :func:`predict_images` made: one row per classified image, and one
    ``<file>: <what>; <how to fix>`` line per image that could not be classified."""

    rows: list[dict]
    failed: list[str] = field(default_factory=list)
    calibration: Calibration | None = None  # the thresholds applied (None: none)


class Predictor:
    """A finished run's fitted detector and classifier, loaded once, to classify images a
    chunk at a time (:meth:`classify`) and merge the results (:meth:`merge`).

    ``maps``: maps will be given (no detector is loaded). ``workers``: threads reading images
    and running MEBin (OpenCV and NumPy release the GIL; results are in input order, so the
    same whatever the number).
    """

    def __init__(
        self,
        run: Run,
        device: str = "auto",
        batch_size: int | None = None,
        maps: bool = False,
        workers: int | None = None,
        normal_quantile: float | None = None,
        unknown_quantile: float | None = None,
        normal_gate: bool = True,
    ) -> None:
        from .device import resolve_device
        from .detect import load_detector
        from .model import load_model

        self.run = run
        self.calibration = None
        if run.calibration is not None:
            self.calibration = run.calibration.with_quantiles(normal_quantile, unknown_quantile)
            if not normal_gate:
                self.calibration = replace(self.calibration, normal_scores=np.zeros(0), note="--no-normal-gate")
        # the normal gate's threshold (None: every image goes on to the defect classifier)
        self.t_normal = None if self.calibration is None else self.calibration.normal_threshold
        self.detector = None
        self.maps_given = maps
        if not maps:
            if not run.detector.exists():
                raise InputError(f"{run.detector}: no fitted detector in this run; pass --maps with its anomaly maps")
            self.detector = load_detector(run.detector, device=None if device == "auto" else device)
        self.device = resolve_device(device)
        self.net, info = load_model(run.model, self.device)
        if self.net.cfg.side_dim and self.detector is None:
            # the classifier reads each crop's residual descriptor, which only the run's detector gives
            self.detector = load_detector(run.detector, device=None if device == "auto" else device) if run.detector.exists() else None
        if self.net.cfg.side_dim and (self.detector is None or self.detector.residual_dim != self.net.cfg.side_dim):
            raise InputError(f"{run.model}: the classifier reads the crops' residual descriptors, and {run.detector} cannot make them; rerun the run's detect stage")
        self.head = int(info["head"])
        self.batch_size = batch_size or (CPU_BATCH if self.device == "cpu" else InferParams().batch_size)
        self.workers = max(1, workers if workers is not None else min(4, os.cpu_count() or 1))
        self.timings: dict[str, float] = defaultdict(float)  # seconds per step, summed over calls

    def _map(self, fn, items: list) -> list:
        if self.workers == 1 or len(items) < 2:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(fn, items))

    def classify(self, images: list[tuple[str, Path]], map_files: list[Path] | None = None) -> "Classified":
        """Maps, MEBin crops and crop probabilities of ``images`` (one chunk: all of it is in
        memory at once); unreadable images (or maps) go to ``failed``."""
        import torch

        from .detect import normalise_u8
        from .detect.parallel import single_threaded
        from .inference import crop_outputs, novel_probabilities as head_probabilities
        from .mebin import mebin_image

        run = self.run
        files = map_files if map_files is not None else [None] * len(images)

        def load(job):
            (item, f) = job
            try:
                return item, read_image(item[1], run.bits), None if f is None else _read_map(f, run.map_size)
            except InputError as e:
                return e

        out = Classified()
        loaded = []
        clock = _Clock(self.timings)
        for r in clock("read", self._map, load, list(zip(images, files))):
            if isinstance(r, InputError):
                out.failed.append(str(r))
            else:
                loaded.append(r)
        if not loaded:
            return out
        # An image the normal gate calls normal gets no class and no boxes whatever its regions
        # (:meth:`_decide`): its region search, MEBin, descriptors and classifier are skipped.
        grids = None
        if not self.maps_given:
            try:
                images = [img for _, img, _ in loaded]

                def wanted(scored: np.ndarray) -> bool:  # a batch's score maps: does any image need regions
                    return not all(self._normal(float(s)) for s in run.image_score(scored))

                if self.net.cfg.side_dim:  # the crops' residual descriptors come from the same pass
                    raw, scored, grids = clock("detector", self.detector.predict_described, images, wanted)
                else:
                    raw, scored = clock("detector", self.detector.predict_scored, images, wanted)
            except InputError as e:
                raise InputError(f"{e}; or pass ready anomaly maps with --maps <folder>") from e
        else:
            raw = scored = np.stack([m for _, _, m in loaded])

        out.kept = [item for item, _, _ in loaded]
        out.sizes = np.array([img.shape[:2] for _, img, _ in loaded], np.int64).reshape(-1, 2)
        out.image_scores = run.image_score(scored).astype(np.float64)
        todo = [i for i, s in enumerate(out.image_scores) if not self._normal(float(s))]

        def crop(i):
            img, m = loaded[i][1], raw[i]
            # the run's global map range, as the detect stage normalised the run's own maps
            return mebin_image(normalise_u8(m, run.norm_min, run.norm_max), img, run.lo, run.hi, run.mebin)

        results = clock("mebin", self._map, crop, todo)
        crops = [c for _, c in results]
        side = None
        if self.net.cfg.side_dim:
            from .residual import pool_regions

            if grids is None:  # maps given: the detector's pass for the descriptors alone
                with single_threaded():
                    grids = dict(zip(todo, clock("detector", self._map, self.detector.residuals, [loaded[i][1] for i in todo])))

            def describe(job):
                grid, (res, c) = job
                return pool_regions(grid, res.map_mask, c.regions) if len(c.regions) else np.zeros((0, self.net.cfg.side_dim), np.float32)

            side = _rows(clock("residuals", self._map, describe, [(grids[i], r) for i, r in zip(todo, results)]), (self.net.cfg.side_dim,), np.float32)
        out.counts = np.zeros(len(loaded), np.int64)
        out.counts[todo] = [len(c) for c in crops]
        out.boxes = _rows([c.boxes for c in crops], (4,), np.int32).reshape(-1, 4)
        out.regions = _rows([c.regions for c in crops], (4,), np.int32).reshape(-1, 4)
        out.areas = _rows([c.areas for c in crops], (), np.int64)
        out.scores = _rows([c.scores for c in crops], (), np.float32)
        # one thread: the same logits as two here, and on a shared CPU two OpenMP threads wait on
        # each other at every kernel (one crop: 1.2-1.5 s on 2 threads, 35 ms on 1, load ~7)
        with single_threaded():
            o = clock("classifier", crop_outputs, self.net, _rows([c.crops for c in crops], (0, 0, 3), np.uint8),
                      _rows([c.crop_masks for c in crops], (0, 0), np.uint8), self.device, self.batch_size, side)
        probs = head_probabilities(torch.from_numpy(o.logits), self.net.cfg.num_labeled).numpy().astype(np.float32)
        out.probs = novel_probabilities(probs, self.head, self.net.cfg.num_labeled)
        out.features = o.features
        return out

    def merge(self, parts: list["Classified"]) -> list[dict]:
        """The image rows of the classified chunks, in their order (region merging with the
        run's settings, as the merge stage)."""
        parts = [p for p in parts if p.kept]
        ids = [i for p in parts for i, _ in p.kept]
        image_index = np.repeat(np.arange(len(ids)), np.concatenate([p.counts for p in parts]))
        rows, _, merged = merge_tables(
            ids=ids,
            images=[str(f) for p in parts for _, f in p.kept],
            categories=[""] * len(ids),
            crop_ids=crop_ids_of(ids, image_index),
            image_index=image_index,
            boxes=np.concatenate([p.boxes for p in parts]).reshape(-1, 4),
            regions=np.concatenate([p.regions for p in parts]).reshape(-1, 4),
            image_sizes=np.concatenate([p.sizes for p in parts]).reshape(-1, 2),
            areas=np.concatenate([p.areas for p in parts]),
            scores=np.concatenate([p.scores for p in parts]),
            crop_probs=np.concatenate([p.probs for p in parts]),
            merger=self.run.merger,
        )
        scores = np.concatenate([p.image_scores for p in parts])
        unknown = np.full(len(ids), np.nan)
        cal = self.calibration
        if cal is not None and np.isfinite(cal.prototypes).all(1).any():
            dist, _ = crop_distances(np.concatenate([p.features for p in parts]), cal.prototypes)
            unknown = image_unknown_scores(dist, merged.weights, image_index, merged.anomaly)
        return [self._decide(r, s, u) for r, s, u in zip(rows, scores, unknown)]

    def _normal(self, score: float) -> bool:
        """The normal gate: an image score not above the run's normal threshold (never without
        one). :meth:`classify` skips such images' regions, :meth:`_decide` reports them normal."""
        return self.t_normal is not None and score <= self.t_normal

    def _decide(self, r: dict, score: float, unknown: float) -> dict:
        """One merged row with predict's decisions and columns: ``name`` after ``cluster``, and
        ``open_set`` (known type / unknown type), ``image_score`` and ``unknown_score`` after
        ``status``. An image not above the normal threshold is ``normal``: no class, no boxes."""
        cal, no_anomaly = self.calibration, self.run.merger.no_anomaly
        t_unknown = None if cal is None else cal.unknown_threshold
        r = {c: v for c, v in r.items() if c != "category"}
        if self._normal(score):
            r.update(cluster=no_anomaly, status=NORMAL, confidence="", n_crops=0, boxes="", crop_boxes="", crop_clusters="")
            r.update({c: "" for c in r if c.startswith("prob_")})
        found = r["status"] == STATUS[True]
        open_set = "" if not found or t_unknown is None else (UNKNOWN if unknown > t_unknown else KNOWN)
        out = {"id": r["id"], "image": r["image"], "cluster": r["cluster"], "name": self.run.names.get(int(r["cluster"]), "")}
        out.update(status=r["status"], open_set=open_set, image_score=_num(score), unknown_score=_num(unknown) if found else "")
        return out | {c: v for c, v in r.items() if c not in out}


def _rows(parts: list[np.ndarray], tail: tuple[int, ...], dtype) -> np.ndarray:
    """``parts`` joined along their first axis; ``(0, *tail)`` of ``dtype`` when there are none
    (a chunk whose every image the normal gate passed)."""
    return np.concatenate(parts) if parts else np.zeros((0, *tail), dtype)


def _num(x: float) -> str:
    return "" if not np.isfinite(x) else f"{x:.6f}"


class _Clock:
    """``clock(step, fn, *args)``: ``fn(*args)``, its wall time added to ``timings[step]``."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings

    def __call__(self, step: str, fn, *args):
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.timings[step] += time.perf_counter() - t


@dataclass
class Classified:
    """One chunk's result before merging: the images kept (id, path), each one's number of
    crops, the crops' boxes (M, 4), areas, scores and novel-class probabilities (M, K)."""

    kept: list[tuple[str, Path]] = field(default_factory=list)
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))
    regions: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))
    sizes: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    areas: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    features: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # (M, D) the encoder's
    image_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (n,) the detector's image scores
    failed: list[str] = field(default_factory=list)


def predict_images(
    run: Run,
    images: list[tuple[str, Path]],
    maps_dir: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
    workers: int | None = None,
    normal_quantile: float | None = None,
    unknown_quantile: float | None = None,
    normal_gate: bool = True,
) -> Predictions:
    """Classify ``images`` ((id, path) pairs) with ``run``: one row per image as in
    ``data/merge/predictions.csv``, with ``name``: the cluster's class in the run's catalog
    ("not a defect" for a rejected cluster; '' without anomaly), and ``open_set``,
    ``image_score`` and ``unknown_score`` (:meth:`Predictor._decide`).

    Maps come from the run's fitted detector, or from ``maps_dir``, read and resized to the
    run's map size as the ``external`` detector reads map files; either way they are
    normalised with the run's global range (``norm_min``/``norm_max``), as the run's own.
    ``normal_quantile``/``unknown_quantile`` override the run's (``calibrate`` params);
    ``normal_gate=False`` classes every image as a defect, as a run without calibration.
    ``batch_size``: crops per batch (default: :data:`CPU_BATCH` on the CPU, ``infer``'s on a
    GPU). Images go through the detector, MEBin and the classifier :data:`CHUNK` at a time
    (memory stays bounded on large folders); ``workers``: see :class:`Predictor`.
    An unreadable image (or map) is reported in ``failed`` and the others are classified; an
    ``InputError`` only when none can be.
    """
    map_files = find_maps(maps_dir, [i for i, _ in images]) if maps_dir is not None else None
    predictor = Predictor(run, device, batch_size, maps=map_files is not None, workers=workers,
                          normal_quantile=normal_quantile, unknown_quantile=unknown_quantile, normal_gate=normal_gate)
    parts: list[Classified] = []
    bar = tqdm(total=len(images), desc="predict", unit="img", disable=not progress)
    for s in range(0, len(images), CHUNK):
        parts.append(predictor.classify(images[s : s + CHUNK], None if map_files is None else map_files[s : s + CHUNK]))
        bar.update(len(images[s : s + CHUNK]))
    bar.close()
    failed = [f for p in parts for f in p.failed]
    if not any(p.kept for p in parts):
        raise InputError(f"none of the {len(images)} images could be classified; the first: {failed[0]}")
    return Predictions(predictor.merge(parts), failed, predictor.calibration)


def _read_map(path: Path, size: int) -> np.ndarray:
    """A map file as the ``external`` detector reads it, resized to ``size`` x ``size``."""
    import cv2

    from .detect.external import read_map_file

    return cv2.resize(read_map_file(path), (size, size), interpolation=cv2.INTER_LINEAR)
