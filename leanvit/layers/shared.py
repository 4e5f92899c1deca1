"""A stage whose blocks are applied several times each: depth without parameters, every shared weight stored once."""

from collections.abc import Callable, Sequence

import torch
from timm.models import checkpoint
from torch import nn


class SharedWeightStage(nn.Module):
    """Distinct blocks, each applied ``repeats`` times in a row, each application followed by its own small module.

    It serves two papers' mechanisms:
    - SReT's recursion (Shen et al., "Sliced Recursive Transformer", Sec. 3): a shared block applied several times,
      a non-linear projection (NLL) after every application breaking the symmetry between them.
    - MiniViT's weight multiplexing (Zhang et al., "MiniViT", Sec. 3): consecutive layers share one block's weights,
      each layer adding its own small modules (LayerNorms, attention and MLP transformations).

    Each shared block is one module in ``blocks`` and so one entry per parameter in the state_dict and in
    ``parameters()``, however often it runs; the per-application modules are not shared. Block ``i``'s
    ``r``-th application uses per-application module ``i * repeats + r``. The stage opens with ``downsample``
    (identity by default), as timm's stages do, registered first so that parameters come in execution order.

    A family says how one application runs by overriding `forward_application` (default: the block, then the
    application's module), and may draw fewer applications per block, e.g. for mixed-depth training, by overriding
    `applications`. With ``grad_checkpointing`` set, each application is checkpointed on its own (timm's
    ``checkpoint``, so timm's re-entrancy setting applies).

    Args:
        blocks: The distinct (shared) blocks, in order.
        repeats: Applications per block.
        per_application: Factory ``(block index, repeat) -> module``, called once per application; None for none.
        per_application_name: Attribute (and state_dict prefix) of the per-application ModuleList.
        downsample: Module opening the stage, before the applications.
    """

    def __init__(
            self,
            blocks: Sequence[nn.Module],
            repeats: int,
            per_application: Callable[[int, int], nn.Module] | None = None,
            per_application_name: str = 'per_application',
            downsample: nn.Module | None = None,
    ):
        super().__init__()
        if repeats < 1:
            raise ValueError(f'repeats must be at least 1, got {repeats}')
        self.repeats = repeats
        self.grad_checkpointing = False
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.ModuleList(blocks)
        self.per_application_name = per_application_name
        if per_application is not None:
            setattr(self, per_application_name, nn.ModuleList([
                per_application(index, repeat) for index in range(len(self.blocks)) for repeat in range(repeats)]))

    def application_module(self, index: int, repeat: int) -> nn.Module | None:
        """The un-shared module of block ``index``'s ``repeat``-th application, or None when there are none."""
        modules = getattr(self, self.per_application_name, None)
        return None if modules is None else modules[index * self.repeats + repeat]

    def applications(self) -> int:
        """How many times to apply a block in this forward; asked once per block. Override to draw fewer."""
        return self.repeats

    def forward_application(self, x: torch.Tensor, index: int, repeat: int) -> torch.Tensor:
        """One application: block ``index`` then its ``repeat``-th per-application module."""
        x = self.blocks[index](x)
        module = self.application_module(index, repeat)
        return x if module is None else module(x)

    def forward_block(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Block ``index`` applied ``applications()`` times; its output is one of the stage's intermediates."""
        for repeat in range(self.applications()):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(self.forward_application, x, index, repeat)
            else:
                x = self.forward_application(x, index, repeat)
        return x

    def forward_applications(self, x: torch.Tensor) -> torch.Tensor:
        """Every application in order: block 0 ``applications()`` times, then block 1, and so on."""
        for index in range(len(self.blocks)):
            x = self.forward_block(x, index)
        return x

    def truncate(self, num_blocks: int):
        """Keep the first ``num_blocks`` blocks and their per-application modules (timm's layer pruning)."""
        self.blocks = self.blocks[:num_blocks]
        modules = getattr(self, self.per_application_name, None)
        if modules is not None:
            setattr(self, self.per_application_name, modules[:num_blocks * self.repeats])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_applications(self.downsample(x))
