"""exps: the experiments side by side, readable in a terminal: `dvc exp show` with only the params that differ and the headline metrics.

Not a pipeline stage. Every param and every metric is a column of `dvc exp show` (over a
hundred); this shows the params that vary across the experiments shown, image NMI / ARI / F1
(``metrics/evaluate.json``) and the number of classes with its estimate
(``metrics/num_classes.json``). Other arguments go to `dvc exp show` as they are
(``anomalyncd exps -A --md``, ``--sort-by image.nmi``, ``--keep aupro``).
"""

import subprocess
import sys

import typer

from anomalyncd.config import SECTIONS
from anomalyncd.stage import run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

#: the metric columns shown, whether or not they vary (dvc names a column ``<file>:<key>`` where
#: the key alone is ambiguous)
HEADLINE = r"(.*:)?(image\.(nmi|ari|f1)|num_classes|estimate)$"


def exp_show_args(extra: list[str]) -> list[str]:
    """The `dvc exp show` arguments: the headline metrics kept, every other column that is not
    a param dropped, unchanged params dropped by ``--only-changed``; then ``extra``."""
    params = "|".join(SECTIONS)
    return [
        "--only-changed",
        "--keep", rf"Experiment$|{HEADLINE}",
        "--drop", rf"(?!(params\.yaml:)?({params})\.)",
        *extra,
    ]


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def main(ctx: typer.Context) -> None:
    """Show the experiments: the params that differ, image NMI / ARI / F1, K and its estimate (`dvc exp show` arguments pass through)."""
    out = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", *exp_show_args(list(ctx.args))])
    raise typer.Exit(out.returncode)


if __name__ == "__main__":
    run(app)
