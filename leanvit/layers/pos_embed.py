"""Resizing a learned absolute position embedding to another token grid, as the official fine-tuning scripts do."""

import torch
from timm.layers import resample_abs_pos_embed


def resample_pos_embed(pos_embed: torch.Tensor, new_size: tuple[int, int], old_size: tuple[int, int]) -> torch.Tensor:
    """A (1, H * W, C) position embedding of an ``old_size`` token grid resized to ``new_size``, bicubically.

    timm's ``resample_abs_pos_embed`` with the official scripts' interpolation (DeiT's fine-tuning resize, which
    SReT, Mini-DeiT and GFNet reuse): ``F.interpolate(mode='bicubic', align_corners=False)`` without antialiasing.
    timm's default ``antialias=True`` computes another function, even when upsampling (its bicubic kernel is PIL's,
    a = -0.5, against -0.75), and the resized official checkpoints' outputs pinned by the tests would not hold.
    """
    return resample_abs_pos_embed(pos_embed, new_size=list(new_size), old_size=list(old_size), num_prefix_tokens=0,
                                  interpolation='bicubic', antialias=False, align_corners=False)
