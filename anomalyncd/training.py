"""The training loop of mask-guided representation learning (AnomalyNCD, https://arxiv.org/abs/2410.14379).

:func:`train` runs SGD with a cosine schedule on two augmented views of every crop, writes a
checkpoint after each epoch (atomically), resumes from it, runs under ``torchrun`` (DDP: gloo
on CPU, NCCL on GPU) and optionally trains on a frozen-trunk cache. It is deterministic on
CPU: every random draw comes from generators seeded by ``(seed, epoch, crop, view)``.

The frozen-trunk cache (``trunk_cache_views: V``) runs V augmented views of every crop once
through the frozen blocks (every DDP process builds the whole cache) and trains the later
blocks and the heads on two distinct cached views per crop and epoch. The backbone's trained
blocks (a ViT's from ``grad_from_block``, a CNN's last stage with ``tune_last_stage``) learn at
``lr * backbone_lr_scale``.

Pseudo-label correction (the authors', ``anomaly_thred: 0.5``; off by default) pulls the teacher
target of every unlabelled crop scoring below ``anomaly_thred`` toward the first novel output:
the normal slot with ``dataset.include_normal``, otherwise the first defect class. A crop's score
is its peak on the set's range of map peaks, so "low" is relative to the set's brightest image,
and the pull gathers faint defects of every type in one class: measured on MTD with and without
a normal slot, it costs discovery (docs/discovery.md).

The kept head (``head_select``) is by default the medoid of the heads' partitions of the
training crops (:func:`select_consensus_head`) rather than the authors' head of lowest cluster
loss (``loss``): the me-max term of that loss favours classes of equal size, which real defect
classes seldom are.

Loss of one batch (per head h, then averaged over heads)::

    cluster_h = distill_h + memax_weight * memax_h     (both on the unlabelled rows only)
    memax_h = KL(mean prediction || prior_h): the prior uniform (the me-max term, the paper), or
              with memax_prior: init head h's class sizes in the k-means partition it starts from
    no base set:   total = cluster + contrastive
    with base set: total = (1 - sup_weight) * (cluster + contrastive) + sup_weight * (ce + supcon)
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from sklearn.metrics import normalized_mutual_info_score
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import losses
from .augment import eval_views, train_views
from .baseline import kmeans_clusters
from .config import TrainParams
from .device import resolve_device
from .io import InputError, load_torch, save_torch
from .model import MGViTClassifier, fuse

CACHE_EPOCH = 2**31 - 1  # the random stream of cached views, distinct from every real epoch


@dataclass
class TrainData:
    """Crops to train on. crops uint8 (M, C, C, 3); masks uint8 (M, C, C) in {0, 1};
    scores float32 (M,) crop anomaly scores; labels int64 (M,) base class, -1 for unlabelled;
    side float32 (M, S): per-crop descriptors the heads read beside the encoder's feature
    (the crops' residual descriptors; S = 0: none)."""

    crops: np.ndarray
    masks: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    side: np.ndarray | None = None

    def __post_init__(self) -> None:
        m = len(self.crops)
        if self.side is None:
            self.side = np.zeros((m, 0), np.float32)
        for name in ("masks", "scores", "labels", "side"):
            if len(getattr(self, name)) != m:
                raise ValueError(f"{name} has {len(getattr(self, name))} rows, expected {m}")

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).any())


@dataclass
class TrainResult:
    head: int  # selected head (train.head_select): the medoid of the heads' partitions, or lowest cluster loss
    agreement: list[float] = field(default_factory=list)  # head_select consensus: each head's mean NMI to the others
    history: list[dict] = field(default_factory=list)  # one dict of metrics per epoch
    seconds: float = 0.0
    resumed_from: int = 0  # epochs loaded from the checkpoint
    cache_seconds: float = 0.0  # time spent building the frozen-trunk cache


def cosine_lr(epoch: int, epochs: int, lr: float, min_ratio: float) -> float:
    """Learning rate of ``epoch``: cosine from ``lr`` to ``lr * min_ratio`` over ``epochs``."""
    lo = lr * min_ratio
    return lo + (lr - lo) * (1 + math.cos(math.pi * epoch / max(1, epochs))) / 2


def select_head(cluster_per_head: list[float] | np.ndarray) -> int:
    """Index of the head with the lowest mean cluster loss (first on ties).

    The cluster loss of a head is distillation + memax_weight * me-max, the authors' criterion.
    """
    return int(np.argmin(np.asarray(cluster_per_head, dtype=np.float64)))


def head_agreement(assignments: np.ndarray) -> np.ndarray:
    """Each head's mean NMI to the other heads' partitions: float (H,) (0 for a single head).

    assignments: int (H, M), each head's cluster of every crop. The head of highest agreement
    is the medoid of the heads' partitions, the choice of the cluster-ensemble literature
    (Strehl & Ghosh, JMLR 2002, https://www.jmlr.org/papers/v3/strehl02a.html).
    """
    h = len(assignments)
    if h == 1:
        return np.zeros(1)
    nmi = np.zeros((h, h))
    for i in range(h):
        for j in range(i + 1, h):
            nmi[i, j] = nmi[j, i] = normalized_mutual_info_score(assignments[i], assignments[j])
    return nmi.sum(1) / (h - 1)


def select_consensus_head(assignments: np.ndarray, cluster_per_head: list[float] | np.ndarray) -> int:
    """Index of the head whose partition agrees most with the others (:func:`head_agreement`);
    among heads of equal agreement (within 1e-9), the one of lowest cluster loss."""
    agree = head_agreement(np.asarray(assignments))
    tied = np.flatnonzero(agree >= agree.max() - 1e-9)
    return int(tied[select_head(np.asarray(cluster_per_head, dtype=np.float64)[tied])])


def epoch_batches(labels: np.ndarray, batch_size: int, seed: int, epoch: int, min_size: int = 2) -> list[np.ndarray]:
    """Global batches of crop indices for one epoch.

    Without labelled crops: a seeded permutation. With labelled crops (labels >= 0): M draws
    with replacement weighted so that labelled and unlabelled crops are equally likely.
    A last batch smaller than ``min_size`` is dropped.
    """
    m = len(labels)
    rng = np.random.default_rng([seed, epoch])
    lab = labels >= 0
    if lab.any() and (~lab).any():
        p = np.where(lab, 0.5 / lab.sum(), 0.5 / (~lab).sum())
        order = rng.choice(m, size=m, replace=True, p=p / p.sum())
    else:
        order = rng.permutation(m)
    batches = [order[i : i + batch_size] for i in range(0, m, batch_size)]
    return [b for b in batches if len(b) >= min_size]


# -- distributed helpers ---------------------------------------------------------------------


def dist_env() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside ``torchrun``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> str:
    """Join the ``torchrun`` process group when launched by it; return this process's device.

    ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. Under torchrun with CUDA each
    process takes ``cuda:LOCAL_RANK`` and NCCL; on CPU gloo.
    """
    device = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return device


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    if dist_env()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# -- data ------------------------------------------------------------------------------------


class _Views(Dataset):
    """Item k: both augmented views of this process's share of batch k, view-major."""

    def __init__(self, data: TrainData, batches: list[np.ndarray], image_size: int, crop_pct: float, seed: int, epoch: int):
        self.data, self.batches, self.seed, self.epoch = data, batches, seed, epoch
        self.image_size, self.crop_pct = image_size, crop_pct

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int):
        idx = self.batches[k]
        d = self.data
        x0, m0 = train_views(d.crops, d.masks, idx, self.image_size, self.crop_pct, self.seed, self.epoch, 0)
        x1, m1 = train_views(d.crops, d.masks, idx, self.image_size, self.crop_pct, self.seed, self.epoch, 1)
        return torch.from_numpy(idx), torch.from_numpy(np.concatenate([x0, x1])), torch.from_numpy(np.concatenate([m0, m1]))


def _single_threaded_worker(_: int) -> None:
    """Data-loading workers are forked: keep OpenCV and torch off their thread pools there."""
    cv2.setNumThreads(0)
    torch.set_num_threads(1)


def build_trunk_cache(
    net: MGViTClassifier, data: TrainData, views: int, seed: int, device: str, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen-trunk outputs of ``views`` augmented views per crop.

    Returns tokens float32 (views, M, N, D) and patch masks float32 (views, M, P), on CPU.
    """
    image_size = net.cfg.image_size
    toks, pms = [], []
    m = len(data.crops)
    net.eval()
    with torch.no_grad():
        for v in tqdm(range(views), desc="trunk cache", leave=False, disable=dist_env()[0] != 0):
            vt, vp = [], []
            for s in range(0, m, batch_size):
                idx = np.arange(s, min(m, s + batch_size))
                x, mk = train_views(data.crops, data.masks, idx, image_size, net.cfg.crop_pct, seed, CACHE_EPOCH, v)
                t, p = net.encoder.trunk(torch.from_numpy(x).to(device), torch.from_numpy(mk).to(device))
                vt.append(t.cpu())
                vp.append(p.cpu())
            toks.append(torch.cat(vt))
            pms.append(torch.cat(vp))
    return torch.stack(toks), torch.stack(pms)


@torch.no_grad()
def eval_trunk(net: MGViTClassifier, data: TrainData, device: str, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen-part outputs of every crop's evaluation view (the view ``infer`` sees): tokens
    (M, N, D) and patch masks (M, P), on ``device``."""
    net.eval()
    parts = [
        net.encoder.trunk(*(torch.from_numpy(a).to(device) for a in eval_views(data.crops[s : s + batch_size], data.masks[s : s + batch_size], net.cfg.image_size, net.cfg.crop_pct)))
        for s in range(0, len(data.crops), batch_size)
    ]
    return torch.cat([t for t, _ in parts]), torch.cat([p for _, p in parts])


@torch.no_grad()
def head_assignments(net: MGViTClassifier, data: TrainData, device: str, batch_size: int = 64) -> np.ndarray:
    """Each head's novel class of every unlabelled crop's evaluation view: int (H, M_unlabelled)."""
    tokens, pmask = eval_trunk(net, data, device, batch_size)
    unl = torch.from_numpy(data.labels < 0).to(tokens.device)
    tokens, pmask = tokens[unl], pmask[unl]
    side = torch.from_numpy(data.side[data.labels < 0]).to(device)
    out = [
        net(tokens[s : s + batch_size], pmask[s : s + batch_size], cached=True, side=side[s : s + batch_size])[2]
        for s in range(0, len(tokens), batch_size)
    ]
    if not out:
        return np.zeros((net.cfg.n_head, 0), np.int64)
    return torch.cat(out, dim=1)[..., net.cfg.num_labeled :].argmax(-1).cpu().numpy()


@torch.no_grad()
def prepare_model(
    net: MGViTClassifier, data: TrainData, device: str, head_init: str, seed: int, batch_size: int = 64
) -> np.ndarray | None:
    """Fit what the network takes from the training crops before training, on their
    evaluation views (deterministic): the encoder's channel statistics
    (:meth:`MaskGuidedCNN.calibrate`) and, with ``head_init: kmeans``, the novel outputs of
    every head, set to the mean directions of the clusters that the frozen-feature baseline
    (:func:`~anomalyncd.baseline.kmeans_clusters`, seed ``seed + head``) finds in the untrained
    features of the unlabelled crops, so that training starts from the baseline's partition
    and refines it. The centroids go in order of their crops' mean anomaly score, so the first
    novel output, toward which the correction pulls low-score crops, is the lowest.

    Returns each head's class sizes in that partition as output proportions, float64
    (n_head, K) (:func:`~anomalyncd.losses.class_prior`, the me-max prior of
    ``memax_prior: init``), or None where the heads start at random.
    """
    tokens, pmask = eval_trunk(net, data, device, batch_size)
    if net.encoder.needs_calibration:
        net.encoder.calibrate(tokens, pmask)
    if head_init == "random":
        return None
    unl = torch.from_numpy(data.labels < 0)
    side = torch.from_numpy(data.side[unl.numpy()]).to(device) if net.cfg.side_dim else None
    raw = fuse(net.encoder.head_blocks(tokens[unl], pmask[unl]), side, net.fuse_angle).cpu().numpy().astype(np.float64)
    feats = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
    cfg = net.cfg
    k = cfg.num_unlabeled
    if len(feats) < k:
        return None
    priors = []
    for h in range(cfg.n_head):
        # the baseline's clustering (standardise, PCA, k-means), so that training starts from
        # the frozen features' partition; each output is its cluster's mean direction
        labels = kmeans_clusters(raw, k, seed + h)
        centres = np.stack([feats[labels == c].mean(0) for c in range(k)])
        # the first novel output (the normal slot, if any) is where the correction pulls low scores
        mean_score = [data.scores[np.flatnonzero(data.labels < 0)[labels == c]].mean() for c in range(k)]
        order = np.argsort(mean_score, kind="stable")
        net.head.weight[h, cfg.num_labeled :] = torch.from_numpy(centres[order]).to(net.head.weight)
        priors.append(losses.class_prior(np.argsort(order)[labels], k, cfg.num_labeled))
    return np.stack(priors)


def cached_view_pairs(m: int, views: int, seed: int, epoch: int) -> np.ndarray:
    """Which two distinct cached views each crop uses in ``epoch``: int (M, 2)."""
    rng = np.random.default_rng([seed, epoch, CACHE_EPOCH])
    first = rng.integers(0, views, size=m)
    second = (first + rng.integers(1, views, size=m)) % views
    return np.stack([first, second], axis=1)


# -- loss of one batch -----------------------------------------------------------------------


def batch_loss(
    proj: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    cfg: TrainParams,
    teacher_temp: float,
    num_labeled: int,
    supervised: bool,
    priors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts for a view-major batch.

    proj: (2B, P); logits: (H, 2B, K); labels: (B,) int64 (-1 unlabelled); scores: (B,);
    priors: (H, K) each head's expected output proportions for the me-max term (None: uniform).
    Low-score crops are corrected toward output ``num_labeled``, the first novel one.
    ``supervised``: a labelled base set takes part in training (enables CE and SupCon).
    Returns (total, parts) with parts['cluster_heads'] (H,): each head's cluster loss.
    """
    unl = labels < 0
    unl2 = torch.cat([unl, unl])
    w = losses.correction_weight(torch.cat([scores, scores]), cfg.anomaly_thred)
    distill, memax, ce = [], [], []
    lab_rows = torch.cat([~unl, ~unl])
    lab2 = torch.cat([labels, labels])
    for h in range(logits.shape[0]):
        lg = logits[h]
        teacher = losses.teacher_targets(lg, teacher_temp, num_labeled, unl2, w, num_labeled)
        distill.append(losses.distillation(lg, teacher, unl, losses.STUDENT_TEMP))
        memax.append(losses.mean_entropy_penalty(lg[unl2], losses.STUDENT_TEMP, None if priors is None else priors[h]))
        if supervised and bool(lab_rows.any()):
            ce.append(losses.supervised_ce(lg[lab_rows], lab2[lab_rows], losses.STUDENT_TEMP))
    cluster_h = torch.stack(distill) + cfg.memax_weight * torch.stack(memax)
    cluster = cluster_h.mean()
    contrast = losses.info_nce(proj)
    parts = {"distill": torch.stack(distill).mean(), "memax": torch.stack(memax).mean(), "contrastive": contrast}
    if not supervised:
        total = cluster + contrast
    else:
        b, lab = len(labels), ~unl
        if bool(lab.any()):
            sup = losses.supcon(torch.cat([proj[:b][lab], proj[b:][lab]]), labels[lab])
            ce_m = torch.stack(ce).mean()
        else:
            sup = ce_m = proj.sum() * 0.0
        parts.update(ce=ce_m, supcon=sup)
        total = (1 - cfg.sup_weight) * (cluster + contrast) + cfg.sup_weight * (ce_m + sup)
    parts["loss"] = total
    parts["cluster_heads"] = cluster_h
    return total, parts


# -- the loop --------------------------------------------------------------------------------


def _param_groups(net: torch.nn.Module, weight_decay: float, backbone_lr_scale: float) -> list[dict]:
    """SGD groups: weight decay on weights but not on biases and norms; the backbone's trained
    blocks at ``backbone_lr_scale`` times the learning rate (``lr_scale``), the rest at 1."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in net.named_parameters():
        if p.requires_grad:
            groups.setdefault((name.startswith("encoder.backbone."), p.ndim <= 1), []).append(p)
    return [
        {"params": ps, "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": backbone_lr_scale if bb else 1.0}
        for (bb, no_decay), ps in sorted(groups.items())
    ]


def train(
    net: MGViTClassifier,
    data: TrainData,
    cfg: TrainParams,
    device: str = "cpu",
    checkpoint: str | Path | None = None,
    resume: bool = False,
    fingerprint: str = "",
    on_epoch: Callable[[int, dict], None] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``net`` in place on ``data``; return the selected head and the per-epoch metrics.

    checkpoint: file rewritten atomically after every epoch (rank 0). resume: continue from it
    when it exists; its ``fingerprint`` (params and inputs) must match. on_epoch(epoch, metrics)
    is called on rank 0 for every epoch, including those replayed from a checkpoint.
    stop_after: end after this many epochs (simulates an interruption in tests).
    """
    rank, world = dist_env()
    if cfg.trunk_cache_views == 1 or cfg.trunk_cache_views < 0:
        raise InputError("params.yaml: train.trunk_cache_views must be 0 (off) or at least 2 (two views per crop)")
    if cfg.trunk_cache_views and not net.encoder.has_frozen_trunk:
        raise InputError(
            "params.yaml: train.trunk_cache_views needs frozen blocks (train.grad_from_block > 0); "
            "set trunk_cache_views: 0 to train every block"
        )
    t0 = time.perf_counter()
    net.to(device)
    init_priors = prepare_model(net, data, device, cfg.head_init, cfg.seed)
    priors = None
    if cfg.memax_prior == "init" and init_priors is not None:
        priors = torch.from_numpy(init_priors).float().to(device)
    opt = torch.optim.SGD(_param_groups(net, cfg.weight_decay, cfg.backbone_lr_scale), lr=cfg.lr, momentum=cfg.momentum)
    history: list[dict] = []
    start = 0
    if resume and checkpoint is not None and Path(checkpoint).exists():
        state = load_torch(checkpoint, "set train.resume=false to start again")
        if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
            raise InputError(
                f"{checkpoint}: checkpoint of a run with other params or inputs; "
                "set train.resume=false to start again (or delete the checkpoint)"
            )
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history, start = state["history"], state["epoch"]
    resumed_from = start
    if on_epoch is not None and rank == 0:
        for e, metrics in enumerate(history):
            on_epoch(e, metrics)

    model: torch.nn.Module = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.startswith("cuda") else None)

    cache, cache_seconds = None, 0.0
    if cfg.trunk_cache_views and start < cfg.epochs:
        tc = time.perf_counter()
        cache = build_trunk_cache(net, data, cfg.trunk_cache_views, cfg.seed, device)
        cache_seconds = time.perf_counter() - tc

    labels_all = torch.from_numpy(data.labels.astype(np.int64))
    side_all = torch.from_numpy(data.side.astype(np.float32)) if net.cfg.side_dim else None
    scores_all = torch.from_numpy(data.scores.astype(np.float32))
    cfgm = net.cfg
    supervised = data.has_labels
    end = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    for epoch in range(start, end):
        torch.manual_seed(cfg.seed * 100003 + epoch)
        lr = cosine_lr(epoch, cfg.epochs, cfg.lr, cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        tt = losses.teacher_temperature(
            epoch, cfg.warmup_teacher_epochs, cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.repeat_times
        )
        batches = epoch_batches(data.labels, cfg.batch_size, cfg.seed, epoch, min_size=2 * world)
        if not batches:
            raise InputError(f"only {len(data.labels)} crops: need at least {2 * world} to train")
        local = [np.array_split(b, world)[rank] for b in batches]
        if cache is None:
            loader = DataLoader(
                _Views(data, local, cfgm.image_size, cfgm.crop_pct, cfg.seed, epoch),
                batch_size=None,
                shuffle=False,
                num_workers=cfg.num_workers,
                worker_init_fn=_single_threaded_worker,
            )
        else:
            pairs = cached_view_pairs(len(data.labels), cfg.trunk_cache_views, cfg.seed, epoch)
            loader = (_cached_batch(cache, pairs, idx) for idx in local)
        net.train()
        sums: dict[str, torch.Tensor] = {}
        count = torch.zeros(())
        for idx, x, m in tqdm(loader, total=len(local), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=rank != 0):
            idx = idx.long()
            side = None if side_all is None else side_all[idx].repeat(2, 1).to(device)  # the batch is view-major
            _, proj, logits = model(x.to(device), m.to(device), cached=cache is not None, side=side)
            total, parts = batch_loss(
                proj,
                logits,
                labels_all[idx].to(device),
                scores_all[idx].to(device),
                cfg,
                tt,
                cfgm.num_labeled,
                supervised,
                priors,
            )
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            n = float(len(idx))
            for k, v in parts.items():
                sums[k] = sums.get(k, 0) + v.detach().cpu().double() * n
            count += n
        packed = torch.cat([sums["cluster_heads"], torch.stack([sums[k] for k in _scalar_keys(sums)]), count[None].double()])
        packed = _all_sum(packed)
        # every rank sees the same sums and weights: all stop together
        if not torch.isfinite(packed).all() or not all(torch.isfinite(w).all() for w in net.parameters()):
            raise InputError(
                f"params.yaml: train: the loss or the weights are not finite in epoch {epoch + 1} (training diverged); "
                f"no model was saved. Lower train.lr (now {cfg.lr:g}) or train.memax_weight and run again"
            )
        h = cfgm.n_head
        total_n = float(packed[-1])
        metrics = {k: float(packed[h + i]) / total_n for i, k in enumerate(_scalar_keys(sums))}
        metrics.update({f"cluster_head{i}": float(packed[i]) / total_n for i in range(h)})
        metrics.update(lr=lr, teacher_temp=tt)
        history.append(metrics)
        if rank == 0:
            if checkpoint is not None:
                _save_checkpoint(checkpoint, net, opt, epoch + 1, history, fingerprint)
            if on_epoch is not None:
                on_epoch(epoch, metrics)
    head, agreement = 0, []
    if history:
        losses_h = [history[-1][f"cluster_head{i}"] for i in range(net.cfg.n_head)]
        if cfg.head_select == "consensus" and net.cfg.n_head > 1:
            assignments = head_assignments(net, data, device)
            agreement = head_agreement(assignments).tolist()
            head = select_consensus_head(assignments, losses_h)
        else:
            head = select_head(losses_h)
    return TrainResult(
        head=head,
        agreement=agreement,
        history=history,
        seconds=time.perf_counter() - t0,
        resumed_from=resumed_from,
        cache_seconds=cache_seconds,
    )


def _scalar_keys(sums: dict) -> list[str]:
    return sorted(k for k in sums if k != "cluster_heads")


def _cached_batch(cache: tuple[torch.Tensor, torch.Tensor], pairs: np.ndarray, idx: np.ndarray):
    toks, pms = cache
    t_idx = torch.from_numpy(idx)
    v0 = torch.from_numpy(pairs[idx, 0])
    v1 = torch.from_numpy(pairs[idx, 1])
    x = torch.cat([toks[v0, t_idx], toks[v1, t_idx]])
    m = torch.cat([pms[v0, t_idx], pms[v1, t_idx]])
    return t_idx, x, m


def _save_checkpoint(path, net, opt, epoch: int, history: list[dict], fingerprint: str) -> None:
    state = {
        "epoch": epoch,
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "history": history,
        "fingerprint": fingerprint,
    }
    save_torch(state, path)


