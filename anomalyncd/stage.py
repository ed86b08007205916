"""Running a stage's Typer app: bad input ends in one clear line, not a traceback."""

import sys

import typer

from .io import InputError


def run(app: typer.Typer) -> None:
    """Run ``app``; an :class:`InputError` prints ``error: <message>`` and exits with 2."""
    try:
        app()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
