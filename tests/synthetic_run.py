"""A small synthetic project for stage tests of merge and evaluate: manifest, images, a crop
store and a probability store written the way the upstream stages write them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from anomalyncd import paths
from anomalyncd.datasets import Manifest, Record
from anomalyncd.io import write_image
from anomalyncd.store import CropSet, ProbSet, write_crops, write_probs

SIZE, CROP, K = 48, 16, 3


def make_project(root: Path, categories=("tile",), labelled=True, crops_per_image=(1, 2, 3), seed=0, no_anomaly=()) -> dict:
    """Write the inputs of ``merge`` under ``root`` (the project dir). Types cycle through
    crack/hole/stain; image i has ``crops_per_image[i % len]`` crops, or, for i in
    ``no_anomaly``, MEBin's one whole-image crop without mask pixels. Returns what was written."""
    rng = np.random.default_rng(seed)
    types = ["crack", "hole", "stain"]
    records, image_index, boxes, areas = [], [], [], []
    n = 0
    for cat in categories:
        for t in types:
            for j in range(2):
                p = root / "data" / "images" / cat / t / f"{j:03d}.png"
                write_image(p, rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
                records.append(
                    Record(f"{cat}/test/{t}/{j:03d}", str(p.relative_to(root)), "", t if labelled else "", "test", cat, SIZE, SIZE)
                )
                for c in range(1 if n in no_anomaly else crops_per_image[n % len(crops_per_image)]):
                    image_index.append(n)
                    boxes.append([0, 0, SIZE, SIZE] if n in no_anomaly else [c * 10, c * 5, c * 10 + 16, c * 5 + 16])
                    areas.append(0 if n in no_anomaly else int(rng.integers(4, 200)))
                n += 1
    (root / paths.MANIFEST).parent.mkdir(parents=True, exist_ok=True)
    Manifest(records).write(root / paths.MANIFEST)
    m = len(image_index)
    masks = np.zeros((m, CROP, CROP), np.uint8)
    masks[:, 4:12, 4:12] = 1
    masks[np.array(areas) == 0] = 0
    cs = CropSet(
        ids=[r.id for r in records],
        image_sizes=np.full((n, 2), SIZE),
        thresholds=rng.integers(50, 200, n),
        est_counts=np.array([0 if i in no_anomaly else crops_per_image[i % len(crops_per_image)] for i in range(n)]),
        count_seqs=rng.integers(0, 6, (n, 64)),
        masks=[np.zeros((SIZE, SIZE), bool) for _ in range(n)],
        crops=rng.integers(0, 255, (m, CROP, CROP, 3), dtype=np.uint8),
        crop_masks=masks,
        image_index=np.array(image_index),
        boxes=np.array(boxes),
        regions=np.array([[0, 0, 0, 0] if a == 0 else [b[0] + 4, b[1] + 4, b[0] + 12, b[1] + 12] for b, a in zip(boxes, areas)]),
        areas=np.array(areas),
        scores=rng.random(m),
        attrs={"lo": 10, "hi": 240, "sample_rate": 4},
    )
    write_crops(root / paths.CROPS, cs)
    # crops lean towards their image's true type (index in `types`), through 2 heads
    truth = np.array([types.index(records[i].id.split("/")[2]) for i in image_index])
    logits = rng.normal(0, 0.1, (m, 2, K)).astype(np.float32)
    logits[np.arange(m), 1, truth] += 0.3
    z = logits / 0.1
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    write_probs(root / paths.PROBS, ProbSet(probs=probs, logits=logits, features=np.zeros((m, 4), np.float32), baseline_features=rng.normal(size=(m, 3)).astype(np.float32), head=1))
    (root / "params.yaml").write_text(
        yaml.safe_dump({"merge": {"strategy": "weighted", "temperature": 10.0}, "evaluate": {"report_images": 4, "mebin_plots": 2}})
    )
    return {"records": records, "crops": cs, "probs": probs}
