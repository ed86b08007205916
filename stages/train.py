"""train: mask-guided representation learning on the anomaly-centred crops.

Reads ``data/mebin/crops.zarr.zip`` and params ``train`` (+ ``dataset.include_normal``);
writes ``models/mgvit.pt`` (weights, model config, selected head, class names and the params as
resolved, ``num_classes: auto`` as the number it became),
``metrics/train.json`` and the DVCLive loss curves in ``dvclive/train``. A checkpoint is
rewritten after every epoch in ``checkpoints/train.pt``; ``train.resume=true`` continues an
interrupted run from it and reaches the same result.

Distributed: ``torchrun --nproc_per_node=N -m stages.train`` (gloo on CPU, NCCL on GPU);
``train.batch_size`` is the global batch, split over the processes.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
import typer

from anomalyncd import auto_k, paths
from anomalyncd.config import TrainParams, load_params
from anomalyncd.datasets import IMAGE_EXTENSIONS
from anomalyncd.io import InputError, image_info, read_image, read_mask, significant_bits, write_json
from anomalyncd.model import MGViTClassifier, ModelConfig, appearance_weight, create_backbone, save_model
from anomalyncd.stage import reads, run
from anomalyncd.store import CropSet, read_crops
from anomalyncd.training import TrainData, dist_env, init_distributed, train

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

CHECKPOINT = Path("checkpoints/train.pt")
LIVE_DIR = Path("dvclive/train")
# params that change how a run is executed, not what it computes
NOT_IN_FINGERPRINT = {"resume", "num_workers", "device"}


def resolve_num_classes(params: TrainParams, crops: CropSet, device: str) -> int:
    """Number of defect classes to discover (the novel outputs, without the normal slot).

    ``num_classes: auto`` estimates it from the crops; the estimate is printed and logged on every
    run (``metrics/num_classes.json``, ``plots/num_classes.json``), see :mod:`anomalyncd.auto_k`.
    """
    return auto_k.resolve_num_classes(
        params, crops.crops, crops.crop_masks, paths.NUM_CLASSES_METRICS, paths.NUM_CLASSES_PLOT, device, typer.echo,
        crops.residuals,
    )


def read_base_set(folder: str | Path, crop_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """A labelled base set: ``<folder>/<class>/<name>.<ext>`` with mask ``<name>_mask.png``.

    Returns crops uint8 (B, C, C, 3), masks uint8 (B, C, C), labels int64 (B,) and the class
    names (sorted subfolder names), every crop resized to ``crop_size``. 16-bit crops are read
    on the set's own bit depth, as ``prepare`` reads a data set's images (the smallest camera
    depth that holds its brightest pixel: :func:`anomalyncd.io.significant_bits`).
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"params.yaml: train.base_dir {str(root)!r} is not a folder; set it to '' for no base set")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files = []  # (label, crop file, mask file)
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() not in IMAGE_EXTENSIONS or f.stem.endswith("_mask"):
                continue
            mask_file = f.with_name(f"{f.stem}_mask.png")
            if not mask_file.exists():
                raise InputError(f"{f}: base-set crop without its mask {mask_file.name}")
            files.append((label, f, mask_file))
    if not files:
        raise InputError(f"{root}: no base-set crops found (expected <class>/<name>.png with <name>_mask.png)")
    bits = significant_bits(image_info(f)[2] for _, f, _ in files)
    crops, masks = [], []
    for _, f, mask_file in files:
        img = read_image(f, bits)
        mask = read_mask(mask_file, img.shape[:2])
        crops.append(cv2.resize(img, (crop_size, crop_size), interpolation=cv2.INTER_LINEAR))
        masks.append(cv2.resize(mask.astype(np.uint8), (crop_size, crop_size), interpolation=cv2.INTER_NEAREST))
    return np.stack(crops), np.stack(masks), np.array([label for label, _, _ in files], np.int64), classes


def result_params(params: TrainParams) -> dict:
    """The params that determine the trained model (not resume, workers or device)."""
    return {k: v for k, v in asdict(params).items() if k not in NOT_IN_FINGERPRINT}


def fingerprint(params: TrainParams, include_normal: bool, world: int, *files: Path) -> str:
    """Hash of what determines the result: params, the number of processes and input files."""
    h = hashlib.sha256()
    key = {"train": result_params(params), "include_normal": include_normal, "world": world}
    h.update(json.dumps(key, sort_keys=True).encode())
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _base_hash(folder: str) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file()) if folder else []


class _Live:
    """DVCLive logger of the per-epoch metrics (rank 0 only); DVC declares its files."""

    def __init__(self, directory: Path):
        from dvclive import Live

        self.live = Live(dir=str(directory), resume=False, report=None, save_dvc_exp=False, dvcyaml=None)

    def __call__(self, epoch: int, metrics: dict) -> None:
        self.live.step = epoch
        for k, v in metrics.items():
            self.live.log_metric(k, v)
        self.live.next_step()

    def end(self) -> None:
        self.live.end()


@app.command(cls=reads("train", "dataset.include_normal"))
def main(params: Path = typer.Option("params.yaml", help="params file")) -> None:
    """Write models/mgvit.pt, metrics/train.json and dvclive/train."""
    p = load_params("train", params)
    ds = load_params("dataset", params)
    t0 = time.time()
    device = init_distributed(p.device)
    rank, world = dist_env()
    cs = read_crops(paths.CROPS)
    if len(cs.crops) < 2:
        raise InputError(f"{paths.CROPS}: {len(cs.crops)} crop(s); training needs at least 2 (check detect/mebin)")
    labels = -np.ones(len(cs.crops), np.int64)
    crops, masks, scores, side = cs.crops, cs.crop_masks, cs.scores, cs.residuals
    base_names: list[str] = []
    if p.base_dir:  # read before num_classes: auto writes its metrics
        bc, bm, bl, base_names = read_base_set(p.base_dir, cs.crops.shape[1])
    tk = time.perf_counter()
    k = resolve_num_classes(p, cs, device)
    k_seconds = time.perf_counter() - tk
    if p.base_dir:
        crops, masks = np.concatenate([crops, bc]), np.concatenate([masks, bm])
        scores = np.concatenate([scores, np.ones(len(bc), np.float32)])
        labels = np.concatenate([labels, bl])
        # a labelled base crop has no detector map, so no residual descriptor: zeros beside its feature
        side = np.concatenate([side, np.zeros((len(bc), side.shape[1]), np.float32)])
    data = TrainData(crops, masks, scores, labels, side)
    has_normal = bool(ds.include_normal)
    cfg = ModelConfig.from_params(
        p, num_unlabeled=k + int(has_normal), num_labeled=len(base_names), has_normal=has_normal, side_dim=side.shape[1]
    )
    torch.manual_seed(p.seed)
    backbone = create_backbone(p.model, p.image_size, p.pretrained, p.checkpoint, p.layers)
    if rank == 0:
        typer.echo(f"train: model {p.model}, weights: {backbone.weights}", err=True)
    net = MGViTClassifier(cfg, backbone)
    fp = fingerprint(p, has_normal, world, paths.CROPS, *_base_hash(p.base_dir))
    live = _Live(LIVE_DIR) if rank == 0 else None
    result = train(
        net, data, p, device, checkpoint=CHECKPOINT, resume=p.resume, fingerprint=fp, on_epoch=live
    )
    if rank == 0:
        live.end()
        novel = (["normal"] if has_normal else []) + [f"class_{i}" for i in range(k)]
        class_names = base_names + novel
        # the params as resolved: num_classes: auto recorded as the number it became
        resolved = {**result_params(p), "num_classes": k, "num_classes_estimated": p.num_classes == "auto"}
        save_model(paths.MODEL, net, result.head, extra={"class_names": class_names, "params": resolved})
        last = result.history[-1] if result.history else {}
        write_json(
            paths.METRICS / "train.json",
            {
                **{k_: round(v, 6) for k_, v in last.items()},
                "head": result.head,
                **{f"agreement_head{i}": round(a, 6) for i, a in enumerate(result.agreement)},
                "epochs": len(result.history),
                "resumed_from_epoch": result.resumed_from,
                "crops": len(cs.crops),
                "base_crops": int((labels >= 0).sum()),
                "num_outputs": cfg.num_outputs,
                "pretrained": bool(p.pretrained or p.checkpoint),
                "weights": backbone.weights,
                "processes": world,
                "appearance_weight": appearance_weight(net.fuse_angle),
            },
        )
        # timings vary from run to run: a log, not a DVC-tracked metric
        timings = {"seconds": time.time() - t0, "cache_seconds": result.cache_seconds, "num_classes_seconds": k_seconds}
        write_json(paths.LOGS / "train.json", {k: round(v, 2) for k, v in timings.items()})
        typer.echo(
            f"train: {len(cs.crops)} crops, {len(result.history)} epochs on {device} x{world}, "
            f"head {result.head}, loss {last.get('loss', float('nan')):.4f} -> {paths.MODEL}"
        )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run(app)
