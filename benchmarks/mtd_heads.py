"""Training variants and head selection on one project's crops, against the frozen baseline.

    OMP_NUM_THREADS=1 python benchmarks/mtd_heads.py --project <dir> --seeds 0,1,2 \
        base lr=0.01 memax_weight=2,lr=0.03

``<dir>`` is a project where ``mebin`` has run (``data/mebin/crops.zarr.zip`` and
``data/prepared/manifest.csv``), e.g. a clone that ran the MTD command of README.md; with its
``dataset.include_normal`` the model has the normal slot, as the train stage gives it. Every
variant (``base`` = params.yaml's ``train`` section; ``key=value,...`` changes train params)
is trained with the library's :func:`~anomalyncd.training.train` for each seed, and its crops
are merged to images as the pipeline does. Printed per variant (image NMI / ARI / F1, mean over
seeds, then per seed): the head kept by ``head_select: consensus`` and by ``loss``, and the
frozen-feature k-means baseline as ``evaluate`` reports it (mean over its k-means seeds). The
frozen trunk's outputs are memoised by input, so the variants share one trunk pass per
distinct view: the figures are those of separate runs, computed faster.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch
import yaml

from anomalyncd.config import MergeParams, TrainParams, from_dict
from anomalyncd.datasets import Manifest
from anomalyncd.inference import crop_outputs, novel_probabilities
from anomalyncd.merge import NO_ANOMALY, Merger, merge_regions
from anomalyncd.metrics import score_clustering
from anomalyncd.model import MGViTClassifier, ModelConfig, create_backbone
from anomalyncd.store import ProbSet, read_crops
from anomalyncd.training import TrainData, select_head, train
from stages.evaluate import BASELINE_SEEDS, baseline_metrics


class TrunkMemo:
    """The frozen trunk, memoised by the bytes of its input batch (it is deterministic): in
    memory, or with ``folder`` in files there (float32, exact), so that later invocations on
    the same crops skip the trunk passes and the memory holds one train run's cache only."""

    def __init__(self, folder: Path | None = None):
        self.memo: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.folder = folder
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def wrap(self, trunk):
        def cached(images: torch.Tensor, masks: torch.Tensor):
            key = hashlib.sha1(images.numpy().tobytes() + masks.numpy().tobytes()).hexdigest()
            if self.folder is None:
                if key not in self.memo:
                    self.memo[key] = trunk(images, masks)
                return self.memo[key]
            f = self.folder / f"{key}.pt"
            if f.exists():
                return torch.load(f)
            out = trunk(images, masks)
            torch.save(out, f.with_suffix(".tmp"))
            f.with_suffix(".tmp").rename(f)
            return out

        return cached


def parse_variant(text: str) -> dict:
    if text == "base":
        return {}
    return {k: yaml.safe_load(v) for k, _, v in (kv.partition("=") for kv in text.split(","))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, required=True)
    ap.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[0, 1, 2], help="comma-separated")
    ap.add_argument("--num-classes", type=int, default=5)
    ap.add_argument("--memo-dir", type=Path, default=None, help="keep the trunk outputs in files here (reused by later runs on the same crops)")
    ap.add_argument("--residuals", type=Path, default=None,
                    help="an .npz of the crops' residual descriptors (benchmarks/bench_residual.py --cache) instead of those in the crops store: the heads read them beside the encoder's feature")
    ap.add_argument("variants", nargs="*", default=["base"])
    a = ap.parse_args()

    params = yaml.safe_load((a.project / "params.yaml").read_text())
    base = from_dict(TrainParams, {**params.get("train", {}), "num_classes": a.num_classes})
    merge = from_dict(MergeParams, params.get("merge", {}))
    cs = read_crops(a.project / "data/mebin/crops.zarr.zip")
    records = Manifest.read(a.project / "data/prepared/manifest.csv").by_id()
    truth = [records[i].defect_type for i in cs.ids]
    side = np.load(a.residuals)["residual"].astype(np.float32) if a.residuals else cs.residuals  # the run's own, if mebin stored any
    data = TrainData(cs.crops, cs.crop_masks, cs.scores, -np.ones(len(cs.crops), np.int64), side)
    has_normal = bool(params.get("dataset", {}).get("include_normal", False))
    k = a.num_classes + int(has_normal)  # novel outputs, the normal slot included

    def image_scores(crop_probs: np.ndarray) -> np.ndarray:
        merged = merge_regions(crop_probs, cs.areas, cs.image_index, len(cs.ids), merge.strategy, merge.temperature)
        s = score_clustering(truth, merged.labels).summary()
        return np.array([s["nmi"], s["ari"], s["f1"]])

    def fmt(x: np.ndarray) -> str:
        return " / ".join(f"{v:.3f}" for v in x)

    memo = TrunkMemo(a.memo_dir)
    backbone = create_backbone(base.model, base.image_size, base.pretrained, base.checkpoint, base.layers)
    baseline_done = False
    for text in a.variants:
        rows: dict[str, list[np.ndarray]] = {"consensus": [], "loss": []}
        seconds = []
        for seed in a.seeds:
            p = dataclasses.replace(base, seed=seed, head_select="consensus", **parse_variant(text))
            torch.manual_seed(seed)
            # a copy: fine-tuned blocks (grad_from_block) train the backbone's weights in place
            net = MGViTClassifier(ModelConfig.from_params(p, num_unlabeled=k, has_normal=has_normal, side_dim=side.shape[1]), copy.deepcopy(backbone))
            if getattr(net.encoder, "tuned", False):
                # the frozen layers' tokens come first in the whole trunk's: one memo serves both
                frozen_dim = net.encoder.frozen_channels
                whole = memo.wrap(MGViTClassifier(ModelConfig.from_params(base, num_unlabeled=k), copy.deepcopy(backbone)).encoder.trunk)
                net.encoder.trunk = lambda x, m, whole=whole, d=frozen_dim: (lambda t, pm: (t[..., :d], pm))(*whole(x, m))
            else:
                net.encoder.trunk = memo.wrap(net.encoder.trunk)
            res = train(net, data, p)
            seconds.append(res.seconds - res.cache_seconds)
            out = crop_outputs(net, cs.crops, cs.crop_masks, side=side)
            probs = novel_probabilities(torch.from_numpy(out.logits), 0).numpy()
            by_loss = select_head([res.history[-1][f"cluster_head{h}"] for h in range(p.n_head)])
            rows["consensus"].append(image_scores(probs[:, res.head]))
            rows["loss"].append(image_scores(probs[:, by_loss]))
            if not baseline_done:  # the frozen features do not depend on the variant or seed
                ps = ProbSet(probs, out.logits, out.features, out.baseline, res.head, {"num_unlabeled": k})
                b = baseline_metrics(cs, ps, Merger(merge.strategy, merge.temperature, NO_ANOMALY), 0, records)["image"]
                print(f"baseline (k-means, {BASELINE_SEEDS} seeds): {fmt(np.array([b[m] for m in ('nmi', 'ari', 'f1')]))}", flush=True)
                baseline_done = True
        for rule, r in rows.items():
            print(f"{text:40s} {rule:9s} {fmt(np.mean(r, 0))}   per seed: {', '.join(fmt(x) for x in r)}", flush=True)
        print(f"{text:40s} training without the cache build: {np.mean(seconds):.0f} s per seed", flush=True)


if __name__ == "__main__":
    main()
