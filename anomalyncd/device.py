"""Which torch device a stage runs on: one rule for every ``device`` param, and the precision
its frozen networks run in there."""

import contextlib

import torch

from .config import valid_device
from .io import InputError


def resolve_device(device: str, where: str = "params.yaml: device") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cpu``/``cuda``/``cuda:N``/``mps`` as given.

    Any other name, or CUDA asked for on a machine without it, is an ``InputError`` naming
    ``where`` (the param or option).
    """
    if not valid_device(device):
        raise InputError(f"{where}: unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"{where}: device {device!r} requested but CUDA is not available; use auto or cpu")
    return device


def autocast(device: str | torch.device, enabled: bool):
    """A context that runs the networks called in it in mixed precision on ``device`` when
    ``enabled`` (``torch.autocast``: convolutions and matrix products in half precision, the
    rest in float32), else one that changes nothing.

    Half precision is float16 on CUDA and MPS (tensor cores; 10 significant bits) and bfloat16
    on the CPU (what CPUs with bf16 units run fast, e.g. AMX; 7 significant bits): outputs
    within that rounding of float32's. Callers convert what they keep back to float32.
    """
    if not enabled:
        return contextlib.nullcontext()
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16 if kind == "cpu" else torch.float16)
