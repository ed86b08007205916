"""After ``dvc repro``: the trained model vs k-means on the untrained model, on the run's crops.

    OMP_NUM_THREADS=1 python benchmarks/pipeline_vs_kmeans.py     # from the project root

Reads the run's manifest, crops (``data/mebin``) and crop probabilities (``data/infer``).
The baseline rebuilds the model exactly as the train stage initialises it (same params and
seed, before any training), clusters its [CLS] features of the same crops with k-means
(k = number of outputs), and merges crops to images the same way as the trained model's
probabilities (softmax over the image's crops of sqrt(mask area) / 50). Images where MEBin
found no anomaly count as wrong for both, as in the evaluate stage. Prints image-level NMI, ARI
and Hungarian F1.
"""

from __future__ import annotations

import numpy as np
import torch
from mtd_train import image_scores
from sklearn.cluster import KMeans

from anomalyncd import paths
from anomalyncd.config import load_params
from anomalyncd.datasets import Manifest
from anomalyncd.inference import crop_outputs
from anomalyncd.model import MGViTClassifier, ModelConfig, create_backbone
from anomalyncd.store import read_crops, read_probs


def main() -> None:
    p = load_params("train")
    ds = load_params("dataset")
    records = Manifest.read(paths.MANIFEST).to_classify(ds.include_normal)
    truth = np.array([r.defect_type for r in records])
    cs = read_crops(paths.CROPS)
    ps = read_probs(paths.PROBS)
    n = len(cs.ids)

    k = ps.attrs["num_unlabeled"]  # the trained model's novel outputs, normal slot included
    cfg = ModelConfig.from_params(p, num_unlabeled=k, has_normal=ds.include_normal)
    torch.manual_seed(p.seed)
    untrained = MGViTClassifier(cfg, create_backbone(p.model, p.image_size, p.pretrained, p.checkpoint, p.layers))
    feats = crop_outputs(untrained, cs.crops, cs.crop_masks).features
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    km = KMeans(n_clusters=k, n_init=10, random_state=p.seed).fit(feats)
    areas = cs.areas.astype(np.float64)
    base = image_scores(truth, np.eye(k)[km.labels_], cs.image_index, areas, n)
    ours = image_scores(truth, ps.probs[:, ps.head], cs.image_index, areas, n)
    print(f"{n} images, {len(cs.crops)} crops, {int((np.bincount(cs.image_index, weights=cs.areas > 0, minlength=n) == 0).sum())} images without anomaly")
    for name, s in (("untrained [CLS] + k-means", base), (f"trained MGViT (head {ps.head})", ours)):
        print(f"{name:<28} image-level: NMI {s['nmi']:.3f}  ARI {s['ari']:.3f}  F1 {s['f1']:.3f}")


if __name__ == "__main__":
    main()
