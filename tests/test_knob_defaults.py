"""A knob's default exists once, in config.py: library functions take the value from the
params (or their caller), so a default can never disagree with params.yaml's."""

import ast
import dataclasses

import pytest

from anomalyncd.config import MebinParams, MergeParams, TrainParams

from .conftest import ROOT

# Names a knob shares with unrelated arguments (a device to run on, a seed of a helper, the
# threads of detect's and predict's pools beside mebin.workers, ...).
SHARED_NAMES = {"seed", "device", "batch_size", "image_size", "layers", "pretrained", "checkpoint", "model",
                "resume", "num_workers", "workers", "temperature"}
# Arguments that carry a knob under another name.
ALIASES = {"warmup_epochs": "warmup_teacher_epochs", "start": "warmup_teacher_temp", "end": "teacher_temp"}


def _defaulted_arguments() -> list[tuple[str, str, int]]:
    """(file, argument, line) of every library function argument with a default value."""
    out = []
    for f in sorted((ROOT / "anomalyncd").rglob("*.py")):
        if f.name == "config.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                positional = a.posonlyargs + a.args
                with_default = positional[len(positional) - len(a.defaults):] if a.defaults else []
                with_default += [k for k, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
                out += [(str(f.relative_to(ROOT)), arg.arg, node.lineno) for arg in with_default]
    return out


@pytest.mark.parametrize("section", [TrainParams, MebinParams, MergeParams], ids=["train", "mebin", "merge"])
def test_no_library_function_repeats_a_knobs_default(section):
    knobs = {f.name for f in dataclasses.fields(section)} - SHARED_NAMES
    repeated = [
        f"{file}:{line} {arg}" for file, arg, line in _defaulted_arguments() if ALIASES.get(arg, arg) in knobs
    ]
    assert repeated == [], "defaults belong in anomalyncd/config.py only"
