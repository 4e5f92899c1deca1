"""Shared layers: the exact folds ``reparameterize()`` uses compute what they replace, and the shared-weight stage."""

import pytest
import torch
from timm.layers import ConvNormAct
from torch import nn

import leanvit
from leanvit.layers import SharedWeightStage, fold_conv_norm_act, folded_conv


def randomise_batchnorm(bn: nn.Module) -> nn.Module:
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn.eval()


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('dims', [1, 2])
def test_folded_conv_equals_conv_then_batchnorm(dims, bias):
    torch.manual_seed(0)
    conv_type, bn_type = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
    conv = conv_type(6, 12, 3, stride=2, padding=1, groups=3, bias=bias)
    bn = randomise_batchnorm(bn_type(12))
    x = torch.randn(2, 6, *[9] * dims)
    folded = folded_conv(conv, bn)
    assert type(folded) is conv_type and folded.bias is not None and folded.groups == 3
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn(conv(x)))


def test_fold_conv_norm_act_equals_conv_norm_act_and_keeps_the_conv_keys():
    torch.manual_seed(0)
    layer = ConvNormAct(3, 8, 3, stride=2, padding=1, bias=True, act_kwargs=dict(inplace=False)).eval()
    randomise_batchnorm(layer.bn)
    x = torch.randn(2, 3, 16, 16)
    folded = fold_conv_norm_act(layer)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), layer(x))
    assert list(folded.state_dict()) == ['conv.weight', 'conv.bias']
    assert leanvit.count_params(folded) == leanvit.count_params(layer) - 2 * 8
    with pytest.raises(ValueError, match='folds a Conv2d followed by a BatchNorm'):
        fold_conv_norm_act(ConvNormAct(3, 8, 3, norm_layer='layernorm2d'))


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
