"""Losses of mask-guided representation learning (AnomalyNCD, https://arxiv.org/abs/2410.14379; the
self-distillation, me-max and contrastive terms follow SimGCD, https://arxiv.org/abs/2211.11727),
pure functions on tensors.

Conventions: a batch holds two augmented views of B crops stacked view-major, i.e. rows
``0..B-1`` are view 0 and rows ``B..2B-1`` view 1 of the same crops. Logits are cosine
similarities from :class:`anomalyncd.model.ClusterHead`; ``K = num_labeled + num_unlabeled``
outputs with the base (labelled) classes first.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

STUDENT_TEMP = 0.1
SUPCON_TEMP = 0.07


def info_nce(proj: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Unsupervised contrastive loss between the two views.

    proj: (2B, P) projections, view-major. Each row's positive is the same crop's other view;
    the other 2B - 2 rows are negatives. Cosine similarities / ``temperature``; mean over 2B.
    """
    n = proj.shape[0]
    b = n // 2
    z = F.normalize(proj, dim=-1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(b, n), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, target)


def supcon(proj: torch.Tensor, labels: torch.Tensor, temperature: float = SUPCON_TEMP) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al.) over both views of labelled crops.

    proj: (2B, P) view-major; labels: (B,) class of each crop. Positives of a row are every
    other row with the same label (its other view included). Mean over rows.
    """
    n = proj.shape[0]
    z = F.normalize(proj, dim=-1)
    lab = torch.cat([labels, labels])
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    pos = (lab[:, None] == lab[None, :]) & ~self_mask
    sim = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    log_prob = log_prob.masked_fill(self_mask, 0.0)
    return -((log_prob * pos).sum(1) / pos.sum(1).clamp(min=1)).mean()


def teacher_temperature(
    epoch: int, warmup_epochs: int, start: float, end: float, repeat_times: int
) -> float:
    """Teacher temperature at ``epoch`` (0-based).

    Goes from ``start`` to ``end`` linearly over the first ``warmup_epochs`` epochs in
    ceil(warmup_epochs / repeat_times) steps held for ``repeat_times`` epochs each (the last
    step, ``end``, for what remains of the warm-up), then stays at ``end``. When
    ``repeat_times`` divides ``warmup_epochs`` this is the authors' schedule; otherwise theirs
    has int(warmup_epochs / repeat_times) steps, so its list is shorter than the training and
    fails before the last epochs (e.g. 48 entries for 30 / 4 and 50 epochs).
    """
    if epoch >= warmup_epochs or warmup_epochs <= 0:
        return float(end)
    steps = max(1, math.ceil(warmup_epochs / max(1, repeat_times)))
    return float(np.linspace(start, end, steps)[epoch // max(1, repeat_times)])


def teacher_targets(
    logits: torch.Tensor,
    teacher_temp: float,
    num_labeled: int,
    unlabeled: torch.Tensor,
    normal_weight: torch.Tensor | None = None,
    normal_slot: int | None = None,
) -> torch.Tensor:
    """Sharpened, detached teacher distributions.

    logits: (N, K); unlabeled: bool (N,). For unlabelled rows the base outputs are zeroed and
    the novel ones renormalised. ``normal_weight`` (N,) in [0, 1], with ``normal_slot``, mixes
    in a one-hot on the normal output: ``w * onehot + (1 - w) * teacher`` (pseudo-label
    correction). Returns (N, K), rows summing to 1.
    """
    t = F.softmax(logits.detach() / teacher_temp, dim=-1)
    if num_labeled:
        keep = torch.ones_like(t)
        keep[unlabeled, :num_labeled] = 0
        t = t * keep
        t = t / t.sum(-1, keepdim=True)
    if normal_weight is not None and normal_slot is not None:
        onehot = torch.zeros_like(t)
        onehot[:, normal_slot] = 1.0
        w = (normal_weight * unlabeled.float())[:, None]
        t = w * onehot + (1 - w) * t
    return t


def correction_weight(scores: torch.Tensor, anomaly_thred: float) -> torch.Tensor:
    """Pseudo-label correction weight ``max(0, anomaly_thred - score)`` per crop. (N,)"""
    return (anomaly_thred - scores).clamp(min=0)


def distillation(
    logits: torch.Tensor, teacher: torch.Tensor, rows: torch.Tensor, student_temp: float = STUDENT_TEMP
) -> torch.Tensor:
    """Self-distillation: cross-entropy of each view's student against the other view's teacher.

    logits: (2B, K) student logits, view-major; teacher: (2B, K) from :func:`teacher_targets`
    on the same logits; rows: bool (B,) crops that take part. Mean over the 2 * rows.sum() terms.
    """
    b = logits.shape[0] // 2
    logp = F.log_softmax(logits / student_temp, dim=-1)
    t_swapped = torch.cat([teacher[b:], teacher[:b]])
    ce = -(t_swapped * logp).sum(-1)
    r = torch.cat([rows, rows])
    if not bool(r.any()):
        return logits.sum() * 0.0
    return ce[r].mean()


def mean_entropy_penalty(
    logits: torch.Tensor, student_temp: float = STUDENT_TEMP, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """``KL(mean prediction || prior)``: zero when the batch uses the outputs in the prior's
    proportions.

    logits: (N, K); prior: (K,) positive, summing to 1, or None for the uniform prior, where the
    penalty is ``log K - H(mean prediction)`` (the me-max term: minimising it maximises the
    entropy of the batch-average prediction). A non-uniform prior (the class sizes expected)
    lets small classes stay small instead of being spread toward equal sizes.
    No rows (N = 0): no penalty.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    avg = F.softmax(logits / student_temp, dim=-1).mean(0)
    entropy = -(avg * torch.log(avg.clamp(min=1e-12))).sum()
    if prior is None:
        return math.log(avg.numel()) - entropy
    return -entropy - (avg * torch.log(prior.to(avg))).sum()


def class_prior(labels: np.ndarray, k: int, num_labeled: int = 0) -> np.ndarray:
    """Expected output proportions from a partition of the unlabelled crops: float64 (num_labeled + k,).

    labels: int (M,) in [0, k). The novel outputs get the partition's class sizes, smoothed by
    one crop each ((n_c + 1) / (M + k), so no class has probability 0), scaled to the novel
    outputs' share ``k / (num_labeled + k)``; each base output keeps ``1 / (num_labeled + k)``.
    Equal class sizes give the uniform prior.
    """
    counts = np.bincount(np.asarray(labels, np.int64), minlength=k)[:k].astype(np.float64)
    novel = (counts + 1) / (counts.sum() + k)
    total = num_labeled + k
    return np.concatenate([np.full(num_labeled, 1.0 / total), novel * k / total])


def supervised_ce(logits: torch.Tensor, labels: torch.Tensor, student_temp: float = STUDENT_TEMP) -> torch.Tensor:
    """Cross-entropy of labelled rows' logits / 0.1. logits: (N, K); labels: (N,)."""
    return F.cross_entropy(logits / student_temp, labels)
