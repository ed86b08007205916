"""merge: crop predictions to one class per image.

PLACEHOLDER (issue 6 replaces it with area-weighted region merging): plain mean of the
selected head's crop probabilities.
"""

import csv
from pathlib import Path

import numpy as np
import typer

from anomalyncd import paths
from anomalyncd.datasets import Manifest
from anomalyncd.io import atomic_path
from anomalyncd.store import read_crops, read_probs
from anomalyncd.stage import run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(params: Path = typer.Option("params.yaml", help="params file")) -> None:
    """Write data/merge/predictions.csv."""
    cs, ps = read_crops(paths.CROPS), read_probs(paths.PROBS)
    records = {r.id: r for r in Manifest.read(paths.MANIFEST).records}
    probs = ps.probs[:, ps.head]
    with atomic_path(paths.PREDICTIONS) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "image", "predicted", "probability", "n_crops"])
        for i, iid in enumerate(cs.ids):
            p = probs[cs.image_index == i].mean(0)
            w.writerow([iid, records[iid].image, int(p.argmax()), f"{p.max():.4f}", int((cs.image_index == i).sum())])
    typer.echo(f"merge: {len(cs.ids)} images -> {paths.PREDICTIONS}")


if __name__ == "__main__":
    run(app)
