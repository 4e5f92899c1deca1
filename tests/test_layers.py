"""Shared layers: the CPU inference forms that ``reparameterize()`` installs compute the canonical layers they stand
for, go back to them with ``canonical()``, and are counted as them by the profiler."""

import copy

import pytest
import timm
import torch
from timm.layers import ConvNormAct
from timm.utils.model import reparameterize_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import leanvit
from leanvit.layers import (
    ConvMlp,
    DepthwiseMultiplierConv,
    FoldedConvNormAct,
    InplaceGELU,
    Mlp,
    PaddedLinear,
    PointwiseLinear,
    SharedWeightStage,
)


def reparameterized(module: nn.Module) -> nn.Module:
    fast = copy.deepcopy(module)
    fast.reparameterize()
    return fast


def test_padded_mlp_equals_the_canonical_mlp_and_counts_true_shapes():
    torch.manual_seed(0)
    mlp = Mlp(16, 23).eval()
    x = torch.randn(4, 5, 16)
    expected = mlp(x).detach()
    fast = reparameterized(mlp)
    assert isinstance(fast.fc1, PaddedLinear) and isinstance(fast.fc2, PaddedLinear)
    assert fast.fc1.weight.shape == (24, 16) and fast.fc2.weight.shape == (16, 24)
    assert isinstance(fast.act, InplaceGELU)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), expected)
    assert torch.equal(fast.fc1.canonical().weight, mlp.fc1.weight)
    assert torch.equal(fast.fc2.canonical().weight, mlp.fc2.weight)
    assert leanvit.profile(fast, (5, 16)) == leanvit.profile(mlp, (5, 16))
    assert leanvit.count_params(fast) == leanvit.count_params(mlp) == 16 * 23 + 23 + 23 * 16 + 16
    assert isinstance(fast.fc1, PaddedLinear), 'counting changed the model'
    reparameterized_twice = reparameterized(fast)
    assert reparameterized_twice.fc1.weight.shape == (24, 16)


def test_mlp_keeps_its_width_behind_an_activation_that_moves_zero():
    mlp = Mlp(16, 23, act_layer=nn.Sigmoid).eval()
    fast = reparameterized(mlp)
    assert type(fast.fc1) is nn.Linear and fast.fc1.out_features == 23 and type(fast.act) is nn.Sigmoid


@pytest.mark.parametrize('size', [(5, 3), (16, 16)])  # below and above PointwiseLinear.MIN_PIXELS
@pytest.mark.parametrize('layout', ['nchw', 'channels_last'])
def test_pointwise_linear_equals_the_conv(layout, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 1)
    fast = PointwiseLinear(conv)
    x = torch.randn(2, 6, *size)
    if layout == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last)
    expected = conv(x).detach()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), expected)
        torch.testing.assert_close(fast.canonical()(x), expected)
    assert fast.state_dict().keys() == conv.state_dict().keys()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert fast(x).dtype == conv(x).dtype == torch.bfloat16


def test_conv_mlp_switches_to_products_and_back():
    torch.manual_seed(0)
    mlp = ConvMlp(8, 32).eval()
    x = torch.randn(2, 8, 16, 16)
    fast = reparameterized(mlp)
    assert isinstance(fast.fc1, PointwiseLinear) and isinstance(fast.fc2, PointwiseLinear)
    assert fast.state_dict().keys() == mlp.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), mlp(x))
    assert leanvit.profile(fast, (8, 16, 16)) == leanvit.profile(mlp, (8, 16, 16))
    with pytest.raises(ValueError, match='plain 1 x 1 convolutions only'):
        PointwiseLinear(nn.Conv2d(8, 8, 1, stride=2))


def test_depthwise_multiplier_conv_equals_the_plain_conv_and_back():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 24, 3, stride=2, padding=1, groups=8)
    fast = DepthwiseMultiplierConv(conv)
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), conv(x))
        back = fast.canonical()
    assert torch.equal(back.weight, conv.weight) and torch.equal(back.bias, conv.bias)
    assert leanvit.count_params(fast) == leanvit.count_params(conv)
    with pytest.raises(ValueError, match='channel multiplier > 1'):
        DepthwiseMultiplierConv(nn.Conv2d(8, 8, 3, groups=8))


def test_folded_conv_norm_act_equals_conv_norm_act():
    torch.manual_seed(0)
    layer = ConvNormAct(3, 8, 3, stride=2, padding=1, bias=True, act_kwargs=dict(inplace=False)).eval()
    with torch.no_grad():
        layer.bn.running_mean.normal_()
        layer.bn.running_var.uniform_(0.5, 2)
        layer.bn.weight.normal_()
        layer.bn.bias.normal_()
    x = torch.randn(2, 3, 16, 16)
    fast = FoldedConvNormAct(layer)
    with torch.no_grad():
        expected = layer(x)
        torch.testing.assert_close(fast(x), expected)
        torch.testing.assert_close(fast.canonical()(x), expected)
    assert fast(x).is_contiguous(memory_format=torch.channels_last)
    assert leanvit.count_params(fast) == leanvit.count_params(layer)


def test_profiler_counts_the_architecture_not_the_padding():
    model = reparameterize_model(timm.create_model('sret_t').eval())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 224, 224))
    executed_linear_macs = sum(v for k, v in counter.get_flop_counts()['Global'].items() if 'addmm' in str(k)) // 2
    true_model = timm.create_model('sret_t').eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        true_model(torch.zeros(1, 3, 224, 224))
    true_linear_macs = sum(v for k, v in counter.get_flop_counts()['Global'].items() if 'addmm' in str(k)) // 2
    assert executed_linear_macs > true_linear_macs
    assert leanvit.profile(model) == leanvit.profile(true_model) == leanvit.profile(model.to('meta'))


@pytest.mark.parametrize('grad_checkpointing', [False, True])
def test_shared_weight_stage_stores_each_block_once_and_runs_the_hand_written_loop(grad_checkpointing):
    torch.manual_seed(0)
    blocks, repeats = [nn.Linear(6, 6), nn.Linear(6, 6)], 3
    stage = SharedWeightStage(blocks, repeats, per_application=lambda index, repeat: nn.LayerNorm(6),
                              per_application_name='norms')
    stage.grad_checkpointing = grad_checkpointing
    assert len(stage.norms) == len(blocks) * repeats
    block_params = sum(p.numel() for b in blocks for p in b.parameters())
    assert leanvit.count_params(stage) == block_params + len(blocks) * repeats * 2 * 6
    assert sorted(k for k in stage.state_dict() if k.startswith('blocks.')) == [
        'blocks.0.bias', 'blocks.0.weight', 'blocks.1.bias', 'blocks.1.weight']
    x = torch.randn(2, 6, requires_grad=True)
    expected = x
    for index, block in enumerate(blocks):
        for repeat in range(repeats):
            expected = stage.norms[index * repeats + repeat](block(expected))
    torch.testing.assert_close(stage(x), expected)


def test_shared_weight_stage_applications_hook_draws_fewer_applications():
    class Shallow(SharedWeightStage):
        def applications(self) -> int:
            return 1

    calls = []
    stage = Shallow([nn.Identity(), nn.Identity()], 4, per_application=lambda index, repeat: nn.Identity())
    for i, module in enumerate(stage.per_application):
        module.register_forward_hook(lambda *_, i=i: calls.append(i))
    stage(torch.zeros(1))
    assert calls == [0, 4]
