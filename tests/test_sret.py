"""SReT: exact published figures, the official checkpoint converter, sliced attention semantics and clear errors."""

import json
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_models_generic import randomise_folded_statistics
from timm.utils.model import reparameterize_model
from torch import nn

import leanvit
from leanvit.models.sret import FoldedResidual, GroupAttention, LearnableResidual, SReT, checkpoint_filter_fn

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
GOLDEN = json.load(open(os.path.join(FIXTURES, 'sret_official_tiny.json')))

# Figures of the official implementation (docs/sret.md, "Variants and figures"): parameters exact, MACs within 2 %.
PUBLISHED = {
    'sret_t.in1k': (4_755_979, 1.112), 'sret_t.distill_in1k': (4_755_979, 1.112),
    'sret_lt.in1k': (4_988_024, 1.164), 'sret_lt.distill_in1k': (4_988_024, 1.164),
    'sret_s.in1k': (20_899_692, 4.173),
    'sret_t_unsliced.in1k': (4_755_979, 1.366), 'sret_t_unsliced.distill_in1k': (4_755_979, 1.366),
    'sret_lt_unsliced.in1k': (4_988_024, 1.418), 'sret_lt_unsliced.distill_in1k': (4_988_024, 1.418),
    'sret_s_unsliced.in1k': (20_899_692, 4.671),
    'sret_t_unsliced_384.distill_in1k': (None, 6.4), 'sret_s_unsliced_384.distill_in1k': (None, 18.5),
    'sret_s_unsliced_512.distill_in1k': (None, 42.8),
}


def golden_model(sliced: bool = True, **kwargs) -> SReT:
    """The fixture's official tiny configuration, in leanvit's arguments."""
    cfg = GOLDEN['config']
    groups = dict(groups=cfg['groups1'], recursive_groups=cfg['groups2']) if sliced else \
        dict(groups=(1, 1, 1), recursive_groups=(1, 1, 1))
    kwargs.setdefault('img_size', cfg['image_size'])
    return SReT(
        head_dim=cfg['base_dims'], num_heads=cfg['heads'],
        num_blocks=cfg['recursive_num'], recursion=[d // r for d, r in zip(cfg['depth'], cfg['recursive_num'])],
        mlp_ratio=cfg['mlp_ratio'], nll_ratio=cfg['np_mlp_ratio'], num_classes=cfg['num_classes'],
        **groups, **kwargs).eval()


def golden_io() -> dict:
    return load_file(os.path.join(FIXTURES, 'sret_official_tiny_io.safetensors'))


def official_state_dict() -> dict:
    return torch.load(os.path.join(FIXTURES, 'sret_official_tiny.pth'), weights_only=True)


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_published_params_and_macs(name):
    model = timm.create_model(name)
    params, gmacs = PUBLISHED[name]
    cfg = model.pretrained_cfg
    measured = leanvit.profile(model.to('meta'), cfg['input_size'])
    if params is not None:
        assert measured.params == params
    assert measured.params == cfg['paper_params']
    assert measured.gmacs == pytest.approx(gmacs, rel=0.02)


def test_every_published_configuration_is_checked():
    tagged = [n for name in leanvit.list_models('sret_*') for n in timm.models.get_arch_pretrained_cfgs(name)]
    assert sorted(PUBLISHED) == sorted(tagged)


def test_distilled_weights_are_a_tag_of_the_same_architecture():
    model = timm.create_model('sret_t.distill_in1k')
    assert model.pretrained_cfg['tag'] == 'distill_in1k' and model.pretrained_cfg['paper_top1'] == 77.6
    assert timm.create_model('sret_t').pretrained_cfg['tag'] == 'in1k'
    assert model.state_dict().keys() == timm.create_model('sret_t').state_dict().keys()
    assert 'sret_t_distill' not in leanvit.list_models()


def test_high_resolution_fine_tunes_are_their_own_architectures_with_a_distilled_tag():
    for name in ('sret_t_unsliced_384', 'sret_s_unsliced_384', 'sret_s_unsliced_512'):
        assert name in leanvit.list_models()
        assert list(timm.models.get_arch_pretrained_cfgs(name)) == [f'{name}.distill_in1k']
        assert timm.create_model(name).pretrained_cfg['tag'] == 'distill_in1k'
    assert not leanvit.list_models('*_distill_*')


def test_high_resolution_params_grow_by_the_position_embedding_only():
    base = leanvit.count_params(timm.create_model('sret_s_unsliced'))
    large = leanvit.count_params(timm.create_model('sret_s_unsliced_512'))
    assert large - base == 126 * (64 * 64 - 28 * 28)


def test_official_checkpoint_gives_official_outputs_with_random_permutations():
    io = golden_io()
    model = leanvit.load_checkpoint(golden_model(eval_permutation='random'),
                                    os.path.join(FIXTURES, 'sret_official_tiny.pth'))
    torch.manual_seed(GOLDEN['forward_seed'])
    with torch.no_grad():
        logits = model(io['x'])
    torch.testing.assert_close(logits, io['logits_sliced_seed123'], rtol=1e-5, atol=1e-5)
    torch.manual_seed(GOLDEN['forward_seed'])
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(io['x']), pre_logits=True)
    torch.testing.assert_close(pooled, io['features_sliced_seed123'], rtol=1e-5, atol=1e-5)
    # The comparison is sensitive to the permutations drawn: the deterministic eval permutation differs.
    model.stages[0].random_eval_permutation = False
    with torch.no_grad():
        assert (model(io['x']) - io['logits_sliced_seed123']).abs().max() > 1e-2


def test_official_checkpoint_into_unsliced_model():
    io = golden_io()
    model = leanvit.load_checkpoint(golden_model(sliced=False), os.path.join(FIXTURES, 'sret_official_tiny.pth'))
    with torch.no_grad():
        torch.testing.assert_close(model(io['x']), io['logits_unsliced'], rtol=1e-5, atol=1e-5)


def test_converter_stores_each_shared_block_once():
    official = official_state_dict()['model']
    converted = checkpoint_filter_fn(official, golden_model())
    assert len(official) == GOLDEN['state_dict_entries']
    assert len(converted) == GOLDEN['state_dict_unique_tensors']
    model = golden_model()
    assert leanvit.count_params(model) == GOLDEN['param_count']
    assert len(model.state_dict()) == len(converted)


@pytest.mark.parametrize('wrap', ['model', 'state_dict_module', 'bare'])
def test_converter_accepts_training_script_wrappers(wrap, tmp_path):
    official = official_state_dict()['model']
    if wrap == 'model':
        saved = {'model': official, 'epoch': 300}
    elif wrap == 'state_dict_module':
        saved = {'state_dict': {'module.' + k: v for k, v in official.items()}}
    else:
        saved = official
    torch.save(saved, tmp_path / 'ckpt.pth')
    model = leanvit.load_checkpoint(golden_model(sliced=False), tmp_path / 'ckpt.pth')
    with torch.no_grad():
        torch.testing.assert_close(model(golden_io()['x']), golden_io()['logits_unsliced'], rtol=1e-5, atol=1e-5)


def test_converter_refuses_diverging_copies_of_a_shared_block():
    official = {k: v.clone() for k, v in official_state_dict()['model'].items()}
    official['transformers.0.blocks.2.attn.qkv.weight'] += 1
    with pytest.raises(ValueError, match=r'transformers\.0\.blocks\.2\.attn\.qkv\.weight should repeat shared block 0'):
        checkpoint_filter_fn(official, golden_model())


def test_checkpoint_of_another_architecture_is_named(tmp_path):
    model = timm.create_model('test_sret')
    with pytest.raises(ValueError, match=r'does not fit model test_sret: .*shapes differ.*another architecture'):
        leanvit.load_checkpoint(model, os.path.join(FIXTURES, 'sret_official_tiny.pth'))


def test_position_embedding_is_resized_for_another_resolution():
    model = golden_model(sliced=False, img_size=128)
    official = official_state_dict()['model']
    converted = checkpoint_filter_fn(official, model)
    expected = F.interpolate(official['pos_embed'], size=(16, 16), mode='bicubic', align_corners=False)
    torch.testing.assert_close(converted['pos_embed'], expected)
    model.load_state_dict(converted)
    assert model(torch.randn(1, 3, 128, 128)).shape == (1, 5)


def test_img_size_384_creates_a_larger_grid():
    model = timm.create_model('sret_t', img_size=384, num_classes=10).eval()
    assert model.pos_embed.shape == (1, 64, 48, 48)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 384, 384)).shape == (1, 10)


def test_eval_is_deterministic_and_training_draws_permutations():
    model = timm.create_model('test_sret').eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_random_eval_permutation_reproduces_the_official_stochastic_evaluation():
    model = timm.create_model('test_sret', eval_permutation='random').eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
        torch.manual_seed(0)
        first = model(x)
        torch.manual_seed(0)
        assert torch.equal(first, model(x))


def test_fixed_eval_permutation_is_the_random_path_with_a_fixed_draw(monkeypatch):
    fixed = timm.create_model('test_sret').eval()
    random = timm.create_model('test_sret', eval_permutation='random').eval()
    random.load_state_dict(fixed.state_dict())
    drawn = iter([stage.fixed_permutation for stage in fixed.stages for _ in range(len(stage.blocks))
                  if stage.fixed_permutation is not None])
    monkeypatch.setattr(torch, 'randperm', lambda n: next(drawn))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), random(x), rtol=0, atol=0)


def reference_group_attention(attn: GroupAttention, x: torch.Tensor, groups: int) -> torch.Tensor:
    """Attention written out per group, before the output projection."""
    B, N, C = x.shape
    heads, head_dim = attn.num_heads, C // attn.num_heads
    outputs = []
    for chunk in x.chunk(groups, dim=1):
        q, k, v = attn.qkv(chunk).reshape(B, -1, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * head_dim ** -0.5).softmax(-1)
        outputs.append((weights @ v).transpose(1, 2).reshape(B, -1, C))
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize('groups', [1, 2, 4])
def test_group_attention_attends_within_contiguous_slices(groups):
    attn = GroupAttention(16, num_heads=2).eval()
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, groups), attn.proj(reference_group_attention(attn, x, groups)))


def test_group_attention_permutes_then_restores_token_order():
    attn = GroupAttention(16, num_heads=2).eval()
    x = torch.randn(2, 8, 16)
    permutation = torch.randperm(8)
    with torch.no_grad():
        expected = torch.empty_like(x)
        expected[:, permutation] = reference_group_attention(attn, x[:, permutation], 2)
        torch.testing.assert_close(attn(x, 2, permutation), attn.proj(expected))


def test_group_attention_without_slicing_is_timms_attention():
    torch.manual_seed(0)
    attn = GroupAttention(16, num_heads=2).eval()
    reference = timm.layers.Attention(16, num_heads=2, qkv_bias=True).eval()
    reference.load_state_dict(attn.state_dict())  # strict: the same keys
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), reference(x))


def test_group_attention_drops_attention_weights_in_training_only():
    attn = GroupAttention(16, num_heads=2, attn_drop=0.5)
    assert not any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in attn.modules())  # a rate, not a module
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        assert not torch.equal(attn.train()(x, 2), attn(x, 2))
        assert torch.equal(attn.eval()(x, 2), attn(x, 2))


def test_shared_blocks_are_stored_once_and_recursion_is_configurable():
    deep = timm.create_model('sret_t', recursion=10, img_size=64, num_classes=10)
    applications = sum(len(stage.blocks) * stage.recursion for stage in deep.stages)
    assert applications == 100
    assert sum(len(stage.projections) for stage in deep.stages) == 100
    assert sum(len(stage.blocks) for stage in deep.stages) == 10
    shallow = timm.create_model('sret_t', img_size=64, num_classes=10)
    nll_params = sum(p.numel() for stage in shallow.stages for p in stage.projections[0].parameters())
    assert nll_params > 0
    block_params = sum(p.numel() for stage in deep.stages for p in stage.blocks.parameters())
    assert block_params == sum(p.numel() for stage in shallow.stages for p in stage.blocks.parameters())
    storages = [v.untyped_storage().data_ptr() for v in deep.state_dict().values()]
    assert len(storages) == len(set(storages))
    assert deep(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_learnable_residual_coefficients_start_at_one():
    model = timm.create_model('sret_t')
    scales = {k: v for k, v in model.named_parameters() if k.endswith('_scale')}
    blocks = sum(len(stage.blocks) for stage in model.stages)
    projections = sum(len(stage.projections) for stage in model.stages)
    assert len(scales) == 4 * blocks + 2 * projections == 4 * 10 + 2 * 20
    assert all(v.shape == (1,) and v.item() == 1.0 for v in scales.values())


def test_drop_path_follows_the_official_schedule():
    model = timm.create_model('sret_t', drop_path_rate=0.1)
    # Official: shared block b of stage s gets rate * (applications in earlier stages + b) / 20.
    expected = [0.1 * (start + b) / 20 for start, blocks in ((0, 2), (4, 5), (14, 3)) for b in range(blocks)]
    rates = [getattr(block.drop_path, 'drop_prob', 0.) for stage in model.stages for block in stage.blocks]
    assert rates == pytest.approx(expected)


def test_wrong_channel_count_is_named():
    model = timm.create_model('test_sret')
    with pytest.raises(ValueError, match='expected 3 input channels, got 1'):
        model(torch.randn(1, 1, 64, 64))


def test_wrong_input_resolution_is_named():
    model = timm.create_model('test_sret')
    with pytest.raises(ValueError, match=r'expected input size 64x64, got 96x96.*img_size=96'):
        model(torch.randn(1, 3, 96, 96))


def test_image_size_not_divisible_by_the_stem_stride_is_named():
    with pytest.raises(ValueError, match=r'img_size \(100, 100\) must be divisible by the conv stem stride 8'):
        timm.create_model('sret_t', img_size=100)


def test_group_count_that_does_not_divide_the_tokens_is_named():
    with pytest.raises(ValueError, match=r'groups=5 does not divide the 784 tokens \(28x28 grid\).*divisor of 784'):
        timm.create_model('sret_t', groups=(5, 4, 1))
    with pytest.raises(ValueError, match=r'recursive_groups=3 does not divide the 196 tokens'):
        timm.create_model('sret_t', recursive_groups=(2, 3, 1))


def test_per_stage_arguments_must_match_the_stage_count():
    with pytest.raises(ValueError, match=r'groups has 2 entries; expected one per stage \(3\)'):
        timm.create_model('sret_t', groups=(8, 4))


def test_reparameterized_model_folds_the_stem_norms_and_the_branch_scales():
    model = randomise_folded_statistics(timm.create_model('test_sret')).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = model(x).detach()
    folded = reparameterize_model(model)
    assert not any(isinstance(m, (nn.BatchNorm2d, LearnableResidual)) for m in folded.modules())
    residuals = [m for m in folded.modules() if isinstance(m, FoldedResidual)]
    assert len(residuals) == sum(isinstance(m, LearnableResidual) for m in model.modules())
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-5)
    # The training model is untouched, and its forward does not depend on the autograd mode.
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_reparameterized_model_counts_what_it_keeps():
    model = timm.create_model('sret_t').to('meta')
    folded = reparameterize_model(model)
    stem_norm_params = sum(m.weight.numel() + m.bias.numel() for m in model.stem.modules()
                           if isinstance(m, nn.BatchNorm2d))
    branch_scales = sum(isinstance(m, LearnableResidual) for m in model.modules())
    assert leanvit.profile(model).params == PUBLISHED['sret_t.in1k'][0]
    assert leanvit.count_params(folded) == PUBLISHED['sret_t.in1k'][0] - stem_norm_params - branch_scales
    assert leanvit.profile(folded).macs == leanvit.profile(model).macs


def test_stage_widths_must_allow_the_depthwise_downsampling():
    with pytest.raises(ValueError, match='a stage of width 48 cannot follow one of width 32'):
        timm.create_model('sret_t', head_dim=(16, 16, 32), num_heads=(2, 3, 8))


def test_timm_pretrained_loading_converts_an_official_file():
    cfg = GOLDEN['config']
    io = golden_io()
    model = timm.create_model(
        'test_sret', pretrained=True, img_size=cfg['image_size'], head_dim=cfg['base_dims'], num_classes=5,
        groups=cfg['groups1'], recursive_groups=cfg['groups2'], eval_permutation='random',
        pretrained_cfg_overlay=dict(file=os.path.join(FIXTURES, 'sret_official_tiny.pth'), num_classes=5)).eval()
    torch.manual_seed(GOLDEN['forward_seed'])
    with torch.no_grad():
        torch.testing.assert_close(model(io['x']), io['logits_sliced_seed123'], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_matches_cpu():
    model = timm.create_model('test_sret').eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        got = model.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


def count_projection_calls(model, x) -> int:
    calls = []
    hooks = [p.register_forward_hook(lambda *_: calls.append(1)) for s in model.stages for p in s.projections]
    model(x)
    for hook in hooks:
        hook.remove()
    return len(calls)


def test_mixed_depth_samples_shallower_networks_in_training_only():
    model = timm.create_model('test_sret', recursion=4, mixed_depth=True)
    x = torch.randn(1, 3, 64, 64)
    full_depth = sum(len(stage.projections) for stage in model.stages)
    torch.manual_seed(0)
    depths = [count_projection_calls(model.train(), x) for _ in range(8)]
    assert min(depths) >= sum(len(stage.blocks) for stage in model.stages)
    assert max(depths) <= full_depth and len(set(depths)) > 1
    assert count_projection_calls(model.eval(), x) == full_depth


@pytest.mark.parametrize('recursion, mixed_depth, unused', [(4, True, True), (4, False, False), (1, True, False)])
def test_only_mixed_depth_training_declares_parameters_a_step_leaves_unused(recursion, mixed_depth, unused):
    # The engine reads this to set DDP's find_unused_parameters: with one application per block nothing is skipped.
    model = timm.create_model('test_sret', recursion=recursion, mixed_depth=mixed_depth)
    assert model.leaves_parameters_unused is unused
