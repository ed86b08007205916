"""prepare: read the dataset through its layout reader, validate it, write the manifest."""

from collections import Counter
from pathlib import Path

import typer

from anomalyncd import paths
from anomalyncd.config import load_params
from anomalyncd.datasets import build_manifest, read_dataset
from anomalyncd.stage import reads, run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(cls=reads("dataset"))
def main(params: Path = typer.Option("params.yaml", help="params file")) -> None:
    """Validate every image and mask of ``dataset.root`` and write data/prepared/manifest.csv."""
    p = load_params("dataset", params)
    manifest = build_manifest(read_dataset(p))
    manifest.write(paths.MANIFEST)
    todo = manifest.to_classify(p.include_normal)
    counts = Counter(r.defect_type or "unlabelled" for r in todo)
    typer.echo(
        f"prepare: {len(manifest)} images ({len(manifest.train_normal())} normal for training), "
        f"{len(todo)} to classify: {dict(sorted(counts.items()))}"
    )
    if manifest.bits != 16:
        typer.echo(f"prepare: the 16-bit images use {manifest.bits} bits (none is above {(1 << manifest.bits) - 1}); every stage reads them on that range")


if __name__ == "__main__":
    run(app)
