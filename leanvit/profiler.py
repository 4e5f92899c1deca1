"""Parameters and multiply-accumulates (MACs) as the papers count them.

The papers' "FLOPs" are fvcore-style MACs of convolutions, linear layers and matmuls, attention matmuls included.
torch's FlopCounterMode counts 2 x MACs and has no formula for the fused CPU attention kernel, so attention would
count as zero; we register one (QK^T and AV: 2 * B * heads * Nq * Nk * head_dim MACs), and the in-place batched
product it also leaves out.
FFTs (GFNet's global filters) count as their authors count them, see ``_fft_flops``.

A re-parameterized model (``timm.utils.model.reparameterize_model``) counts as the architecture it is: a norm folded
into its conv no longer has parameters, and RIFormer's deploy form has the paper's deploy parameter count.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


@dataclass(frozen=True)
class Profile:
    params: int
    macs: int

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def flops(self) -> int:
        """FLOPs as 2 x MACs (one multiply and one add each)."""
        return 2 * self.macs


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _baddbmm_flops(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    batch, rows, inner = a_shape
    return 2 * batch * rows * inner * b_shape[-1]


def _fft_flops(input_shape, dim, *args, **kwargs) -> int:
    """N * ceil(log2 N) MACs per transform of N points, N the transformed input extent (complex for c2r).

    The rule of the GFNet authors' fvcore handler (``rfft_flop_jit`` in github.com/raoyongming/DynamicViT
    calc_flops.py, for rfft2 and irfft2); the elementwise filter product is not counted, as fvcore skips it.
    """
    points = math.prod(input_shape[d] for d in dim)
    # numel / N transforms of N * ceil(log2 N) MACs each, times 2: FlopCounterMode counts FLOPs.
    return 2 * math.prod(input_shape) * math.ceil(math.log2(points)) if points > 1 else 0


_EXTRA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten.baddbmm_: _baddbmm_flops,  # in place (Mini-DeiT's iRPE logits); FlopCounterMode maps only baddbmm
    torch.ops.aten._fft_r2c: _fft_flops,
    torch.ops.aten._fft_c2r: _fft_flops,
    torch.ops.aten._fft_c2c: _fft_flops,
}


def count_params(model: nn.Module) -> int:
    """Parameters over unique tensors (a block applied several times counts once)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def profile(model: nn.Module, input_size: tuple[int, ...] = (3, 224, 224)) -> Profile:
    """Count ``model``'s parameters and the MACs of one eval forward on a (1, *input_size) input.

    The forward runs on the model's device; a model moved to the 'meta' device is counted without computing.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    x = torch.zeros(1, *input_size, device=param.device if param is not None else 'cpu',
                    dtype=param.dtype if param is not None else torch.float32)
    try:
        with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
            model(x)
    finally:
        model.train(was_training)
    return Profile(params=count_params(model), macs=counter.get_total_flops() // 2)
