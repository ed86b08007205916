"""MGViT: a timm Vision Transformer whose [CLS] token looks only at the anomalous region.

Mask guidance adds no parameters. In the last ``mask_layers`` blocks the attention row of the
[CLS] query is restricted to the prefix tokens (the [CLS] token itself, and register tokens
when the model has them) and to the patches whose patch-mask value is at least 0.5; every
other query attends as usual. The patch mask is the crop mask average-pooled over each patch.
The restriction is passed to timm's own blocks as a boolean attention mask, so the fused
``scaled_dot_product_attention`` path is used and any timm/DINO state dict loads unchanged
into :attr:`MGViT.backbone`.

The classification head (:class:`ClusterHead`) holds a projection MLP for the contrastive
loss and ``n_head`` cosine classifiers: weight-normalised linear layers without bias whose
weight norm is fixed to 1, applied to the L2-normalised feature.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .io import InputError, save_torch


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network from a saved state dict.

    ``num_labeled`` base classes come first in the outputs, then ``num_unlabeled`` novel
    classes; when ``has_normal`` the first novel output is the normal slot.
    """

    model: str = "vit_tiny_patch16_224"
    image_size: int = 64
    mask_layers: int = 1
    grad_from_block: int = 11
    n_head: int = 4
    num_labeled: int = 0
    num_unlabeled: int = 4
    has_normal: bool = False
    proj_hidden: int = 2048
    proj_dim: int = 256

    @property
    def num_outputs(self) -> int:
        return self.num_labeled + self.num_unlabeled

    @property
    def normal_slot(self) -> int | None:
        """Index of the normal output, or None when no defect-free images are classified."""
        return self.num_labeled if self.has_normal else None

    def to_dict(self) -> dict:
        return asdict(self)


def create_backbone(
    name: str, image_size: int, pretrained: bool = False, checkpoint: str = ""
) -> nn.Module:
    """A timm ViT without classifier for ``image_size`` inputs.

    ``pretrained`` loads timm's weights for ``name`` (downloaded the usual timm way);
    ``checkpoint`` loads a local timm/DINO state dict file instead. Position embeddings are
    resampled by timm when ``image_size`` differs from the checkpoint's.
    """
    kwargs: dict = {"img_size": image_size, "num_classes": 0}
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise InputError(f"params.yaml: train.checkpoint {checkpoint!r} is not a file; set it to '' or fix the path")
        kwargs["pretrained_cfg_overlay"] = {"file": checkpoint}
        pretrained = True
    if not timm.is_model(name.split(".")[0]):
        raise InputError(f"params.yaml: train.model {name!r} is not a timm model name")
    try:
        net = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, ConnectionError) as e:
        raise InputError(
            f"params.yaml: could not download the weights of train.model {name!r} ({e}); "
            "offline, set train.checkpoint to a local weights file or train.pretrained: false"
        ) from e
    if not hasattr(net, "blocks") or getattr(net, "cls_token", None) is None:
        raise InputError(
            f"params.yaml: train.model {name!r} is not a ViT with a [CLS] token; "
            "use a timm VisionTransformer such as vit_base_patch8_224.dino"
        )
    return net


def patch_mask(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Average-pool a crop mask over each patch.

    mask: float (B, H, W) in [0, 1]. Returns float (B, H/p * W/p) in row-major patch order.
    """
    pooled = F.avg_pool2d(mask[:, None].float(), kernel_size=patch_size, stride=patch_size)
    return pooled.flatten(1)


def cls_attention_mask(pmask: torch.Tensor, num_prefix: int, threshold: float = 0.5) -> torch.Tensor:
    """Boolean attention mask (True = may attend) restricting only the [CLS] query row.

    pmask: float (B, P) patch-mask values. Returns bool (B, 1, N, N) with N = num_prefix + P:
    row 0 allows the prefix tokens and the patches with ``pmask >= threshold``; all other rows
    allow everything. An empty mask leaves [CLS] attending to the prefix tokens only.
    """
    b, p = pmask.shape
    n = num_prefix + p
    allow = torch.ones(b, 1, n, n, dtype=torch.bool, device=pmask.device)
    allow[:, 0, 0, num_prefix:] = pmask >= threshold
    return allow


class MGViT(nn.Module):
    """Mask-guided ViT: ``forward(images, masks) -> normed [CLS] features (B, D)``.

    images: float (B, 3, S, S) normalised; masks: float (B, S, S) in [0, 1].
    The forward pass is split at ``grad_from_block`` so that the frozen part (``trunk``) can be
    run once and cached (``head_blocks``) when training with a frozen-trunk cache.
    """

    def __init__(self, backbone: nn.Module, mask_layers: int, grad_from_block: int):
        super().__init__()
        depth = len(backbone.blocks)
        if not 0 <= mask_layers <= depth:
            raise InputError(f"params.yaml: train.mask_layers={mask_layers} must be in 0..{depth} (model depth)")
        if not 0 <= grad_from_block <= depth:
            raise InputError(
                f"params.yaml: train.grad_from_block={grad_from_block} must be in 0..{depth} (model depth)"
            )
        self.backbone = backbone
        self.depth = depth
        self.mask_from = depth - mask_layers
        self.grad_from_block = grad_from_block
        self.patch_size = _patch_size(backbone)
        self.num_prefix = int(backbone.num_prefix_tokens)
        self.embed_dim = int(backbone.embed_dim)
        self.freeze()

    def freeze(self) -> None:
        """Freeze everything before block ``grad_from_block``; later blocks and the final norm train."""
        for name, param in self.backbone.named_parameters():
            if name.startswith("blocks."):
                trainable = int(name.split(".")[1]) >= self.grad_from_block
            elif name.startswith(("norm.", "fc_norm.")):
                trainable = True
            else:  # embeddings, tokens, norm_pre
                trainable = self.grad_from_block == 0
            param.requires_grad_(trainable)

    def _blocks(self, x: torch.Tensor, pmask: torch.Tensor, start: int, end: int) -> torch.Tensor:
        allow = None
        for i in range(start, end):
            if i >= self.mask_from:
                if allow is None:
                    allow = cls_attention_mask(pmask, self.num_prefix)
                x = self.backbone.blocks[i](x, attn_mask=allow)
            else:
                x = self.backbone.blocks[i](x)
        return x

    def trunk(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen part: tokens after block ``grad_from_block - 1`` (B, N, D) and patch mask (B, P)."""
        bb = self.backbone
        pmask = patch_mask(masks, self.patch_size)
        x = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(images))))
        return self._blocks(x, pmask, 0, self.grad_from_block), pmask

    def head_blocks(self, tokens: torch.Tensor, pmask: torch.Tensor) -> torch.Tensor:
        """Trainable part: the remaining blocks, final norm, [CLS] token (B, D)."""
        x = self._blocks(tokens, pmask, self.grad_from_block, self.depth)
        return self.backbone.norm(x)[:, 0]

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        tokens, pmask = self.trunk(images, masks)
        return self.head_blocks(tokens, pmask)


def _patch_size(backbone: nn.Module) -> int:
    ps = backbone.patch_embed.patch_size
    ps = ps if isinstance(ps, int) else ps[0]
    return int(ps)


class ClusterHead(nn.Module):
    """Projection MLP and ``n_head`` cosine classifiers on a feature of size ``dim``.

    forward(features (B, D)) -> (projections (B, proj_dim), logits (n_head, B, K)).
    The logits are cosines in [-1, 1]: weight-normalised rows (norm fixed to 1) times the
    L2-normalised feature.
    """

    def __init__(self, dim: int, num_outputs: int, n_head: int, proj_hidden: int = 2048, proj_dim: int = 256):
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(dim, proj_hidden),
            nn.GELU(),
            nn.Linear(proj_hidden, proj_hidden),
            nn.GELU(),
            nn.Linear(proj_hidden, proj_dim),
        )
        self.weight = nn.Parameter(torch.empty(n_head, num_outputs, dim))
        for m in self.projector:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.weight, std=0.02)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        w = F.normalize(self.weight, dim=-1)
        return torch.einsum("bd,hkd->hbk", F.normalize(features, dim=-1), w)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.projector(features), self.logits(features)


class MGViTClassifier(nn.Module):
    """MGViT + ClusterHead, built from a :class:`ModelConfig`.

    forward(images, masks) -> (features (B, D), projections (B, proj_dim), logits (n_head, B, K)).
    """

    def __init__(self, cfg: ModelConfig, backbone: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        backbone = backbone if backbone is not None else create_backbone(cfg.model, cfg.image_size)
        self.encoder = MGViT(backbone, cfg.mask_layers, cfg.grad_from_block)
        self.head = ClusterHead(self.encoder.embed_dim, cfg.num_outputs, cfg.n_head, cfg.proj_hidden, cfg.proj_dim)

    def forward(self, x: torch.Tensor, masks: torch.Tensor, cached: bool = False):
        """``cached=False``: x images (B, 3, S, S), masks (B, S, S). ``cached=True``: x trunk
        tokens (B, N, D) and masks patch masks (B, P) from :meth:`MGViT.trunk`."""
        feats = self.encoder.head_blocks(x, masks) if cached else self.encoder(x, masks)
        proj, logits = self.head(feats)
        return feats, proj, logits


MODEL_FORMAT = "anomalyncd-mgvit-1"


def save_model(path, net: MGViTClassifier, head: int, extra: dict | None = None) -> None:
    """Write the trained network, its config and the selected head to ``path`` atomically."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    payload = {"format": MODEL_FORMAT, "config": net.cfg.to_dict(), "head": int(head), "state_dict": state}
    payload.update(extra or {})
    save_torch(payload, path)


def load_model(path, device: str | torch.device = "cpu") -> tuple[MGViTClassifier, dict]:
    """Rebuild a network saved by :func:`save_model` (no download: weights come from the file).

    Returns the network in eval mode on ``device`` and the saved payload without weights.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: model not found; run the train stage first (dvc repro train)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a damaged file
        raise InputError(f"{path}: not a readable model file ({e}); rerun the train stage (dvc repro train)") from e
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise InputError(f"{path}: not a model written by the anomalyncd train stage")
    cfg = ModelConfig(**payload["config"])
    net = MGViTClassifier(cfg, create_backbone(cfg.model, cfg.image_size))
    net.load_state_dict(payload.pop("state_dict"))
    return net.to(device).eval(), payload
