"""GLiT: the published figures, the official model's outputs (golden fixture), architectures as data."""

import json
import os

import pytest
import timm
import torch
from safetensors.torch import load_file

import leanvit
from leanvit.errors import UsageError
from leanvit.models.glit import (
    GLIT_TINY,
    BlockArch,
    ConvModule,
    GLiT,
    GlobalAttention,
    SearchSpace,
    load_architecture,
)

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'glit')
GOLDEN = json.load(open(os.path.join(FIXTURES, 'glit_official_tiny.json')))


def test_published_params_and_macs():
    # docs/glit.md, "Variants and figures": exact count of the official model; MACs with the GLU's full width.
    with torch.device('meta'):
        model = timm.create_model('glit_tiny_patch16_224')
    measured = leanvit.profile(model, (3, 224, 224))
    assert measured.params == 7_264_456 == model.pretrained_cfg['paper_params']
    assert measured.gmacs == pytest.approx(1.473, rel=0.02)


def test_official_checkpoint_gives_official_outputs():
    config = GOLDEN['model']['config']
    model = GLiT(img_size=config['img_size'], patch_size=config['patch_size'], num_classes=config['num_classes'],
                 embed_dim=config['embed_dim'], num_heads=config['num_heads']).eval()
    leanvit.load_checkpoint(model, os.path.join(FIXTURES, 'glit_official_tiny.pth'))
    io = load_file(os.path.join(FIXTURES, 'glit_official_tiny_io.safetensors'))
    outputs = []
    hooks = [block.register_forward_hook(lambda m, args, out: outputs.append(out)) for block in model.blocks]
    with torch.no_grad():
        logits = model(io['x'])
        pooled = model.forward_head(model.forward_features(io['x']), pre_logits=True)
    torch.testing.assert_close(logits, io['logits'], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, io['pooled'], rtol=1e-5, atol=1e-5)
    for i in range(12):
        torch.testing.assert_close(outputs[i], io[f'hidden.{i}'], rtol=1e-5, atol=1e-5)
    for hook in hooks:
        hook.remove()


def test_glit_tiny_is_the_official_decoded_architecture():
    # Official glit_models.py: G per block and an index 3 i + j into the block type's 3 x 3 grid.
    decoded = []
    for block in GOLDEN['model']['blocks']:
        if block['type'] == 'global':
            decoded.append(BlockArch(3, block['mlp_ratio'], block['qkv_ratio']))
        else:
            decoded.append(BlockArch(block['G'], block['mlp_ratio'], block.get('qkv_ratio', 1.),
                                     block['conv_expansion'], block['kernel_size']))
    assert tuple(decoded) == GLIT_TINY


def test_an_architecture_file_builds_through_timm(tmp_path):
    arch = [dict(global_heads=6, qkv_ratio=2, mlp_ratio=2), dict(global_heads=0, kernel_size=17, expansion=1),
            dict(global_heads=2, expansion=2, mlp_ratio=6), dict(global_heads=4, expansion=4, mlp_ratio=4)]
    path = tmp_path / 'best.json'
    path.write_text(json.dumps({'blocks': arch}))
    model = timm.create_model('glit_custom', arch=str(path), embed_dim=384, num_heads=6, img_size=64,
                              num_classes=3).eval()
    assert [m.mixer.global_dim for m in model.blocks] == [384, 0, 128, 256]
    assert model.blocks[0].mixer.attn.head_dim == 128 and model.blocks[1].mixer.local.dw.kernel_size == (17,)
    yaml_path = tmp_path / 'best.yaml'
    yaml_path.write_text('- {global_heads: 6, qkv_ratio: 2, mlp_ratio: 2}\n- {global_heads: 0, kernel_size: 17, '
                         'expansion: 1}\n- {global_heads: 2, expansion: 2, mlp_ratio: 6}\n'
                         '- {global_heads: 4, expansion: 4, mlp_ratio: 4}\n')
    assert load_architecture(yaml_path) == load_architecture(path) == model.arch
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


@pytest.mark.parametrize('arch, message', [
    ([dict(global_heads=4)], r'block 0: global_heads 4 is not one of \[0, 1, 2, 3\]'),
    ([dict(global_heads=3, qkv_ratio=3)], r'block 0 \(global\): qkv_ratio 3 is not one of \[0.5, 1.0, 2.0\]'),
    ([dict(global_heads=0, kernel_size=33)], r'block 0 \(local\): kernel_size 33 is not one of \[17, 31, 45\]'),
    ([dict(global_heads=0, mlp_ratio=6)], r'block 0 \(local\): mlp_ratio 6 is not one of \[4.0\]'),
    ([dict(global_heads=1, kernel_size=17)], r'block 0 \(mixed\): kernel_size 17 is not one of \[31\]'),
    ([dict(global_heads=1, colour=2)], 'block 0 must be a mapping with global_heads'),
    ([], 'must be a non-empty list of blocks'),
])
def test_architectures_outside_the_space_are_named(arch, message):
    with pytest.raises(UsageError, match=message):
        leanvit.create_model('glit_custom', arch=arch)


def test_a_bad_architecture_file_is_named(tmp_path):
    path = tmp_path / 'arch.json'
    path.write_text('[{"global_heads": 3,')
    with pytest.raises(UsageError, match=f'{path} is not valid JSON'):
        leanvit.create_model('glit_custom', arch=str(path))


def test_the_search_space_checks_nothing_when_told():
    model = GLiT(arch=[BlockArch(1, kernel_size=5)], search_space=None, img_size=32, patch_size=8, num_classes=2)
    assert model.blocks[0].mixer.local.dw.kernel_size == (5,)
    assert SearchSpace().global_head_choices(12) == (0, 4, 8, 12)


def test_batchnorm_makes_train_and_eval_differ():
    model = timm.create_model('glit_tiny_patch16_224', img_size=32, patch_size=8, num_classes=3)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        train_out = model.train()(x)
        eval_out = model.eval()(x)
    assert not torch.allclose(train_out, eval_out)


def test_reparameterized_glit_equals_its_training_form():
    # The official fixture's BatchNorms carry trained running statistics: folding them must not change the outputs.
    from timm.utils.model import reparameterize_model
    config = GOLDEN['model']['config']
    model = GLiT(img_size=config['img_size'], patch_size=config['patch_size'], num_classes=config['num_classes'],
                 embed_dim=config['embed_dim'], num_heads=config['num_heads']).eval()
    leanvit.load_checkpoint(model, os.path.join(FIXTURES, 'glit_official_tiny.pth'))
    assert any(block.mixer.local is not None and block.mixer.local.norm.running_var.std() > 0
               for block in model.blocks)
    x = load_file(os.path.join(FIXTURES, 'glit_official_tiny_io.safetensors'))['x']
    with torch.no_grad():
        expected = model(x)
        deployed = reparameterize_model(model)
        assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in deployed.modules())
        torch.testing.assert_close(deployed(x), expected, rtol=1e-5, atol=1e-5)
        # Each local module is still a ConvModule, its depthwise conv carrying the norm.
        locals_ = [m for m in deployed.modules() if isinstance(m, ConvModule)]
        assert len(locals_) == 7 and all(isinstance(m.norm, torch.nn.Identity) for m in locals_)
        assert leanvit.count_params(deployed) == leanvit.count_params(model) - sum(
            2 * m.norm.num_features for m in model.modules() if isinstance(m, ConvModule))


def test_global_heads_are_timms_attention_with_their_own_head_width():
    # A qkv ratio of 2 at DeiT-Tiny widths: one global head of width 128 over 64 channels.
    torch.manual_seed(0)
    attn = GlobalAttention(64, num_heads=1, head_dim=128).eval()
    reference = timm.layers.Attention(64, num_heads=1, attn_head_dim=128, qkv_bias=True).eval()
    reference.load_state_dict(attn.state_dict())  # strict: the same keys
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), reference(x))
