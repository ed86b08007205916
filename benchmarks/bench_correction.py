"""After a run: what pseudo-label correction is worth, retrained on the run's crops with and without.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_correction.py   # from the project root

Training pulls the teacher target of every crop scoring below ``train.anomaly_thred`` toward
the first novel output, as the authors do: the normal slot with ``dataset.include_normal``, a
defect class without it. This retrains the run's model twice on the run's crops, from the same
initialisation and with the run's ``train`` params: once as the run did (``correction``), once
with ``anomaly_thred: 0`` (``none``: no crop is corrected, which is what the project did
without a normal slot before following the authors). The first reproduces the run's
``metrics/evaluate.json``, printed beside it. Crops are merged to images and scored as in
``benchmarks/mtd_train.py`` (sqrt(area) / 50 weights). Prints how many crops score below the
threshold, then image-level NMI, ARI and F1 of each.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np
import torch
from mtd_train import image_scores

from anomalyncd import paths
from anomalyncd.config import load_params
from anomalyncd.datasets import Manifest
from anomalyncd.device import resolve_device
from anomalyncd.inference import crop_outputs, novel_probabilities
from anomalyncd.model import MGViTClassifier, ModelConfig, create_backbone
from anomalyncd.store import read_crops, read_probs
from anomalyncd.training import TrainData, train


def retrain(p, num_unlabeled: int, has_normal: bool, cs, device: str) -> np.ndarray:
    """Train the model of train params ``p`` on the crops ``cs`` as the train stage does;
    return the crop probabilities (M, K) of the selected head."""
    cfg = ModelConfig.from_params(p, num_unlabeled=num_unlabeled, has_normal=has_normal)
    torch.manual_seed(p.seed)
    net = MGViTClassifier(cfg, create_backbone(p.model, p.image_size, p.pretrained, p.checkpoint, p.layers))
    data = TrainData(cs.crops, cs.crop_masks, cs.scores, -np.ones(len(cs.crops), np.int64))
    res = train(net, data, p, device)
    logits = crop_outputs(net, cs.crops, cs.crop_masks, device).logits
    return novel_probabilities(torch.from_numpy(logits), 0).numpy()[:, res.head]


def main() -> None:
    p = load_params("train")
    ds = load_params("dataset")
    device = resolve_device(p.device)
    records = Manifest.read(paths.MANIFEST).to_classify(ds.include_normal)
    truth = np.array([r.defect_type for r in records])
    cs = read_crops(paths.CROPS)
    k = read_probs(paths.PROBS).attrs["num_unlabeled"]  # the run's novel outputs, normal slot included
    weight = np.clip(p.anomaly_thred - cs.scores, 0, None)
    print(f"{len(records)} images ({int(sum(r.is_normal for r in records))} normal), {len(cs.crops)} crops, "
          f"{int((weight > 0).sum())} below anomaly_thred {p.anomaly_thred} (mean weight {weight.mean():.3f})")
    run = json.loads(paths.METRICS.joinpath("evaluate.json").read_text())["image"]
    print(f"{'the run':<11} image-level: NMI {run['nmi']:.3f}  ARI {run['ari']:.3f}  F1 {run['f1']:.3f}")
    for name, params in (("correction", p), ("none", replace(p, anomaly_thred=0.0))):
        t0 = time.perf_counter()
        probs = retrain(params, k, ds.include_normal, cs, device)
        s = image_scores(truth, probs, cs.image_index, cs.areas.astype(np.float64), len(records))
        print(f"{name:<11} image-level: NMI {s['nmi']:.3f}  ARI {s['ari']:.3f}  F1 {s['f1']:.3f}"
              f"   ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
