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
   ``state_dict()`` holds their values and the run's resume state their optimizer state;
6. lets distributed training find the model's parameters a step leaves without a gradient, if the objective has a
   true ``leaves_parameters_unused`` attribute (optional, default False; GLiT's path sampling trains one sampled
   path per step): DDP then searches each step's graph for them (``find_unused_parameters``), a cost it otherwise
   spares every step. A model may declare the same attribute.
A new objective is a class with these four methods (five, if it trains parameters) and a factory registered with
``register_objective``, in the method's own module (``leanvit.methods``): this module imports none of them.
"""

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from leanvit.errors import UsageError


class Objective(Protocol):
    """An auxiliary objective (see the module docstring); it may also have ``parameters()`` and
    ``leaves_parameters_unused``."""

    def loss(self) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def remove(self) -> None: ...


OBJECTIVES: dict[str, Callable[..., Objective]] = {}


def register_objective(name: str) -> Callable[[Callable[..., Objective]], Callable[..., Objective]]:
    """Decorator: ``factory(student, teacher, **options) -> Objective`` builds the objective a recipe's
    ``objectives: {name: {...}}`` asks for. A factory raises ``UsageError`` for options that do not fit the models.

    Raises:
        ValueError: another factory already has ``name``.
    """
    def register(factory: Callable[..., Objective]) -> Callable[..., Objective]:
        known = OBJECTIVES.get(name)
        if known is not None and known.__qualname__ != factory.__qualname__:
            raise ValueError(f'objective {name!r} is already registered by {known.__module__}.{known.__qualname__}')
        OBJECTIVES[name] = factory
        return factory
    return register


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
            raise UsageError(f'objectives (--objectives): unknown objective {name!r}; '
                             f'known: {", ".join(sorted(OBJECTIVES))}')
        if not isinstance(kwargs, dict):
            raise UsageError(f'objectives.{name} must be a mapping of options, such as {{relation: 1.0}}, '
                             f'got {kwargs!r}')
