"""Input validation shared by every leanvit model, with errors that say what was expected."""

import torch
from timm.layers import register_notrace_function

from leanvit.errors import UsageError


@register_notrace_function  # timm's FX feature extractor keeps it as one call
def check_input_size(x: torch.Tensor, in_chans: int, img_size: tuple[int, int] | None) -> torch.Tensor:
    """Return ``x`` unchanged if it is a (B, in_chans, *img_size) batch; raise a UsageError naming the mismatch.

    ``img_size=None`` accepts any height and width (fully convolutional models).
    """
    if x.ndim != 4:
        expected = f'{img_size[0]}, {img_size[1]}' if img_size is not None else 'H, W'
        raise UsageError(f'expected an image batch of shape (B, {in_chans}, {expected}), '
                         f'got a {x.ndim}-d tensor of shape {tuple(x.shape)}')
    if x.shape[1] != in_chans:
        raise UsageError(f'expected {in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})')
    if img_size is not None and tuple(x.shape[2:]) != tuple(img_size):
        raise UsageError(
            f'expected input size {img_size[0]}x{img_size[1]}, got {x.shape[2]}x{x.shape[3]}; the position embedding '
            f'is fixed at creation: create the model with img_size={x.shape[2]} (checkpoints are resized on load)')
    return x

