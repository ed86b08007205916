"""MGViT: mask guidance on the [CLS] query row, frozen blocks, heads, saving."""

import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from anomalyncd.io import InputError
from anomalyncd.model import (
    ClusterHead,
    MGViT,
    MGViTClassifier,
    ModelConfig,
    cls_attention_mask,
    create_backbone,
    load_model,
    patch_mask,
    save_model,
)


def tiny_vit(depth: int = 1) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=0).eval()


def quadrant_mask() -> torch.Tensor:
    """Mask on the top-left 16x16 pixels: exactly patches (0,0), (0,1), (1,0), (1,1)."""
    m = torch.zeros(1, 32, 32)
    m[:, :16, :16] = 1
    return m


def test_patch_mask_is_the_mean_of_each_patch():
    m = torch.zeros(1, 16, 16)
    m[0, :8, :4] = 1  # half of patch 0
    m[0, 8:, 8:] = 1  # all of patch 3
    np.testing.assert_allclose(patch_mask(m, 8).numpy(), [[0.5, 0.0, 0.0, 1.0]])


def test_attention_mask_restricts_only_the_cls_row():
    allow = cls_attention_mask(torch.tensor([[0.2, 0.5, 0.9]]), num_prefix=1)
    assert allow.shape == (1, 1, 4, 4)
    assert allow[0, 0, 0].tolist() == [True, False, True, True]
    assert allow[0, 0, 1:].all()


def test_cls_output_ignores_pixels_outside_the_mask():
    # one block, masked: with more blocks the patch tokens (which attend everywhere) would
    # carry outside pixels into the [CLS] token of the next block, by design
    enc = MGViT(tiny_vit(depth=1), mask_layers=1, grad_from_block=0).eval()
    x = torch.randn(1, 3, 32, 32)
    changed = x.clone()
    changed[:, :, 16:, :] = torch.randn(1, 3, 16, 32)  # everything outside the quadrant
    changed[:, :, :16, 16:] = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(enc(x, quadrant_mask()), enc(changed, quadrant_mask()), rtol=0, atol=1e-6)


def test_cls_output_changes_with_pixels_inside_the_mask():
    enc = MGViT(tiny_vit(depth=1), mask_layers=1, grad_from_block=0).eval()
    x = torch.randn(1, 3, 32, 32)
    changed = x.clone()
    changed[:, :, :8, :8] += 1.0
    with torch.no_grad():
        assert (enc(x, quadrant_mask()) - enc(changed, quadrant_mask())).abs().max() > 1e-3


def test_unmasked_layers_see_the_whole_crop():
    enc = MGViT(tiny_vit(depth=1), mask_layers=0, grad_from_block=0).eval()
    x = torch.randn(1, 3, 32, 32)
    changed = x.clone()
    changed[:, :, 16:, 16:] += 1.0
    with torch.no_grad():
        assert (enc(x, quadrant_mask()) - enc(changed, quadrant_mask())).abs().max() > 1e-3


def test_empty_mask_leaves_cls_attending_to_itself():
    enc = MGViT(tiny_vit(depth=2), mask_layers=2, grad_from_block=0).eval()
    empty = torch.zeros(1, 32, 32)
    with torch.no_grad():
        a = enc(torch.randn(1, 3, 32, 32), empty)
        b = enc(torch.randn(1, 3, 32, 32), empty)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_timm_state_dict_loads_unchanged_and_full_mask_matches_timm():
    torch.manual_seed(1)
    ref = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0).eval()
    bb = create_backbone("vit_tiny_patch16_224", 32)
    bb.load_state_dict(ref.state_dict(), strict=True)
    enc = MGViT(bb, mask_layers=12, grad_from_block=12).eval()
    x = torch.rand(2, 3, 32, 32)  # images in [0, 1]: the encoder applies the model's own mean and std
    mean = torch.tensor(ref.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(ref.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(enc(x, torch.ones(2, 32, 32)), ref.forward_features((x - mean) / std)[:, 0])


def trainable(enc: MGViT) -> set[str]:
    return {n for n, p in enc.backbone.named_parameters() if p.requires_grad}


def test_only_the_blocks_from_grad_from_block_train():
    enc = MGViT(tiny_vit(depth=3), mask_layers=1, grad_from_block=2)
    names = [n for n, _ in enc.backbone.named_parameters()]
    assert trainable(enc) == {n for n in names if n.startswith("blocks.2.")}
    assert "norm.weight" not in trainable(enc)  # the final norm stays as loaded, as the authors'


def test_grad_from_block_zero_trains_every_block_but_not_the_embeddings_or_final_norm():
    enc = MGViT(tiny_vit(depth=2), mask_layers=1, grad_from_block=0)
    names = [n for n, _ in enc.backbone.named_parameters()]
    assert trainable(enc) == {n for n in names if n.startswith("blocks.")}


def test_vit_small_trains_exactly_its_last_block():
    enc = MGViT(timm.create_model("vit_small_patch16_224", num_classes=0), mask_layers=1, grad_from_block=11)
    n_trainable = sum(p.numel() for p in enc.parameters() if p.requires_grad)
    assert n_trainable == sum(p.numel() for p in enc.backbone.blocks[11].parameters())


def test_out_of_range_mask_layers_is_an_input_error():
    with pytest.raises(InputError, match="mask_layers"):
        MGViT(tiny_vit(depth=2), mask_layers=3, grad_from_block=0)


def test_head_logits_are_cosines_with_unit_weight_norm():
    head = ClusterHead(dim=8, num_outputs=3, n_head=2, proj_hidden=16, proj_dim=4)
    f = torch.randn(5, 8)
    proj, logits = head(f)
    assert proj.shape == (5, 4) and logits.shape == (2, 5, 3)
    assert logits.abs().max() <= 1 + 1e-6
    with torch.no_grad():
        head.weight.mul_(7.0)  # the norm of each class vector does not matter
        torch.testing.assert_close(head(f * 3)[1], logits)


def test_save_and_load_reproduce_the_outputs(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(model="vit_tiny_patch16_224", image_size=32, crop_pct=0.875, mask_layers=2, grad_from_block=11, n_head=2, num_unlabeled=3)
    net = MGViTClassifier(cfg).eval()
    save_model(tmp_path / "m.pt", net, head=1, extra={"class_names": ["a"]})
    loaded, info = load_model(tmp_path / "m.pt")
    x, m = torch.randn(2, 3, 32, 32), torch.ones(2, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, m)[2], net(x, m)[2])
    assert info["head"] == 1 and info["class_names"] == ["a"] and loaded.cfg == cfg


def test_loading_a_missing_model_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="train stage"):
        load_model(tmp_path / "none.pt")


def test_loading_a_truncated_model_is_an_input_error(tmp_path):
    cfg = ModelConfig(model="vit_tiny_patch16_224", image_size=32, crop_pct=0.875, mask_layers=1, grad_from_block=11, n_head=1, num_unlabeled=2)
    save_model(tmp_path / "m.pt", MGViTClassifier(cfg), head=0)
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "m.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="m.pt: damaged .*dvc repro train"):
        load_model(tmp_path / "m.pt")


def test_predict_crops_gives_novel_probabilities_of_every_head(tmp_path):
    from anomalyncd.inference import predict_crops

    torch.manual_seed(0)
    cfg = ModelConfig(model="vit_tiny_patch16_224", image_size=32, crop_pct=0.875, mask_layers=1, grad_from_block=11, n_head=3, num_labeled=2, num_unlabeled=3)
    save_model(tmp_path / "m.pt", MGViTClassifier(cfg), head=2)
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (5, 36, 36, 3), dtype=np.uint8)
    masks = np.ones((5, 36, 36), np.uint8)
    ps = predict_crops(tmp_path / "m.pt", crops, masks, device="cpu", batch_size=2)
    assert ps.probs.shape == ps.logits.shape == (5, 3, 5) and ps.features.shape == (5, 192)
    assert ps.head == 2
    np.testing.assert_array_equal(ps.probs[..., :2], 0)  # base classes zeroed
    np.testing.assert_allclose(ps.probs.sum(-1), 1, atol=1e-5)  # novel ones renormalised
    again = predict_crops(tmp_path / "m.pt", crops, masks, device="cpu", batch_size=5)
    np.testing.assert_allclose(again.probs, ps.probs, atol=1e-6)  # batching does not matter


def test_local_checkpoint_file_loads_with_position_embeddings_resampled(tmp_path):
    torch.manual_seed(2)
    ref = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0)
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    same = create_backbone("vit_tiny_patch16_224", 64, checkpoint=str(tmp_path / "vit.pth"))
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in same.state_dict().items())
    smaller = create_backbone("vit_tiny_patch16_224", 32, checkpoint=str(tmp_path / "vit.pth"))
    assert smaller.pos_embed.shape == (1, 5, 192)
    assert torch.equal(smaller.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)


def test_unknown_model_name_is_an_input_error():
    with pytest.raises(InputError, match="train.model"):
        create_backbone("not_a_vit_at_all", 32)
