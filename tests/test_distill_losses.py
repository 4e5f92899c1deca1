"""Distillation losses against references written out from their formulas in float64."""

import pytest
import torch
import torch.nn.functional as F

from leanvit.train.distillation import (
    KD_LOSSES,
    deit_hard,
    deit_soft,
    distillation_loss,
    kl_batchmean,
    soft_cross_entropy,
)

BATCH, CLASSES = 6, 11


def _logits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(BATCH, CLASSES, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(BATCH, CLASSES, generator=gen, dtype=torch.float64) * 3
    return student, teacher


def _softmax(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x - x.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def _kl_sum(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """Σ_batch Σ_classes p_t · (log p_t − log p_s) at temperature tau."""
    p_s, p_t = _softmax(student / tau), _softmax(teacher / tau)
    return (p_t * (torch.log(p_t) - torch.log(p_s))).sum()


@pytest.mark.parametrize('tau', [1.0, 3.0])
def test_deit_soft_is_kl_sum_times_tau_squared_over_all_logits(tau):
    student, teacher = _logits(0)
    reference = _kl_sum(student, teacher, tau) * tau ** 2 / (BATCH * CLASSES)
    torch.testing.assert_close(deit_soft(student, teacher, tau), reference)


@pytest.mark.parametrize('tau', [1.0, 3.0])
def test_kl_batchmean_is_kl_sum_times_tau_squared_over_batch(tau):
    student, teacher = _logits(1)
    reference = _kl_sum(student, teacher, tau) * tau ** 2 / BATCH
    torch.testing.assert_close(kl_batchmean(student, teacher, tau), reference)


def test_kl_batchmean_is_num_classes_times_deit_soft():
    student, teacher = _logits(2)
    ratio = kl_batchmean(student, teacher, 2.0) / deit_soft(student, teacher, 2.0)
    torch.testing.assert_close(ratio, torch.tensor(float(CLASSES), dtype=torch.float64))


def test_deit_hard_is_cross_entropy_against_teacher_top_class_and_ignores_tau():
    student, teacher = _logits(3)
    top = teacher.argmax(dim=1)
    log_p_s = torch.log(_softmax(student))
    reference = -log_p_s[torch.arange(BATCH), top].mean()
    torch.testing.assert_close(deit_hard(student, teacher, 1.0), reference)
    torch.testing.assert_close(deit_hard(student, teacher, 7.0), reference)


@pytest.mark.parametrize('tau', [1.0, 4.0])
def test_soft_cross_entropy_is_per_sample_soft_ce_mean_without_tau_squared(tau):
    student, teacher = _logits(4)
    p_t, log_p_s = _softmax(teacher / tau), torch.log(_softmax(student / tau))
    reference = sum(-(p_t[i] * log_p_s[i]).sum() for i in range(BATCH)) / BATCH
    torch.testing.assert_close(soft_cross_entropy(student, teacher, tau), reference)


def test_soft_cross_entropy_matches_sret_kd_loss_formula():
    """SReT's kd_loss.KDLoss: −bmm(softmax(t) as (B,1,C), log_softmax(s) as (B,C,1)), mean; no temperature."""
    student, teacher = _logits(5)
    per_sample = -torch.bmm(F.softmax(teacher, dim=1).unsqueeze(1), F.log_softmax(student, dim=1).unsqueeze(2))
    assert per_sample.shape == (BATCH, 1, 1)
    torch.testing.assert_close(soft_cross_entropy(student, teacher, 1.0), per_sample.mean())


def test_registry_names_and_shared_signature():
    assert set(KD_LOSSES) == {'deit_soft', 'deit_hard', 'kl_batchmean', 'soft_ce'}
    student, teacher = _logits(6)
    for loss in KD_LOSSES.values():
        value = loss(student, teacher, 2.0)
        assert value.ndim == 0 and torch.isfinite(value)


@pytest.mark.parametrize('kind', sorted(KD_LOSSES))
def test_teacher_never_receives_gradients(kind):
    student, teacher = _logits(7)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    KD_LOSSES[kind](student, teacher, 2.0).backward()
    assert teacher.grad is None and student.grad is not None
    student.grad = None
    targets = torch.arange(BATCH) % CLASSES
    distillation_loss(student, targets, teacher, kind, alpha=0.5, tau=2.0).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_alpha_one_is_kd_only_and_needs_no_targets():
    student, teacher = _logits(8)
    total = distillation_loss(student, None, teacher, 'soft_ce', alpha=1.0, tau=1.0)
    torch.testing.assert_close(total, soft_cross_entropy(student, teacher, 1.0))


def test_alpha_zero_is_plain_cross_entropy():
    student, teacher = _logits(9)
    targets = torch.tensor([0, 3, 10, 5, 5, 1])
    reference = -torch.log(_softmax(student))[torch.arange(BATCH), targets].mean()
    total = distillation_loss(student, targets, teacher, 'deit_soft', alpha=0.0, tau=3.0)
    torch.testing.assert_close(total, reference)


def test_mixed_total_with_mixup_soft_targets():
    student, teacher = _logits(10)
    a, b = torch.arange(BATCH) % CLASSES, (torch.arange(BATCH) + 4) % CLASSES
    lam = 0.7
    soft_targets = lam * F.one_hot(a, CLASSES).double() + (1 - lam) * F.one_hot(b, CLASSES).double()
    log_p_s = torch.log(_softmax(student))
    label_term = -(soft_targets * log_p_s).sum(dim=1).mean()
    kd_term = _kl_sum(student, teacher, 2.0) * 4.0 / (BATCH * CLASSES)
    total = distillation_loss(student, soft_targets, teacher, 'deit_soft', alpha=0.3, tau=2.0)
    torch.testing.assert_close(total, 0.7 * label_term + 0.3 * kd_term)


def test_custom_label_loss_is_used():
    student, teacher = _logits(11)
    targets = torch.arange(BATCH) % CLASSES
    smoothed = distillation_loss(student, targets, teacher, 'deit_hard', alpha=0.0, tau=1.0,
                                 label_loss=lambda s, y: F.cross_entropy(s, y, label_smoothing=0.1))
    torch.testing.assert_close(smoothed, F.cross_entropy(student, targets, label_smoothing=0.1))


@pytest.mark.parametrize('kwargs, message', [
    (dict(kind='kl'), r"unknown distillation kind 'kl'; expected one of \['deit_hard', 'deit_soft', "),
    (dict(alpha=1.5), r'alpha must be in \[0, 1\], got 1.5'),
    (dict(alpha=-0.1), r'alpha must be in \[0, 1\], got -0.1'),
    (dict(tau=0.0), r'tau must be > 0, got 0.0'),
    (dict(tau=-1.0), r'tau must be > 0, got -1.0'),
    (dict(targets=None), r'targets are required when alpha < 1'),
])
def test_bad_arguments_raise_value_error(kwargs, message):
    student, teacher = _logits(12)
    args = dict(targets=torch.zeros(BATCH, dtype=torch.long), kind='soft_ce', alpha=0.5, tau=1.0) | kwargs
    with pytest.raises(ValueError, match=message):
        distillation_loss(student, teacher_logits=teacher, **args)


def test_tuple_student_output_is_rejected():
    student, teacher = _logits(13)
    with pytest.raises(TypeError, match='student_logits must be a tensor'):
        distillation_loss((student, student), None, teacher, 'deit_soft', alpha=1.0, tau=1.0)
