"""The ``anomalyncd`` console command: every pipeline stage as a subcommand, and ``predict``.

``anomalyncd detect`` is the same as ``python -m stages.detect``; ``dvc repro`` runs the stages
in order with caching, which is what most users want. ``anomalyncd predict`` classifies new
images with a finished run. The command lives with the stages: the library (``anomalyncd``)
never imports ``stages``.
"""

import typer

from anomalyncd.stage import run

from stages import demo, detect, evaluate, infer, mebin, merge, predict, prepare, train

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help="Discover the types of defects in industrial images (AnomalyNCD).")

for _name, _module in [
    ("demo", demo),
    ("prepare", prepare),
    ("detect", detect),
    ("mebin", mebin),
    ("train", train),
    ("infer", infer),
    ("merge", merge),
    ("evaluate", evaluate),
    ("predict", predict),
]:
    app.command(name=_name, help=_module.__doc__.strip().splitlines()[0])(_module.main)


def main() -> None:
    """Console entry point."""
    run(app)


if __name__ == "__main__":
    main()
