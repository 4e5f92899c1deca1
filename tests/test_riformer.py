"""RIFormer: published sizes, exact re-parameterization, official checkpoints (mmpretrain and PoolFormer)."""

import copy
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.utils.model import reparameterize_model
from torch import nn

import leanvit
from leanvit.errors import CheckpointError
from leanvit.io.weights import unwrap_state_dict
from leanvit.models.riformer import (
    AffineTokenMixer,
    Layout,
    PoolingTokenMixer,
    RIFormer,
    checkpoint_filter_fn,
    detect_layout,
)

FIXTURES = Path(__file__).parent / 'fixtures'
FIXTURE_ARCH = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=5)
FULL_SIZE = ['riformer_s12', 'riformer_s24', 'riformer_s36', 'riformer_m36', 'riformer_m48']


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every norm, affine and layer scale off its init, so that a wrong fold cannot pass by accident."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if 'norm' in name or 'affine' in name or 'layer_scale' in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model


@pytest.mark.parametrize('name', [n + tag for n in FULL_SIZE for tag in ('.in1k', '.in1k_384')])
def test_params_and_macs_match_the_paper(name):
    model = leanvit.create_model(name).to('meta')
    cfg = model.pretrained_cfg
    measured = leanvit.profile(model, cfg['input_size'])
    assert measured.params == cfg['paper_params']
    assert leanvit.count_params(model.reparameterize()) == cfg['paper_deploy_params']
    assert leanvit.count_params(leanvit.create_model(name, deploy=True).to('meta')) == cfg['paper_deploy_params']
    assert measured.gmacs == pytest.approx(cfg['paper_gmacs'], rel=0.007)  # GroupNorm and GELU are not counted


def test_training_form_adds_two_parameters_per_channel_and_block():
    train, deploy = leanvit.create_model('riformer_s12'), leanvit.create_model('riformer_s12', deploy=True)
    blocks = [b for stage in train.stages for b in stage.blocks]
    assert leanvit.count_params(train) - leanvit.count_params(deploy) == sum(2 * b.norm1.num_channels for b in blocks)


@pytest.mark.parametrize('fold_layer_scale', [False, True])
def test_reparameterize_keeps_outputs(fold_layer_scale):
    torch.manual_seed(0)
    model = randomise(leanvit.create_model('test_riformer', num_classes=7)).eval()
    x = torch.randn(3, 3, 64, 80)
    with torch.no_grad():
        expected = model(x)
        deploy = copy.deepcopy(model).reparameterize(fold_layer_scale=fold_layer_scale)
        got = deploy(x)
    assert deploy.deploy and not model.deploy
    assert not any(isinstance(m, AffineTokenMixer) for m in deploy.modules())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - expected).abs().max() < 1e-5 < expected.abs().max()


def test_reparameterize_model_from_timm_reaches_every_block():
    model = randomise(leanvit.create_model('test_riformer')).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        deploy = reparameterize_model(model)  # copies, then calls reparameterize() on every module that has one
        torch.testing.assert_close(deploy(x), expected, rtol=1e-4, atol=1e-5)
    assert deploy.deploy and not model.deploy
    # ... the paper's fold, and nothing else
    paper_fold = copy.deepcopy(model).reparameterize()
    assert [type(m) for m in deploy.modules()] == [type(m) for m in paper_fold.modules()]
    assert leanvit.profile(deploy, (3, 64, 64)) == leanvit.profile(paper_fold, (3, 64, 64))
    assert deploy.state_dict().keys() == paper_fold.state_dict().keys()


def test_reparameterize_after_training_keeps_outputs():
    torch.manual_seed(0)
    model = leanvit.create_model('test_riformer', num_classes=4, drop_path_rate=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 4, (8,))
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    affine = model.stages[0].blocks[0].token_mixer.affine
    assert not torch.equal(affine.weight, torch.ones_like(affine.weight))  # training moved the mixer
    model.eval()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(copy.deepcopy(model).reparameterize()(x), expected, rtol=1e-4, atol=1e-5)


def test_deploy_model_loads_reparameterized_and_training_checkpoints(tmp_path):
    model = randomise(leanvit.create_model('test_riformer')).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    leanvit.save_weights(model, tmp_path / 'train.safetensors')
    leanvit.save_weights(copy.deepcopy(model).reparameterize(), tmp_path / 'deploy.safetensors')
    for file, kwargs in [('deploy.safetensors', {}), ('train.safetensors', {}),
                         ('train.safetensors', dict(fold_layer_scale=True))]:
        deploy = leanvit.create_model('test_riformer', deploy=True, **kwargs).eval()
        leanvit.load_checkpoint(deploy, tmp_path / file)
        with torch.no_grad():
            torch.testing.assert_close(deploy(x), expected, rtol=1e-4, atol=1e-5)


def test_deploy_checkpoint_cannot_load_into_training_form(tmp_path):
    leanvit.save_weights(leanvit.create_model('test_riformer', deploy=True), tmp_path / 'deploy.safetensors')
    with pytest.raises(ValueError, match='deploy .*RIFormer cannot be unfolded, create the model with deploy=True'):
        leanvit.load_checkpoint(leanvit.create_model('test_riformer'), tmp_path / 'deploy.safetensors')


def test_pooling_form_has_no_mixer_to_fold_and_no_deploy_form():
    poolformer = leanvit.create_model('test_riformer', token_mixer='pooling').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = poolformer(x)
        folded = reparameterize_model(poolformer)  # timm's path works on every model of the family
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-5)
    assert not folded.deploy and any(isinstance(m, PoolingTokenMixer) for m in folded.modules())
    with pytest.raises(ValueError, match="token_mixer 'pooling' has no deploy form"):
        leanvit.create_model('test_riformer', token_mixer='pooling', deploy=True)
    with pytest.raises(ValueError, match="token_mixer must be one of .*got 'attention'"):
        leanvit.create_model('test_riformer', token_mixer='attention')


def test_stages_downsample_even_with_equal_widths():
    model = leanvit.create_model('test_riformer', dims=(16, 16, 32, 32)).eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 32, 2, 2)
    assert [info['reduction'] for info in model.feature_info] == [4, 8, 16, 32]


def test_forward_intermediates_stopping_early_returns_the_unnormalised_stage():
    model = leanvit.create_model('test_riformer').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, indices=[1], stop_early=True)
    torch.testing.assert_close(final, intermediates[-1])
    assert final.shape == (1, 24, 8, 8)


def test_affine_scale_is_spared_from_weight_decay():
    from timm.optim import create_optimizer_v2
    model = leanvit.create_model('test_riformer')
    optimizer = create_optimizer_v2(model, opt='adamw', lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for group in optimizer.param_groups if group['weight_decay'] > 0 for p in group['params']}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    assert names and all(n.endswith('.weight') and ('mlp.fc' in n or 'conv' in n or 'head' in n) for n in names)


def test_checkpoints_of_another_token_mixer_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="PoolFormer checkpoint has a pooling token mixer; .*token_mixer='pooling'"):
        leanvit.load_checkpoint(RIFormer(**FIXTURE_ARCH, deploy=True), FIXTURES / 'poolformer_official_tiny.pth')
    with pytest.raises(ValueError, match='official PoolFormer checkpoint has a pooling token mixer'):
        leanvit.load_checkpoint(RIFormer(**FIXTURE_ARCH), FIXTURES / 'poolformer_official_tiny.pth')
    for name in ('riformer_mmpretrain_tiny_deploy.pth', 'riformer_mmpretrain_tiny.pth'):
        with pytest.raises(ValueError, match="mmpretrain RIFormer .*checkpoint has no pooling token mixer"):
            leanvit.load_checkpoint(RIFormer(**FIXTURE_ARCH, token_mixer='pooling'), FIXTURES / name)


def test_checkpoint_of_another_family_is_named_as_such(tmp_path):
    leanvit.save_weights(leanvit.create_model('test_sret'), tmp_path / 'sret.safetensors')
    with pytest.raises(CheckpointError, match=r"not a RIFormer/PoolFormer checkpoint: its keys match no known layout "
                                              r"\(e.g. '[\w.]+'\)") as error:
        leanvit.load_checkpoint(leanvit.create_model('test_riformer'), tmp_path / 'sret.safetensors')
    assert 'unfolded' not in str(error.value)


@pytest.mark.parametrize('file, layout', [
    ('riformer_mmpretrain_tiny.pth', Layout.MMPRETRAIN_TRAINING),
    ('riformer_mmpretrain_tiny_deploy.pth', Layout.MMPRETRAIN_DEPLOY),
    ('poolformer_official_tiny.pth', Layout.POOLFORMER_OFFICIAL),
])
def test_official_layouts_are_detected(file, layout):
    assert detect_layout(unwrap_state_dict(leanvit.read_checkpoint(FIXTURES / file))) is layout


def test_leanvit_layouts_are_detected():
    model = leanvit.create_model('test_riformer')
    assert detect_layout(model.state_dict()) is Layout.LEANVIT_TRAINING
    assert detect_layout(model.reparameterize().state_dict()) is Layout.LEANVIT_DEPLOY


def test_any_input_size_but_channels_are_checked():
    model = leanvit.create_model('test_riformer').eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 40)).shape == (1, 1000)
    with pytest.raises(ValueError, match='expected 3 input channels, got 1'):
        model(torch.randn(1, 1, 64, 64))


def test_pooling_mixer_equals_timm_poolformer_mixer():
    from timm.models.metaformer import Pooling
    x = torch.randn(2, 5, 9, 7)
    torch.testing.assert_close(PoolingTokenMixer()(x), Pooling()(x))


# Golden fixtures made once from the official code (see the JSON files beside them).

def test_mmpretrain_training_checkpoint_matches_official_outputs():
    io = load_file(FIXTURES / 'riformer_mmpretrain_tiny_io.safetensors')
    model = RIFormer(**FIXTURE_ARCH).eval()
    leanvit.load_checkpoint(model, FIXTURES / 'riformer_mmpretrain_tiny.pth')
    with torch.no_grad():
        features = model.forward_features(io['input'])
        torch.testing.assert_close(features, io['features_train'], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.forward_head(features), io['logits_train'], rtol=1e-5, atol=1e-5)
        stages = model.forward_intermediates(io['input'], intermediates_only=True)
    for i, stage in enumerate(stages):
        torch.testing.assert_close(stage, io[f'stage{i}_train'], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('checkpoint', ['riformer_mmpretrain_tiny_deploy.pth', 'riformer_mmpretrain_tiny.pth'])
@pytest.mark.parametrize('fold_layer_scale', [False, True])
def test_mmpretrain_checkpoints_load_into_deploy_model(checkpoint, fold_layer_scale):
    io = load_file(FIXTURES / 'riformer_mmpretrain_tiny_io.safetensors')
    model = RIFormer(**FIXTURE_ARCH, deploy=True, fold_layer_scale=fold_layer_scale).eval()
    leanvit.load_checkpoint(model, FIXTURES / checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(model(io['input']), io['logits_deploy'], rtol=1e-4, atol=1e-5)


def test_mmpretrain_deploy_checkpoint_is_refused_by_training_model():
    with pytest.raises(ValueError, match='create the model with deploy=True'):
        leanvit.load_checkpoint(RIFormer(**FIXTURE_ARCH), FIXTURES / 'riformer_mmpretrain_tiny_deploy.pth')


def test_official_poolformer_checkpoint_matches_official_outputs():
    io = load_file(FIXTURES / 'poolformer_official_tiny_io.safetensors')
    model = RIFormer(**FIXTURE_ARCH, token_mixer='pooling').eval()
    leanvit.load_checkpoint(model, FIXTURES / 'poolformer_official_tiny.pth')
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(io['input']), io['features'], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(io['input']), io['logits'], rtol=1e-5, atol=1e-5)


def test_pretrained_cfg_points_at_the_official_files():
    cfg = timm.models.get_pretrained_cfg('riformer_m48.in1k_384')
    assert cfg.url.startswith('https://download.openmmlab.com/mmclassification/v1/riformer/riformer-m48_')
    assert '384px' in cfg.url and cfg.url != timm.models.get_pretrained_cfg('riformer_m48').url
    assert cfg.input_size == (3, 384, 384) and cfg.interpolation == 'bicubic' and cfg.crop_pct == 1.0
    tagged = [n for name in FULL_SIZE for n in timm.models.get_arch_pretrained_cfgs(name)]
    assert tagged == [n + tag for n in FULL_SIZE for tag in ('.in1k', '.in1k_384')]
    assert timm.models.get_pretrained_cfg('riformer_m36').crop_pct == 0.95


def test_pretrained_true_converts_an_mmpretrain_file():
    io = load_file(FIXTURES / 'riformer_mmpretrain_tiny_io.safetensors')
    model = timm.create_model('test_riformer', pretrained=True, deploy=True, **FIXTURE_ARCH,
                              pretrained_cfg_overlay=dict(file=str(FIXTURES / 'riformer_mmpretrain_tiny.pth'),
                                                          num_classes=5))  # else timm drops the classifier
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(io['input']), io['logits_deploy'], rtol=1e-4, atol=1e-5)


def test_mmpretrain_norms_of_other_out_indices_are_ignored():
    io = load_file(FIXTURES / 'riformer_mmpretrain_tiny_io.safetensors')
    checkpoint = leanvit.read_checkpoint(FIXTURES / 'riformer_mmpretrain_tiny.pth')
    # A backbone saved with out_indices (0, 2, 4, 6) also has norm0 / norm2 / norm4 on the earlier stages.
    for index, dim in ((0, 8), (2, 16), (4, 24)):
        checkpoint['state_dict'][f'backbone.norm{index}.weight'] = torch.randn(dim)
        checkpoint['state_dict'][f'backbone.norm{index}.bias'] = torch.randn(dim)
    model = RIFormer(**FIXTURE_ARCH).eval()
    model.load_state_dict(checkpoint_filter_fn(checkpoint, model))  # strict: the extra norms are dropped
    with torch.no_grad():
        torch.testing.assert_close(model(io['input']), io['logits_train'], rtol=1e-5, atol=1e-5)
