"""Crop-level class probabilities from a trained model (used by ``infer`` and ``predict``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .augment import eval_views
from .device import resolve_device
from .io import InputError
from .losses import STUDENT_TEMP
from .model import MGViTClassifier, load_model
from .store import ProbSet, StoreWriter


def novel_probabilities(logits: torch.Tensor, num_labeled: int, temperature: float = STUDENT_TEMP) -> torch.Tensor:
    """softmax(logits / temperature) with base outputs zeroed and novel ones renormalised.

    logits: (..., K) with the ``num_labeled`` base outputs first. Returns (..., K).
    """
    probs = F.softmax(logits[..., num_labeled:] / temperature, dim=-1)
    return F.pad(probs, (num_labeled, 0))


@dataclass
class CropOutputs:
    """What the network gives for M crops: features float32 (M, D) (the encoder's output),
    logits float32 (M, n_head, K), and baseline float32 (M, D0), the frozen part's features
    pooled over the mask (:meth:`MaskGuidedCNN.pooled_trunk`, the k-means baseline's input)."""

    features: np.ndarray
    logits: np.ndarray
    baseline: np.ndarray


@torch.no_grad()
def crop_outputs(
    net: MGViTClassifier,
    crops: np.ndarray,
    crop_masks: np.ndarray,
    device: str = "cpu",
    batch_size: int = 64,
    side: np.ndarray | None = None,
) -> CropOutputs:
    """Features, logits and baseline features of every crop under the evaluation transform.

    crops uint8 (M, C, C, 3); crop_masks (M, C, C) in {0, 1}; side float32 (M, S): the crops'
    descriptors, for a model that fuses them (``cfg.side_dim``). The trunk runs once per crop.
    """
    net.eval()
    if net.cfg.side_dim and (side is None or np.shape(side) != (len(crops), net.cfg.side_dim)):
        got = None if side is None else np.shape(side)
        raise InputError(f"the model fuses {net.cfg.side_dim}-dim residual descriptors per crop; got {got} for {len(crops)} crops; rerun mebin (dvc repro)")
    feats, logits, base = [], [], []
    for s in tqdm(range(0, len(crops), batch_size), desc="infer", leave=False):
        x, mk = eval_views(crops[s : s + batch_size], crop_masks[s : s + batch_size], net.cfg.image_size, net.cfg.crop_pct)
        tokens, pmask = net.encoder.trunk(torch.from_numpy(x).to(device), torch.from_numpy(mk).to(device))
        sd = torch.from_numpy(np.asarray(side[s : s + batch_size], np.float32)).to(device) if net.cfg.side_dim else None
        f, _, lg = net(tokens, pmask, cached=True, side=sd)
        feats.append(f.cpu())
        logits.append(lg.transpose(0, 1).cpu())
        base.append(net.encoder.pooled_trunk(tokens, pmask).cpu())
    if not feats:
        empty = np.zeros((0, net.encoder.embed_dim), np.float32)
        fused = np.zeros((0, net.encoder.embed_dim + net.cfg.side_dim), np.float32)
        return CropOutputs(fused, np.zeros((0, net.cfg.n_head, net.cfg.num_outputs), np.float32), empty)
    return CropOutputs(*(torch.cat(t).float().numpy() for t in (feats, logits, base)))


def predict_crops(
    checkpoint_path: str | os.PathLike,
    crops: np.ndarray,
    crop_masks: np.ndarray,
    device: str = "cpu",
    batch_size: int = 64,
    side: np.ndarray | None = None,
) -> ProbSet:
    """Class probabilities of every crop and head from the model saved at ``checkpoint_path``.

    crops uint8 (M, C, C, 3) RGB; crop_masks uint8 (M, C, C) in {0, 1}. Returns a ProbSet with
    probs/logits float32 (M, n_head, K), features float32 (M, D) and the selected head.
    Probabilities are softmax(logits / 0.1) over the novel outputs (base outputs are 0).
    """
    device = resolve_device(device)
    net, info = load_model(checkpoint_path, device)
    out = crop_outputs(net, crops, crop_masks, device, batch_size, side)
    probs = novel_probabilities(torch.from_numpy(out.logits), net.cfg.num_labeled).numpy()
    return ProbSet(
        probs=probs.astype(np.float32),
        logits=out.logits,
        features=out.features,
        baseline_features=out.baseline,
        head=int(info["head"]),
        attrs=prob_attrs(net, info),
    )


def prob_attrs(net: MGViTClassifier, info: dict) -> dict:
    """The probability store's attrs besides ``head``."""
    cfg = net.cfg
    return {
        "num_labeled": cfg.num_labeled,
        "num_unlabeled": cfg.num_unlabeled,
        "normal_slot": cfg.normal_slot,
        "temperature": STUDENT_TEMP,
        "class_names": info.get("class_names", []),
    }


#: Crops read from the store at a time by :func:`write_probs_part` (rounded to whole batches).
CROPS_PER_CHUNK = 256
PART_KIND = "probs-part"


def write_probs_part(
    checkpoint_path: str | os.PathLike,
    crops: Sequence[np.ndarray],
    crop_masks: Sequence[np.ndarray],
    rows: range,
    path: str | os.PathLike,
    device: str = "cpu",
    batch_size: int = 64,
    side: np.ndarray | None = None,
) -> tuple[int, dict]:
    """The outputs of crops ``rows`` into the part store ``path``, a chunk at a time: probs and
    logits (m, n_head, K), features (m, D), baseline_features (m, D0) as in :func:`predict_crops`.

    crops uint8 (M, C, C, 3) and crop_masks (M, C, C): arrays or the store's lazy rows; side
    float32 (M, S): the crops' residual descriptors (for a model that fuses them); ``rows``
    starts on a batch boundary, so every batch is the one a single process forms. Returns the
    selected head and the store's attrs.
    """
    net, info = load_model(checkpoint_path, device)
    step = batch_size * max(1, CROPS_PER_CHUNK // batch_size)
    with StoreWriter(path, PART_KIND) as w:
        for a in range(rows.start, max(rows.stop, rows.start + 1), step):  # once at least: the arrays exist
            b = min(a + step, rows.stop)
            out = crop_outputs(net, np.asarray(crops[a:b]), np.asarray(crop_masks[a:b]), device, batch_size,
                               None if side is None else side[a:b])
            probs = novel_probabilities(torch.from_numpy(out.logits), net.cfg.num_labeled).numpy()
            for name, arr in [("probs", probs), ("logits", out.logits), ("features", out.features),
                              ("baseline_features", out.baseline)]:
                w.declare(name, arr.shape[1:], np.float32)
                w.append(name, arr, np.float32)
    return int(info["head"]), prob_attrs(net, info)
