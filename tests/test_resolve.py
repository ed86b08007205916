"""The resolve step: values derived from other sections, and constraints between sections."""

import os
import subprocess
import sys

import pytest
import yaml

from anomalyncd.config import crop_pct, load_params
from anomalyncd.io import InputError


def _params(tmp_path, **sections):
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(sections))
    return f


@pytest.mark.parametrize(
    "model, image_size, crop_size",
    [("tf_efficientnet_lite0", 224, 256), ("resnet18", 224, 235), ("vit_base_patch8_224.dino", 224, 248)],
)
def test_auto_crop_size_is_the_image_size_over_the_models_timm_crop_pct(tmp_path, model, image_size, crop_size):
    f = _params(tmp_path, mebin={"crop_size": "auto"}, train={"model": model, "image_size": image_size})
    assert load_params("mebin", f).crop_size == crop_size


def test_the_crop_pct_is_the_timm_pretrained_configs_or_timms_default():
    import timm
    from timm.data import DEFAULT_CROP_PCT

    assert crop_pct("resnet18") == timm.get_pretrained_cfg("resnet18").crop_pct == 0.95
    assert crop_pct("no_such_model") == DEFAULT_CROP_PCT


def test_a_crop_size_given_by_hand_is_kept_when_it_holds_the_classifiers_input(tmp_path):
    f = _params(tmp_path, mebin={"crop_size": 300}, train={"image_size": 224})
    assert load_params("mebin", f).crop_size == 300


def test_a_crop_size_smaller_than_the_classifiers_input_is_an_error_naming_both_keys(tmp_path):
    f = _params(tmp_path, mebin={"crop_size": 128}, train={"image_size": 224})
    with pytest.raises(InputError, match=r"mebin.crop_size 128 is smaller than train.image_size 224.*auto \(256 for tf_efficientnet_lite0\)"):
        load_params("mebin", f)


def test_the_mebin_stage_stops_on_the_broken_constraint_with_one_line(tmp_path):
    from .conftest import ROOT

    _params(tmp_path, mebin={"crop_size": 128}, train={"image_size": 224})
    out = subprocess.run([sys.executable, "-m", "stages.mebin"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and out.stderr.startswith("error: params.yaml: mebin.crop_size 128"), out.stderr


def test_auto_crop_pct_is_resolved_to_the_models_and_a_given_one_kept(tmp_path):
    assert load_params("train", _params(tmp_path, train={"model": "resnet18"})).crop_pct == 0.95
    assert load_params("train", _params(tmp_path, train={"model": "resnet18", "crop_pct": 0.5})).crop_pct == 0.5
    with pytest.raises(InputError, match=r"train.crop_pct must be in \(0, 1\], or auto, got 0.0"):
        load_params("train", _params(tmp_path, train={"crop_pct": 0}))


def test_auto_crop_size_follows_a_crop_pct_given_by_hand(tmp_path):
    f = _params(tmp_path, mebin={"crop_size": "auto"}, train={"image_size": 100, "crop_pct": 0.5})
    assert load_params("mebin", f).crop_size == 200


def test_the_models_transforms_resize_by_the_crop_pct_it_carries():
    """The evaluation transform travels in the model bundle: the crop_pct is in its config."""
    from anomalyncd.config import TrainParams
    from anomalyncd.model import ModelConfig

    assert ModelConfig.from_params(TrainParams(model="resnet18"), num_unlabeled=2).crop_pct == 0.95
    assert ModelConfig.from_params(TrainParams(crop_pct=0.8), num_unlabeled=2).crop_pct == 0.8


def test_a_model_file_without_the_crop_pct_asks_for_retraining(tmp_path):
    from anomalyncd.io import save_torch
    from anomalyncd.model import MODEL_FORMAT, load_model

    config = {"model": "tf_efficientnet_lite0", "image_size": 32, "mask_layers": 0, "grad_from_block": 0,
              "n_head": 1, "num_unlabeled": 2}
    save_torch({"format": MODEL_FORMAT, "config": config, "state_dict": {}}, tmp_path / "m.pt")
    with pytest.raises(InputError, match="m.pt: damaged or written by another version of anomalyncd .*dvc repro train"):
        load_model(tmp_path / "m.pt")
