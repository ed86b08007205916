"""train: fit the crop classifier.

PLACEHOLDER (issue 5 replaces it with the mask-guided ViT): k-means on simple colour and
mask-shape statistics of each crop.
"""

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import typer
from sklearn.cluster import KMeans

from anomalyncd import paths
from anomalyncd.auto_k import resolve_num_classes
from anomalyncd.config import load_params
from anomalyncd.io import atomic_path, write_json
from anomalyncd.store import read_crops
from anomalyncd.stage import run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def crop_features(crops: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Placeholder features (M, 8): mean RGB inside and outside the mask, mask fraction, score."""
    m = masks[..., None].astype(np.float32)
    inside = (crops * m).sum((1, 2)) / np.maximum(m.sum((1, 2)), 1)
    outside = (crops * (1 - m)).sum((1, 2)) / np.maximum((1 - m).sum((1, 2)), 1)
    frac = masks.reshape(len(masks), -1).mean(1, keepdims=True)
    return np.concatenate([inside / 255, outside / 255, frac, np.sqrt(frac)], axis=1).astype(np.float32)


@app.command()
def main(params: Path = typer.Option("params.yaml", help="params file")) -> None:
    """Write models/mgvit.pt and metrics/train.json."""
    p = load_params("train", params)
    ds = load_params("dataset", params)
    t0 = time.time()
    cs = read_crops(paths.CROPS)
    num_classes = resolve_num_classes(
        p, cs.crops, cs.crop_masks, ds.include_normal, paths.NUM_CLASSES_METRICS, paths.NUM_CLASSES_PLOT
    )
    k = num_classes + int(ds.include_normal)
    feats = crop_features(cs.crops, cs.crop_masks)
    km = KMeans(n_clusters=k, n_init=10, random_state=p.seed).fit(feats)
    with atomic_path(paths.MODEL) as tmp:
        torch.save(
            {"kind": "kmeans-placeholder", "centers": torch.from_numpy(km.cluster_centers_), "params": asdict(p)}, tmp
        )
    write_json(paths.METRICS / "train.json", {"inertia": float(km.inertia_), "seconds": time.time() - t0})
    typer.echo(f"train: k-means placeholder, {k} classes on {len(feats)} crops -> {paths.MODEL}")


if __name__ == "__main__":
    run(app)
