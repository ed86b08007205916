"""demo: generate the built-in synthetic dataset (MVTec layout) from a seed."""

from pathlib import Path

import typer

from anomalyncd import demo, paths
from anomalyncd.config import load_params
from anomalyncd.io import atomic_path
from anomalyncd.stage import reads, run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(cls=reads("demo"))
def main(params: Path = typer.Option("params.yaml", help="params file"), out: Path = paths.DEMO) -> None:
    """Write the demo dataset to data/demo/<category>."""
    p = load_params("demo", params)
    with atomic_path(out) as tmp:
        counts = demo.generate(tmp, p)
    typer.echo(f"demo: wrote {sum(counts.values())} images to {out}/{p.category} " + str(counts))


if __name__ == "__main__":
    run(app)
