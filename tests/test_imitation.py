"""RIFormer's training method: feature taps, module imitation losses, teacher-weight initialisation, engine wiring."""

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from test_riformer import FIXTURE_ARCH, FIXTURES
from torch import nn

import leanvit
from leanvit.errors import UsageError
from leanvit.methods.features import FeatureTaps, blocks_by_stage, feature_mse, relation_matrix, relation_mse
from leanvit.methods.riformer.imitation import (
    ImitationWeights,
    ModuleImitation,
    mixer_output_mse,
    module_imitation,
    pair_blocks,
)
from leanvit.models.riformer import RIFormer
from leanvit.train import TrainConfig, train
from leanvit.train.initialization import init_from_teacher


def student_and_teacher(seed: int = 0):
    torch.manual_seed(seed)
    return leanvit.create_model('test_riformer', num_classes=4), \
        leanvit.create_model('test_riformer', num_classes=4, token_mixer='pooling').eval()


def test_taps_keep_outputs_and_inputs_by_name_and_detach_cleanly():
    model = leanvit.create_model('test_riformer').eval()
    x = torch.randn(2, 3, 64, 64)
    with FeatureTaps(model, ['stages.1', 'stages.0.blocks.0.norm1'], inputs=True) as taps:
        with torch.no_grad():
            model(x)
            stage0 = model.stages[0](model.stem(x))
        torch.testing.assert_close(taps.inputs['stages.1'], stage0)
        torch.testing.assert_close(taps.outputs['stages.1'], model.stages[1](stage0))
        assert taps.outputs['stages.0.blocks.0.norm1'].shape == (2, 16, 16, 16)
    assert not taps.outputs and not any(m._forward_hooks for m in model.modules())


def test_taps_name_the_closest_modules_for_a_typo():
    with pytest.raises(KeyError, match=r"no module named \['stages.0.blocks.0.nrom1'\].*stages.0.blocks.0.norm1"):
        FeatureTaps(leanvit.create_model('test_riformer'), ['stages.0.blocks.0.nrom1'])


def test_losses_against_hand_written_formulas():
    s, t = torch.randn(2, 6, 3, 4), torch.randn(2, 6, 3, 4)
    assert feature_mse(s, t) == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-6)
    tokens = s.flatten(2).transpose(1, 2)  # (B, N, C)
    cosine = F.cosine_similarity(tokens.unsqueeze(2), tokens.unsqueeze(1), dim=-1)
    torch.testing.assert_close(relation_matrix(s), cosine)
    # Relations compare features of any widths with the same tokens, and a rescaled feature has the same relations.
    wide = torch.randn(2, 10, 3, 4)
    assert relation_mse(s, wide) > 0
    assert relation_mse(s, 3 * s) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match=r'student feature \(2, 6, 3, 4\) and teacher feature \(2, 10, 3, 4\) differ'):
        feature_mse(s, wide)
    with pytest.raises(ValueError, match='same number of tokens'):
        relation_mse(s, torch.randn(2, 6, 2, 2))


def test_mixer_output_term_trains_the_affine_towards_the_pooling_mixer():
    student, teacher = student_and_teacher()
    mixer = student.stages[0].blocks[0].token_mixer
    normalised = torch.randn(4, 16, 8, 8)
    target = teacher.stages[0].blocks[0].token_mixer(normalised)
    loss = mixer_output_mse(mixer, normalised, target)
    # The affine starts as "add nothing", so the first loss is the pooling mixer's own energy.
    assert loss.item() == pytest.approx(target.square().mean().item(), rel=1e-6)
    loss.backward()
    assert mixer.affine.weight.grad.abs().sum() > 0 and mixer.affine.bias.grad is not None


def test_blocks_pair_stage_by_stage_and_proportionally_in_depth():
    student = [['s0.b0'], ['s1.b0', 's1.b1']]
    teacher = [['t0.b0', 't0.b1', 't0.b2'], ['t1.b0', 't1.b1', 't1.b2', 't1.b3']]
    assert pair_blocks(student, teacher) == [('s0.b0', 't0.b2'), ('s1.b0', 't1.b1'), ('s1.b1', 't1.b3')]
    with pytest.raises(ValueError, match='the student has 2 stages and the teacher 1'):
        pair_blocks(student, teacher[:1])
    names = blocks_by_stage(leanvit.create_model('test_riformer'))
    assert names == [['stages.0.blocks.0'], ['stages.1.blocks.0'], ['stages.2.blocks.0', 'stages.2.blocks.1'],
                     ['stages.3.blocks.0']]
    with pytest.raises(ValueError, match='no module of RIFormer matches the block pattern'):
        blocks_by_stage(leanvit.create_model('test_riformer'), r'layers\.(\d+)\.(\d+)')


def test_module_imitation_terms_equal_the_direct_computation():
    student, teacher = student_and_teacher()
    weights = ImitationWeights(block_output=2., mixer_output=3., relation=5.)
    imitation = ModuleImitation(student, teacher, weights)
    x = torch.randn(2, 3, 64, 64)
    student(x)
    with torch.no_grad():
        teacher(x)
    terms = imitation.terms()
    # The same terms computed by hand, from a second pair of forwards with our own taps.
    names = [f'stages.{s}.blocks.{b}' for s, b in [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0)]]
    with FeatureTaps(student, names) as st, FeatureTaps(teacher, names) as tt, \
            FeatureTaps(teacher, [n + '.token_mixer' for n in names], inputs=True) as mt:
        student(x)
        teacher(x)
        block = sum(((st.outputs[n] - tt.outputs[n]) ** 2).mean() for n in names) / len(names)
        mixer = sum(((student.get_submodule(n + '.token_mixer')(mt.inputs[n + '.token_mixer']) -
                      mt.outputs[n + '.token_mixer']) ** 2).mean() for n in names) / len(names)
        relation = sum(((relation_matrix(st.outputs[n]) - relation_matrix(tt.outputs[n])) ** 2).mean()
                       for n in names) / len(names)
    torch.testing.assert_close(terms['block_output'], block)
    torch.testing.assert_close(terms['mixer_output'], mixer)
    torch.testing.assert_close(terms['relation'], relation)
    loss = imitation.loss()
    torch.testing.assert_close(loss, 2 * block + 3 * mixer + 5 * relation)
    with pytest.raises(RuntimeError, match='needs one student and one teacher forward before each loss'):
        imitation.loss()  # the taps were emptied
    loss.backward()
    # Every parameter before the final norm feeds some tapped block output.
    assert all(p.grad is not None for n, p in student.named_parameters() if not n.startswith(('norm.', 'head.')))
    imitation.remove()
    assert not any(m._forward_hooks for m in list(student.modules()) + list(teacher.modules()))


def test_disabled_terms_are_not_computed():
    student, teacher = student_and_teacher()
    imitation = ModuleImitation(student, teacher, ImitationWeights(relation=1.))
    assert imitation.teacher_mixer_taps is None
    student(torch.randn(1, 3, 64, 64))
    teacher(torch.randn(1, 3, 64, 64))
    assert set(imitation.terms()) == {'relation'}


def test_teacher_init_copies_everything_but_the_token_mixer():
    student, teacher = student_and_teacher()
    report = init_from_teacher(student, teacher)
    assert report.token_mixer and all('.token_mixer.' in n for n in report.token_mixer)
    assert not report.student_only and not report.teacher_only and not report.shape_mismatch
    teacher_state = teacher.state_dict()
    for name, value in student.state_dict().items():
        assert (name in teacher_state and torch.equal(value, teacher_state[name])) == (name in report.copied), name
    assert len(report.copied) + len(report.token_mixer) == len(student.state_dict())


def test_teacher_init_from_official_poolformer_and_timm_poolformer():
    # An official PoolFormer checkpoint: converted by the RIFormer family's checkpoint_filter_fn on the way in.
    student = RIFormer(**FIXTURE_ARCH).eval()
    report = init_from_teacher(student, leanvit.read_checkpoint(FIXTURES / 'poolformer_official_tiny.pth'))
    assert not report.student_only and not report.teacher_only
    reference = leanvit.load_checkpoint(RIFormer(**FIXTURE_ARCH, token_mixer='pooling'),
                                        FIXTURES / 'poolformer_official_tiny.pth').state_dict()
    assert sorted(report.copied) == sorted(reference)
    for name, value in student.state_dict().items():
        if name in reference:
            assert torch.equal(value, reference[name]), name
    # timm's poolformer: same block names, but its head normalises after pooling (LayerNorm): reported, not copied.
    timm_teacher = timm.create_model('poolformer_s12', num_classes=10)
    report = init_from_teacher(leanvit.create_model('riformer_s12', num_classes=10), timm_teacher)
    assert report.teacher_only == ['head.norm.bias', 'head.norm.weight']
    assert sorted(report.student_only) == ['norm.bias', 'norm.weight']
    assert len(report.copied) == len(timm_teacher.state_dict()) - 2
    assert 'copied' in report.summary() and 'head.norm.weight' in report.summary()


TINY = dict(model='test_riformer', img_size=32, batch_size=64, epochs=1, lr=2e-3, warmup_epochs=0, progress=False,
            augment='none')


def test_engine_trains_with_imitation_and_teacher_init(tmp_path, monkeypatch):
    teacher = leanvit.create_model('test_riformer', num_classes=10, token_mixer='pooling')
    leanvit.save_weights(teacher, tmp_path / 'teacher.safetensors')
    losses = []
    original_loss = ModuleImitation.loss

    def recorded_loss(self):
        losses.append(original_loss(self))
        assert not self.student_taps.outputs, 'the taps are emptied after every loss'
        return losses[-1]
    monkeypatch.setattr(ModuleImitation, 'loss', recorded_loss)
    config = TrainConfig(**TINY, teacher='test_riformer', teacher_kwargs={'token_mixer': 'pooling'},
                         teacher_checkpoint=str(tmp_path / 'teacher.safetensors'), kd_alpha=1.0, ema_decay=0.9,
                         objectives={'module_imitation': dict(block_output=1., mixer_output=1., relation=1.)},
                         init_from_teacher=True, output=str(tmp_path / 'full'))
    train(config)
    report = json.loads((tmp_path / 'full' / 'teacher_init.json').read_text())
    assert len(report['copied']) == len(teacher.state_dict()) and report['token_mixer']
    assert len(losses) == 1437 // 64 and all(loss.requires_grad and loss > 0 for loss in losses)
    # Initialised from the teacher, the student's blocks start close to its own: the first step's imitation loss is
    # the mixers' (the affine starts as "add nothing") and the terms shrink as it trains.
    assert losses[-1] < losses[0]


def test_engine_refuses_imitation_without_a_live_teacher(tmp_path):
    with pytest.raises(UsageError, match='module_imitation needs a live teacher'):
        train(TrainConfig(**TINY, output=str(tmp_path / 'run'), objectives={'module_imitation': {'relation': 1.}}))


@pytest.mark.parametrize('objectives, match', [
    ({'imitation': {}}, "unknown objective 'imitation'; known: module_imitation"),
    ({'module_imitation': [1]}, 'objectives.module_imitation must be a mapping of options'),
    ({'module_imitation': {'relations': 1.}}, "objectives.module_imitation: .*unexpected keyword argument 'relations'"),
    ({'module_imitation': {}}, 'needs a weight > 0'),
])
def test_objective_options_are_checked_by_name(tmp_path, objectives, match):
    with pytest.raises(UsageError, match=match):
        train(TrainConfig(**TINY, output=str(tmp_path / 'run'), teacher='test_riformer', objectives=objectives))



def test_block_patterns_reach_other_model_layouts():
    class Flat(nn.Module):  # blocks named layers.{stage}_{block}, as another family might
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleDict({f'{s}_{b}': nn.Conv2d(3, 3, 1) for s in range(2) for b in range(2)})
    assert blocks_by_stage(Flat(), r'layers\.(\d+)_(\d+)') == [['layers.0_0', 'layers.0_1'],
                                                                ['layers.1_0', 'layers.1_1']]


def test_relation_imitation_of_a_gfnet_teacher_reads_its_nhwc_blocks():
    student = leanvit.create_model('test_riformer', num_classes=4)
    teacher = leanvit.create_model('gfnet_h_ti', num_classes=4, img_size=64).eval()
    imitation = ModuleImitation(student, teacher, ImitationWeights(relation=1.), teacher_blocks=r'blocks\.(\d+)\.(\d+)',
                                teacher_layout='NHWC')
    assert imitation.pairs[0] == ('stages.0.blocks.0', 'blocks.0.2')  # 1 student block vs 3 teacher blocks
    x = torch.randn(2, 3, 64, 64)
    student(x)
    with torch.no_grad():
        teacher(x)
    s, t = imitation.student_taps.outputs['stages.2.blocks.1'], imitation.teacher_taps.outputs['blocks.2.9']
    assert t.shape[-1] == 256 and s.shape[1] == 32  # other widths: only the relation term applies
    expected = relation_mse(s, t.permute(0, 3, 1, 2))  # the teacher's map, read as NCHW
    assert relation_mse(s, t, 'NCHW', 'NHWC').item() == pytest.approx(expected.item(), rel=1e-5)
    assert imitation.loss() > 0
    with pytest.raises(ValueError, match="layout must be one of .*got 'HWC'"):
        relation_mse(s, t, 'NCHW', 'HWC')


def test_a_gfnet_teachers_blocks_are_found_without_a_pattern():
    student = leanvit.create_model('test_riformer', num_classes=4)
    teacher = leanvit.create_model('gfnet_h_ti', num_classes=4, img_size=64)
    found, named = (ModuleImitation(student, teacher, ImitationWeights(relation=1.), teacher_blocks=pattern,
                                    teacher_layout='NHWC') for pattern in (None, r'blocks\.(\d+)\.(\d+)'))
    assert found.pairs == named.pairs and found.pairs[-1] == ('stages.3.blocks.0', 'blocks.3.2')


def test_imagenet_recipe_pairs_riformer_s12_with_gfnet_h_b_stage_by_stage():
    config = TrainConfig.from_yaml(str(Path(__file__).parent.parent / 'recipes' / 'riformer_s12_in1k.yaml'))
    student, teacher = leanvit.create_model(config.model), leanvit.create_model(config.teacher)
    imitation = module_imitation(student, teacher, **config.objectives['module_imitation'])
    # 12 student blocks, each with the teacher block at the same relative depth of the same stage (3, 3, 27, 3).
    assert [t for _, t in imitation.pairs] == ['blocks.0.1', 'blocks.0.2', 'blocks.1.1', 'blocks.1.2'] + \
        [f'blocks.2.{k}' for k in (4, 8, 13, 17, 22, 26)] + ['blocks.3.1', 'blocks.3.2']


def test_teacher_init_unwraps_saved_state_dicts():
    student, teacher = student_and_teacher()
    wrapped = {'state_dict': {'module.' + k: v for k, v in teacher.state_dict().items()}, 'meta': {'epoch': 3}}
    report = init_from_teacher(student, wrapped)
    assert len(report.copied) == len(teacher.state_dict()) and not report.teacher_only
    torch.testing.assert_close(student.stem.conv.weight, teacher.stem.conv.weight)


def test_imitation_settings_are_checked():
    student, teacher = student_and_teacher()
    with pytest.raises(ValueError, match='imitation weights must be >= 0'):
        ModuleImitation(student, teacher, ImitationWeights(relation=-1.))
    gfnet = leanvit.create_model('gfnet_h_ti', img_size=64)
    with pytest.raises(ValueError, match='mixer-output term .*needs MetaFormer blocks with a token_mixer'):
        ModuleImitation(student, gfnet, ImitationWeights(mixer_output=1.), teacher_blocks=r'blocks\.(\d+)\.(\d+)')


def test_timm_poolformer_is_a_same_layout_teacher_for_every_term():
    student = leanvit.create_model('riformer_s12', num_classes=10)
    teacher = timm.create_model('poolformer_s12', num_classes=10).eval()
    imitation = ModuleImitation(student, teacher, ImitationWeights(1., 1., 1.))
    assert imitation.pairs == [(name, name) for stage in blocks_by_stage(student) for name in stage]
    x = torch.randn(1, 3, 64, 64)
    student(x)
    with torch.no_grad():
        teacher(x)
    terms = imitation.terms()
    assert set(terms) == {'block_output', 'mixer_output', 'relation'} and all(v > 0 for v in terms.values())
