"""mebin: anomaly masks and anomaly-centred crops.

PLACEHOLDER binarization (issue 3 replaces it with MEBin): Otsu's threshold per map, one
square crop per connected component.
"""

from pathlib import Path

import cv2
import numpy as np
import typer
from tqdm import tqdm

from anomalyncd import paths
from anomalyncd.config import load_params
from anomalyncd.datasets import Manifest
from anomalyncd.io import InputError, read_image, write_json
from anomalyncd.store import CropSet, read_maps, write_crops
from anomalyncd.stage import run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _square(x: int, y: int, w: int, h: int, H: int, W: int, pad: float) -> tuple[int, int, int, int]:
    r = max(int(max(w, h) * (1 + pad) / 2), 4)
    r = min(r, min(H, W) // 2)
    cx, cy = x + w // 2, y + h // 2
    x0, y0 = min(max(cx - r, 0), W - 2 * r), min(max(cy - r, 0), H - 2 * r)
    return x0, y0, x0 + 2 * r, y0 + 2 * r


@app.command()
def main(params: Path = typer.Option("params.yaml", help="params file")) -> None:
    """Write data/mebin/crops.zarr.zip."""
    p = load_params("mebin", params)
    manifest = {r.id: r for r in Manifest.read(paths.MANIFEST).records}
    ms = read_maps(paths.MAPS)
    missing = [i for i in ms.ids if i not in manifest]
    if missing:
        raise InputError(f"{paths.MAPS}: image ids not in {paths.MANIFEST}: {missing[:5]}; rerun detect")
    c = p.crop_size
    thresholds, est, masks, crops, cmasks, index, boxes, areas, scores = [], [], [], [], [], [], [], [], []
    for i, (iid, m) in enumerate(tqdm(list(zip(ms.ids, ms.maps_u8)), desc="mebin", unit="img")):
        rec = manifest[iid]
        img = read_image(rec.image)
        H, W = img.shape[:2]
        t, _ = cv2.threshold(m, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        mask = cv2.resize((m > t).astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST)
        score_map = cv2.resize(m, (W, H), interpolation=cv2.INTER_NEAREST)
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        comps = sorted(stats[1:].tolist(), key=lambda s: -s[4]) or [[0, 0, W, H, 0]]
        for x, y, w, h, _a in comps[:3]:
            x0, y0, x1, y1 = _square(x, y, w, h, H, W, p.padding)
            crops.append(cv2.resize(img[y0:y1, x0:x1], (c, c), interpolation=cv2.INTER_LINEAR))
            cmasks.append(cv2.resize(mask[y0:y1, x0:x1], (c, c), interpolation=cv2.INTER_NEAREST))
            index.append(i)
            boxes.append((x0, y0, x1, y1))
            areas.append(int(mask[y0:y1, x0:x1].sum()))
            scores.append(float(score_map[y0:y1, x0:x1].max()) / 255)
        thresholds.append(int(t))
        est.append(n - 1)
        masks.append(mask.astype(bool))
    cs = CropSet(
        ids=ms.ids,
        image_sizes=ms.image_sizes,
        thresholds=np.array(thresholds),
        est_counts=np.array(est),
        count_seqs=np.array(est)[:, None],
        masks=masks,
        crops=np.stack(crops),
        crop_masks=np.stack(cmasks),
        image_index=np.array(index),
        boxes=np.array(boxes),
        areas=np.array(areas),
        scores=np.array(scores),
        attrs={"lo": 0, "hi": 255, "crop_size": c, "method": "otsu-placeholder"},
    )
    write_crops(paths.CROPS, cs)
    write_json(paths.METRICS / "mebin.json", {"crops": len(crops), "crops_per_image": len(crops) / len(ms.ids)})
    typer.echo(f"mebin: {len(crops)} crops from {len(ms.ids)} images -> {paths.CROPS}")


if __name__ == "__main__":
    run(app)
