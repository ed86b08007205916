"""predict: classify new defect images with a finished run, without retraining.

Not a pipeline stage: it loads the run's fitted components (detector, MEBin range, classifier,
merge settings) from its artifacts and applies them with the functions the stages call
(:mod:`anomalyncd.predict`).
"""

from collections import Counter
from pathlib import Path

import typer

from anomalyncd.stage import fail, run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    inputs: list[Path] = typer.Argument(..., help="image files and/or folders (searched recursively)"),
    run_dir: Path = typer.Option(..., "--run", help="project directory of a finished run (after dvc repro)"),
    out: Path = typer.Option(Path("predictions.csv"), "--out", help="CSV to write: one row per image (an existing folder: <folder>/predictions.csv)"),
    maps: Path = typer.Option(None, "--maps", help="folder of raw anomaly maps (<image id>.npy or .png) instead of the run's detector"),
    device: str = typer.Option("auto", help="cpu, cuda or auto (cuda when available)"),
    batch_size: int = typer.Option(None, help="crops per batch (default: infer's default batch size)"),
) -> None:
    """Classify new defect images with a finished run, without retraining."""
    from anomalyncd.merge import STATUS, write_table
    from anomalyncd.device import resolve_device
    from anomalyncd.io import InputError, output_file
    from anomalyncd.predict import find_images, load_run, predict_images

    out = output_file(out, "predictions.csv", "--out")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    resolve_device(device, "--device")
    r = load_run(run_dir)
    images = find_images(inputs)
    pred = predict_images(r, images, maps, device, batch_size)
    write_table(out, pred.rows)
    found = [row for row in pred.rows if row["status"] == STATUS[True]]
    counts = Counter(row["name"] or f"cluster {row['cluster']}" for row in found)
    typer.echo(
        f"predict: {len(pred.rows)} images -> {out}; per class: {dict(sorted(counts.items()))}; "
        f"no anomaly found: {len(pred.rows) - len(found)}"
    )
    if pred.failed:
        for line in pred.failed:
            typer.echo(f"error: {line}", err=True)
        fail(f"{len(pred.failed)} of {len(images)} images not classified (listed above); the others are in {out}")


if __name__ == "__main__":
    run(app)
