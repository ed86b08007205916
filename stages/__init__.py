"""The pipeline's stages, one Typer command each (``python -m stages.<name> --help``), and the
``anomalyncd`` console command that gathers them (:mod:`stages.cli`). The library
(``anomalyncd``) never imports this package."""
