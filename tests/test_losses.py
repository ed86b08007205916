"""Each loss on inputs small enough to check by hand."""

import math

import numpy as np
import pytest
import torch

from anomalyncd import losses

E = math.e


def two_crops_two_views() -> torch.Tensor:
    """View-major projections: crop 0 -> e1 in both views, crop 1 -> e2 in both views."""
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    return torch.stack([e1, e2, e1, e2])


def test_info_nce_matches_hand_computation():
    # row 0: similarities to rows 1, 2, 3 are 0, 1, 0 and the positive is row 2
    expected = math.log(E + 2) - 1
    assert losses.info_nce(two_crops_two_views(), temperature=1.0).item() == pytest.approx(expected)


def test_info_nce_is_lower_when_views_agree():
    agree = losses.info_nce(two_crops_two_views())
    swapped = losses.info_nce(two_crops_two_views()[[0, 1, 3, 2]])
    assert agree < swapped


def test_supcon_with_one_class_matches_hand_computation():
    # every other row is a positive: mean log-prob of similarities (0, 1, 0) under log(2 + e)
    expected = math.log(2 + E) - 1 / 3
    got = losses.supcon(two_crops_two_views(), torch.tensor([0, 0]), temperature=1.0)
    assert got.item() == pytest.approx(expected)


def test_supcon_with_two_classes_uses_only_the_other_view_as_positive():
    expected = math.log(2 + E) - 1
    got = losses.supcon(two_crops_two_views(), torch.tensor([0, 1]), temperature=1.0)
    assert got.item() == pytest.approx(expected)


def test_teacher_temperature_warms_linearly_then_stays():
    ref = np.linspace(0.07, 0.04, 40)
    assert losses.teacher_temperature(0, 40, 0.07, 0.04, 1) == pytest.approx(0.07)
    assert losses.teacher_temperature(20, 40, 0.07, 0.04, 1) == pytest.approx(ref[20])
    assert losses.teacher_temperature(39, 40, 0.07, 0.04, 1) == pytest.approx(0.04)
    assert losses.teacher_temperature(100, 40, 0.07, 0.04, 1) == pytest.approx(0.04)


def test_teacher_temperature_holds_each_step_for_repeat_times_epochs():
    steps = np.linspace(0.07, 0.04, 20)
    temps = [losses.teacher_temperature(e, 40, 0.07, 0.04, repeat_times=2) for e in range(42)]
    assert temps[0] == temps[1] == pytest.approx(steps[0])
    assert temps[2] == temps[3] == pytest.approx(steps[1])
    assert temps[38] == pytest.approx(0.04) and temps[41] == pytest.approx(0.04)


def authors_schedule(warmup: int, repeat: int, epochs: int, start: float = 0.07, end: float = 0.04) -> np.ndarray:
    """The authors' teacher-temperature list (one entry per epoch when repeat divides warmup)."""
    steps = np.linspace(start, end, int(warmup / repeat)).repeat(repeat)
    return np.concatenate([steps, np.ones(epochs - warmup) * end])


@pytest.mark.parametrize("warmup,repeat", [(40, 4), (40, 1), (30, 1), (30, 3)])
def test_teacher_temperature_is_the_authors_schedule_when_repeat_divides_warmup(warmup, repeat):
    ours = [losses.teacher_temperature(e, warmup, 0.07, 0.04, repeat) for e in range(50)]
    np.testing.assert_allclose(ours, authors_schedule(warmup, repeat, 50), rtol=0, atol=1e-15)


def test_teacher_temperature_rounds_the_number_of_steps_up_where_the_authors_list_runs_short():
    assert len(authors_schedule(30, 4, 50)) == 48  # theirs would fail at epoch 48
    ours = [losses.teacher_temperature(e, 30, 0.07, 0.04, repeat_times=4) for e in range(50)]
    steps = np.linspace(0.07, 0.04, 8)  # ceil(30 / 4) steps of 4 epochs, the last one cut to 2
    np.testing.assert_allclose(ours[:30], steps.repeat(4)[:30], rtol=0, atol=1e-15)
    np.testing.assert_allclose(ours[30:], 0.04)


def test_teacher_zeroes_base_outputs_for_unlabelled_crops():
    logits = torch.tensor([[0.5, 0.1, 0.1], [0.5, 0.1, 0.1]])
    t = losses.teacher_targets(logits, 1.0, num_labeled=1, unlabeled=torch.tensor([True, False]))
    torch.testing.assert_close(t[0], torch.tensor([0.0, 0.5, 0.5]))
    torch.testing.assert_close(t[1], torch.softmax(logits[1], 0))


def test_pseudo_label_correction_mixes_in_the_normal_slot():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    w = losses.correction_weight(torch.tensor([0.1]), anomaly_thred=0.5)  # 0.4
    t = losses.teacher_targets(logits, 1.0, 0, torch.tensor([True]), normal_weight=w, normal_slot=0)
    torch.testing.assert_close(t[0], torch.tensor([0.4 + 0.6 / 4, 0.15, 0.15, 0.15]))


def test_correction_weight_is_zero_above_the_threshold():
    w = losses.correction_weight(torch.tensor([0.1, 0.5, 0.9]), anomaly_thred=0.5)
    torch.testing.assert_close(w, torch.tensor([0.4, 0.0, 0.0]))


def test_distillation_is_cross_entropy_against_the_other_view():
    logits = torch.zeros(4, 3)  # uniform student: CE = log 3 against any teacher
    teacher = torch.eye(3)[[0, 1, 2, 2]]
    rows = torch.tensor([True, False])
    assert losses.distillation(logits, teacher, rows).item() == pytest.approx(math.log(3))
    # a student that predicts the other view's teacher exactly (sharp logits) has ~zero loss
    sharp = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    t = torch.eye(3)[[0, 1, 2, 1]]
    assert losses.distillation(sharp, t, rows, student_temp=0.01).item() == pytest.approx(0.0, abs=1e-6)


def test_mean_entropy_penalty_is_zero_for_balanced_and_log_k_for_collapsed():
    balanced = torch.eye(4) * 10
    collapsed = torch.tensor([[10.0, 0, 0, 0]] * 4)
    assert losses.mean_entropy_penalty(balanced).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.mean_entropy_penalty(collapsed).item() == pytest.approx(math.log(4), abs=1e-6)


def test_supervised_ce_uses_logits_over_student_temperature():
    logits = torch.tensor([[0.1, 0.0]])
    expected = -math.log(E / (E + 1))  # logits / 0.1 = (1, 0)
    assert losses.supervised_ce(logits, torch.tensor([0])).item() == pytest.approx(expected)


def test_memax_with_a_prior_is_zero_when_the_batch_matches_the_prior_sizes():
    # three crops to output 0, one to output 1: the sizes the prior expects
    sized = torch.tensor([[10.0, 0], [10.0, 0], [10.0, 0], [0, 10.0]])
    prior = torch.tensor([0.75, 0.25])
    assert losses.mean_entropy_penalty(sized, 0.01, prior).item() == pytest.approx(0.0, abs=1e-6)
    # the uniform penalty pushes the same batch toward equal sizes; the prior does not
    assert losses.mean_entropy_penalty(sized, 0.01).item() > 0.1
    balanced = torch.tensor([[10.0, 0], [0, 10.0]])
    assert losses.mean_entropy_penalty(balanced, 0.01, prior).item() > 0.1


def test_memax_with_the_uniform_prior_is_the_me_max_term():
    logits = torch.randn(20, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        losses.mean_entropy_penalty(logits, prior=torch.full((5,), 0.2)), losses.mean_entropy_penalty(logits)
    )


def test_class_prior_is_the_smoothed_class_sizes_after_the_base_outputs():
    prior = losses.class_prior(np.array([0, 0, 0, 0, 0, 1, 1, 2]), 3)
    np.testing.assert_allclose(prior, [6 / 11, 3 / 11, 2 / 11])
    # an empty class keeps a small share; equal sizes are the uniform prior
    assert losses.class_prior(np.array([0, 0, 1, 1]), 3)[2] == pytest.approx(1 / 7)
    np.testing.assert_allclose(losses.class_prior(np.array([0, 1, 2, 0, 1, 2]), 3), [1 / 3] * 3)
    # base outputs keep 1 / K each, the novel ones share the rest in proportion
    with_base = losses.class_prior(np.array([0, 0, 0, 1]), 2, num_labeled=2)
    np.testing.assert_allclose(with_base, [0.25, 0.25, 0.5 * 4 / 6, 0.5 * 2 / 6])
    assert with_base.sum() == pytest.approx(1.0)
