"""``train.num_classes: auto``: the number of defect classes the train stage uses.

The estimate runs on the mask-guided [CLS] features of the crops, computed by the model the
train stage starts from (timm/DINO weights with ``pretrained``/``checkpoint``, else random
weights from ``train.seed``) with mask guidance in *every* block, so that the [CLS] token
describes the anomalous region only (measured in ``benchmarks/bench_num_classes.py``: with
random weights, guidance in the last block only leaves too little of the region in the
feature). The estimator itself is :func:`anomalyncd.num_classes.estimate_num_classes`.

The estimate is made and logged on every run, so that a given ``num_classes`` can be checked
against it; it replaces ``num_classes`` only when that is ``auto``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .augment import eval_views
from .config import TrainParams
from .io import InputError, write_json
from .model import MGViT, create_backbone
from .num_classes import KEstimate, estimate_num_classes


@torch.no_grad()
def region_features(
    p: TrainParams, crops: np.ndarray, crop_masks: np.ndarray, device: str = "cpu", batch_size: int = 64
) -> np.ndarray:
    """Normed [CLS] features of every crop, mask guidance in all blocks, evaluation transform.

    crops uint8 (M, C, C, 3) RGB; crop_masks (M, C, C) in {0, 1}. Returns float32 (M, D).
    The global torch RNG is left as it was (the train stage draws its own initialisation).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        backbone = create_backbone(p.model, p.image_size, p.pretrained, p.checkpoint)
    depth = len(backbone.blocks)
    encoder = MGViT(backbone, mask_layers=depth, grad_from_block=depth).to(device).eval()
    out = []
    for s in tqdm(range(0, len(crops), batch_size), desc="num_classes features", leave=False):
        x, mk = eval_views(crops[s : s + batch_size], crop_masks[s : s + batch_size], p.image_size)
        out.append(encoder(torch.from_numpy(x).to(device), torch.from_numpy(mk).to(device)).float().cpu())
    if not out:
        return np.zeros((0, encoder.embed_dim), np.float32)
    return torch.cat(out).numpy()


def resolve_num_classes(
    p: TrainParams,
    crops: np.ndarray,
    crop_masks: np.ndarray,
    include_normal: bool,
    metrics_path: str | Path,
    plot_path: str | Path,
    device: str = "cpu",
) -> int:
    """The number of defect classes to train with; writes the estimate's metrics and plot.

    With ``include_normal`` the crops of defect-free images form one more cluster, so the
    defect classes are the estimate minus one (at least 1). Returns ``p.num_classes`` when it
    is an int, the estimate when it is ``"auto"``.
    """
    if p.num_classes != "auto" and p.num_classes < 1:
        raise InputError(f"params.yaml: train.num_classes={p.num_classes} must be at least 1, or auto")
    if p.auto_max < 1:
        raise InputError(f"params.yaml: train.auto_max={p.auto_max} must be at least 1")
    feats = region_features(p, crops, crop_masks, device)
    k_max = p.auto_max + int(include_normal)
    if len(feats) >= 2:
        est = estimate_num_classes(feats, k_max=k_max, method=p.auto_method, seed=p.seed)
    else:  # nothing to compare: one class
        est = KEstimate(1, [1], [float("nan")], p.auto_method)
    estimate = max(1, est.k - int(include_normal))
    auto = p.num_classes == "auto"
    chosen = estimate if auto else int(p.num_classes)
    write_json(metrics_path, num_classes_metrics(est, estimate, chosen, auto))
    write_json(plot_path, num_classes_plot(est))
    return chosen


def num_classes_metrics(est: KEstimate, estimate: int, chosen: int, auto: bool) -> dict:
    """The metrics file: the K used, the estimate, and the score of every candidate K."""
    d = est.to_dict()
    return {
        "num_classes": chosen,
        "estimate": estimate,
        "auto": auto,
        "method": est.method,
        "scores": {f"k{k}": s for k, s in zip(d["candidates"], d["scores"]) if s is not None},
    }


def num_classes_plot(est: KEstimate) -> list[dict]:
    """DVC plot rows ``{"k": K, "score": s}`` (score against K; undefined scores left out)."""
    d = est.to_dict()
    return [{"k": k, "score": s} for k, s in zip(d["candidates"], d["scores"]) if s is not None]
