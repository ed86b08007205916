"""Which torch device a stage runs on: one rule for every ``device`` param."""

import torch

from .io import InputError


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cpu``/``cuda``/``cuda:N`` as given.

    Asking for CUDA on a machine without it is an ``InputError`` naming the param.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"params.yaml: device {device!r} requested but CUDA is not available; use auto or cpu")
    return device
