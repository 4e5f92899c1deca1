"""The parts of timm's model contract that leanvit's families share word for word.

- `LayeredClassifier`: ``forward_intermediates`` and ``prune_intermediate_layers`` over the sequence of layers
  (stages, or blocks) whose outputs are a model's intermediates; each family says only how to run its stem and each
  layer, and in which layout its layers compute.
- `PoolingHeadClassifier`: models whose features are maps, classified by a timm head module ``head`` that pools, drops
  out and applies ``head.fc`` (SReT, RIFormer, Mini-Swin, GFNet), as timm's convolutional and hierarchical models
  have: official ``head.*`` keys load as ``head.fc.*``.
- `StagedClassifier`: a `PoolingHeadClassifier` whose layers are stages ``self.stages`` (SReT, RIFormer, Mini-Swin).
- `LinearHeadClassifier`: token models with a bare ``head`` Linear after their own pooling (Mini-DeiT, GLiT), as
  timm's ``VisionTransformer`` has: official ``head.*`` keys load unchanged.
"""

from collections.abc import Callable, Sequence

import torch
from timm.models._features import feature_take_indices
from torch import nn


class LayeredClassifier(nn.Module):
    """timm's feature-extraction contract, written once: the intermediates are the outputs of a sequence of layers,
    the final features those of the last layer after the final norm ``self.norm``.

    A family supplies what differs:

    - ``layer_fmt``: the layout its layers compute in, 'NCHW' or 'NHWC' maps or 'NLC' tokens. Intermediates come in
      that layout or as NCHW maps; an NHWC map is permuted, other layouts override `_format_intermediate`.
    - ``uniform_width``: every layer has the final norm's width (isotropic models). Then ``norm=True`` normalises
      every intermediate, and the final features are normalised after an early stop too. Otherwise the final norm fits
      the last layer only: only its output is normalised, and an early stop returns the stopped layer's output as is.
    - ``has_final_norm``: False for a model whose features take no final norm (its head normalises after pooling).
    - ``layers_attr``: the attribute holding the layers, for the default `_intermediate_layers` and `_truncate_layers`
      (a family whose layers are not one container overrides both).
    - `_forward_stem`: the input image to the first layer's input. Optionally `_forward_layer` (to checkpoint each
      layer where the model holds the grad checkpointing flag), `_format_final` (to ``forward_features``' layout).
    """

    layer_fmt: str = 'NCHW'
    uniform_width: bool = False
    has_final_norm: bool = True
    layers_attr: str = 'stages'

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _intermediate_layers(self) -> Sequence[Callable[[torch.Tensor], torch.Tensor]]:
        """The layers whose outputs are the intermediates, in order; ``len`` of it is the number of intermediates."""
        return getattr(self, self.layers_attr)

    def _truncate_layers(self, num_layers: int):
        """Keep the first ``num_layers`` layers (timm's layer pruning)."""
        setattr(self, self.layers_attr, getattr(self, self.layers_attr)[:num_layers])

    def _forward_layer(self, layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return layer(x)

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) if self.has_final_norm else x

    def _format_intermediate(self, x: torch.Tensor, output_fmt: str) -> torch.Tensor:
        """A layer's output, in ``layer_fmt``, as ``output_fmt``."""
        return x.permute(0, 3, 1, 2) if output_fmt == 'NCHW' and self.layer_fmt == 'NHWC' else x

    def _format_final(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's normalised output as ``forward_features`` returns it."""
        return x

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Layer outputs at ``indices`` and, unless ``intermediates_only``, the final features (``forward_features``'
        output, or the stopped layer's, see ``uniform_width``).

        Args:
            x: Input images.
            indices: timm's convention: an int n takes the last n layers, a list the layers it names, None all.
            norm: Apply the final norm to the intermediates it fits (see ``uniform_width``).
            stop_early: Run no layer after the last one in ``indices``.
            output_fmt: 'NCHW', or the layers' own ``layer_fmt``.
            intermediates_only: Return the intermediates only.
        """
        formats = tuple(dict.fromkeys(('NCHW', self.layer_fmt)))
        if output_fmt not in formats:
            raise ValueError(f'output_fmt must be {" or ".join(map(repr, formats))} for {type(self).__name__} '
                             f'intermediates, got {output_fmt!r}')
        layers = self._intermediate_layers()
        last = len(layers) - 1
        take_indices, max_index = feature_take_indices(len(layers), indices)
        if stop_early and not torch.jit.is_scripting():
            layers = layers[:max_index + 1]
        x = self._forward_stem(x)
        intermediates = []
        for i, layer in enumerate(layers):
            x = self._forward_layer(layer, x)
            if i in take_indices:
                normed = norm and (self.uniform_width or i == last)
                intermediates.append(self._format_intermediate(self._final_norm(x) if normed else x, output_fmt))
        if intermediates_only:
            return intermediates
        complete = len(layers) == last + 1
        return self._format_final(self._final_norm(x) if complete or self.uniform_width else x), intermediates

    def prune_intermediate_layers(
            self,
            indices: int | list[int] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Keep the layers up to the last one in ``indices``; drop the head unless ``prune_head`` is False, and the
        final norm if asked or if layers were dropped: it was trained on the last layer's output (and an earlier stage
        may be narrower), so the pruned model's features are the kept layer's raw output."""
        num_layers = len(self._intermediate_layers())
        take_indices, max_index = feature_take_indices(num_layers, indices)
        self._truncate_layers(max_index + 1)
        if self.has_final_norm and (prune_norm or max_index < num_layers - 1):
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class PoolingHeadClassifier(LayeredClassifier):
    """The classifier calls of a timm head module ``self.head`` (``fc``, ``reset``, ``forward(x, pre_logits)``), which
    pools the features itself; subclasses define ``forward_features``."""

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)


class StagedClassifier(PoolingHeadClassifier):
    """Stages ``self.stages`` (each with a ``grad_checkpointing`` flag) as layers, and a timm head module."""

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.stages:
            stage.grad_checkpointing = enable


class LinearHeadClassifier(LayeredClassifier):
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
