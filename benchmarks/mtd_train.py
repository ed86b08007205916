"""MTD: does training the mask-guided ViT beat k-means on the untrained model's features?

    OMP_NUM_THREADS=1 python benchmarks/mtd_train.py --root ../shared/datasets/mtd

Crops come straight from the ground-truth masks (the ``ground_truth`` detector's maps make
MEBin find the same regions): one square crop around the bounding box of each connected
mask component, with the crop's mask. Both models start from the same random weights (no
pretrained weights here). The baseline clusters the untrained model's [CLS] features of the
crops with k-means; the trained model predicts with its selected head. Crops are merged to
one label per image the same way for both (probabilities weighted by the softmax over the
image's crops of sqrt(mask area) / 50, a one-hot per crop for k-means). Prints image-level
NMI, ARI and Hungarian F1 for both, and the training time.
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
import torch
from sklearn.cluster import KMeans

from anomalyncd.config import DatasetParams, MergeParams
from anomalyncd.datasets import read_dataset
from anomalyncd.inference import crop_outputs, novel_probabilities
from anomalyncd.io import read_mask
from anomalyncd.merge import merge_regions
from anomalyncd.metrics import score_clustering
from anomalyncd.model import MGViTClassifier, ModelConfig
from anomalyncd.config import TrainParams, crop_pct
from anomalyncd.training import TrainData, train


def mask_crops(
    image: np.ndarray, mask: np.ndarray, crop_size: int, padding: float = 0.1, min_area: int = 16, max_crops: int = 4
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Square crops around mask components: [(crop uint8 (C, C, 3), mask uint8 (C, C), area)]."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    comps = sorted((s for s in stats[1:] if s[cv2.CC_STAT_AREA] >= min_area), key=lambda s: -s[cv2.CC_STAT_AREA])
    h, w = mask.shape
    out = []
    for x, y, bw, bh, area in comps[:max_crops]:
        side = int(max(bw, bh) * (1 + 2 * padding)) + 1
        side = max(side, int(0.1 * min(h, w)))
        cx, cy = x + bw / 2, y + bh / 2
        x0 = int(np.clip(cx - side / 2, 0, max(0, w - side)))
        y0 = int(np.clip(cy - side / 2, 0, max(0, h - side)))
        x1, y1 = min(w, x0 + side), min(h, y0 + side)
        crop = cv2.resize(image[y0:y1, x0:x1], (crop_size, crop_size), interpolation=cv2.INTER_LINEAR)
        cm = cv2.resize(mask[y0:y1, x0:x1].astype(np.uint8), (crop_size, crop_size), interpolation=cv2.INTER_NEAREST)
        out.append((crop, cm, int(area)))
    return out


def image_scores(true: np.ndarray, crop_probs: np.ndarray, image_index: np.ndarray, areas: np.ndarray,
                 n_images: int, keep: np.ndarray | None = None) -> dict[str, float]:
    """Merge crops to images as the merge stage does (weights softmax(sqrt(area) / 50)), then
    score the images (optionally only ``keep``) as the evaluate stage does: NMI, ARI, F1."""
    mp = MergeParams()
    labels = merge_regions(crop_probs, areas, image_index, n_images, mp.strategy, mp.temperature).labels
    keep = np.ones(n_images, bool) if keep is None else keep
    return score_clustering(true[keep], labels[keep]).summary()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="../shared/datasets/mtd")
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--grad-from-block", type=int, default=11)
    ap.add_argument("--mask-layers", type=int, default=1)
    ap.add_argument("--views", type=int, default=4, help="trunk_cache_views")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    records = [r for r in read_dataset(DatasetParams(layout="mtd", root=args.root)) if r.split == "test" and not r.is_normal]
    types = sorted({r.defect_type for r in records})
    crop_size = int(args.image_size / 0.875)
    crops, masks, areas, index, labels = [], [], [], [], []
    for i, r in enumerate(records):
        img = r.read()
        for c, m, a in mask_crops(img, read_mask(r.mask, img.shape[:2]), crop_size):
            crops.append(c), masks.append(m), areas.append(a), index.append(i)
        labels.append(types.index(r.defect_type))
    crops, masks = np.stack(crops), np.stack(masks)
    areas, index, labels = np.array(areas, np.float64), np.array(index), np.array(labels)
    lost = len(records) - len(np.unique(index))
    print(f"MTD: {len(records)} defect images, {len(types)} types, {len(crops)} crops ({lost} images without a crop) "
          f"in {time.perf_counter() - t0:.1f} s")
    keep = np.isin(np.arange(len(records)), index)

    cfg = ModelConfig(model=args.model, image_size=args.image_size, crop_pct=crop_pct(args.model), mask_layers=args.mask_layers,
                      grad_from_block=args.grad_from_block, n_head=4, num_unlabeled=len(types))
    torch.manual_seed(args.seed)
    net = MGViTClassifier(cfg)
    feats0 = crop_outputs(net, crops, masks).features
    f0 = feats0 / np.linalg.norm(feats0, axis=1, keepdims=True)
    km = KMeans(n_clusters=len(types), n_init=10, random_state=args.seed).fit(f0)
    base = image_scores(labels, np.eye(len(types))[km.labels_], index, areas, len(records), keep)

    data = TrainData(crops, masks, np.ones(len(crops), np.float32), -np.ones(len(crops), np.int64))
    tc = TrainParams(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     trunk_cache_views=args.views)
    res = train(net, data, tc)
    logits = crop_outputs(net, crops, masks).logits
    probs = novel_probabilities(torch.from_numpy(logits), 0).numpy()[:, res.head]
    ours = image_scores(labels, probs, index, areas, len(records), keep)

    print(f"untrained [CLS] + k-means  image-level: NMI {base['nmi']:.3f}  ARI {base['ari']:.3f}  F1 {base['f1']:.3f}")
    print(f"trained MGViT (head {res.head})    image-level: NMI {ours['nmi']:.3f}  ARI {ours['ari']:.3f}  F1 {ours['f1']:.3f}")
    print(f"training: {args.epochs} epochs in {res.seconds:.1f} s ({args.model} @ {args.image_size}px, "
          f"grad_from_block {args.grad_from_block}, trunk cache {args.views}); total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
