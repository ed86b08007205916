"""How well does ``train.num_classes: auto`` find the number of defect classes?

Two measurements, both printed as tables:

``estimators``: every estimator of :mod:`anomalyncd.num_classes` on the crops of an existing
run (``data/mebin/crops.zarr.zip``, true classes from the manifest), on [CLS] features with
mask guidance in all blocks (what ``auto`` uses) and in the last block only, plus the
over-complete head (train with ``auto_max`` outputs, count the outputs that keep at least 2% /
5% of the crops) when ``--overcomplete-epochs`` is given::

    python benchmarks/bench_num_classes.py estimators --overcomplete-epochs 6

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
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


def run_estimators(args: argparse.Namespace) -> None:
    import torch
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    from anomalyncd.augment import eval_views
    from anomalyncd.auto_k import region_features
    from anomalyncd.config import load_params
    from anomalyncd.model import MGViT, create_backbone
    from anomalyncd.num_classes import METHODS, count_massive_classes, estimate_num_classes, prepare_features
    from anomalyncd.store import read_crops

    torch.set_num_threads(1)
    p = load_params("train", args.params)
    cs = read_crops(args.crops)
    y = crop_labels(args.crops, args.manifest)
    k_true = len(np.unique(y))
    print(f"{len(y)} crops, true classes {k_true}, crops per class {np.bincount(y).tolist()}")

    def last_block_features() -> np.ndarray:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p.seed)
            enc = MGViT(create_backbone(p.model, p.image_size, p.pretrained, p.checkpoint), 1, 0).eval()
        x, mk = eval_views(cs.crops, cs.crop_masks, p.image_size)
        with torch.no_grad():
            return torch.cat([enc(torch.from_numpy(x[s : s + 64]), torch.from_numpy(mk[s : s + 64]))
                              for s in range(0, len(x), 64)]).numpy()

    feature_sets = {"all blocks": region_features(p, cs.crops, cs.crop_masks), "last block": last_block_features()}
    print(f"\n{'features':<12} {'kmeans@K NMI':>12}  " + "  ".join(f"{m:>10}" for m in METHODS) + "   seconds")
    for name, f in feature_sets.items():
        labels = KMeans(k_true, n_init=4, random_state=0).fit(prepare_features(f)).labels_
        row, secs = [], []
        for m in METHODS:
            t = time.perf_counter()
            row.append(estimate_num_classes(f, k_max=p.auto_max, method=m, seed=p.seed).k)
            secs.append(time.perf_counter() - t)
        print(f"{name:<12} {normalized_mutual_info_score(y, labels):>12.3f}  "
              + "  ".join(f"{k:>10}" for k in row) + "   " + " ".join(f"{s:.1f}" for s in secs))

    if args.overcomplete_epochs:
        from anomalyncd.inference import crop_outputs, novel_probabilities
        from anomalyncd.model import MGViTClassifier, ModelConfig
        from anomalyncd.training import TrainConfig, TrainData, train

        torch.manual_seed(p.seed)
        net = MGViTClassifier(ModelConfig(model=p.model, image_size=p.image_size, num_unlabeled=p.auto_max))
        data = TrainData(cs.crops, cs.crop_masks, cs.scores.astype(np.float32), -np.ones(len(y), np.int64))
        t = time.perf_counter()
        res = train(net, data, TrainConfig(epochs=args.overcomplete_epochs, seed=p.seed, trunk_cache_views=4))
        _, logits = crop_outputs(net, cs.crops, cs.crop_masks)
        probs = novel_probabilities(torch.from_numpy(logits[:, res.head]), 0).numpy()
        share = np.bincount(probs.argmax(1), minlength=probs.shape[1]) / len(probs)
        print(f"\nover-complete head ({p.auto_max} outputs, {args.overcomplete_epochs} epochs, "
              f"{time.perf_counter() - t:.0f} s): shares {np.round(np.sort(share)[::-1], 2).tolist()}; "
              f"count >= 2%: {count_massive_classes(probs, 0.02)}, >= 5%: {count_massive_classes(probs, 0.05)}")


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


def run_pipeline(args: argparse.Namespace) -> None:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-num-classes-"))
    work.mkdir(parents=True, exist_ok=True)
    copy_repo(work)
    base = yaml.safe_load((work / "params.yaml").read_text())
    if args.dataset == "mtd":
        set_key(base, "dataset.layout", "mtd")
        set_key(base, "dataset.root", str(Path(args.mtd_root).resolve()))
        stages_data = STAGES_DATA[1:]
    else:
        stages_data = STAGES_DATA
    for kv in args.set:
        key, value = kv.split("=", 1)
        set_key(base, key, yaml.safe_load(value))
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
    e = sub.add_parser("estimators", help="every estimator on the crops of an existing run")
    e.add_argument("--crops", type=Path, default=ROOT / "data/mebin/crops.zarr.zip")
    e.add_argument("--manifest", type=Path, default=ROOT / "data/prepared/manifest.csv")
    e.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    e.add_argument("--overcomplete-epochs", type=int, default=0)
    p = sub.add_parser("pipeline", help="the whole pipeline with num_classes auto and fixed")
    p.add_argument("--dataset", choices=["demo", "mtd"], default="demo")
    p.add_argument("--mtd-root", default=str(ROOT.parent / "shared/datasets/mtd"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--true-k", type=int, default=None, help="default: 4 (demo), 5 (mtd)")
    p.add_argument("--ks", nargs="+", default=None, help="num_classes settings; default auto K K-1 K+1 2K")
    p.add_argument("--set", nargs="*", default=[], help="extra params, e.g. train.epochs=6")
    p.add_argument("--workdir", default=None, help="scratch copy of the repo (default: a new temp dir)")
    args = ap.parse_args()
    if args.cmd == "estimators":
        run_estimators(args)
    else:
        if args.true_k is None:
            args.true_k = 5 if args.dataset == "mtd" else 4
        run_pipeline(args)


if __name__ == "__main__":
    main()
