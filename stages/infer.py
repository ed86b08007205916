"""infer: class probabilities of every crop from the trained model.

Reads ``data/mebin/crops.zarr.zip`` and ``models/mgvit.pt``; writes
``data/infer/probs.zarr.zip`` (a ProbSet: probs and logits (M, n_head, K), the normed [CLS]
features (M, D) and the selected head). Crops go through the evaluation transform; the base
outputs get probability 0 and the novel ones are renormalised (softmax of logits / 0.1).
"""

from pathlib import Path

import typer

from anomalyncd import paths
from anomalyncd.config import load_params
from anomalyncd.inference import predict_crops
from anomalyncd.stage import run
from anomalyncd.store import read_crops, write_probs

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(params: Path = typer.Option("params.yaml", help="params file")) -> None:
    """Write data/infer/probs.zarr.zip."""
    p = load_params("infer", params)
    cs = read_crops(paths.CROPS)
    ps = predict_crops(paths.MODEL, cs.crops, cs.crop_masks, device=p.device, batch_size=p.batch_size)
    write_probs(paths.PROBS, ps)
    typer.echo(f"infer: {len(cs.crops)} crops x {ps.probs.shape[1]} heads, selected head {ps.head} -> {paths.PROBS}")


if __name__ == "__main__":
    run(app)
