"""Shared layers: the padded MLP computes the unpadded one, and the profiler counts the unpadded shapes."""

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import leanvit
from leanvit.layers import Mlp, unpadded_hidden


def test_padded_mlp_equals_unpadded_mlp_and_trains_true_shapes():
    mlp = Mlp(16, 23)
    assert mlp.hidden_padding == 1
    x = torch.randn(4, 5, 16, requires_grad=True)
    padded = mlp(x)
    with unpadded_hidden():
        reference = mlp(x)
    reference_manual = mlp.fc2(mlp.act(mlp.fc1(x)))
    torch.testing.assert_close(padded, reference)
    torch.testing.assert_close(reference, reference_manual)
    padded.sum().backward()
    assert mlp.fc1.weight.grad.shape == (23, 16) and mlp.fc2.weight.grad.shape == (16, 23)


def test_profiler_counts_the_architecture_not_the_padding():
    model = timm.create_model('sret_t').eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 224, 224))
    executed_linear_macs = sum(v for k, v in counter.get_flop_counts()['Global'].items() if 'addmm' in str(k)) // 2
    with unpadded_hidden(), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 224, 224))
    true_linear_macs = sum(v for k, v in counter.get_flop_counts()['Global'].items() if 'addmm' in str(k)) // 2
    assert executed_linear_macs > true_linear_macs
    assert leanvit.profile(model, (3, 224, 224)).gmacs == leanvit.profile(model.to('meta'), (3, 224, 224)).gmacs
