"""Initialise a student from a same-layout teacher (RIFormer guideline 5: copy every weight but the token mixer)."""

from dataclasses import dataclass, field

import torch
from torch import nn

from leanvit.checkpoint import unwrap_state_dict
from leanvit.models._registry import converter_for


@dataclass
class TeacherInitReport:
    copied: list[str] = field(default_factory=list)
    student_only: list[str] = field(default_factory=list)     # kept the student's own init
    teacher_only: list[str] = field(default_factory=list)     # no counterpart in the student
    shape_mismatch: list[str] = field(default_factory=list)   # same name, other shape: not copied
    token_mixer: list[str] = field(default_factory=list)      # left out on purpose

    def summary(self) -> str:
        def show(names: list[str]) -> str:
            return ', '.join(names[:6]) + (f' ... ({len(names)} in all)' if len(names) > 6 else '') if names else '-'
        return (f'copied {len(self.copied)} tensors from the teacher; kept the student init for token mixers: '
                f'{show(self.token_mixer)}; student only: {show(self.student_only)}; teacher only: '
                f'{show(self.teacher_only)}; shape mismatch: {show(self.shape_mismatch)}')


@torch.no_grad()
def init_from_teacher(student: nn.Module, teacher: nn.Module | dict) -> TeacherInitReport:
    """Copy the teacher's weights into ``student`` wherever names and shapes agree, except token mixers.

    ``teacher`` is a model or a state_dict (wrappers such as ``'state_dict'`` or DDP's ``module.`` are removed); its
    names pass through the student family's names-only converter (`leanvit.models.converter_for`) first, so an
    official PoolFormer checkpoint or a leanvit PoolFormer-form RIFormer maps onto a RIFormer student. The report
    lists every tensor that was not copied, and why.
    """
    own = student.state_dict()
    state_dict = unwrap_state_dict(dict(teacher.state_dict() if isinstance(teacher, nn.Module) else teacher))
    # Only the names are converted: the family's full converter would also refuse a teacher whose mixer is not the
    # student's, which is the point here.
    convert = converter_for(student, names_only=True)
    if convert is not None:
        state_dict = convert(state_dict, student)
    report = TeacherInitReport()
    for name, value in own.items():
        if '.token_mixer.' in name:
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
