"""`leanvit.compress.multiplex`: MiniViT students built from pre-trained timm DeiT/ViT and Swin teachers."""

import pytest
import timm
import torch

from leanvit.compress import agreement, multiplex
from leanvit.errors import UsageError
from leanvit.models.minivit import MiniDeiT, MiniSwin


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=4, embed_dim=24, num_heads=3,
                             num_classes=5, **kwargs).eval()


def tiny_swin():
    torch.manual_seed(0)
    # Maps 8 x 8 and 4 x 4: the second stage's window shrinks to the map (a smaller bias table in timm).
    return timm.create_model('swin_tiny_patch4_window7_224', img_size=32, window_size=4, embed_dim=12,
                             depths=(2, 2), num_heads=(1, 2), num_classes=5).eval()


def randomise(model):
    # Pre-trained teachers have non-trivial norms and biases; timm's init leaves them at 1 and 0.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)


X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize('make', [lambda: tiny_vit(class_token=False, global_pool='avg', fc_norm=False),
                                  tiny_swin], ids=['vit', 'swin'])
def test_without_sharing_the_student_is_the_teacher(make):
    # Head mixing at the identity, iRPE tables at zero: with one layer per block the student computes the teacher.
    teacher = make()
    randomise(teacher)
    student, report = multiplex(teacher, share=1, rpe=isinstance(teacher, timm.models.VisionTransformer))
    assert isinstance(student, (MiniDeiT, MiniSwin))
    with torch.no_grad():
        torch.testing.assert_close(student.eval()(X), teacher(X), rtol=1e-5, atol=1e-5)
    assert agreement(student, teacher, [X]).top1_agreement == 1.0


@pytest.mark.parametrize('init', ['first', 'mean', 1])
def test_shared_blocks_take_the_chosen_teacher_weights(init):
    teacher = tiny_vit()
    randomise(teacher)
    student, report = multiplex(teacher, share=2, init=init)
    assert report.groups == {'stages.0.blocks.0': ['blocks.0', 'blocks.1'],
                             'stages.0.blocks.1': ['blocks.2', 'blocks.3']}
    qkv = [teacher.blocks[i].attn.qkv.weight for i in (2, 3)]
    expected = {'first': qkv[0], 'mean': (qkv[0] + qkv[1]) / 2, 1: qkv[1]}[init]
    torch.testing.assert_close(student.stages[0].blocks[1].attn.qkv.weight, expected)
    # Every layer keeps its own norms.
    torch.testing.assert_close(student.stages[0].layers[3].norm2.weight, teacher.blocks[3].norm2.weight)
    assert report.student_params < report.teacher_params
    assert 'class/register token' in report.summary()


def test_compressed_swin_is_close_to_its_teacher():
    teacher = tiny_swin()
    randomise(teacher)
    student, report = multiplex(teacher, share=2)
    assert [len(stage.blocks) for stage in student.stages] == [1, 1]
    measured = agreement(student, teacher, [(X, torch.zeros(4))])
    assert measured.images == 4 and 0 <= measured.top1_agreement <= 1 and measured.logit_rmse > 0


@pytest.mark.parametrize('kwargs, message', [
    (dict(share=3), "share=3 does not divide the teacher's 4 layers"),
    (dict(share=0), 'share must be a positive number'),
    (dict(init='last'), "init must be one of first, mean or the index of a layer within each group of 2"),
    (dict(init=2), 'got 2'),
])
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(UsageError, match=message):
        multiplex(tiny_vit(), **kwargs)


def test_unsupported_teachers_are_named():
    with pytest.raises(UsageError, match='cannot multiplex a ResNet; expected a timm VisionTransformer'):
        multiplex(timm.create_model('resnet18'))
    with pytest.raises(UsageError, match='layer scale'):
        multiplex(tiny_vit(init_values=1e-5))
