"""export: the curated classes as a labelled data set: <class name>/ folders of crops and masks, and a CSV.

Not a pipeline stage. Reads the finished run's crops (data/mebin), its merge result and the
catalog stored with it (data/merge), and writes ``--out`` atomically in the layout
``train.base_dir`` reads (:mod:`anomalyncd.export`). A classes.yaml edited since the last
``dvc repro`` is an error (the export would not be the run's classes). ``--out`` must be new,
empty, or an earlier export: any other folder is left as it is.
"""

from pathlib import Path

import typer

from anomalyncd.stage import run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    out: Path = typer.Option(..., "--out", help="folder to write (new, empty, or an earlier export, which is replaced)"),
    classes: Path = typer.Option(Path("classes.yaml"), "--classes", help="the catalog the run was merged with"),
) -> None:
    """Write the curated classes as <out>/<class name>/ folders of crops with their masks, and <out>/labels.csv."""
    from collections import Counter

    from anomalyncd import paths
    from anomalyncd.catalog import from_attrs, load_catalog, resolve
    from anomalyncd.datasets import Manifest
    from anomalyncd.export import TABLE, check_out, plan_export, write_export
    from anomalyncd.io import InputError
    from anomalyncd.store import read_crops, read_merged

    check_out(out)
    for f in (paths.CROPS, paths.MERGED, paths.MANIFEST):
        if not f.exists():
            raise InputError(f"{f}: missing; run the pipeline first (dvc repro), from the project folder")
    ms = read_merged(paths.MERGED)
    if "catalog" not in ms.attrs:
        raise InputError(f"{paths.MERGED}: has no class catalog; rerun merge (dvc repro)")
    stored = from_attrs(ms.attrs["catalog"], str(paths.MERGED))
    current = resolve(load_catalog(classes), ms.n_classes, {c.cluster: c.matched for c in stored if c.matched})
    if [(c.name, c.root, c.rejected) for c in current] != [(c.name, c.root, c.rejected) for c in stored]:
        raise InputError(f"{classes}: changed since the run's last merge; run `dvc repro` first (reruns merge, calibrate and evaluate only)")
    cs = read_crops(paths.CROPS, lazy=True)
    if cs.ids != ms.ids or len(cs.image_index) != len(ms.crop_clusters):
        raise InputError(f"{paths.MERGED}: images or crops differ from {paths.CROPS}; rerun merge (dvc repro)")
    records = Manifest.read(paths.MANIFEST).by_id()
    items = plan_export(cs.crop_ids, ms.crop_clusters, cs.areas, stored)
    index = cs.image_index.tolist()
    write_export(
        out,
        items,
        crop=lambda j: (cs.crops[j], cs.crop_masks[j]),
        image_of=lambda j: (records[cs.ids[index[j]]].image, cs.ids[index[j]]),
        boxes=cs.boxes,
        regions=cs.regions,
        image_size=lambda j: cs.image_sizes[index[j]],
    )
    per_class = Counter(it.name for it in items)
    typer.echo(f"export: {len(items)} crops -> {out}/<class>/, {out / TABLE}; per class: {dict(sorted(per_class.items()))}")


if __name__ == "__main__":
    run(app)
