"""Seconds per training epoch with and without the frozen-trunk cache.

    OMP_NUM_THREADS=1 python benchmarks/bench_train.py [--crops 256 --epochs 3 --views 4]

Trains the same model on the same synthetic crops twice: ``trunk_cache_views=0`` (every epoch
augments the crops and runs the whole ViT) and ``trunk_cache_views=V`` (V views per crop run
once through the frozen blocks; epochs run only the trainable blocks and heads). Prints the
one-off cache cost, seconds per epoch of each mode and the speed-up.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from anomalyncd.model import MGViTClassifier, ModelConfig
from anomalyncd.config import TrainParams, crop_pct
from anomalyncd.training import TrainData, train


def synthetic_crops(m: int, size: int, seed: int = 0) -> TrainData:
    rng = np.random.default_rng(seed)
    crops = rng.integers(0, 255, (m, size, size, 3), dtype=np.uint8)
    masks = np.zeros((m, size, size), np.uint8)
    for i in range(m):
        y, x = rng.integers(0, size // 2, 2)
        masks[i, y : y + size // 3, x : x + size // 3] = 1
    return TrainData(crops, masks, rng.random(m).astype(np.float32), -np.ones(m, np.int64))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--crops", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--grad-from-block", type=int, default=11)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    data = synthetic_crops(args.crops, int(args.image_size / 0.875))
    cfg = ModelConfig(model=args.model, image_size=args.image_size, crop_pct=crop_pct(args.model), mask_layers=1, grad_from_block=args.grad_from_block,
                      n_head=4, num_unlabeled=4)
    print(f"{args.model} @ {args.image_size}px, {args.crops} crops, batch {args.batch_size}, "
          f"grad_from_block {args.grad_from_block}, {torch.get_num_threads()} thread(s)")
    results = {}
    for views in (0, args.views):
        torch.manual_seed(0)
        tc = TrainParams(epochs=args.epochs, batch_size=args.batch_size, trunk_cache_views=views)
        res = train(MGViTClassifier(cfg), data, tc)
        results[views] = (res.seconds - res.cache_seconds) / args.epochs
        label = "off" if views == 0 else f"{views} views"
        note = f"  (cache built once in {res.cache_seconds:.2f} s)" if views else ""
        print(f"trunk cache {label:>8}: {results[views]:6.2f} s/epoch{note}")
    print(f"speed-up per epoch: {results[0] / results[args.views]:.1f}x")


if __name__ == "__main__":
    main()
