"""MiniViT: published figures, the official models' outputs (golden fixtures), the weight-multiplexing options."""

import json
import os

import pytest
import timm
import torch
from safetensors.torch import load_file

import leanvit
from leanvit.errors import UsageError
from leanvit.models.minivit import (
    LayerTransforms,
    MiniDeiT,
    MiniSwin,
    MultiplexedAttention,
    product_bucket_ids,
    shifted_window_mask,
)

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'minivit')
GOLDEN = json.load(open(os.path.join(FIXTURES, 'minivit_official_tiny.json')))

# Exact counts of the official models (docs/minivit.md, "Variants and figures"); MACs within 2 %.
PUBLISHED = {
    'mini_deit_tiny_patch16_224': (3_090_304, 1.28), 'mini_deit_small_patch16_224': (11_450_824, 4.65),
    'mini_deit_base_patch16_224': (44_098_408, 17.69), 'mini_deit_base_patch16_384': (44_390_248, 56.78),
    'mini_swin_tiny_patch4_window7_224': (12_001_765, 4.60), 'mini_swin_small_patch4_window7_224': (26_463_205, 8.93),
    'mini_swin_base_patch4_window7_224': (46_444_852, 15.71),
    'mini_swin_base_patch4_window12_384': (46_512_532, 48.58),
}


def count(name: str, **kwargs) -> int:
    with torch.device('meta'):
        model = timm.create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_published_params_and_macs(name):
    params, gmacs = PUBLISHED[name]
    with torch.device('meta'):
        model = timm.create_model(name)
    measured = leanvit.profile(model, model.pretrained_cfg['input_size'])
    assert measured.params == params == model.pretrained_cfg['paper_params']
    assert measured.gmacs == pytest.approx(gmacs, rel=0.02)


def test_paper_ablations_are_one_flag_each():
    # Paper Sec. 4.3: Mini-Swin-B built up from sharing only; Mini-DeiT-B with one block for all 12 layers.
    swin_b = 'mini_swin_base_patch4_window7_224'
    sharing_only = dict(separate_norms=False, attn_transform=False, local_conv=False)
    assert round(count(swin_b, **sharing_only) / 1e6, 2) == 45.78
    assert round(count(swin_b, **(sharing_only | dict(separate_norms=True))) / 1e6, 2) == 45.80
    assert round(count(swin_b, local_conv=False) / 1e6, 2) == 45.82
    assert round(count(swin_b) / 1e6, 2) == 46.44
    assert round(count('mini_deit_base_patch16_224', share=12) / 1e6, 2) == 8.67


def test_shared_weights_are_stored_once():
    model = timm.create_model('mini_deit_tiny_patch16_224', img_size=64)
    stage = model.stages[0]
    assert len(stage.blocks) == 6 and len(stage.layers) == 12
    keys = model.state_dict().keys()
    assert sum(k.endswith('attn.qkv.weight') for k in keys) == 6
    assert sum(k.endswith('norm1.weight') for k in keys) == 12


def test_iRPE_buckets_equal_the_official_ones():
    io = load_file(os.path.join(FIXTURES, 'mini_deit_official_tiny_io.safetensors'))
    assert torch.equal(product_bucket_ids((8, 8)), io['rpe_bucket_ids'])
    assert product_bucket_ids((14, 14)).unique().numel() == 49


def official_deit() -> MiniDeiT:
    config = GOLDEN['mini_deit']['config']
    return MiniDeiT(img_size=config['img_size'], patch_size=config['patch_size'], num_classes=config['num_classes'],
                    embed_dim=config['embed_dim'], depth=config['depth'], num_heads=config['num_heads'],
                    share=config['repeated_times']).eval()


def official_swin(**kwargs) -> MiniSwin:
    config = GOLDEN['mini_swin']['config']
    return MiniSwin(img_size=config['img_size'], patch_size=config['patch_size'], num_classes=config['num_classes'],
                    embed_dim=config['embed_dim'], depths=config['depths'], num_heads=config['num_heads'],
                    window_size=config['window_size'], distinct_blocks=config['separate_layer_num_list'],
                    **kwargs).eval()


def layer_outputs(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Every applied layer's output, in order (a shared block's hook fires once per application)."""
    outputs = []
    hooks = [block.register_forward_hook(lambda m, args, out: outputs.append(out.flatten(1, 2)))
             for stage in model.stages for block in stage.blocks]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return outputs


@pytest.mark.parametrize('family', ['mini_deit', 'mini_swin'])
def test_official_checkpoint_gives_official_outputs(family):
    model = official_deit() if family == 'mini_deit' else official_swin()
    leanvit.load_checkpoint(model, os.path.join(FIXTURES, f'{family}_official_tiny.pth'))
    io = load_file(os.path.join(FIXTURES, f'{family}_official_tiny_io.safetensors'))
    with torch.no_grad():
        torch.testing.assert_close(model(io['x']), io['logits'], rtol=1e-5, atol=1e-5)
        pooled = model.forward_head(model.forward_features(io['x']), pre_logits=True)
    torch.testing.assert_close(pooled, io['pooled'], rtol=1e-5, atol=1e-5)
    hidden = layer_outputs(model, io['x'])
    assert len(hidden) == sum(1 for k in io if k.startswith('hidden.'))
    for layer, output in enumerate(hidden):
        torch.testing.assert_close(output, io[f'hidden.{layer}'], rtol=1e-5, atol=1e-5)
    # The converted model saves and reloads in leanvit's own layout.
    again = official_deit() if family == 'mini_deit' else official_swin()
    again.load_state_dict(leanvit.io.weights.converter_for(again)(model.state_dict(), again))


def test_official_mask_quirk_is_an_option():
    io = load_file(os.path.join(FIXTURES, 'mini_swin_official_tiny_io.safetensors'))
    official, corrected = official_swin(), official_swin(official_mask=False)
    path = os.path.join(FIXTURES, 'mini_swin_official_tiny.pth')
    leanvit.load_checkpoint(official, path)
    leanvit.load_checkpoint(corrected, path)
    with torch.no_grad():
        differs = (official(io['x']) - corrected(io['x'])).abs().max()
    assert differs > 1e-3
    # Only the stages whose map is larger than a window have a shift, hence a mask.
    assert [stage.shift for stage in official.stages] == [2, 2, 0]


def test_shifted_window_mask_separates_regions():
    mask = shifted_window_mask((8, 8), 4, 2)
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()  # the top-left window holds one region only
    assert (mask[-1] != 0).any() and set(mask.unique().tolist()) == {-100.0, 0.0}


@pytest.mark.parametrize('kwargs, message', [
    (dict(share=5), 'share=5 layers per block does not divide depth 12'),
    (dict(share=0), 'share=0 layers per block does not divide depth 12'),
])
def test_bad_sharing_is_named(kwargs, message):
    with pytest.raises(UsageError, match=message):
        leanvit.create_model('mini_deit_tiny_patch16_224', **kwargs)


def test_bad_distinct_blocks_are_named():
    with pytest.raises(UsageError, match='4 distinct blocks cannot share a stage of depth 6 evenly'):
        leanvit.create_model('mini_swin_tiny_patch4_window7_224', distinct_blocks=(1, 1, 4, 1))
    with pytest.raises(UsageError, match=r'distinct_blocks has 3 entries; expected one per stage \(4\)'):
        leanvit.create_model('mini_swin_tiny_patch4_window7_224', distinct_blocks=(1, 1, 1))


def test_paper_form_of_mini_deit_trains():
    # The paper's MLP transformation instead of the official iRPE: a depthwise conv per layer.
    model = timm.create_model('mini_deit_tiny_patch16_224', img_size=32, rpe=False, local_conv=True, num_classes=3)
    assert all(layer.rpe is None and layer.local is not None for layer in model.stages[0].layers)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.stages[0].layers[3].local.conv.weight.grad.abs().sum() > 0


def test_shared_attention_without_layer_transforms_is_timms_attention():
    torch.manual_seed(0)
    attn = MultiplexedAttention(16, num_heads=2).eval()
    none = LayerTransforms(16, 2, separate_norms=False, attn_transform=False, mixing_bias=False, local_conv=False,
                           rpe_grid=None, drop_path=0., norm_layer=torch.nn.LayerNorm)
    reference = timm.layers.Attention(16, num_heads=2, qkv_bias=True).eval()
    reference.load_state_dict(attn.state_dict())  # strict: the same keys
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, none), reference(x))
