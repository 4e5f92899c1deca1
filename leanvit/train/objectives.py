"""Auxiliary objectives: the loss terms a method adds to the training step, behind one small protocol.

The training loop knows no paper. A method's extra terms (RIFormer's module imitation, MiniViT's weight distillation,
GLiT's supernet path sampling) are objects that the loop
1. builds once from the student, the teacher and their options (a recipe's ``objectives:`` section, e.g.
   ``objectives: {module_imitation: {relation: 1.0}}``, or ``--objectives JSON``), after the EMA copy is made, so
   that hooks an objective installs are not copied into the EMA model, and before the optimizer (see 5);
2. asks for a loss term after each micro-batch's student (and teacher) forward: ``loss()``;
3. saves and restores with each checkpoint: ``state_dict()`` / ``load_state_dict()``;
4. detaches at the end of training: ``remove()``;
5. trains, if the objective has a ``parameters()`` method (optional; weight distillation's width adapters): what it
   returns is one more optimizer param group (no weight decay), clipped with the model's gradients; the objective's
   ``state_dict()`` holds their values and the run's resume state their optimizer state.
A new objective is a class with these four methods (five, if it trains parameters) and one entry in ``OBJECTIVES``.
"""

import re
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from leanvit.distill.imitation import LAYOUTS, ImitationWeights, ModuleImitation
from leanvit.distill.weight_distillation import WeightDistillation
from leanvit.errors import UsageError


class Objective(Protocol):
    def loss(self) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def remove(self) -> None: ...


def module_imitation(student: nn.Module, teacher: nn.Module | None, *, block_output: float = 0.,
                     mixer_output: float = 0., relation: float = 0., student_blocks: str | None = None,
                     teacher_blocks: str | None = None, teacher_layout: str = 'NCHW') -> ModuleImitation:
    """RIFormer's module imitation (see ``leanvit.distill.imitation``): one weight per term, 0 turns it off."""
    if teacher is None:
        raise UsageError('module_imitation needs a live teacher model (teacher: NAME), not precomputed '
                         'teacher_logits')
    weights = ImitationWeights(block_output, mixer_output, relation)
    if not weights:
        raise UsageError('module_imitation needs a weight > 0 for at least one of block_output, mixer_output and '
                         'relation')
    if teacher_layout not in LAYOUTS:
        raise UsageError(f'module_imitation: teacher_layout must be one of {", ".join(LAYOUTS)}, '
                         f'got {teacher_layout!r}')
    try:
        return ModuleImitation(student, teacher, weights, student_blocks, teacher_blocks,
                               teacher_layout=teacher_layout)
    except (ValueError, re.error) as e:  # block patterns that match nothing, stages that do not pair, bad regexes
        raise UsageError(f'module_imitation: {e}') from None


def weight_distillation(student: nn.Module, teacher: nn.Module | None, **options) -> WeightDistillation:
    """MiniViT's weight distillation (see ``leanvit.distill.weight_distillation``): attention relations and hidden
    states of paired layers; ``options`` are `WeightDistillation`'s keyword arguments."""
    if teacher is None:
        raise UsageError('weight_distillation needs a live teacher model (teacher: NAME), not precomputed '
                         'teacher_logits')
    try:
        return WeightDistillation(student, teacher, **options)
    except (ValueError, re.error) as e:  # options that do not fit the two models, bad block patterns
        raise UsageError(f'weight_distillation: {e}') from None


def path_sampling(student: nn.Module, teacher: nn.Module | None, *, seed: int = 0) -> Objective:
    """GLiT's supernet training (see ``leanvit.search.supernet``): one architecture drawn uniformly per step."""
    from leanvit.search.supernet import PathSampling
    try:
        return PathSampling(student, seed)
    except ValueError as e:  # not a supernet
        raise UsageError(f'path_sampling: {e}') from None


OBJECTIVES: dict[str, Callable[..., Objective]] = {'module_imitation': module_imitation,
                                                   'path_sampling': path_sampling,
                                                   'weight_distillation': weight_distillation}


def build_objectives(options: dict, student: nn.Module, teacher: nn.Module | None) -> dict[str, Objective]:
    """One objective per entry of ``options`` (name -> keyword options), in the order given."""
    check_objective_names(options)
    objectives = {}
    for name, kwargs in options.items():
        try:
            objectives[name] = OBJECTIVES[name](student, teacher, **kwargs)
        except TypeError as e:  # an option the objective does not take, or a value of the wrong type
            raise UsageError(f'objectives.{name}: {e}') from None
    return objectives


def check_objective_names(options: dict) -> None:
    """Raise a UsageError unless every key names an objective and every value is a mapping of options."""
    for name, kwargs in options.items():
        if name not in OBJECTIVES:
            raise UsageError(f'objectives (--objectives): unknown objective {name!r}; known: {", ".join(OBJECTIVES)}')
        if not isinstance(kwargs, dict):
            raise UsageError(f'objectives.{name} must be a mapping of options, such as {{relation: 1.0}}, '
                             f'got {kwargs!r}')
