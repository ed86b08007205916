"""The ``anomalyncd`` console command: every pipeline stage as a subcommand, ``predict``, and the catalog's ``classes`` and ``export``.

``anomalyncd detect`` is the same as ``python -m stages.detect``; ``dvc repro`` runs the stages
in order with caching, which is what most users want. ``anomalyncd predict`` classifies new
images with a finished run. The command lives with the stages: the library (``anomalyncd``)
never imports ``stages``.

A stage's module (and with it torch) is imported only when that subcommand runs or shows its
help, so ``anomalyncd --help`` starts at once: its one-line summaries are kept here
(``tests/test_cli.py`` checks them against the modules' docstrings).
"""

import importlib
from typing import Any

import typer
from typer.core import TyperGroup

from anomalyncd.stage import run

#: subcommand -> the first line of its module's docstring, in pipeline order
COMMANDS = {
    "demo": "demo: generate the built-in synthetic dataset (MVTec layout) from a seed.",
    "prepare": "prepare: read the dataset through its layout reader, validate it, write the manifest.",
    "detect": "detect: one anomaly map per image to classify, from the detector named by detect.method.",
    "mebin": "mebin: binarize each anomaly map with MEBin and cut anomaly-centred crops.",
    "train": "train: mask-guided representation learning on the anomaly-centred crops.",
    "infer": "infer: class probabilities of every crop from the trained model.",
    "merge": "merge: region merging, from crop predictions to one class per image.",
    "calibrate": "calibrate: the thresholds of predict's normal/defect and known/unknown-type decisions.",
    "evaluate": "evaluate: clustering metrics, the confusion plot and the HTML report.",
    "predict": "predict: classify new defect images with a finished run, without retraining.",
    "classes": "classes: show the discovered clusters and curate them in classes.yaml: name, merge, reject.",
    "export": "export: the curated classes as a labelled data set: <class name>/ folders of crops and masks, and a CSV.",
    "exps": "exps: the experiments side by side, readable in a terminal: `dvc exp show` with only the params that differ and the headline metrics.",
}


class LazyStages(TyperGroup):
    """The subcommands of :data:`COMMANDS`, each imported from ``stages.<name>`` on use."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, name: str) -> Any:
        if name not in COMMANDS:
            return None
        return typer.main.get_command(importlib.import_module(f"stages.{name}").app)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        super(TyperGroup, self).format_help(ctx, formatter)  # plain: rich's would import every stage

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, line.partition(": ")[2]) for name, line in COMMANDS.items()])


app = typer.Typer(cls=LazyStages, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def root() -> None:
    """Discover the types of defects in industrial images (AnomalyNCD).

    `dvc repro` runs the stages in order, with caching; each is also a subcommand here.
    `anomalyncd <command> --help` lists the params it reads and their current values."""


def main() -> None:
    """Console entry point."""
    run(app)


if __name__ == "__main__":
    main()
