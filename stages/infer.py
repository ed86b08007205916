"""infer: class probabilities of every crop from the trained model.

Reads ``data/mebin/crops.zarr.zip`` and ``models/mgvit.pt``; writes
``data/infer/probs.zarr.zip`` (a ProbSet: probs and logits (M, n_head, K), the normed [CLS]
features (M, D) and the selected head). Crops go through the evaluation transform; the base
outputs get probability 0 and the novel ones are renormalised (softmax of logits / 0.1).
"""

from pathlib import Path

import typer

from anomalyncd import paths, shard
from anomalyncd.config import load_params
from anomalyncd.inference import PART_KIND, write_probs_part
from anomalyncd.stage import reads, run
from anomalyncd.store import StoreWriter, read_crops

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(cls=reads("infer"))
def main(params: Path = typer.Option("params.yaml", help="params file")) -> None:
    """Write data/infer/probs.zarr.zip."""
    p = load_params("infer", params)
    # torchrun: every rank infers a block of whole batches into a part store; rank 0 gathers them
    rank, world, device = shard.start(p.device)
    cs = read_crops(paths.CROPS, lazy=True)
    shard.clear_parts(paths.PROBS, rank)
    rows = shard.block(len(cs.crops), rank, world, p.batch_size)
    if world > 1:
        typer.echo(shard.describe("infer", rank, world, rows, "crops"), err=True)
    head, attrs = write_probs_part(
        paths.MODEL, cs.crops, cs.crop_masks, rows, shard.part_path(paths.PROBS, rank, world), device, p.batch_size, cs.residuals
    )
    shard.barrier()
    if rank != 0:
        shard.finish()
        return
    try:
        with shard.Parts(shard.part_paths(paths.PROBS, world), PART_KIND) as parts:
            with StoreWriter(paths.PROBS, "probs", {"head": head, **attrs}) as w:
                shard.concatenate(parts, w)
            heads = parts.readers[0]["probs"].shape[1]
    finally:
        shard.remove_parts(paths.PROBS)
        shard.finish()
    typer.echo(f"infer: {len(cs.crops)} crops x {heads} heads, selected head {head} -> {paths.PROBS}")


if __name__ == "__main__":
    run(app)
