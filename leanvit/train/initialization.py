"""Initialise a model from weights of the same layout: a teacher's (RIFormer guideline 5: every weight but the
token mixer) or a checkpoint's (a fine-tune at another resolution, a compressed student)."""

from dataclasses import dataclass, field

import torch
from torch import nn

from leanvit.errors import CheckpointError
from leanvit.io.weights import converter_for, read_checkpoint, unwrap_state_dict


@dataclass
class TeacherInitReport:
    """What `copy_matching` did, tensor by tensor: copied from the source (a teacher or a checkpoint), or not."""
    copied: list[str] = field(default_factory=list)
    student_only: list[str] = field(default_factory=list)     # kept the model's own init
    teacher_only: list[str] = field(default_factory=list)     # no counterpart in the model
    shape_mismatch: list[str] = field(default_factory=list)   # same name, other shape: not copied
    token_mixer: list[str] = field(default_factory=list)      # left out on purpose (``skip``)

    def summary(self) -> str:
        def show(names: list[str]) -> str:
            return ', '.join(names[:6]) + (f' ... ({len(names)} in all)' if len(names) > 6 else '') if names else '-'
        return (f'copied {len(self.copied)} tensors; left out on purpose: {show(self.token_mixer)}; only in the '
                f'model: {show(self.student_only)}; only in the source: {show(self.teacher_only)}; shape mismatch: '
                f'{show(self.shape_mismatch)}')


@torch.no_grad()
def copy_matching(model: nn.Module, state_dict: dict, skip: str | None = None,
                  source: str = 'the weights') -> TeacherInitReport:
    """Copy ``state_dict``'s tensors into ``model`` wherever names and shapes agree, except names containing
    ``skip``, after mapping the names through the family's names-only converter (`leanvit.models.converter_for`).
    The report lists every tensor that was not copied, and why.

    Raises:
        CheckpointError: the converter cannot map ``source`` (named in the message) onto ``model``'s family.
    """
    own = model.state_dict()
    convert = converter_for(model, names_only=True)
    if convert is not None:
        try:
            state_dict = convert(state_dict, model)
        except (ValueError, KeyError, IndexError, RuntimeError) as e:  # a layout of another family
            raise CheckpointError(f'{source} cannot be mapped onto {type(model).__name__}: {e}') from None
    report = TeacherInitReport()
    for name, value in own.items():
        if skip is not None and skip in name:
            report.token_mixer.append(name)
        elif name not in state_dict:
            report.student_only.append(name)
        elif state_dict[name].shape != value.shape:
            report.shape_mismatch.append(f'{name} {tuple(state_dict[name].shape)} -> {tuple(value.shape)}')
        else:
            value.copy_(state_dict[name])
            report.copied.append(name)
    report.teacher_only = sorted(set(state_dict) - set(own))
    return report


def init_from_teacher(student: nn.Module, teacher: nn.Module | dict) -> TeacherInitReport:
    """Copy the teacher's weights into ``student`` wherever names and shapes agree, except token mixers.

    ``teacher`` is a model or a state_dict (wrappers such as ``'state_dict'`` or DDP's ``module.`` are removed); its
    names pass through the student family's names-only converter first, so an official PoolFormer checkpoint or a
    leanvit PoolFormer-form RIFormer maps onto a RIFormer student (`copy_matching`).
    """
    # Only the names are converted: the family's full converter would also refuse a teacher whose mixer is not the
    # student's, which is the point here.
    state_dict = unwrap_state_dict(dict(teacher.state_dict() if isinstance(teacher, nn.Module) else teacher))
    return copy_matching(student, state_dict, skip='.token_mixer.', source='the teacher')


def init_from_checkpoint(model: nn.Module, path: str, trust: bool = False) -> TeacherInitReport:
    """Start ``model`` from the weights in ``path`` where names and shapes agree (a run of another resolution, a
    compressed student, an official checkpoint with another head); ``trust`` is `leanvit.read_checkpoint`'s."""
    return copy_matching(model, unwrap_state_dict(read_checkpoint(path, trust=trust)), source=str(path))
