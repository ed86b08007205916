"""The README's paper preset: params.yaml plus its `-S` overrides is the authors' configuration."""

from __future__ import annotations

import re

import yaml

from anomalyncd.config import SECTIONS, from_dict

from .conftest import ROOT

# The authors' configs/AnomalyNCD.yaml (and the constants of their code), as params.yaml keys.
AUTHORS = {
    "mebin.sample_rate": 4,
    "mebin.min_interval_len": 4,
    "mebin.erosion": "paper",  # their 6x6 erosion, which erases thin regions
    "mebin.fallback": "none",  # an image without a stable interval has no anomaly
    "mebin.padding": 0.1,
    "mebin.core": 0.0,  # their crop masks are the whole region
    "mebin.crop_size": 256,  # their crops are resized to int(224 / 0.875) before the 224 crop
    "train.model": "vit_base_patch8_224.dino",  # dino_vitb8
    "train.pretrained": True,
    "train.image_size": 224,
    "train.crop_pct": 0.875,  # their transforms: resize to int(224 / 0.875), then the 224 crop (timm's DINO config says 0.9)
    "train.grad_from_block": 11,
    "train.mask_layers": 9,
    "train.n_head": 4,
    "train.head_select": "loss",  # they keep the head of lowest cluster loss
    "train.batch_size": 32,
    "train.lr": 0.003,
    "train.momentum": 0.9,
    "train.weight_decay": 5.0e-5,
    "train.min_lr_ratio": 1.0e-3,  # cosine annealing to lr * 1e-3
    "train.epochs": 50,
    "train.head_init": "random",  # their heads start from random weights
    "train.sup_weight": 0.3,
    "train.memax_weight": 4.0,
    "train.anomaly_thred": 0.5,
    "train.warmup_teacher_temp": 0.07,
    "train.teacher_temp": 0.04,
    "train.warmup_teacher_epochs": 40,
    "train.repeat_times": 4,
    "train.trunk_cache_views": 0,  # they train on fresh augmentations every epoch
    "merge.strategy": "weighted",
    "merge.temperature": 50.0,  # theirs on MTD (100 on MVTec AD)
}


def readme_paper_command() -> str:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    (command,) = [b for b in blocks if "train.mask_layers" in b]
    return command


def test_readme_paper_command_gives_the_authors_full_configuration():
    command = readme_paper_command()
    assert command.startswith("dvc exp run ") and command.replace("\\\n", " ").count("\n") == 1  # one command
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    overrides = re.findall(r"-S (\w+)\.(\w+)=(\S+)", command)
    for section, key, value in overrides:
        assert key in params[section], f"{section}.{key} is not a param"
        params[section][key] = yaml.safe_load(value)
    for section in ("mebin", "train", "merge"):
        from_dict(SECTIONS[section], params[section], where=section)  # the stages accept them
    got = {name: params[name.split(".")[0]][name.split(".")[1]] for name in AUTHORS}
    assert got == AUTHORS
