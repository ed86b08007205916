"""merge: region merging, from crop predictions to one class per image.

Each crop's class probabilities (the selected head's softmax(logits / 0.1) over the novel
classes, as written by ``infer``) are weighted within their image by a softmax of
sqrt(mask area) / ``merge.temperature`` and summed; the image's class is the argmax
(``merge.strategy: mean`` averages instead). An image where MEBin found no anomaly gets no
class: status ``no anomaly found``, cluster -1 (the normal class when the run has one), no
confidence. Writes the result to the store evaluate reads (data/merge/merged.zarr.zip, with the
merge settings for ``anomalyncd predict``) and as tables for people: one row per image
(data/merge/predictions.csv) and one per crop (data/merge/crops.csv).

The classes are named by the catalog (``classes.yaml``, :mod:`anomalyncd.catalog`): each
cluster's curated class (its name, the cluster it was merged into, or "not a defect") is
stored with the result and is the tables' ``name`` column; an uncurated cluster is named by
its matched true type (image-level Hungarian matching, as ``evaluate`` scores it), else
``cluster <id>``. Editing the catalog reruns this stage and ``evaluate``, nothing before.
"""

from pathlib import Path
from typing import Annotated

import typer

from anomalyncd import paths
from anomalyncd.catalog import CATALOG_FILE, cluster_names, load_catalog, resolve, to_attrs
from anomalyncd.config import load_params
from anomalyncd.datasets import Manifest
from anomalyncd.io import InputError
from anomalyncd.merge import Merger, merge_tables, named_rows, no_anomaly_cluster, novel_probabilities, write_table
from anomalyncd.metrics import matched_types
from anomalyncd.stage import reads, run
from anomalyncd.store import read_crops, read_probs, write_merged

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(cls=reads("merge"))
def main(
    params: Path = typer.Option("params.yaml", help="params file"),
    classes: Annotated[Path, typer.Option(help="the class catalog (missing: no curation)")] = CATALOG_FILE,
) -> None:
    """Write data/merge/merged.zarr.zip, data/merge/predictions.csv and data/merge/crops.csv."""
    p = load_params("merge", params)
    catalog = load_catalog(classes)
    # lazy: no crop pixels or features in memory, and the tables are written as they are made
    cs, ps = read_crops(paths.CROPS, lazy=True), read_probs(paths.PROBS, lazy=True)
    records = Manifest.read(paths.MANIFEST).by_id()
    unknown = [i for i in cs.ids if i not in records]
    if unknown:
        raise InputError(f"{paths.CROPS}: image ids not in {paths.MANIFEST}: {unknown[:5]}; rerun mebin (dvc repro)")
    if len(ps.probs) != len(cs.crops):
        raise InputError(
            f"{paths.PROBS}: {len(ps.probs)} crop predictions but {paths.CROPS} holds {len(cs.crops)} crops; "
            "rerun infer (dvc repro)"
        )
    try:
        crop_probs = novel_probabilities(ps.probs, ps.head, int(ps.attrs.get("num_labeled", 0)))
    except ValueError as e:
        raise InputError(f"{paths.PROBS}: {e}") from e
    img_rows, crop_rows, merged = merge_tables(
        ids=cs.ids,
        images=[records[i].image for i in cs.ids],
        categories=[records[i].category for i in cs.ids],
        crop_ids=cs.crop_ids,
        image_index=cs.image_index,
        boxes=cs.boxes,
        regions=cs.regions,
        image_sizes=cs.image_sizes,
        areas=cs.areas,
        scores=cs.scores,
        crop_probs=crop_probs,
        merger=Merger(p.strategy, p.temperature, no_anomaly_cluster(ps.attrs)),
    )
    matched = matched_types([records[i].defect_type for i in cs.ids], merged.clusters, [records[i].category for i in cs.ids])
    curated = resolve(catalog, crop_probs.shape[1], matched)
    merged.attrs["catalog"] = to_attrs(curated)
    names = cluster_names(curated)
    write_merged(paths.MERGED, merged)
    write_table(paths.PREDICTIONS, named_rows(img_rows, names))
    write_table(paths.CROP_PREDICTIONS, named_rows(crop_rows, names))
    none_found = int((~merged.anomaly).sum())
    typer.echo(
        f"merge ({p.strategy}, T={p.temperature:g}): {len(cs.ids)} images, {len(cs.image_index)} crops, "
        f"{crop_probs.shape[1]} classes -> {paths.PREDICTIONS}; no anomaly found in {none_found} images"
    )
    typer.echo("classes: " + "; ".join(f"{c.cluster}: {c.name}" for c in curated))


if __name__ == "__main__":
    run(app)
