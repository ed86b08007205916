"""Batch normalisation folded into the convolution before it, for frozen CNNs.

A frozen network in eval mode normalises with fixed statistics: ``bn(conv(x))`` is one affine
map per channel after the convolution, so it can be the convolution's own weights and bias
(torch's :func:`~torch.nn.utils.fusion.fuse_conv_bn_weights`). On CPU the separate
normalisation pass is about a third of a Lite0 forward in the channels-last layout; folded,
the outputs are equal up to float rounding.

Only a convolution directly followed, among its parent's children, by the batch norm of its
output (a :class:`torch.nn.BatchNorm2d`, or timm's ``BatchNormAct2d``, whose activation stays)
is folded: the layout of timm's CNNs (EfficientNet, MobileNet, ResNet). :func:`folded` checks
the result on one input and keeps the network as it was when the outputs differ.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

#: Largest difference of a folded network's outputs from the original's, relative to their
#: range, that :func:`folded` accepts (float32 rounding gives about 1e-6).
TOLERANCE = 1e-4


class _AfterNorm(nn.Module):
    """What stays of timm's ``BatchNormAct2d`` once its normalisation is folded: drop, act."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.drop, self.act = bn.drop, bn.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _replacement(bn: nn.Module) -> nn.Module | None:
    """The module that takes a folded batch norm's place, None for a kind not known here."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "act") and hasattr(bn, "drop"):
        return _AfterNorm(bn)
    return None


def _foldable(net: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(parent, convolution's name, batch norm's name) of every batch norm in ``net`` that
    directly follows the convolution of its input and is of a kind :func:`_replacement` knows."""
    out = []
    for parent in net.modules():
        names = list(parent._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = parent._modules[a], parent._modules[b]
            if (
                isinstance(conv, nn.Conv2d)
                and isinstance(bn, nn.BatchNorm2d)
                and _replacement(bn) is not None
                and bn.running_mean is not None
                and bn.num_features == conv.out_channels
            ):
                out.append((parent, a, b))
    return out


@torch.no_grad()
def fold_batchnorm(net: nn.Module) -> int:
    """Fold, in place, every batch norm that directly follows the convolution of its input in
    ``net`` (eval-mode statistics). Returns the number folded."""
    pairs = _foldable(net)
    for parent, a, b in pairs:
        conv, bn = parent._modules[a], parent._modules[b]
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        parent._modules[b] = _replacement(bn)
    return len(pairs)


@torch.no_grad()
def folded(net: nn.Module, example: torch.Tensor) -> nn.Module:
    """A frozen copy of ``net`` (eval mode, no gradients) with its batch norms folded, or
    ``net`` itself when nothing folds or the copy's outputs on ``example`` (B, 3, H, W) differ
    from ``net``'s by more than :data:`TOLERANCE` of their range."""
    if not _foldable(net):  # a ViT, the filter bank: no copy
        return net
    out = copy.deepcopy(net).eval().requires_grad_(False)
    fold_batchnorm(out)
    was_training = net.training
    ref, got = net.eval()(example), out(example)
    net.train(was_training)
    ref, got = (list(r) if isinstance(r, (list, tuple)) else [r] for r in (ref, got))
    for r, g in zip(ref, got):
        if r.shape != g.shape or (r - g).abs().max() > TOLERANCE * max(float(r.abs().max()), 1e-12):
            return net
    return out
