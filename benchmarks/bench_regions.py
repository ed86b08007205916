"""The chain detector -> MEBin -> crops of a finished run, measured link by link against the masks.

Given a run's project folder (``--run DIR``, any data set whose manifest has masks; ``detect``
and ``mebin`` done), prints:

- detection: pixel AUROC and AUPRO of the stored maps of the images to classify (the detect
  stage's functions, :mod:`anomalyncd.detect.metrics`; the stage's own figures, over the normal
  test images too, are shown beside them from ``metrics/detect.json`` when present);
- MEBin's masks: per-region IoU, precision and recall against the true regions, mean over
  images (region matching: :mod:`anomalyncd.regions`; true regions of more than 64 pixels, the
  rule of ``metrics/mebin.json``), regions hit, extra regions per image; the same for the crop
  masks put back into the image (the mask the classifier pools over: MEBin's region, or its
  core with ``mebin.core``);
- the crops: true regions found (at least half of their pixels inside the crop boxes), the
  defect pixels inside the crops (:func:`anomalyncd.mebin.gt_coverage`), the images MEBin found
  no stable interval for on the set's range (those on the own-range fallback);
- the same per defect type: pixel AUROC and AUPRO within that type's images (their own
  background the negatives), MEBin's mask IoU, true regions found, defect pixels in crops and
  images without a stable interval (where a chain loses quality is often one type: MTD's
  large, faint "uneven" bands);
- the frozen-feature k-means baseline's image NMI / ARI / F1 of the crops, computed as
  ``evaluate`` computes it (``stages.evaluate.baseline_metrics``, mean of 5 k-means seeds): on the
  run's ``data/infer/probs.zarr.zip`` when it holds these crops, else on the crops' frozen
  features computed here (the same features up to a per-channel affine map, which the
  baseline's standardisation removes), with ``k`` from ``--k``, else the run's
  ``train.num_classes`` (the number of true types when it is ``auto``).

``--rerun-mebin`` reruns MEBin in memory on the run's maps (a run whose ``mebin`` has not run
yet), ``--set mebin.KEY=VALUE`` does so with those params changed, to judge a MEBin lever on
the same chain; ``--remap-sigma S`` first maps the images again with the run's fitted detector
(``models/detector.pt``, a ``patchcore`` or ``padim`` run) smoothed with ``detect.smooth_sigma``
S, normalised over the set as ``detect`` does; ``--maps FILE.npy`` takes the raw maps
``(N, S, S)`` of the run's images (in the order of its maps store) from another detector or
setting, normalised over the set the same way, to judge any map on the same chain. The run's
folder is only read.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_regions --run /tmp/mtdgt
    OMP_NUM_THREADS=1 python -m benchmarks.bench_regions --run /tmp/mtd --set mebin.core=0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from anomalyncd import mebin, paths
from anomalyncd.auto_k import region_features
from anomalyncd.config import SECTIONS, from_dict, parse_params, resolve
from anomalyncd.datasets import Manifest
from anomalyncd.datasets.manifest import NORMAL
from anomalyncd.detect import load_detector
from anomalyncd.detect.base import normalise_u8
from anomalyncd.detect.metrics import aupro, pixel_auroc, resize_masks
from anomalyncd.image_score import ImageScore
from anomalyncd.io import InputError, read_mask
from anomalyncd.merge import NO_ANOMALY, Merger
from anomalyncd.regions import paste_crop_masks, region_scores, summarize, without_stable_interval
from anomalyncd.store import CropSet, MapSet, ProbSet, read_crops, read_maps, read_merged, read_probs
from stages.evaluate import baseline_metrics
from stages.mebin import build_crops

#: True regions of this many pixels or fewer are not scored (``metrics/mebin.json``'s rule).
MIN_REGION = 64


def run_params(params_file: Path, overrides: list[str]) -> dict:
    """Every section of ``params_file`` as its dataclass, resolved, with ``section.key=value``
    overrides (values parsed as YAML, but ``off``, ``no``... stay words: ``mebin.erosion=off``)."""
    data = parse_params(params_file.read_text(), str(params_file))
    for o in overrides:
        key, sep, value = o.partition("=")
        section, _, name = key.partition(".")
        if not sep or not name or section not in SECTIONS:
            raise InputError(f"--set {o!r}: expected section.key=value, e.g. mebin.core=0")
        v = yaml.safe_load(value)
        data.setdefault(section, {})[name] = value if isinstance(v, bool) and value.lower() not in ("true", "false") else v

    def read(name: str):
        return from_dict(SECTIONS[name], data.get(name) or {}, where=f"{params_file}: {name}")

    return {name: resolve(name, read(name), read) for name in ("dataset", "detect", "mebin", "train", "merge", "evaluate")}


def crops_of_run(ms, records: dict, p, rerun: bool, progress: bool) -> CropSet:
    """The run's crop store, or (``rerun``) MEBin rerun in memory on its maps with params ``p``."""
    if not rerun:
        return read_crops(paths.CROPS)
    return build_crops(ms, records, p, progress=progress)[0]


def remap(ms: MapSet, records: dict, sigma: float, progress: bool) -> MapSet:
    """The maps of ``ms`` made again by the run's detector with ``smooth_sigma`` ``sigma``:
    raw maps float32 (N, S, S), maps_u8 min-max normalised over the set, image scores."""
    det = load_detector(paths.DETECTOR, "cpu")
    if not hasattr(det.params, "smooth_sigma") or det.method not in ("patchcore", "padim"):
        raise InputError(f"{paths.DETECTOR}: a {det.method} detector has no smoothing to change; drop --remap-sigma")
    det.params.smooth_sigma = float(sigma)
    ids = ms.ids if not progress else tqdm(ms.ids, desc=f"maps, sigma {sigma:g}", unit="img")
    pairs = [det.predict_scored([records[i].read()]) for i in ids]
    maps, scored = (np.concatenate(m) for m in zip(*pairs))
    return replaced_maps(ms, maps, scored, smooth_sigma=float(sigma))


def replaced_maps(ms: MapSet, maps: np.ndarray, scored: np.ndarray | None = None, **attrs) -> MapSet:
    """``ms`` with its raw maps replaced by ``maps`` (N, S, S), which are normalised over the
    set to ``maps_u8``, and scored with the run's image score (on ``scored``, the detector's
    score maps, where given); ``attrs`` say where they came from."""
    maps = maps.astype(np.float32)
    lo, hi = float(maps.min()), float(maps.max())
    attrs = {**ms.attrs, "norm_min": lo, "norm_max": hi, **attrs}
    scores = ImageScore.from_attrs(ms.attrs)(maps if scored is None else scored)
    return MapSet(list(ms.ids), maps, normalise_u8(maps, lo, hi), scores, ms.image_sizes, attrs)


def maps_from_file(ms: MapSet, path: Path) -> MapSet:
    """The run's maps replaced by the raw maps float (N, S, S) in ``path`` (``.npy``, the run's
    image order), normalised over the set as ``detect`` does."""
    try:
        maps = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read these maps ({e}); give a .npy file of float maps (N, S, S)") from e
    n = len(ms.ids)
    if (not np.issubdtype(maps.dtype, np.number) or maps.ndim != 3 or len(maps) != n or maps.shape[1] != maps.shape[2]
            or not np.isfinite(maps).all()):
        raise InputError(f"{path}: expected finite square maps (N, S, S) for the run's {n} images, got {maps.dtype} {maps.shape}")
    return replaced_maps(ms, maps, maps_file=str(path))


def baseline(cs: CropSet, params: dict, records: dict, rerun: bool, device: str, k: int = 0) -> tuple[dict, str]:
    """``evaluate``'s frozen-feature baseline of the crops ``cs`` and where its features came from."""
    ps = None
    if not rerun and paths.PROBS.exists():
        ps = read_probs(paths.PROBS, lazy=True)
        if len(ps.baseline_features) != len(cs.crops):
            ps = None
    if ps is not None:
        source = f"{paths.PROBS}"
    else:
        t = params["train"]
        k = k or (t.num_classes if isinstance(t.num_classes, int) else len({records[i].defect_type for i in cs.ids}))
        feats = region_features(t, np.asarray(cs.crops[:]), np.asarray(cs.crop_masks[:]), device)
        m = len(feats)
        ps = ProbSet(np.zeros((m, 1, k), np.float32), np.zeros((m, 1, k), np.float32), np.zeros((m, 0), np.float32),
                     feats, 0, {"num_unlabeled": k})
        source = f"frozen {t.model} features computed here, k = {k}"
    if paths.MERGED.exists():
        merger = Merger.from_attrs(read_merged(paths.MERGED).attrs, str(paths.MERGED))
    else:
        merger = Merger(params["merge"].strategy, params["merge"].temperature, NO_ANOMALY)
    return baseline_metrics(cs, ps, merger, params["evaluate"].seed, records), source


def chain(run: Path, overrides: list[str], rerun: bool = False, device: str = "cpu", k: int = 0, progress: bool = True,
          remap_sigma: float | None = None, maps_file: Path | None = None) -> dict:
    """Every figure of the chain for the run folder ``run`` (see the module docstring), MEBin
    rerun in memory when ``rerun``, ``overrides`` (``mebin.KEY=VALUE``), ``remap_sigma`` (the
    maps made again with that smoothing) or ``maps_file`` (other raw maps of the run's images)
    are given."""
    if remap_sigma is not None and maps_file is not None:
        raise InputError("--remap-sigma and --maps both replace the run's maps: give one")
    maps_file = Path(maps_file).resolve() if maps_file is not None else None
    os.chdir(run)  # the manifest's and the stores' paths are relative to the project root
    # mebin.core: auto follows the smoothing of the maps it binarizes
    remapped = [f"detect.smooth_sigma={remap_sigma}"] if remap_sigma is not None else []
    params = run_params(Path("params.yaml"), overrides + remapped)
    p_mebin = params["mebin"]
    rerun = rerun or bool(overrides) or remap_sigma is not None or maps_file is not None
    if not rerun and not paths.CROPS.exists():
        raise InputError(f"{run / paths.CROPS}: not found; wait for the run's mebin stage, or pass --rerun-mebin")
    records = Manifest.read(paths.MANIFEST).by_id()
    ms = read_maps(paths.MAPS)
    if remap_sigma is not None:
        ms = remap(ms, records, remap_sigma, progress)
    if maps_file is not None:
        ms = maps_from_file(ms, maps_file)
    if not any(records[i].mask for i in ms.ids):
        raise InputError(f"{run / paths.MANIFEST}: no image to classify has a mask; the chain needs ground truth")
    cs = crops_of_run(ms, records, p_mebin, rerun, progress)
    if cs.ids != ms.ids:
        raise InputError(f"{run / paths.CROPS}: images differ from {run / paths.MAPS}; rerun mebin (dvc repro)")
    out: dict = {"run": str(run), "images": len(ms.ids), "crops": len(cs.crops), "mebin_rerun": rerun, "overrides": overrides,
                 "remap_sigma": remap_sigma, "maps_file": str(maps_file) if maps_file else None}

    sizes = [tuple(int(v) for v in s) for s in ms.image_sizes]
    truth = [read_mask(records[i].mask, s) if records[i].mask else np.zeros(s, bool) for i, s in zip(ms.ids, sizes)]
    small = resize_masks(truth, ms.maps.shape[-1])
    out["detect"] = {"pixel_auroc": pixel_auroc(ms.maps, small), "aupro": aupro(ms.maps, small)}
    if (paths.METRICS / "detect.json").exists() and remap_sigma is None and maps_file is None:  # the stage's own maps
        d = json.loads((paths.METRICS / "detect.json").read_text())
        out["detect"]["stage"] = {k: d.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "normal_images_for_metrics")}

    lo, hi = int(cs.attrs["lo"]), int(cs.attrs["hi"])
    crop_rows: dict[int, list[int]] = {}
    for j, i in enumerate(cs.image_index.tolist()):
        crop_rows.setdefault(i, []).append(j)
    mask_scores, crop_scores, covers, no_interval = [], [], [], []
    for i, gt in enumerate(truth):
        rows = crop_rows.get(i, [])
        mask_scores.append(region_scores(gt, cs.masks[i], MIN_REGION))
        pasted = paste_crop_masks(gt.shape, cs.boxes[rows], np.asarray(cs.crop_masks[rows]) if rows else [])
        crop_scores.append(region_scores(gt, pasted, MIN_REGION))
        covers.append(mebin.gt_coverage(gt, cs.boxes[rows], cs.areas[rows], MIN_REGION))
        no_interval.append(without_stable_interval(np.asarray(ms.maps_u8[i]), lo, hi, p_mebin))
    coverage = sum(covers, mebin.GtCoverage())
    types = np.array([records[i].defect_type for i in ms.ids])
    out["per_type"] = {}
    for t in sorted(set(types.tolist()) - {"", NORMAL}):
        idx = np.flatnonzero(types == t)
        out["per_type"][t] = per_type(ms.maps[idx], small[idx], [mask_scores[i] for i in idx],
                                      sum((covers[i] for i in idx), mebin.GtCoverage()), int(sum(no_interval[i] for i in idx)))
    out["mebin_mask"] = summarize(mask_scores)
    out["crop_mask"] = summarize(crop_scores)
    out["mebin_mask"]["mask_fraction"] = float(np.mean([m.mean() for m in cs.masks]))
    out["crops_cover"] = {
        **coverage.metrics(),
        "images_without_stable_interval": int(sum(no_interval)),
        "fallback": p_mebin.fallback,
        "images_without_anomaly": int((cs.est_counts == 0).sum()),
    }
    out["mebin_params"] = {k: getattr(p_mebin, k) for k in ("erosion", "fallback", "padding", "core", "crop_size")}
    t0 = time.perf_counter()
    out["baseline"], out["baseline_source"] = baseline(cs, params, records, rerun, device, k)
    out["baseline_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def per_type(maps: np.ndarray, truth: np.ndarray, mask_scores: list, cover: "mebin.GtCoverage", no_interval: int) -> dict:
    """The chain's figures over the images of one defect type: pixel AUROC and AUPRO within
    those images (their own background the negatives: the images to classify hold no normal
    ones), MEBin's mask IoU, true regions found, defect pixels in crops, images without a stable
    interval. maps (n, S, S), truth bool (n, S, S) at the maps' size."""
    has_both = truth.any() and not truth.all()
    return {
        "images": len(maps),
        "pixel_auroc_within": pixel_auroc(maps, truth) if has_both else None,
        "aupro_within": aupro(maps, truth) if has_both else None,
        "mebin_iou": summarize(mask_scores)["iou"],
        **{k: v for k, v in cover.metrics().items() if k in ("gt_regions", "gt_regions_found", "gt_pixels_in_crops")},
        "images_without_stable_interval": no_interval,
    }


def _f(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"


def report(out: dict) -> str:
    """The figures of :func:`chain` as a few lines."""
    d, m, c, cov, b = out["detect"], out["mebin_mask"], out["crop_mask"], out["crops_cover"], out["baseline"]["image"]
    lines = [f"run {out['run']}: {out['images']} images, {out['crops']} crops"
             + (f", maps made again with smooth_sigma {out['remap_sigma']:g}" if out.get("remap_sigma") is not None else "")
             + (f", maps from {out['maps_file']}" if out.get("maps_file") else "")
             + (f", MEBin rerun here{' with ' + ' '.join(out['overrides']) if out['overrides'] else ''}" if out["mebin_rerun"] else "")
             + f"; mebin {out['mebin_params']}"]
    stage = d.get("stage")
    lines.append(f"  detect      pixel AUROC {d['pixel_auroc']:.3f}  AUPRO {d['aupro']:.3f}  (images to classify)"
                 + (f"; metrics/detect.json: image AUROC {_f(stage['image_auroc'])}, pixel AUROC {_f(stage['pixel_auroc'])}, "
                    f"AUPRO {_f(stage['aupro'])} (with {stage['normal_images_for_metrics']} normal images)" if stage else ""))
    for name, s in (("MEBin mask", m), ("crop masks", c)):
        lines.append(f"  {name:11s} region IoU {s['iou']:.3f}  precision {s['precision']:.3f}  recall {s['recall']:.3f}  "
                     f"regions hit {s['regions_hit']}/{s['regions']}  extra regions/image {s['extra_regions_per_image']:.2f}"
                     + (f"  mask fraction {s['mask_fraction']:.3f}" if "mask_fraction" in s else ""))
    lines.append(f"  crops       true regions found {cov['gt_regions_found']:.1%}  defect pixels in crops "
                 f"{cov['gt_pixels_in_crops']:.1%}  images without a stable interval (fallback {cov['fallback']}) "
                 f"{cov['images_without_stable_interval']}  without anomaly {cov['images_without_anomaly']}")
    if out.get("per_type"):
        lines.append(f"  {'per type':12s}{'images':>7s}  {'pixel AUROC / AUPRO within':>26s}  {'MEBin IoU':>9s}  "
                     f"{'regions found':>16s}  {'defect px in crops':>18s}  {'no stable interval':>18s}")
        for t, r in out["per_type"].items():
            found = "-" if r["gt_regions_found"] is None else f"{r['gt_regions_found']:.1%} of {r['gt_regions']}"
            px = "-" if r["gt_pixels_in_crops"] is None else f"{r['gt_pixels_in_crops']:.1%}"
            lines.append(f"    {t:10s}{r['images']:7d}  {_f(r['pixel_auroc_within']) + ' / ' + _f(r['aupro_within']):>26s}  "
                         f"{_f(r['mebin_iou']):>9s}  {found:>16s}  {px:>18s}  {r['images_without_stable_interval']:18d}")
    lines.append(f"  baseline    image NMI {b['nmi']:.3f}  ARI {b['ari']:.3f}  F1 {b['f1']:.3f}  "
                 f"(k-means on the frozen features, {out['baseline']['kmeans_seeds']} seeds; {out['baseline_source']})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a run's project folder (detect and mebin done)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="mebin.KEY=VALUE",
                    help="rerun MEBin in memory with this param changed (repeatable)")
    ap.add_argument("--rerun-mebin", action="store_true", help="rerun MEBin in memory on the run's maps")
    ap.add_argument("--remap-sigma", type=float, default=None, metavar="S",
                    help="map the images again with the run's detector smoothed with sigma S (implies --rerun-mebin)")
    ap.add_argument("--maps", type=Path, default=None, metavar="FILE.npy",
                    help="raw maps (N, S, S) of the run's images, in its maps store's order, instead of its own (implies --rerun-mebin)")
    ap.add_argument("--device", default="cpu", help="for the frozen features, when computed here")
    ap.add_argument("--k", type=int, default=0,
                    help="clusters of the baseline when its features are computed here (0: the run's train.num_classes)")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    args = ap.parse_args()
    if not (args.run / "params.yaml").is_file():
        raise SystemExit(f"{args.run}: no params.yaml; pass a project folder of a run")
    bad = [o for o in args.overrides if not o.startswith("mebin.")]
    if bad:
        raise SystemExit(f"--set {bad[0]!r}: only mebin params can change (MEBin is rerun on the run's maps)")
    json_path = args.json.resolve() if args.json else None
    try:
        out = chain(args.run.resolve(), args.overrides, args.rerun_mebin, args.device, args.k, progress=sys.stderr.isatty(),
                    remap_sigma=args.remap_sigma, maps_file=args.maps)
    except InputError as e:
        raise SystemExit(f"error: {e}") from e
    print(report(out))
    if json_path:
        json_path.write_text(json.dumps(out, indent=2, default=lambda v: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else str(v)))


if __name__ == "__main__":
    main()
