"""How well does ``train.num_classes: auto`` find the number of defect classes?

Two measurements, both printed as tables:

``estimators``: every estimator of :mod:`anomalyncd.num_classes` on every feature the estimate
can use (the filter-bank region descriptors, the mask-guided [CLS] features with guidance in all
blocks, and in the last block only), on the crops of one run per seed (the data stages run in a
scratch copy of the repository with ``demo.seed`` set), or on existing runs (``--runs``). Prints
the estimate of each (features, method) pair per run, with its runner-up and confidence in
brackets, and how often it is exact and within 1;
``--overcomplete-epochs`` adds the over-complete head (train with ``auto_max`` outputs, count
the outputs that keep at least 2% / 5% of the crops)::

    python benchmarks/bench_num_classes.py estimators --seeds 0 1 2 3 4 5 6 7 8 9
    python benchmarks/bench_num_classes.py estimators --dataset mtd --set detect.method=ground_truth

``synthetic``: the estimators on the synthetic feature sets of :mod:`synthetic_k` (known K:
no structure, equal and unequal classes, one class of 5 %, overlapping classes), several seeds
each; prints every estimate and the share within 1 of the true K::

    python benchmarks/bench_num_classes.py synthetic --seeds 0 1 2 3 4 --methods stability null_stability

``pipeline``: the whole pipeline in a scratch copy of the repository, once per seed
(``demo.seed`` and ``train.seed``), with ``num_classes`` set to ``auto`` and to fixed values
(by default the true K, K-1, K+1 and 2K); prints the estimate and image-level NMI/ARI/F1::

    python benchmarks/bench_num_classes.py pipeline --seeds 0 1 2
    python benchmarks/bench_num_classes.py pipeline --dataset mtd --seeds 0 \\
        --set detect.method=ground_truth

Run with ``OMP_NUM_THREADS=1`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

STAGES_DATA = ["demo", "prepare", "detect", "mebin"]
STAGES_MODEL = ["train", "infer", "merge", "evaluate"]


# -- estimators on one run's crops ------------------------------------------------------------


def crop_labels(crops_path: Path, manifest_path: Path) -> np.ndarray:
    """int (M,): the defect type of each crop's image, as an index."""
    from anomalyncd.datasets import Manifest
    from anomalyncd.store import read_crops

    cs = read_crops(crops_path)
    types = {r.id: r.defect_type for r in Manifest.read(manifest_path).records}
    names = sorted({types[i] for i in cs.ids})
    image_labels = np.array([names.index(types[i]) for i in cs.ids])
    return image_labels[cs.image_index]


def feature_sets(p, crops: np.ndarray, crop_masks: np.ndarray) -> dict[str, np.ndarray]:
    """Every feature ``auto`` can cluster, for the crops that have a region."""
    import torch

    from anomalyncd.augment import eval_views
    from anomalyncd.config import train_crop_pct
    from anomalyncd.auto_k import region_descriptors, region_features
    from anomalyncd.model import MGViT, create_backbone, is_vit

    sets = {
        "filterbank": region_descriptors(crops, crop_masks),
        "mgvit": region_features(p, crops, crop_masks),
    }
    if is_vit(p.model):  # a ViT's [CLS] with mask guidance in the last block only
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p.seed)
            enc = MGViT(create_backbone(p.model, p.image_size, p.pretrained, p.checkpoint), 1, 0).eval()
        x, mk = eval_views(crops, crop_masks, p.image_size, train_crop_pct(p))
        with torch.no_grad():
            last = torch.cat([enc(torch.from_numpy(x[s : s + 64]), torch.from_numpy(mk[s : s + 64])) for s in range(0, len(x), 64)])
        sets["mgvit-last"] = last.numpy()
    return sets


def estimators_on_run(run: Path, args: argparse.Namespace) -> dict[tuple[str, str], int]:
    """Print and return the estimate of every (features, method) pair on one run's crops."""
    import torch
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    from anomalyncd.auto_k import with_region
    from anomalyncd.config import load_params
    from anomalyncd.num_classes import METHODS, count_massive_classes, estimate_num_classes, prepare_features
    from anomalyncd.store import read_crops

    crops_path = run / "data/mebin/crops.zarr.zip"
    p = load_params("train", run / "params.yaml")
    cs = read_crops(crops_path)
    y = crop_labels(crops_path, run / "data/prepared/manifest.csv")
    keep = with_region(cs.crop_masks)
    y = y[keep]
    k_true = len(np.unique(y))
    print(f"\n{run}: {len(y)} crops with a region ({int((~keep).sum())} without), true classes {k_true}, "
          f"crops per class {np.bincount(y).tolist()}")
    print(f"{'features':<12} {'kmeans@K NMI':>12}  " + "  ".join(f"{m:>14}" for m in METHODS) + "   seconds")
    out = {}
    for name, f in feature_sets(p, cs.crops[keep], cs.crop_masks[keep]).items():
        labels = KMeans(k_true, n_init=4, random_state=0).fit(prepare_features(f)).labels_
        row, secs = [], []
        for m in METHODS:
            t = time.perf_counter()
            est = estimate_num_classes(f, k_max=p.auto_max, method=m, seed=p.seed)
            out[name, m] = est.k
            conf = f" {est.confidence:.1f}" if est.confidence is not None else ""
            row.append(f"{est.k} ({est.runner_up}{conf})")
            secs.append(time.perf_counter() - t)
        print(f"{name:<12} {normalized_mutual_info_score(y, labels):>12.3f}  "
              + "  ".join(f"{k:>14}" for k in row) + "   " + " ".join(f"{s:.1f}" for s in secs), flush=True)

    if args.overcomplete_epochs:
        from anomalyncd.inference import crop_outputs, novel_probabilities
        from anomalyncd.model import MGViTClassifier, ModelConfig, create_backbone
        from anomalyncd.training import TrainData, train

        torch.manual_seed(p.seed)
        net = MGViTClassifier(
            ModelConfig.from_params(p, num_unlabeled=p.auto_max),
            create_backbone(p.model, p.image_size, p.pretrained, p.checkpoint, p.layers),
        )
        data = TrainData(cs.crops, cs.crop_masks, cs.scores.astype(np.float32), -np.ones(len(cs.crops), np.int64))
        t = time.perf_counter()
        res = train(net, data, replace(p, epochs=args.overcomplete_epochs, trunk_cache_views=4))
        logits = crop_outputs(net, cs.crops[keep], cs.crop_masks[keep]).logits
        probs = novel_probabilities(torch.from_numpy(logits[:, res.head]), 0).numpy()
        share = np.bincount(probs.argmax(1), minlength=probs.shape[1]) / len(probs)
        print(f"over-complete head ({p.auto_max} outputs, {args.overcomplete_epochs} epochs, "
              f"{time.perf_counter() - t:.0f} s): shares {np.round(np.sort(share)[::-1], 2).tolist()}; "
              f"count >= 2%: {count_massive_classes(probs, 0.02)}, >= 5%: {count_massive_classes(probs, 0.05)}")
    return out


def run_estimators(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    if args.runs:
        runs = [Path(r) for r in args.runs]
    else:  # one scratch run per seed: the data stages only
        work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-num-classes-"))
        runs = []
        for seed in args.seeds:
            run = work / f"seed{seed}"
            run.mkdir(parents=True, exist_ok=True)
            copy_repo(run)
            params, stages = base_params(run, args)
            set_key(params, "demo.seed", seed)
            set_key(params, "train.seed", seed)
            run_stages(run, stages, params, open(run / "bench.log", "a"))
            runs.append(run)
    results = [estimators_on_run(run, args) for run in runs]
    k_true = args.true_k
    print(f"\nover {len(runs)} runs (true K {k_true}): estimates, exact / within 1")
    for key in results[0]:
        ks = [r[key] for r in results]
        exact, near = sum(k == k_true for k in ks), sum(abs(k - k_true) <= 1 for k in ks)
        print(f"  {key[0]:<12} {key[1]:<10} {' '.join(map(str, ks)):<24} {exact}/{len(ks)}  {near}/{len(ks)}")


# -- the synthetic bench ---------------------------------------------------------------------


def run_synthetic(args: argparse.Namespace) -> None:
    """Every case of :data:`synthetic_k.CASES` x seed, every method: the estimates, exact and
    within-1 counts, and "no structure" recognised (K = 1 on the cases with one class)."""
    from anomalyncd.num_classes import estimate_num_classes
    from synthetic_k import CASES, mixture

    methods = args.methods
    print(f"{'case':<26} {'K':>2}  " + "  ".join(f"{m:>18}" for m in methods))
    tally = {m: [0, 0, 0] for m in methods}  # exact, within 1, cases
    secs = {m: 0.0 for m in methods}
    for case in CASES:
        cells = []
        for m in methods:
            ks = []
            for seed in args.seeds:
                x, _ = mixture(case, seed)
                t = time.perf_counter()
                k = estimate_num_classes(x, k_max=10, method=m, seed=0).k
                secs[m] += time.perf_counter() - t
                ks.append(k)
                ok = k == case.k
                tally[m][0] += ok
                tally[m][1] += ok if case.k == 1 else abs(k - case.k) <= 1  # no structure must be exactly 1
                tally[m][2] += 1
            cells.append(" ".join(map(str, ks)))
        print(f"{case.name:<26} {case.k:>2}  " + "  ".join(f"{c:>18}" for c in cells), flush=True)
    for m in methods:
        e, n1, n = tally[m]
        print(f"{m}: exact {e}/{n}, within 1 (no structure: exactly 1) {n1}/{n} = {n1 / n:.0%}, {secs[m] / n:.2f} s per set")


# -- the whole pipeline -----------------------------------------------------------------------


def copy_repo(dst: Path) -> None:
    """Copy the working tree's tracked and untracked (not ignored) files to ``dst``."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def set_key(params: dict, dotted: str, value) -> None:
    section, key = dotted.split(".", 1)
    params.setdefault(section, {})[key] = value


def run_stages(work: Path, stages: list[str], params: dict, log) -> None:
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(work)}
    for stage in stages:
        r = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=work, env=env, capture_output=True, text=True)
        log.write(f"$ stages.{stage}\n{r.stdout}{r.stderr}\n")
        if r.returncode:
            raise RuntimeError(f"stages.{stage} failed:\n{r.stderr[-3000:]}")


def image_metrics(work: Path) -> dict:
    ev = json.loads((work / "metrics" / "evaluate.json").read_text())
    img = ev.get("image", ev)
    return {k: img.get(k, float("nan")) for k in ("nmi", "ari", "f1")}


def base_params(work: Path, args: argparse.Namespace) -> tuple[dict, list[str]]:
    """params.yaml of the scratch copy with ``--dataset`` and ``--set`` applied; the data stages."""
    base = yaml.safe_load((work / "params.yaml").read_text())
    stages_data = STAGES_DATA
    if args.dataset == "mtd":
        set_key(base, "dataset.layout", "mtd")
        set_key(base, "dataset.root", str(Path(args.mtd_root).resolve()))
        stages_data = STAGES_DATA[1:]
    for kv in args.set:
        key, value = kv.split("=", 1)
        set_key(base, key, yaml.safe_load(value))
    return base, stages_data


def run_pipeline(args: argparse.Namespace) -> None:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-num-classes-"))
    work.mkdir(parents=True, exist_ok=True)
    copy_repo(work)
    base, stages_data = base_params(work, args)
    log = open(work / "bench.log", "a")
    print(f"workdir {work} (stage logs in bench.log)")
    print(f"{'seed':>4} {'num_classes':>11} {'used':>4} {'estimate':>8} {'nmi':>6} {'ari':>6} {'f1':>6} {'seconds':>7}")
    rows = []
    for seed in args.seeds:
        params = json.loads(json.dumps(base))
        set_key(params, "demo.seed", seed)
        set_key(params, "train.seed", seed)
        run_stages(work, stages_data, params, log)
        k_true = args.true_k
        settings = args.ks or ["auto", k_true, k_true - 1, k_true + 1, 2 * k_true]
        for k in settings:
            k = k if k == "auto" else int(k)
            set_key(params, "train.num_classes", k)
            t = time.perf_counter()
            run_stages(work, STAGES_MODEL, params, log)
            nc = json.loads((work / "metrics" / "num_classes.json").read_text())
            m = image_metrics(work)
            rows.append({"seed": seed, "num_classes": k, **nc, **m})
            print(f"{seed:>4} {str(k):>11} {nc['num_classes']:>4} {nc['estimate']:>8} "
                  f"{m['nmi']:>6.3f} {m['ari']:>6.3f} {m['f1']:>6.3f} {time.perf_counter() - t:>7.0f}", flush=True)
    (work / "bench_num_classes.json").write_text(json.dumps(rows, indent=2))
    auto = [r for r in rows if r["num_classes"] == "auto"]
    known = {r["seed"]: r for r in rows if r["num_classes"] == args.true_k}
    if auto and known:
        print("\nauto vs true K:")
        for r in auto:
            print(f"  seed {r['seed']}: estimate {r['estimate']} (true {args.true_k}, |diff| "
                  f"{abs(r['estimate'] - args.true_k)}), NMI {r['nmi']:.3f} vs {known[r['seed']]['nmi']:.3f} "
                  f"(diff {r['nmi'] - known[r['seed']]['nmi']:+.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("estimators", help="every estimator and feature on the crops of one run per seed")
    e.add_argument("--runs", nargs="*", default=[], help="existing runs (repository copies with data/) instead of seeds")
    e.add_argument("--overcomplete-epochs", type=int, default=0)
    sy = sub.add_parser("synthetic", help="the estimators on synthetic features with known K")
    sy.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    sy.add_argument("--methods", nargs="+", default=["stability", "null_stability"])
    p = sub.add_parser("pipeline", help="the whole pipeline with num_classes auto and fixed")
    p.add_argument("--ks", nargs="+", default=None, help="num_classes settings; default auto K K-1 K+1 2K")
    for q in (e, p):
        q.add_argument("--dataset", choices=["demo", "mtd"], default="demo")
        q.add_argument("--mtd-root", default=str(ROOT.parent / "shared/datasets/mtd"))
        q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        q.add_argument("--true-k", type=int, default=None, help="default: 4 (demo), 5 (mtd)")
        q.add_argument("--set", nargs="*", default=[], help="extra params, e.g. train.epochs=6")
        q.add_argument("--workdir", default=None, help="scratch copy of the repo (default: a new temp dir)")
    args = ap.parse_args()
    if args.cmd == "synthetic":
        import torch

        torch.set_num_threads(1)
        return run_synthetic(args)
    if args.true_k is None:
        args.true_k = 5 if args.dataset == "mtd" else 4
    if args.cmd == "estimators":
        run_estimators(args)
    else:
        run_pipeline(args)


if __name__ == "__main__":
    main()
