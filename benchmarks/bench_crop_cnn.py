"""Time the crop CNN's frozen trunk: as it ran before (contiguous input, batch norms apart) and now.

    python -m benchmarks.bench_crop_cnn [--run <project>] [--crops 64] [--threads 1 2]

The trunk (the default ``train`` model, :class:`~anomalyncd.config.TrainParams`:
``tf_efficientnet_lite0``, layers [2, 3, 4], 224 px, its packaged ImageNet weights) runs on
``--crops`` evaluation views, of the run's crops when ``--run`` holds
``data/mebin/crops.zarr.zip``, else of random crops, three ways, interleaved, best of
``--repeat``: contiguous (NCHW) input to the network as loaded (the train stage
before), channels-last input (infer and predict before), and channels-last input to the
network with its batch norms folded (:func:`anomalyncd.bnfold.folded`): what every crop-CNN
pass (train's trunk cache and evaluation passes, infer, predict, the K estimate) runs now
(:meth:`anomalyncd.model.MaskGuidedCNN.trunk`). Prints ms per crop for each and each thread
count, the ratios to the first, and the largest difference of the tokens from the first's,
relative to their range.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from anomalyncd import paths
from anomalyncd.augment import eval_views
from anomalyncd.bnfold import folded
from anomalyncd.config import TrainParams
from anomalyncd.grids import common_grid
from anomalyncd.model import MGViTClassifier, ModelConfig, cnn_input, create_backbone


def crops_of(run: Path | None, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """uint8 crops (n, C, C, 3) and masks (n, C, C), with where they come from."""
    if run is not None and (run / paths.CROPS).exists():
        from anomalyncd.store import read_crops

        cs = read_crops(run / paths.CROPS, lazy=True)
        m = len(cs.crops)
        idx = np.arange(n) % m
        return np.asarray(cs.crops[:m])[idx], np.asarray(cs.crop_masks[:m])[idx], f"{run / paths.CROPS}"
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)
    masks = np.zeros((n, 256, 256), np.uint8)
    masks[:, 64:192, 64:192] = 1
    return crops, masks, "random crops"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None)
    ap.add_argument("--crops", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    p = TrainParams()
    cfg = ModelConfig.from_params(p, num_unlabeled=4)
    net = MGViTClassifier(cfg, create_backbone(cfg.model, cfg.image_size, pretrained=p.pretrained, layers=cfg.layers)).eval()
    enc = net.encoder
    crops, masks, source = crops_of(args.run, args.crops)
    x, _ = eval_views(crops, masks, cfg.image_size, cfg.crop_pct)
    cl = cnn_input(torch.from_numpy(x), enc.in_mean, enc.in_std)
    fast = folded(enc.backbone, cl[:1])
    ways = {"contiguous": (enc.backbone, cl.contiguous()), "channels-last": (enc.backbone, cl), "channels-last + folded": (fast, cl)}
    print(f"{cfg.model} trunk, {cfg.image_size} px, {args.crops} evaluation views of {source}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        best: dict[str, float] = {}
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for _ in range(args.repeat):
                for name, (cnn, inp) in ways.items():
                    t = time.perf_counter()
                    out[name] = torch.cat(common_grid(cnn(inp)), 1)
                    best[name] = min(best.get(name, np.inf), time.perf_counter() - t)
        ref = out["contiguous"]
        cells = []
        for name in ways:
            ms = best[name] / args.crops * 1000
            rel = float((out[name] - ref).abs().max() / ref.abs().max())
            cells.append(f"{name} {ms:.1f} ms/crop ({best['contiguous'] / best[name]:.2f}x, differs by {rel:.1e})")
        print(f"{threads} thread(s): " + "; ".join(cells))


if __name__ == "__main__":
    main()
