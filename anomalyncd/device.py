"""Which torch device a stage runs on: one rule for every ``device`` param."""

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
