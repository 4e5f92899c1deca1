"""The parts of timm's model contract that leanvit's families share word for word.

- `StagedClassifier`: stage-based models with a timm head module (SReT, RIFormer, Mini-Swin), as timm's hierarchical
  models have.
- `LinearHeadClassifier`: models with a bare ``head`` Linear after their own pooling (GFNet, Mini-DeiT, GLiT), as
  timm's ``VisionTransformer`` has: official ``head.*`` keys load unchanged.
- `prune_sequence`: ``prune_intermediate_layers`` for a model whose intermediates are the outputs of one sequence of
  modules (stages or blocks).
"""

import torch
from timm.models._features import feature_take_indices
from torch import nn


class StagedClassifier(nn.Module):
    """Grad checkpointing over ``self.stages`` (each with a ``grad_checkpointing`` flag) and the classifier calls of a
    timm head ``self.head`` (``fc``, ``reset``, ``forward(x, pre_logits)``); subclasses define ``forward_features``."""

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class LinearHeadClassifier(nn.Module):
    """A bare ``head`` Linear over ``num_features``, replaced by `reset_classifier`; ``global_pool`` is one of
    ``POOLS`` and subclasses pool in ``forward_head``."""

    POOLS: tuple[str, ...] = ('avg', '')

    def check_pool(self, global_pool: str) -> str:
        if global_pool not in self.POOLS:
            raise ValueError(f'global_pool must be one of {", ".join(map(repr, self.POOLS))}, got {global_pool!r}')
        return global_pool

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        if global_pool is not None:
            self.global_pool = self.check_pool(global_pool)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def prune_sequence(model: nn.Module, name: str, indices: int | list[int], prune_norm: bool, prune_head: bool,
                   final_norm: bool = True) -> list[int]:
    """Keep ``model.<name>`` up to the last of ``indices``; drop the head unless told not to, and the final norm
    (``final_norm``: the model has one, trained on the last module's output) if asked or if modules were dropped."""
    sequence = getattr(model, name)
    take_indices, max_index = feature_take_indices(len(sequence), indices)
    if final_norm and (prune_norm or max_index < len(sequence) - 1):
        model.norm = nn.Identity()
    setattr(model, name, sequence[:max_index + 1])
    if prune_head:
        model.reset_classifier(0, '')
    return take_indices
