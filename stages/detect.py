"""detect: one anomaly map per image to classify.

PLACEHOLDER detector (issue 4 replaces it): ``mean_diff`` scores each pixel by its absolute
difference to the mean normal training image, smoothed. It really runs, but it is no
PatchCore/MuSc.
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
from anomalyncd.store import MapSet, write_maps
from anomalyncd.stage import run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _gray(path: str, size: int) -> np.ndarray:
    img = read_image(path).astype(np.float32).mean(axis=2)
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


@app.command()
def main(params: Path = typer.Option("params.yaml", help="params file")) -> None:
    """Write data/detect/maps.zarr.zip (raw and 0..255 maps, image scores)."""
    p = load_params("detect", params)
    ds = load_params("dataset", params)
    if p.method != "mean_diff":
        raise InputError(f"params.yaml: detect.method {p.method!r} unknown; available: ['mean_diff']")
    manifest = Manifest.read(paths.MANIFEST)
    todo = manifest.to_classify(ds.include_normal)
    if not todo:
        raise InputError(f"{paths.MANIFEST}: no images to classify")
    ref_records = manifest.train_normal() or todo
    ref = np.mean([_gray(r.image, p.map_size) for r in tqdm(ref_records, desc="detect: fit", unit="img")], axis=0)
    maps = np.stack(
        [
            cv2.GaussianBlur(np.abs(_gray(r.image, p.map_size) - ref), (0, 0), 2.0)
            for r in tqdm(todo, desc="detect: maps", unit="img")
        ]
    ).astype(np.float32)
    lo, hi = float(maps.min()), float(maps.max())
    maps_u8 = np.round((maps - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)
    write_maps(
        paths.MAPS,
        MapSet(
            ids=[r.id for r in todo],
            maps=maps,
            maps_u8=maps_u8,
            scores=maps.reshape(len(maps), -1).max(axis=1),
            image_sizes=np.array([[r.height, r.width] for r in todo]),
            attrs={"method": p.method, "pretrained": False, "norm_min": lo, "norm_max": hi},
        ),
    )
    write_json(paths.METRICS / "detect.json", {"method": p.method, "images": len(todo)})
    typer.echo(f"detect: {len(todo)} maps ({p.method}, placeholder) -> {paths.MAPS}")


if __name__ == "__main__":
    run(app)
