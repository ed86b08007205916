"""predict: classify new defect images with a finished run, without retraining.

Not a pipeline stage: it loads the run's fitted components (detector, MEBin range, classifier,
merge settings, the calibrated thresholds) from its artifacts and applies them with the
functions the stages call (:mod:`anomalyncd.predict`): an image is first judged normal or
anomalous, then an anomalous one is classed, as a known type or an unknown one.
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
    batch_size: int = typer.Option(None, help="crops per batch (default: 8 on the CPU, infer's batch size on a GPU)"),
    normal_quantile: float = typer.Option(
        None, help="normal/defect threshold: this quantile of the held-back normal images' scores (default: the run's calibrate.normal_quantile)"),
    unknown_quantile: float = typer.Option(
        None, help="unknown-type threshold: this quantile of the run's own images' distances (default: the run's calibrate.unknown_quantile)"),
    normal_gate: bool = typer.Option(True, "--normal-gate/--no-normal-gate", help="--no-normal-gate: class every image as a defect"),
    report: Path = typer.Option(None, "--report", help="also write a browsable page to this folder (<folder>/index.html): the unknown-type images first, then each class"),
) -> None:
    """Classify new defect images with a finished run, without retraining."""
    from anomalyncd.calibrate import UNKNOWN
    from anomalyncd.merge import NORMAL, STATUS, row_label, write_table
    from anomalyncd.device import resolve_device
    from anomalyncd.io import InputError, output_file
    from anomalyncd.memory import share_one_arena
    from anomalyncd.predict import find_images, load_run, predict_images

    share_one_arena()  # before the detector's and MEBin's threads start: they reuse each other's freed memory
    out = output_file(out, "predictions.csv", "--out")
    if report is not None:
        from anomalyncd.predict_report import check_report_folder

        check_report_folder(report)
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    resolve_device(device, "--device")
    r = load_run(run_dir)
    images = find_images(inputs)
    pred = predict_images(r, images, maps, device, batch_size, normal_quantile=normal_quantile,
                          unknown_quantile=unknown_quantile, normal_gate=normal_gate)
    write_table(out, pred.rows)
    cal = pred.calibration
    if report is not None:
        from anomalyncd.predict_report import write_predict_report

        write_predict_report(report, pred.rows, cal, run=str(run_dir.resolve()), failed=pred.failed, bits=r.bits)
    found = [row for row in pred.rows if row["status"] == STATUS[True]]
    counts = Counter(row_label(row) for row in found)
    n = Counter(row["status"] for row in pred.rows)
    unknown = sum(row["open_set"] == UNKNOWN for row in found)
    typer.echo(
        f"predict: {len(pred.rows)} images -> {out}; per class: {dict(sorted(counts.items()))}; "
        f"unknown type: {unknown}; normal: {n[NORMAL]}; no anomaly found: {n[STATUS[False]]}"
        + (f"; page: {report / 'index.html'}" if report is not None else "")
    )
    if cal is not None:
        t_n, t_u = cal.normal_threshold, cal.unknown_threshold
        typer.echo(
            "predict: normal if image_score <= "
            + (f"{t_n:.4g} (quantile {cal.normal_quantile:g} of {len(cal.normal_scores)} held-back normal images)" if t_n is not None else f"- (off: {cal.note})")
            + "; unknown type if unknown_score > "
            + (f"{t_u:.4g} (quantile {cal.unknown_quantile:g} of the run's {len(cal.known_scores)} images)" if t_u is not None else "- (off: no class prototypes)")
        )
    if pred.failed:
        for line in pred.failed:
            typer.echo(f"error: {line}", err=True)
        fail(f"{len(pred.failed)} of {len(images)} images not classified (listed above); the others are in {out}")


if __name__ == "__main__":
    run(app)
