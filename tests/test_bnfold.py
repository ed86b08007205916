"""Batch norm folded into the convolution before it: the same outputs, fewer passes."""

import torch
from torch import nn

from anomalyncd.bnfold import fold_batchnorm, folded
from anomalyncd.model import create_backbone


def _with_statistics(net: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine weights in every batch norm, eval mode."""
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return net.eval()


def test_a_folded_conv_bn_relu_gives_the_same_outputs_without_its_batch_norm():
    net = _with_statistics(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)))
    x = torch.randn(2, 3, 16, 16)
    out = folded(net, x)
    assert out is not net
    assert not any(isinstance(m, nn.BatchNorm2d) for m in out.modules())
    assert torch.allclose(out(x), net(x), atol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # the original is untouched


def test_timm_efficientnet_folds_every_batch_norm_and_keeps_its_features():
    net = _with_statistics(create_backbone("tf_efficientnet_lite0", 64, pretrained=False, layers=[2, 3, 4]))
    x = torch.rand(2, 3, 64, 64)
    out = folded(net, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in out.modules())
    for a, b in zip(net(x), out(x)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    assert not any(p.requires_grad for p in out.parameters())


def test_a_batch_norm_that_does_not_follow_its_convolution_is_left_alone():
    # the norm normalises the input, not the convolution's output: nothing may fold
    class NormFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(self.bn(x))

    net = _with_statistics(NormFirst())
    x = torch.randn(2, 3, 8, 8)
    assert folded(net, x) is net  # folding would change the outputs: the check refuses it
    assert fold_batchnorm(_with_statistics(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)))) == 0
