"""classes: show the discovered clusters and curate them in classes.yaml: name, merge, reject.

Not a pipeline stage. ``show`` lists each cluster of the finished run (data/merge) with its
number of images, mean confidence, matched true type where the run had ground truth, and the
class classes.yaml makes of it; ``name 3 crack``, ``merge 4 3`` (cluster 4 is the same type as
3), ``reject 1`` (not a defect) and ``reset 3`` edit classes.yaml (checked against the run
before it is written, atomically). Then ``dvc repro`` reruns merge, calibrate and evaluate only.
"""

from pathlib import Path

import typer

from anomalyncd.stage import run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)

FILE = typer.Option(Path("classes.yaml"), "--file", help="the catalog to read and edit")


def _run_clusters():
    """The run's merge result (sizes, confidences) and its stored catalog (matched types)."""
    from anomalyncd import paths
    from anomalyncd.catalog import from_attrs
    from anomalyncd.io import InputError
    from anomalyncd.store import read_merged

    if not paths.MERGED.exists():
        raise InputError(f"{paths.MERGED}: missing; run the pipeline first (dvc repro), from the project folder")
    ms = read_merged(paths.MERGED)
    stored = from_attrs(ms.attrs["catalog"], str(paths.MERGED)) if "catalog" in ms.attrs else []
    return ms, stored


def _edit(file: Path, cluster: int, entry) -> None:
    from anomalyncd.catalog import load_catalog, resolve, save_catalog

    ms, stored = _run_clusters()
    cat = load_catalog(file).set(cluster, entry)
    resolve(cat, ms.n_classes, {c.cluster: c.matched for c in stored if c.matched})  # names clash, unknown clusters
    save_catalog(cat, file)


def _done(file: Path, what: str) -> None:
    typer.echo(f"{file}: {what}; `dvc repro` applies it (reruns merge, calibrate and evaluate only)")


@app.command()
def show(file: Path = FILE) -> None:
    """Each cluster: images, mean confidence, matched true type, and its class in classes.yaml."""
    import numpy as np

    from anomalyncd.catalog import load_catalog, resolve

    ms, stored = _run_clusters()
    matched = {c.cluster: c.matched for c in stored if c.matched}
    curated = resolve(load_catalog(file), ms.n_classes, matched)
    typer.echo(f"{'cluster':>7}  {'images':>6}  {'confidence':>10}  {'matched type':<16}  class")
    for c in curated:
        sel = (ms.clusters == c.cluster) & ms.anomaly
        conf = ms.confidence[sel]
        mean = f"{np.nanmean(conf):.3f}" if sel.any() else ""
        how = f"merged into {c.root}" if c.root != c.cluster else ("rejected" if c.rejected else "")
        typer.echo(f"{c.cluster:>7}  {int(sel.sum()):>6}  {mean:>10}  {c.matched or '':<16}  {c.name}" + (f" ({how})" if how else ""))
    none = int((~ms.anomaly).sum())
    if none:
        typer.echo(f"no anomaly found: {none} images")
    if stored and [(c.name, c.root) for c in stored] != [(c.name, c.root) for c in curated]:
        typer.echo(f"{file} changed since the run's last merge: `dvc repro` applies it")


@app.command()
def name(cluster: int = typer.Argument(..., help="cluster id (anomalyncd classes show)"), label: str = typer.Argument(..., metavar="NAME", help="the class's name"), file: Path = FILE) -> None:
    """Name a cluster's class: `anomalyncd classes name 3 crack`."""
    from anomalyncd.catalog import Entry, check_name

    _edit(file, cluster, Entry(name=check_name(label, f"{file}: {cluster}.name")))
    _done(file, f"cluster {cluster} is {label!r}")


@app.command()
def merge(cluster: int = typer.Argument(..., help="the cluster to merge"), into: int = typer.Argument(..., help="the cluster it is the same type as"), file: Path = FILE) -> None:
    """Merge a cluster into another (the same defect type): `anomalyncd classes merge 4 3`."""
    from anomalyncd.catalog import Entry

    _edit(file, cluster, Entry(same_as=into))
    _done(file, f"cluster {cluster} is merged into cluster {into}")


@app.command()
def reject(cluster: int = typer.Argument(..., help="cluster id"), file: Path = FILE) -> None:
    """Reject a cluster as not a defect (false alarms): `anomalyncd classes reject 1`."""
    from anomalyncd.catalog import Entry

    _edit(file, cluster, Entry(reject=True))
    _done(file, f"cluster {cluster} is not a defect")


@app.command()
def reset(cluster: int = typer.Argument(..., help="cluster id"), file: Path = FILE) -> None:
    """Remove a cluster's line: it is its own class again, with its default name."""
    _edit(file, cluster, None)
    _done(file, f"cluster {cluster} is uncurated")


if __name__ == "__main__":
    run(app)
