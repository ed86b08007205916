"""infer: class probabilities for every crop.

PLACEHOLDER (issue 5/6 replace it): soft assignment to the k-means centres of ``train``.
"""

from pathlib import Path

import numpy as np
import torch
import typer

from anomalyncd import paths
from anomalyncd.store import ProbSet, read_crops, write_probs
from anomalyncd.stage import run
from stages.train import crop_features

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(params: Path = typer.Option("params.yaml", help="params file")) -> None:
    """Write data/infer/probs.zarr.zip."""
    cs = read_crops(paths.CROPS)
    centers = torch.load(paths.MODEL)["centers"].numpy()
    feats = crop_features(cs.crops, cs.crop_masks)
    logits = -((feats[:, None, :] - centers[None]) ** 2).sum(-1) * 10
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    write_probs(paths.PROBS, ProbSet(probs=probs[:, None], logits=logits[:, None], features=feats, head=0))
    typer.echo(f"infer: {len(feats)} crops -> {paths.PROBS}")


if __name__ == "__main__":
    run(app)
