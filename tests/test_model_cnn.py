"""MaskGuidedCNN: a frozen pretrained CNN pooled over the anomalous region."""

import numpy as np
import pytest
import torch

from anomalyncd.config import TrainParams
from anomalyncd.io import load_torch, save_torch
from anomalyncd.model import (
    EQUAL_WEIGHT,
    MGViTClassifier,
    ModelConfig,
    appearance_weight,
    create_backbone,
    fuse,
    load_model,
    masked_attention_pool,
    save_model,
)
from anomalyncd.training import TrainData, train

FAST = dict(batch_size=6, warmup_teacher_epochs=2, trunk_cache_views=0, epochs=2)


def cnn_config(**kw) -> ModelConfig:
    base = dict(model="tf_efficientnet_lite0", image_size=64, crop_pct=0.875, mask_layers=1, grad_from_block=0, n_head=2,
                num_unlabeled=3, layers=[2, 3], proj_hidden=32, proj_dim=16)
    return ModelConfig(**{**base, **kw})


def tiny_cnn(**kw) -> MGViTClassifier:
    torch.manual_seed(0)
    cfg = cnn_config(**kw)
    return MGViTClassifier(cfg, create_backbone(cfg.model, cfg.image_size, pretrained=True, layers=cfg.layers))


def tiny_data(m: int = 12) -> TrainData:
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (m, 73, 73, 3), dtype=np.uint8)
    masks = np.zeros((m, 73, 73), np.uint8)
    masks[:, 20:50, 10:60] = 1
    return TrainData(crops, masks, rng.random(m).astype(np.float32), -np.ones(m, np.int64))


def test_tokens_outside_the_mask_cannot_change_the_pooled_feature():
    torch.manual_seed(0)
    x, logits = torch.randn(2, 6, 4), torch.randn(2, 6)
    pmask = torch.tensor([[0, 0.5, 1, 0, 0, 0.1], [1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    changed, changed_logits = x.clone(), logits.clone()
    outside = pmask == 0
    changed[outside] = torch.randn(int(outside.sum()), 4) * 100
    changed_logits[outside] = 50.0
    torch.testing.assert_close(masked_attention_pool(x, pmask, logits), masked_attention_pool(changed, pmask, changed_logits))
    # the second crop's mask covers one token: the feature is that token
    torch.testing.assert_close(masked_attention_pool(x, pmask, logits)[1], x[1, 0])


def test_a_grazing_mask_still_counts_in_proportion_to_its_coverage():
    x = torch.tensor([[[1.0], [3.0]]])
    pooled = masked_attention_pool(x, torch.tensor([[0.1, 0.3]]), torch.zeros(1, 2))
    torch.testing.assert_close(pooled, torch.tensor([[(0.1 * 1 + 0.3 * 3) / 0.4]]))


def test_an_empty_mask_pools_over_the_whole_crop():
    x, logits = torch.randn(1, 5, 3), torch.zeros(1, 5)
    torch.testing.assert_close(masked_attention_pool(x, torch.zeros(1, 5), logits), x.mean(1))
    net = tiny_cnn().eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, 64, 64), torch.zeros(2, 64, 64))[0]
    assert torch.isfinite(out).all()


def test_guided_feature_ignores_feature_map_positions_outside_the_mask():
    enc = tiny_cnn().encoder.eval()
    tokens, pmask = enc.trunk(torch.rand(1, 3, 64, 64), torch.zeros(1, 64, 64))
    pmask = torch.zeros_like(pmask)
    pmask[0, :3] = 1.0
    changed = tokens.clone()
    changed[0, 3:] = torch.randn_like(changed[0, 3:]) * 10
    with torch.no_grad():
        torch.testing.assert_close(enc.head_blocks(tokens, pmask), enc.head_blocks(changed, pmask))


def test_new_encoder_is_the_mask_weighted_mean_of_standardised_features():
    enc = tiny_cnn().encoder.eval()
    tokens, _ = enc.trunk(torch.rand(3, 3, 64, 64), torch.ones(3, 64, 64))
    pmask = torch.rand(3, tokens.shape[1])
    enc.calibrate(tokens, pmask)
    z = (tokens - enc.feat_mean) / enc.feat_std
    expected = (pmask[..., None] * z).sum(1) / pmask.sum(1, keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(enc.head_blocks(tokens, pmask), expected, atol=1e-5, rtol=1e-5)


def test_the_cnn_is_frozen_and_stays_in_eval_mode():
    net = tiny_cnn()
    net.train()
    enc = net.encoder
    assert not any(p.requires_grad for p in enc.backbone.parameters())
    assert not enc.backbone.training
    assert all(p.requires_grad for p in enc.attention.parameters())


def test_cached_trunk_gives_the_uncached_output():
    net = tiny_cnn().eval()
    x, m = torch.rand(2, 3, 64, 64), (torch.rand(2, 64, 64) > 0.5).float()
    with torch.no_grad():
        tokens, pmask = net.encoder.trunk(x, m)
        for a, b in zip(net(x, m), net(tokens, pmask, cached=True)):
            torch.testing.assert_close(a, b)


def test_training_with_the_trunk_cache_is_deterministic_and_keeps_the_cnn():
    cfg = TrainParams(**{**FAST, "trunk_cache_views": 3})
    nets = [tiny_cnn() for _ in range(2)]
    before = {k: v.clone() for k, v in nets[0].encoder.backbone.state_dict().items()}
    results = [train(net, tiny_data(), cfg) for net in nets]
    for k, v in nets[0].state_dict().items():
        torch.testing.assert_close(v, nets[1].state_dict()[k], rtol=0, atol=0, msg=k)
    for k, v in nets[0].encoder.backbone.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)  # frozen, batch-norm statistics too
    assert results[0].history == results[1].history
    assert not torch.equal(nets[0].encoder.attention.weight, torch.zeros_like(nets[0].encoder.attention.weight))


def test_resumed_cnn_run_reaches_the_same_result(tmp_path):
    cfg = TrainParams(**FAST)
    full = tiny_cnn()
    train(full, tiny_data(), cfg, checkpoint=tmp_path / "a.pt", fingerprint="x")
    part = tiny_cnn()
    train(part, tiny_data(), cfg, checkpoint=tmp_path / "b.pt", fingerprint="x", stop_after=1)
    resumed = tiny_cnn()
    res = train(resumed, tiny_data(), cfg, checkpoint=tmp_path / "b.pt", resume=True, fingerprint="x")
    assert res.resumed_from == 1
    for k, v in full.state_dict().items():
        torch.testing.assert_close(v, resumed.state_dict()[k], rtol=0, atol=0, msg=k)


def test_saved_cnn_model_reloads_without_the_weights_package(tmp_path, monkeypatch):
    net = tiny_cnn()
    train(net, tiny_data(), TrainParams(**{**FAST, "epochs": 1}))
    save_model(tmp_path / "m.pt", net.eval(), head=0)
    from anomalyncd import weights

    monkeypatch.setattr(weights, "load_packaged", lambda *a: pytest.fail("weights come from the model file"))
    loaded, _ = load_model(tmp_path / "m.pt")
    x, m = torch.rand(2, 3, 64, 64), torch.ones(2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, m)[2], net(x, m)[2])


def test_empty_layers_for_a_cnn_is_an_input_error():
    from anomalyncd.io import InputError

    with pytest.raises(InputError, match="train.layers"):
        create_backbone("tf_efficientnet_lite0", 64, layers=[])


# -- tune_last_stage: the CNN's last stage fine-tuned, the trunk cache kept for the rest --------


def test_a_tuned_last_stage_starts_from_the_frozen_cnn_and_its_trunk_stops_before_it():
    frozen, tuned = tiny_cnn().eval(), tiny_cnn(tune_last_stage=True).eval()
    enc = tuned.encoder
    # layers [2, 3] meet on the grid of layer 2 (block 2): blocks 3 and 4 make layer 3 and train
    assert enc.tune_from == 3
    trainable = {n for n, p in enc.backbone.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in enc.backbone.named_parameters() if n.startswith(("blocks.3.", "blocks.4."))}
    assert not any(p.requires_grad for p in enc.frozen_tail.parameters())
    x, m = torch.rand(2, 3, 64, 64), (torch.rand(2, 64, 64) > 0.5).float()
    with torch.no_grad():
        whole, pmask = frozen.encoder.trunk(x, m)
        part, pmask_t = enc.trunk(x, m)
        assert part.shape[-1] == 40  # layer 2's channels only
        torch.testing.assert_close(pmask_t, pmask)
        # the frozen CNN's trunk runs its batch norms folded, the tuned blocks run theirs as
        # they train: the same up to float rounding
        torch.testing.assert_close(enc.full_tokens(part), whole, rtol=1e-4, atol=1e-5 * float(whole.abs().max()))
        # the untrained features: the same model output and baseline as the frozen CNN's
        for a, b in zip(frozen(x, m), tuned(x, m)):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(enc.pooled_trunk(part, pmask), frozen.encoder.pooled_trunk(whole, pmask))


def test_a_tuned_last_stage_trains_only_its_blocks_and_keeps_every_batch_norm_statistic():
    cfg = TrainParams(**{**FAST, "trunk_cache_views": 3, "lr": 0.05})
    net = tiny_cnn(tune_last_stage=True)
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    train(net, tiny_data(), cfg)
    after = net.encoder.state_dict()
    tuned_weights = [k for k in after if k.startswith(("backbone.blocks.3.", "backbone.blocks.4.")) and "running" not in k
                     and "num_batches" not in k]
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    # the channel standardisation is fitted on the crops before training; the rest is trained
    trained_here = {"feat_mean", "feat_std", "attention.weight", "attention.bias"} | {k for k in after if k.startswith("adapters.")}
    assert moved <= set(tuned_weights) | trained_here
    assert any(k in moved for k in tuned_weights)
    # the frozen blocks, the untrained copy of the tuned ones, every BN statistic stay as loaded
    for k in after:
        if k not in moved:
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, msg=k)
    assert not any("running" in k or "frozen_tail" in k or "num_batches" in k for k in moved)
    # after training the cached path still equals the uncached forward
    net.eval()
    x, m = torch.rand(2, 3, 64, 64), (torch.rand(2, 64, 64) > 0.5).float()
    with torch.no_grad():
        for a, b in zip(net(x, m), net(*net.encoder.trunk(x, m), cached=True)):
            torch.testing.assert_close(a, b)


def test_backbone_lr_scale_zero_keeps_the_tuned_blocks_where_they_were():
    net = tiny_cnn(tune_last_stage=True)
    before = {k: v.clone() for k, v in net.encoder.backbone.state_dict().items()}
    train(net, tiny_data(), TrainParams(**{**FAST, "backbone_lr_scale": 0.0}))
    for k, v in net.encoder.backbone.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)


def test_resumed_run_with_a_tuned_last_stage_reaches_the_same_weights(tmp_path):
    cfg = TrainParams(**{**FAST, "trunk_cache_views": 2, "backbone_lr_scale": 0.5})
    full = tiny_cnn(tune_last_stage=True)
    train(full, tiny_data(), cfg, checkpoint=tmp_path / "a.pt", fingerprint="x")
    train(tiny_cnn(tune_last_stage=True), tiny_data(), cfg, checkpoint=tmp_path / "b.pt", fingerprint="x", stop_after=1)
    resumed = tiny_cnn(tune_last_stage=True)
    assert train(resumed, tiny_data(), cfg, checkpoint=tmp_path / "b.pt", resume=True, fingerprint="x").resumed_from == 1
    for k, v in full.state_dict().items():
        torch.testing.assert_close(v, resumed.state_dict()[k], rtol=0, atol=0, msg=k)
    # and the saved model reloads with its tuned blocks
    save_model(tmp_path / "m.pt", full.eval(), head=0)
    loaded, _ = load_model(tmp_path / "m.pt")
    x, m = torch.rand(2, 3, 64, 64), torch.ones(2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, m)[2], full(x, m)[2])


def test_tune_last_stage_without_a_stage_to_tune_is_an_input_error():
    from anomalyncd.io import InputError

    with pytest.raises(InputError, match="train.tune_last_stage"):
        tiny_cnn(tune_last_stage=True, layers=[4])  # one layer: nothing after the grid's layer
    with pytest.raises(InputError, match="train.tune_last_stage"):
        MGViTClassifier(ModelConfig(model="vit_tiny_patch16_224", image_size=32, crop_pct=0.875, mask_layers=1,
                                    grad_from_block=11, n_head=1, num_unlabeled=2, tune_last_stage=True))


def test_the_trunk_folds_the_batch_norms_of_the_weights_loaded_last():
    a, b = tiny_cnn(), tiny_cnn()
    with torch.no_grad():
        for m in b.encoder.backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(0.5)
    x, m = torch.rand(2, 3, 64, 64), torch.ones(2, 64, 64)
    with torch.no_grad():
        before, _ = a.encoder.trunk(x, m)  # builds a's folded copy
        a.load_state_dict(b.state_dict())
        after, _ = a.encoder.trunk(x, m)
        expected, _ = b.encoder.trunk(x, m)
    assert not torch.allclose(before, expected)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)
    assert a.state_dict().keys() == b.state_dict().keys()  # the copy is not part of the saved model


def side_data(m: int = 12, s: int = 5) -> TrainData:
    """tiny_data with a unit descriptor per crop beside it."""
    d = tiny_data(m)
    side = np.random.default_rng(1).normal(size=(m, s)).astype(np.float32)
    return TrainData(d.crops, d.masks, d.scores, d.labels, side / np.linalg.norm(side, axis=1, keepdims=True))


def test_the_fusion_starts_with_both_halves_weighing_alike_exactly():
    f, s = torch.randn(4, 6), torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    alike = torch.cat([torch.nn.functional.normalize(f, dim=-1), s], dim=1)
    assert torch.equal(fuse(f, s, torch.tensor(EQUAL_WEIGHT)), alike)
    assert torch.equal(fuse(f, s), alike)
    assert fuse(f, None, torch.tensor(0.3)) is f and fuse(f, s[:, :0], torch.tensor(0.3)) is f
    leaning = fuse(f, s, torch.tensor(0.3))  # below pi/4: the appearance half weighs more
    assert (leaning[:, :6].norm(dim=1) > leaning[:, 6:].norm(dim=1)).all()
    assert appearance_weight(torch.tensor(EQUAL_WEIGHT)) == pytest.approx(0.5) and appearance_weight(None) is None


def test_training_learns_the_weight_of_the_descriptors_and_the_model_file_keeps_it(tmp_path):
    net = tiny_cnn(side_dim=5)
    assert tiny_cnn().fuse_angle is None  # no descriptors: nothing to weigh
    train(net, side_data(), TrainParams(**FAST))
    assert net.fuse_angle.item() != pytest.approx(EQUAL_WEIGHT, abs=1e-6)
    save_model(tmp_path / "m.pt", net.eval(), head=0)
    loaded, _ = load_model(tmp_path / "m.pt")
    assert loaded.fuse_angle.item() == net.fuse_angle.item()


def test_a_model_file_from_before_the_learned_weight_loads_with_equal_weights(tmp_path):
    net = tiny_cnn(side_dim=5).eval()
    save_model(tmp_path / "m.pt", net, head=0)
    payload = load_torch(tmp_path / "m.pt", "")
    del payload["state_dict"]["fuse_angle"]
    save_torch(payload, tmp_path / "old.pt")
    old, _ = load_model(tmp_path / "old.pt")
    assert old.fuse_angle.item() == pytest.approx(EQUAL_WEIGHT)
    x, m, s = torch.rand(2, 3, 64, 64), torch.ones(2, 64, 64), torch.eye(5)[:2]
    with torch.no_grad():
        torch.testing.assert_close(old(x, m, side=s)[2], net(x, m, side=s)[2])


def test_a_resumed_run_with_descriptors_reaches_the_same_weights_and_fusion_angle(tmp_path):
    cfg = TrainParams(**FAST)
    full = tiny_cnn(side_dim=5)
    train(full, side_data(), cfg, checkpoint=tmp_path / "a.pt", fingerprint="x")
    part = tiny_cnn(side_dim=5)
    train(part, side_data(), cfg, checkpoint=tmp_path / "b.pt", fingerprint="x", stop_after=1)
    resumed = tiny_cnn(side_dim=5)
    assert train(resumed, side_data(), cfg, checkpoint=tmp_path / "b.pt", resume=True, fingerprint="x").resumed_from == 1
    for k, v in full.state_dict().items():
        torch.testing.assert_close(v, resumed.state_dict()[k], rtol=0, atol=0, msg=k)
    assert resumed.fuse_angle.item() == full.fuse_angle.item() != pytest.approx(EQUAL_WEIGHT, abs=1e-6)
