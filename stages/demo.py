"""demo: generate the built-in synthetic dataset (MVTec layout) from a seed."""

from pathlib import Path

import typer

from anomalyncd import demo, paths
from anomalyncd.config import load_params
from anomalyncd.io import InputError, atomic_path
from anomalyncd.stage import reads, run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

#: a file in every folder the demo stage writes: it replaces only such a folder
MARKER = ".anomalyncd-demo"


@app.command(cls=reads("demo"))
def main(params: Path = typer.Option("params.yaml", help="params file"), out: Path = paths.DEMO) -> None:
    """Write the demo dataset to data/demo/<category>."""
    p = load_params("demo", params)
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise InputError(
            f"{out}: a folder the demo stage did not write, which it would replace; "
            "choose a new or empty --out (or remove the folder yourself)"
        )
    with atomic_path(out) as tmp:
        counts = demo.generate(tmp, p)
        (tmp / MARKER).write_text("written by the anomalyncd demo stage, which replaces this folder on every run\n")
    typer.echo(f"demo: wrote {sum(counts.values())} images to {out}/{p.category} " + str(counts))


if __name__ == "__main__":
    run(app)
