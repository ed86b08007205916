"""``anomalyncd predict``'s two decisions, measured (issue 27): normal or defect, and open set.

    python -m benchmarks.bench_openset normal                      # (a) on MTD
    python -m benchmarks.bench_openset openset --data demo         # (b) on the demo, every hold-out
    python -m benchmarks.bench_openset openset --data mtd-gt --holdout Crack --seeds 0

(a) **Normal or defect** on MTD (``--mtd``, default ``../shared/datasets/mtd`` beside the project): the
``prepare`` and ``detect`` stages with this project's params (``dataset.include_normal: true``,
so that MTD's 191 defect-free test images are scored with its 392 defect images), then the
decision ``predict`` makes, at ``calibrate.normal_quantile`` of the held-back normal images'
scores (``detect.holdout``): % of defect images flagged, % of defect-free ones flagged, the
AUROC of the image score, beside ``metrics/detect.json``'s image AUROC. The scores are those of
the map store: ``predict`` makes the same ones from the saved detector (the same function on the
same maps; ``tests/test_detect_stage.py`` and ``tests/test_predict.py`` check it). Then how
much of that is the draw of the held-back images (:func:`redrawn_calibration`): the same
quantile taken on other draws from every normal image the detector was not fitted on.

(b) **Open set, leave one type out**: for each defect type, a dataset without it (MVTec layout,
symbolic links) and with 30 % of every other type's test images held back, in whole groups
of photographs of one part (:func:`tile_groups`: MTD shows each tile under up to six lightings;
a held-back image whose twin is in the run would be "known" by its twin, not by its type); the
pipeline (``prepare`` to ``calibrate``, ``train.num_classes`` = the known types) runs on it, then
``predict`` (library call, ``normal_gate=False``: every image here is a defect) classifies the
left-out type's images and as many held-back known-type images. Printed per hold-out and seed:
AUROC of the unknown score (and of ``1 - confidence``, the max-softmax baseline, for
comparison), % of the new type flagged ``unknown type``, % of known-type images flagged, at
``calibrate.unknown_quantile``. ``--data demo``: the built-in demo (``demo`` params, 4 types);
``--data mtd-gt``: MTD with ground-truth maps (``detect.method: ground_truth``; predict reads
the masks' maps with ``--maps``).

Runs live in ``--work`` (default: a temporary folder, removed unless ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
MTD = Path(os.environ.get("ANOMALYNCD_MTD", ROOT.parent / "shared" / "datasets" / "mtd"))
PIPELINE = ["prepare", "detect", "mebin", "train", "infer", "merge", "calibrate"]
#: share of each known type's test images held back from the run (predicted as known types)
KNOWN_SHARE = 0.3


def write_params(proj: Path, overrides: dict[str, dict]) -> None:
    """``proj/params.yaml``: this project's params with ``overrides`` per section."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    proj.mkdir(parents=True, exist_ok=True)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stages(proj: Path, stages: list[str]) -> float:
    """Run ``python -m stages.<name>`` in ``proj`` for each name; wall seconds."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    for name in stages:
        proc = subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=proj, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{proj}: stage {name} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.perf_counter() - t


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    from anomalyncd.detect.metrics import image_auroc

    ok = np.isfinite(scores)
    return image_auroc(scores[ok], positive[ok]) if 0 < positive[ok].sum() < ok.sum() else math.nan


# -- (a) normal or defect ---------------------------------------------------------------------


def bench_normal(work: Path, mtd: Path) -> None:
    from anomalyncd import paths
    from anomalyncd.calibrate import threshold
    from anomalyncd.config import load_params
    from anomalyncd.datasets import Manifest
    from anomalyncd.store import read_maps

    proj = work / "normal"
    write_params(proj, {"dataset": {"layout": "mtd", "root": str(mtd), "include_normal": True}})
    seconds = run_stages(proj, ["prepare", "detect"])
    q = load_params("calibrate", proj / "params.yaml").normal_quantile
    ms = read_maps(proj / paths.MAPS, lazy=True)
    records = Manifest.read(proj / paths.MANIFEST).by_id()
    defect = np.array([not records[i].is_normal for i in ms.ids])
    scores = np.asarray(ms.scores, np.float64)
    held = np.asarray(ms.attrs["holdout_scores"], np.float64)
    detect_auroc = json.loads((proj / paths.METRICS / "detect.json").read_text()).get("image_auroc")
    print(f"(a) normal or defect, MTD: {defect.sum()} defect and {(~defect).sum()} defect-free test images; "
          f"detector fitted on {len(Manifest.read(proj / paths.MANIFEST).train_normal()) - len(held)} normal images, "
          f"{len(held)} held back ({seconds:.0f} s)")
    print(f"    AUROC of the image score {auroc(scores, defect):.3f}; detector's image AUROC (metrics/detect.json) {detect_auroc:.3f}")
    print("    quantile  threshold  defects flagged  defect-free flagged")
    for qq in sorted({0.9, 0.95, 0.99, 1.0, q}):
        t = threshold(held, qq)
        mark = "  (default: calibrate.normal_quantile)" if qq == q else ""
        print(f"    {qq:8.3f}  {t:9.4g}  {100 * np.mean(scores[defect] > t):14.1f} %  {100 * np.mean(scores[~defect] > t):17.1f} %{mark}")
    t90 = np.quantile(scores[defect], 0.1)
    print(f"    flagging 90 % of the defects (threshold {t90:.4g}) flags {100 * np.mean(scores[~defect] > t90):.1f} % of the defect-free images")
    tp, fp = redrawn_calibration(held, scores[~defect], scores[defect], q)
    print(f"    the same quantile taken on other draws of {len(held)} of the {len(held) + (~defect).sum()} normal images the detector "
          f"was not fitted on (held back or test; {len(tp)} draws, the rest the defect-free test images): defects flagged "
          f"{100 * tp.mean():.1f} % (5-95 %: {100 * np.quantile(tp, 0.05):.1f}-{100 * np.quantile(tp, 0.95):.1f}), "
          f"defect-free {100 * fp.mean():.1f} % ({100 * np.quantile(fp, 0.05):.1f}-{100 * np.quantile(fp, 0.95):.1f}); "
          f"this run's draw: {100 * np.mean(scores[defect] > threshold(held, q)):.1f} %")


def redrawn_calibration(held: np.ndarray, free: np.ndarray, defects: np.ndarray, q: float, draws: int = 2000,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """How much the normal/defect decision owes to which normal images were held back: the
    held-back and the defect-free test images' scores pooled (none was fitted on), ``draws``
    random splits into as many calibration images as ``held`` and the rest; per draw the share
    of ``defects`` and of the rest above the ``q`` quantile of the calibration images.
    (The scores keep the standardisation of the run's own held-back images.)"""
    pool = np.concatenate([held, free])
    rng = np.random.default_rng(seed)
    tp, fp = np.empty(draws), np.empty(draws)
    for i in range(draws):
        order = rng.permutation(len(pool))
        t = np.quantile(pool[order[: len(held)]], q)
        tp[i], fp[i] = np.mean(defects > t), np.mean(pool[order[len(held):]] > t)
    return tp, fp


# -- (b) open set, leave one type out ----------------------------------------------------------


def demo_source(work: Path) -> tuple[dict[str, list[tuple[Path, Path]]], list[Path]]:
    """The demo's defect images by type, (image, mask) pairs, and its normal training images."""
    from anomalyncd.config import load_params

    proj = work / "demo-source"
    write_params(proj, {"demo": {}})
    if not (proj / "data" / "demo").is_dir():
        run_stages(proj, ["demo"])
    cat = proj / "data" / "demo" / load_params("demo", proj / "params.yaml").category
    types = {}
    for d in sorted((cat / "test").iterdir()):
        if d.name != "good":
            types[d.name] = [(p, cat / "ground_truth" / d.name / f"{p.stem}_mask.png") for p in sorted(d.glob("*.png"))]
    return types, sorted((cat / "train" / "good").glob("*.png"))


def mtd_source(mtd: Path) -> tuple[dict[str, list[tuple[Path, Path]]], list[Path]]:
    """MTD's defect images by type (MT_<Type>/Imgs/<name>.jpg and its .png mask) and its normal
    training images (``mtd_train_filenames.txt``)."""
    types = {}
    for d in sorted(mtd.glob("MT_*")):
        if d.name != "MT_Free":
            types[d.name[3:]] = [(p, p.with_suffix(".png")) for p in sorted((d / "Imgs").glob("*.jpg"))]
    names = set((mtd / "mtd_train_filenames.txt").read_text().split())
    train = sorted(p for p in (mtd / "MT_Free" / "Imgs").glob("*.jpg") if p.name in names)
    return types, train


def tile_groups(items: list) -> list[list[int]]:
    """Indices of ``items`` ((image, mask) pairs) grouped by physical part. MTD photographs each
    tile under up to six lightings (``exp1_num_20390.jpg`` ... ``exp6_num_20496.jpg``: rising
    ``exp``, nearby frame ``num``); those near-duplicates must fall on one side of a split, or a
    held-back image has its twin in the run. Other names: one group per image."""
    parsed = [re.fullmatch(r"exp(\d+)_num_(\d+)", img.stem) for img, _ in items]
    if not all(parsed):
        return [[i] for i in range(len(items))]
    order = sorted(range(len(items)), key=lambda i: int(parsed[i][2]))
    groups: list[list[int]] = []
    prev = None
    for i in order:
        e, n = int(parsed[i][1]), int(parsed[i][2])
        if prev is None or e <= prev[0] or n - prev[1] > 500:
            groups.append([])
        groups[-1].append(i)
        prev = (e, n)
    return groups


def loto_split(types: dict[str, list], held_type: str, seed: int) -> tuple[dict[str, list], list, list]:
    """(types the run sees, the new type's images, as many held-back known-type images). The
    held-back share of each known type is taken in whole :func:`tile_groups`."""
    rng = np.random.default_rng(seed)
    known = [t for t in types if t != held_type]
    run, held_known = {}, []
    for t in known:
        groups = tile_groups(types[t])
        order = rng.permutation(len(groups))
        n_held = max(1, math.ceil(KNOWN_SHARE * len(groups)))
        held = sorted(i for g in order[:n_held] for i in groups[g])
        held_known += [(t, types[t][i]) for i in held]
        run[t] = [types[t][i] for i in range(len(types[t])) if i not in set(held)]
    new = [(held_type, x) for x in types[held_type]]
    n = min(len(new), len(held_known))
    pick = np.sort(rng.permutation(len(held_known))[:n])
    return run, [new[i] for i in np.sort(rng.permutation(len(new))[:n])], [held_known[i] for i in pick]


def link_dataset(root: Path, run: dict[str, list], train: list[Path]) -> None:
    """An MVTec-layout folder of links: tile/train/good, tile/test/<type>, tile/ground_truth/<type>."""
    cat = root / "tile"
    (cat / "train" / "good").mkdir(parents=True)
    for p in train:
        (cat / "train" / "good" / p.name).symlink_to(p.resolve())
    for t, items in run.items():
        (cat / "test" / t).mkdir(parents=True)
        (cat / "ground_truth" / t).mkdir(parents=True)
        for img, mask in items:
            (cat / "test" / t / img.name).symlink_to(img.resolve())
            (cat / "ground_truth" / t / f"{img.stem}_mask.png").symlink_to(mask.resolve())


def link_queries(folder: Path, items: list, maps: Path | None, map_size: int) -> None:
    """Links to the query images in ``folder`` (named <type>_<name>); with ``maps``, their
    ground-truth maps as ``<maps>/<folder name>/<type>_<name>.npy``."""
    from anomalyncd.detect.ground_truth import mask_map
    from anomalyncd.io import read_mask

    folder.mkdir(parents=True)
    for t, (img, mask) in items:
        (folder / f"{t}_{img.name}").symlink_to(img.resolve())
        if maps is not None:
            (maps / folder.name).mkdir(parents=True, exist_ok=True)
            np.save(maps / folder.name / f"{t}_{img.stem}.npy", mask_map(read_mask(mask), map_size))


#: unknown quantiles shown besides the default
QUANTILES = (0.9, 0.95, 0.99, 1.0)


def bench_openset_one(work: Path, data: str, types, train, held_type: str, seed: int, overrides: dict, reuse: bool) -> dict:
    from anomalyncd.calibrate import threshold
    from anomalyncd.config import load_params
    from anomalyncd.predict import find_images, load_run, predict_images

    base = work / f"{data}-{held_type}-{seed}"
    proj = base / "run"
    gt = data == "mtd-gt"
    run_types, new, known = loto_split(types, held_type, seed)
    maps = base / "maps" if gt else None
    seconds = math.nan
    if not (reuse and (proj / "models" / "calibration.json").exists()):
        if base.exists():
            shutil.rmtree(base)
        link_dataset(base / "dataset", run_types, train)
        write_params(proj, {
            **overrides,
            "dataset": {"layout": "mvtec", "root": str(base / "dataset")},
            "detect": {**overrides.get("detect", {}), **({"method": "ground_truth"} if gt else {})},
            "train": {**overrides.get("train", {}), "num_classes": len(run_types), "seed": seed},
        })
        seconds = run_stages(proj, PIPELINE)
        map_size = load_params("detect", proj / "params.yaml").map_size
        link_queries(base / "queries" / "new", new, maps, map_size)
        link_queries(base / "queries" / "known", known, maps, map_size)
    run = load_run(proj)
    images = find_images([base / "queries" / "new", base / "queries" / "known"])
    q = load_params("calibrate", ROOT / "params.yaml").unknown_quantile  # this project's default, also for reused runs
    pred = predict_images(run, images, maps, "cpu", progress=False, normal_gate=False, unknown_quantile=q)
    rows = pred.rows
    is_new = np.array([r["id"].startswith("new/") for r in rows])
    unknown = np.array([float(r["unknown_score"]) if r["unknown_score"] else math.nan for r in rows])
    conf = np.array([float(r["confidence"]) if r["confidence"] else math.nan for r in rows])
    flagged = np.array([r["open_set"] == "unknown type" for r in rows])
    return {
        "held": held_type, "seed": seed, "new": int(is_new.sum()), "known": int((~is_new).sum()),
        "auroc": auroc(unknown, is_new), "auroc_maxsoftmax": auroc(1 - conf, is_new),
        "new_flagged": float(flagged[is_new].mean()), "known_flagged": float(flagged[~is_new].mean()),
        "no_anomaly": int(np.isnan(unknown).sum()), "threshold": pred.calibration.unknown_threshold,
        "run_images": sum(len(v) for v in run_types.values()), "seconds": seconds,
        **{f"new@{q}": float(np.mean(unknown[is_new] > threshold(run.calibration.known_scores, q))) for q in QUANTILES},
        **{f"known@{q}": float(np.mean(unknown[~is_new] > threshold(run.calibration.known_scores, q))) for q in QUANTILES},
    }


def bench_openset(work: Path, data: str, mtd: Path, seeds: list[int], holdouts: list[str] | None, reuse: bool = False) -> None:
    if data == "demo":
        types, train = demo_source(work)
        overrides: dict = {}
    else:
        types, train = mtd_source(mtd)
        overrides = {}
    from anomalyncd.config import load_params

    q = load_params("calibrate", ROOT / "params.yaml").unknown_quantile
    print(f"(b) open set, leave one type out, {data}: types {list(types)}; calibrate.unknown_quantile {q}; "
          f"{KNOWN_SHARE:.0%} of each known type's parts held back")
    print("    held-out  seed  run imgs  new/known  AUROC  (max-softmax)  new flagged  known flagged  threshold  seconds")
    results = []
    for held_type in holdouts or list(types):
        for seed in seeds:
            r = bench_openset_one(work, data, types, train, held_type, seed, overrides, reuse)
            results.append(r)
            print(f"    {r['held']:>8}  {r['seed']:4d}  {r['run_images']:8d}  {r['new']:4d}/{r['known']:<4d}  {r['auroc']:.3f}"
                  f"  ({r['auroc_maxsoftmax']:.3f})        {100 * r['new_flagged']:6.1f} %  {100 * r['known_flagged']:10.1f} %"
                  f"  {r['threshold']:9.4f}  {r['seconds']:7.0f}", flush=True)
    if len(seeds) > 1:
        print(f"    mean over seeds {seeds}:")
        for held_type in holdouts or list(types):
            rs = [r for r in results if r["held"] == held_type]
            m = {k: float(np.mean([r[k] for r in rs])) for k in ("auroc", "auroc_maxsoftmax", "new_flagged", "known_flagged")}
            print(f"    {held_type:>8}  AUROC {m['auroc']:.3f} (max-softmax {m['auroc_maxsoftmax']:.3f})  "
                  f"new flagged {100 * m['new_flagged']:.1f} %  known flagged {100 * m['known_flagged']:.1f} %")
    print("    new / known flagged at other calibrate.unknown_quantile values, mean of the runs above:")
    for q in QUANTILES:
        print(f"    {q:5.2f}: {100 * np.mean([r[f'new@{q}'] for r in results]):5.1f} % / {100 * np.mean([r[f'known@{q}'] for r in results]):5.1f} %")
    m = {k: float(np.mean([r[k] for r in results])) for k in ("auroc", "auroc_maxsoftmax", "new_flagged", "known_flagged")}
    print(f"    all hold-outs: AUROC {m['auroc']:.3f} (max-softmax {m['auroc_maxsoftmax']:.3f})  new flagged "
          f"{100 * m['new_flagged']:.1f} %  known flagged {100 * m['known_flagged']:.1f} %  (targets: >= 0.85, >= 70 %, <= 15 %)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=["normal", "openset"])
    ap.add_argument("--data", choices=["demo", "mtd-gt"], default="demo", help="openset: the data set")
    ap.add_argument("--mtd", type=Path, default=MTD)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="openset: train.seed and the split's seed")
    ap.add_argument("--holdout", nargs="+", help="openset: the types to leave out (default: each in turn)")
    ap.add_argument("--work", type=Path, help="folder for the runs (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--reuse", action="store_true", help="openset: reuse the finished runs found in --work (predict again only)")
    a = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the stages' and the detector's progress bars
    if (a.part == "normal" or a.data == "mtd-gt") and not a.mtd.is_dir():
        sys.exit(f"MTD not found at {a.mtd}; pass --mtd or set ANOMALYNCD_MTD")
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_openset_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if a.part == "normal":
            bench_normal(work, a.mtd)
        else:
            bench_openset(work, a.data, a.mtd, a.seeds, a.holdout, a.reuse)
    finally:
        if a.work is None and not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
