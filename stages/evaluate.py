"""evaluate: clustering metrics against ground truth, where there is any.

PLACEHOLDER (issue 6 replaces it with crop/image metrics, per-class scores and the report).
"""

import csv
from pathlib import Path

import numpy as np
import typer
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from anomalyncd import paths
from anomalyncd.datasets import Manifest
from anomalyncd.io import write_json
from anomalyncd.stage import run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(params: Path = typer.Option("params.yaml", help="params file")) -> None:
    """Write metrics/evaluate.json."""
    records = {r.id: r for r in Manifest.read(paths.MANIFEST).records}
    with open(paths.PREDICTIONS, newline="") as fh:
        rows = list(csv.DictReader(fh))
    truth = [records[r["id"]].defect_type for r in rows]
    pred = np.array([int(r["predicted"]) for r in rows])
    if not all(truth):
        write_json(paths.METRICS / "evaluate.json", {"ground_truth": False, "images": len(rows)})
        typer.echo("evaluate: no ground truth; wrote cluster counts only")
        return
    names, t = np.unique(truth, return_inverse=True)
    table = np.zeros((pred.max() + 1, len(names)), dtype=int)
    np.add.at(table, (pred, t), 1)
    r, c = linear_sum_assignment(-table)
    metrics = {
        "ground_truth": True,
        "image": {
            "nmi": float(normalized_mutual_info_score(t, pred)),
            "ari": float(adjusted_rand_score(t, pred)),
            "f1": float(table[r, c].sum() / len(rows)),
        },
    }
    write_json(paths.METRICS / "evaluate.json", metrics)
    typer.echo(f"evaluate: {metrics['image']}")


if __name__ == "__main__":
    run(app)
