"""Running a stage's Typer app: bad input ends in one clear line, not a traceback."""

import sys
import warnings

import typer

from .io import DISK_ERRNOS, InputError, InputWarning, disk_error_message


def run(app: typer.Typer) -> None:
    """Run ``app``; an :class:`InputError` prints ``error: <message>`` and exits with 2, and so
    does a full disk or a read-only folder. An :class:`InputWarning` prints ``warning: <message>``."""
    shown = warnings.showwarning

    def show(message, category, *args, **kwargs):
        if issubclass(category, InputWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            shown(message, category, *args, **kwargs)

    warnings.showwarning = show
    try:
        app()
    except InputError as e:
        fail(str(e))
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        fail(disk_error_message(e))
    finally:
        warnings.showwarning = shown


def fail(message: str) -> None:
    """Print ``error: <message>`` and exit with 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
