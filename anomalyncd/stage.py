"""Running a stage's Typer app: bad input ends in one clear line, not a traceback; a stage's
``--help`` ends with the params it reads and their current values (:func:`reads`)."""

import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import typer
import yaml
from typer.core import TyperCommand

from .config import PARAMS_FILE, SECTIONS
from .io import DISK_ERRNOS, InputError, InputWarning, disk_error_message


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _show(value: Any) -> str:
    return value if isinstance(value, str) and value else json.dumps(value)


def params_lines(keys: Sequence[str], data: dict) -> list[str]:
    """``<section>.<key>: <value>`` for each of ``keys`` (a whole section, ``detect``, or one
    key, ``train.model``): its value in ``data`` (a parsed params.yaml), else its default."""
    lines = []
    for name in keys:
        section, _, only = name.partition(".")
        given = data.get(section) or {}
        for f in dataclasses.fields(SECTIONS[section]):
            if not only or f.name == only:
                lines.append(f"{section}.{f.name}: {_show(given.get(f.name, _default(f)))}")
    return lines


def params_help(keys: Sequence[str], path: str | Path = PARAMS_FILE) -> str:
    """The params part of a stage's ``--help``: the keys it reads, with their values in
    ``path`` (the defaults where it is missing or leaves a key out)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {} if path.exists() else {}
    except yaml.YAMLError:
        data = {}
    source = f"their values in {path}" if path.exists() else f"defaults: no {path} here"
    head = f"Params read ({source}; change one for an experiment: dvc exp run -S <key>=<value>):"
    return "\n".join([head, *(f"  {line}" for line in params_lines(keys, data))])


def reads(*keys: str) -> type[TyperCommand]:
    """The command class of a stage that reads the params ``keys`` (those dvc.yaml lists for
    it): its ``--help`` ends with them and their current values (:func:`params_help`)."""

    class StageCommand(TyperCommand):
        params_read = keys

        def format_help(self, ctx: Any, formatter: Any) -> None:
            super().format_help(ctx, formatter)  # rich prints itself; the plain formatter collects
            formatter.write("\n" + params_help(keys) + "\n")

    return StageCommand


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
