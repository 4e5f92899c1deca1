"""The part of timm's model contract that leanvit's stage-based models (SReT, RIFormer) share word for word."""

import torch
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
