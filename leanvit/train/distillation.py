"""Prediction-level knowledge-distillation losses: logits in, scalar out.

The papers leanvit reproduces normalise their KD terms differently, and the reported accuracies depend on it
(docs/across-families.md, "Distillation loss normalisations"), so each normalisation is its own named function:

| name | formula | reproduces |
|---|---|---|
| ``deit_soft`` | KL(t ‖ s) at τ, summed, · τ² / (batch · classes) | DeiT (official ``DistillationLoss``), Mini-DeiT |
| ``deit_hard`` | CE(s, argmax t) | DeiT hard distillation |
| ``kl_batchmean`` | KL(t ‖ s) at τ, summed, · τ² / batch | timm's distillation task, most code |
| ``soft_ce`` | −Σ softmax(t/τ) · log_softmax(s/τ), mean over batch, no τ² | SReT ``kd_loss.py``, Mini-Swin |

``deit_soft`` is exactly ``kl_batchmean / num_classes``. Every loss detaches the teacher logits, so the teacher never
receives gradients, and all share the signature ``(student, teacher, tau)`` (``deit_hard`` ignores ``tau``).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F


def deit_soft(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """DeiT's soft distillation (Touvron et al. 2021, official ``losses.DistillationLoss``, ``'soft'``).

    ``KL(softmax(t/τ) ‖ softmax(s/τ))`` computed as ``kl_div(log_softmax(s/τ), log_softmax(t/τ))`` with reduction
    ``'sum'`` and ``log_target=True``, times τ², divided by ``student.numel()`` (batch × classes): an average over
    logits, not over samples.
    """
    kl = F.kl_div(
        F.log_softmax(student / tau, dim=-1), F.log_softmax(teacher.detach() / tau, dim=-1),
        reduction='sum', log_target=True)
    return kl * (tau * tau) / student.numel()


def deit_hard(student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """DeiT's hard distillation: cross-entropy of the student against the teacher's top class, mean over batch.

    ``tau`` is accepted only to share the registry signature and has no effect.
    """
    return F.cross_entropy(student, teacher.detach().argmax(dim=-1))


def kl_batchmean(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """KL distillation as in timm's distillation task and most code (Hinton et al. 2015 scaling).

    ``KL(softmax(t/τ) ‖ softmax(s/τ))`` with reduction ``'batchmean'`` (sum / batch), times τ²; about
    ``num_classes`` times larger than :func:`deit_soft`.
    """
    kl = F.kl_div(
        F.log_softmax(student / tau, dim=-1), F.log_softmax(teacher.detach() / tau, dim=-1),
        reduction='batchmean', log_target=True)
    return kl * (tau * tau)


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """Soft-label cross-entropy of SReT (Shen et al. 2022, official ``kd_loss.KDLoss``) and Mini-Swin.

    ``−Σ softmax(t/τ) · log_softmax(s/τ)`` per sample, mean over the batch, no τ² factor. The official SReT code has
    no temperature: ``tau=1`` reproduces it exactly.
    """
    return F.cross_entropy(student / tau, F.softmax(teacher.detach() / tau, dim=-1))


KD_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    'deit_soft': deit_soft,
    'deit_hard': deit_hard,
    'kl_batchmean': kl_batchmean,
    'soft_ce': soft_cross_entropy,
}


def distillation_loss(
        student_logits: torch.Tensor,
        targets: torch.Tensor | None,
        teacher_logits: torch.Tensor,
        kind: str,
        alpha: float,
        tau: float,
        label_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``(1 − α) · label_loss(student, targets) + α · KD(student, teacher)``.

    With ``alpha == 1`` the label term is not computed at all (SReT, Mini-DeiT and RIFormer train on soft labels
    only), so ``targets`` may be ``None``. The teacher sees the same (mixup-augmented) input as the student.

    Args:
        student_logits: Student logits (B, classes). A tensor only: for DeiT-style distilled models that return
            ``(cls, dist)`` pick the head to distil before calling.
        targets: Class indices (B,) or soft target distributions (B, classes), e.g. from mixup; ``None`` allowed
            when ``alpha == 1``.
        teacher_logits: Teacher logits (B, classes); detached here.
        kind: A key of :data:`KD_LOSSES`.
        alpha: Weight of the KD term, in [0, 1].
        tau: Softmax temperature, > 0 (ignored by ``'deit_hard'``).
        label_loss: Loss against ``targets``; defaults to :func:`torch.nn.functional.cross_entropy`, which takes
            class indices or, for float targets of the logits' shape, computes ``−Σ target · log_softmax(s)``
            averaged over the batch (timm's ``SoftTargetCrossEntropy``).
    """
    if kind not in KD_LOSSES:
        raise ValueError(f"unknown distillation kind {kind!r}; expected one of {sorted(KD_LOSSES)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not isinstance(student_logits, torch.Tensor):
        raise TypeError(f"student_logits must be a tensor, got {type(student_logits).__name__}; "
                        "for (cls, dist) outputs pass the head to distil")
    kd = KD_LOSSES[kind](student_logits, teacher_logits, tau)
    if alpha == 1.0:
        return kd
    if targets is None:
        raise ValueError(f"targets are required when alpha < 1 (got alpha={alpha})")
    label_loss = label_loss or F.cross_entropy
    return (1.0 - alpha) * label_loss(student_logits, targets) + alpha * kd
