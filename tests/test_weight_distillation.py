"""MiniViT's weight distillation: the relation losses against plain formulas, the applied-layer taps, the objective."""

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

import leanvit
from leanvit.errors import UsageError
from leanvit.methods.features import qkv_projection
from leanvit.methods.minivit.weight_distillation import (
    WeightDistillation,
    attention_relation_loss,
    default_layer_pairs,
    hidden_relation_loss,
    qkv_relation_logits,
)
from leanvit.train.objectives import build_objectives


def tiny_vit(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    options = {'img_size': 32, 'patch_size': 8, 'depth': 4, 'embed_dim': 24, 'num_heads': 3, 'num_classes': 5}
    return timm.create_model('vit_tiny_patch16_224', **options | kwargs)


def tiny_swin(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('swin_tiny_patch4_window7_224', img_size=32, window_size=4, embed_dim=12, depths=(2, 2),
                             num_heads=(1, 2), num_classes=5)


class SharedBlockTwice(nn.Module):
    """One ViT block applied twice per forward, as weight multiplexing applies a shared layer."""

    def __init__(self):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=24)
        self.blocks = nn.ModuleList([Block(24, num_heads=3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        return self.blocks[0](self.blocks[0](x)).mean(1)


def no_hooks(*models: nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for model in models for m in model.modules())


def cosine_gram(x: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(x.unsqueeze(2), x.unsqueeze(1), dim=-1)


def reference_relation_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], heads: int) -> torch.Tensor:
    """−Σ R_t log R_s by plain loops over the nine (i, j), the images, the heads and the rows."""
    def relation(qkv, i, j, b, h):
        d = qkv[i].shape[-1] // heads
        x_i, x_j = qkv[i][b, :, h * d:(h + 1) * d], qkv[j][b, :, h * d:(h + 1) * d]
        return torch.softmax(x_i @ x_j.T / math.sqrt(d), dim=-1)
    total, rows = 0., 0
    for i in range(3):
        for j in range(3):
            for b in range(student[0].shape[0]):
                for h in range(heads):
                    r_s, r_t = relation(student, i, j, b, h), relation(teacher, i, j, b, h)
                    for row in range(r_s.shape[0]):
                        total, rows = total - (r_t[row] * r_s[row].log()).sum(), rows + 1
    return total / rows


def test_attention_relation_loss_equals_a_loop_over_pairs_heads_and_rows():
    torch.manual_seed(0)
    student = [torch.randn(2, 5, 4, dtype=torch.float64) for _ in range(3)]
    teacher = [torch.randn(2, 5, 6, dtype=torch.float64) for _ in range(3)]  # another width, the same tokens
    torch.testing.assert_close(attention_relation_loss(student, teacher, relation_heads=2),
                               reference_relation_loss(student, teacher, heads=2))
    assert qkv_relation_logits(*student, relation_heads=2).shape == (3, 3, 2, 2, 5, 5)


def test_attention_relation_loss_is_least_when_the_relations_agree():
    # Soft cross-entropy (the official loss) of equal relations is the teacher's entropy; anything else costs more.
    torch.manual_seed(0)
    qkv = [torch.randn(2, 5, 4) for _ in range(3)]
    logits = qkv_relation_logits(*qkv, relation_heads=1)
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(attention_relation_loss(qkv, qkv), entropy)
    assert attention_relation_loss([torch.randn(2, 5, 4) for _ in range(3)], qkv) > entropy + 0.1
    with pytest.raises(ValueError, match='need the same sequences of tokens'):
        attention_relation_loss(qkv, [torch.randn(2, 6, 4) for _ in range(3)])


def test_hidden_relation_loss_is_the_scaled_gram_mse_and_ignores_token_norms():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 4), torch.randn(2, 5, 7)
    expected = 49 * ((cosine_gram(student) - cosine_gram(teacher)) ** 2).mean()
    torch.testing.assert_close(hidden_relation_loss(student, teacher), expected)
    token_scales = torch.rand(2, 5, 1) + 0.1
    torch.testing.assert_close(hidden_relation_loss(student * token_scales, teacher), expected)
    assert hidden_relation_loss(student, student * token_scales, scale=1.) == pytest.approx(0, abs=1e-6)


def test_default_layer_pairs_are_the_papers_and_otherwise_evenly_spaced():
    assert default_layer_pairs(12, 24) == ([1, 3, 5, 7, 9, 11], [1, 3, 9, 15, 21, 23])
    assert default_layer_pairs(24, 24) == ([1, 3, 9, 15, 21, 23], [1, 3, 9, 15, 21, 23])
    assert default_layer_pairs(4, 8) == ([0, 1, 2, 3], [1, 3, 5, 7])
    assert default_layer_pairs(12, 12) == ([1, 3, 5, 7, 9, 11], [1, 3, 5, 7, 9, 11])


def test_gradients_reach_the_student_qkv_and_never_the_teacher():
    student, teacher = tiny_vit(0), tiny_vit(1, embed_dim=48, depth=8)
    distillation = WeightDistillation(student, teacher)
    x = torch.randn(2, 3, 32, 32)
    student(x), teacher(x)  # the teacher with autograd on: the objective must detach it itself
    loss = distillation.loss()
    assert loss > 0
    loss.backward()
    assert all(block.attn.qkv.weight.grad.abs().sum() > 0 for block in student.blocks)
    assert all(p.grad is None for p in teacher.parameters())
    assert not distillation.student_taps.qkv and not distillation.teacher_taps.hidden  # emptied by loss()


def test_a_student_equal_to_its_teacher_has_no_hidden_loss_and_no_gradient():
    student = tiny_vit()
    teacher = copy.deepcopy(student)
    distillation = WeightDistillation(student, teacher)
    x = torch.randn(2, 3, 32, 32)
    student(x), teacher(x)
    terms = distillation.terms()
    assert terms['hidden'].item() == pytest.approx(0, abs=1e-6)
    (terms['attention'] + terms['hidden']).backward()
    assert max(block.attn.qkv.weight.grad.abs().max() for block in student.blocks) < 1e-6


def test_a_shared_block_applied_twice_counts_as_two_layers():
    student, teacher = SharedBlockTwice(), tiny_vit(class_token=False, global_pool='avg')  # 16 tokens on both sides
    distillation = WeightDistillation(student, teacher)
    assert distillation.student_depth == 2 and distillation.pairs == [(0, 1), (1, 3)]
    student(torch.randn(2, 3, 32, 32))
    taps = distillation.student_taps
    assert len(taps.qkv) == len(taps.hidden) == 2
    with torch.no_grad():
        torch.testing.assert_close(taps.hidden[1], student.blocks[0](taps.hidden[0]))
    student(torch.randn(2, 3, 32, 32))  # a new forward replaces the layers, it does not add to them
    assert len(taps.qkv) == 2


def test_swin_relations_are_per_window_through_build_objectives():
    student, teacher = tiny_swin(0), tiny_swin(1)
    options = {'attention': 1.0, 'hidden': 0.1, 'hidden_form': 'relation', 'relation_heads': 1,
               'student_layers': [1, 3], 'teacher_layers': [1, 3]}
    objective = build_objectives({'weight_distillation': options}, student, teacher)['weight_distillation']
    x = torch.randn(2, 3, 32, 32)
    student(x), teacher(x)
    # An 8 x 8 map in 4 x 4 windows: 4 windows of 16 tokens per image in stage 0, then one window of 2 x 2 x 4.
    assert [tuple(qkv.shape) for qkv in objective.student_taps.qkv] == [(8, 16, 36)] * 2 + [(2, 16, 72)] * 2
    terms = objective.terms()
    assert set(terms) == {'attention', 'hidden'} and all(torch.isfinite(v) and v > 0 for v in terms.values())
    objective.remove()
    assert no_hooks(student, teacher)


def test_remove_detaches_every_hook_and_loss_needs_both_forwards():
    student, teacher = tiny_vit(0), tiny_vit(1)
    distillation = WeightDistillation(student, teacher)
    student(torch.randn(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match='needs one teacher forward before each loss'):
        distillation.loss()
    distillation.remove()
    assert no_hooks(student, teacher)


def test_mse_adapters_train_and_round_trip_through_state_dict():
    student, teacher = tiny_vit(0), tiny_vit(1, embed_dim=48)
    distillation = WeightDistillation(student, teacher, attention=0, hidden_form='mse')
    adapters = list(distillation.parameters())
    assert [tuple(p.shape) for p in adapters] == [(48, 24), (48,)] and all(p.requires_grad for p in adapters)
    x = torch.randn(2, 3, 32, 32)
    student(x), teacher(x)
    distillation.loss().backward()
    assert all(p.grad.abs().sum() > 0 for p in adapters)
    with torch.no_grad():
        for p in adapters:
            p.add_(1.)
    state = distillation.state_dict()
    distillation.remove()
    restored = WeightDistillation(student, teacher, attention=0, hidden_form='mse')
    restored.load_state_dict(state)
    for saved, loaded in zip(adapters, restored.parameters()):
        torch.testing.assert_close(saved, loaded)
    restored.load_state_dict({})  # a checkpoint saved without this objective keeps the new adapters
    relation_form = WeightDistillation(student, teacher)
    assert not list(relation_form.parameters()) and relation_form.state_dict() == {'adapters': {}}


@pytest.mark.parametrize('student, teacher, options, message', [
    ('vit', 'vit', {'hidden_form': 'cosine'}, "hidden_form must be one of relation, mse, got 'cosine'"),
    ('vit', 'vit', {'student_layers': [0, 4], 'teacher_layers': [0, 1]},
     r'student_layers \[0, 4\] is out of range: the student applies 4 layers per forward \(indices 0 to 3\)'),
    ('vit', 'vit', {'student_layers': [0, 1], 'teacher_layers': [0]}, 'they pair by position'),
    ('vit', 'vit', {'student_layers': [0]}, 'give both student_layers and teacher_layers'),
    ('vit', 'vit', {'relation_heads': 5}, 'relation_heads 5 does not divide the student width 24'),
    ('vit', 'vit', {'relation_heads': 0}, 'relation_heads must be an integer >= 1, got 0'),
    ('vit', 'vit', {'attention': -1}, 'attention must be a weight >= 0, got -1'),
    ('vit', 'vit', {'attention': 0, 'hidden': 0}, 'attention and hidden are both 0'),
    ('vit', 'vit', {'student_blocks': r'stages\.\d+'},
     r'the student \(student_blocks\): no module of VisionTransformer matches the block pattern'),
    ('swin', 'swin', {'student_layers': [0], 'teacher_layers': [3]},
     'attend over 4 and 1 sequences .* pair layers of one resolution'),
    ('vit', 'vit_patch4', {'attention': 0}, 'output 16 and 64 tokens; hidden states need the same'),
    ('vit', 'vit', {'colour': 1}, "unexpected keyword argument 'colour'"),
])
def test_bad_options_are_usage_errors_that_name_the_option(student, teacher, options, message):
    models = {'vit': tiny_vit, 'swin': tiny_swin, 'vit_patch4': lambda: tiny_vit(patch_size=4)}
    student, teacher = models[student](), models[teacher]()
    with pytest.raises(UsageError, match=f'^objectives.weight_distillation: .*{message}|'
                                         f'^weight_distillation: .*{message}'):
        build_objectives({'weight_distillation': options}, student, teacher)
    assert no_hooks(student, teacher)  # a failed build leaves the models as they were


def test_weight_distillation_needs_a_live_teacher():
    with pytest.raises(UsageError, match='weight_distillation needs a live teacher model'):
        build_objectives({'weight_distillation': {}}, tiny_vit(), None)


def test_a_class_token_teacher_pairs_with_a_mini_deit_student():
    # DeiT's class token leads its sequences; Mini-DeiT has none: the relations use the image tokens of both.
    student = timm.create_model('mini_deit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=24, depth=4,
                                num_heads=3, num_classes=5)
    teacher = tiny_vit().eval()
    assert teacher.num_prefix_tokens == 1
    objective = WeightDistillation(student, teacher)
    x = torch.randn(2, 3, 32, 32)
    student(x)
    with torch.no_grad():
        teacher(x)
    assert [tuple(t.shape) for t in objective.teacher_taps.qkv] == [(2, 16, 72)] * 4
    loss = objective.loss()
    assert torch.isfinite(loss) and loss > 0
    objective.remove()


def test_each_blocks_qkv_projection_is_found_in_timm_and_leanvit_blocks():
    deit, swin = (timm.create_model(name, pretrained=False) for name in ('deit_tiny_patch16_224',
                                                                        'swin_tiny_patch4_window7_224'))
    assert qkv_projection(deit.blocks[0]) == qkv_projection(swin.layers[2].blocks[5]) == 'attn.qkv'
    assert qkv_projection(timm.create_model('poolformer_s12', pretrained=False).stages[0].blocks[0]) is None
    # GLiT's blocks keep their attention under a mixer, and its convolution-only blocks have none.
    glit = leanvit.create_model('glit_tiny_patch16_224', img_size=32)
    assert [qkv_projection(block) for block in glit.blocks] == \
        [None if i in (1, 4, 8, 10) else 'mixer.attn.qkv' for i in range(12)]

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_qkv = nn.Linear(4, 12)

    class Unnamed(nn.Module):  # a fused projection by another name is found by its shape, inside the attention only
        def __init__(self, attention: bool):
            super().__init__()
            self.fc1 = nn.Linear(4, 12)
            if attention:
                self.attn = Attention()

    assert qkv_projection(Unnamed(attention=True)) == 'attn.to_qkv'
    assert qkv_projection(Unnamed(attention=False)) is None


def test_the_qkv_projections_tapped_are_those_of_the_blocks_found():
    student = timm.create_model('mini_deit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=24, depth=4,
                                num_heads=3, num_classes=5)
    distillation = WeightDistillation(student, tiny_vit())
    assert distillation.student_taps.qkv_names == {'stages.0.blocks.0.attn.qkv', 'stages.0.blocks.1.attn.qkv'}
    assert distillation.teacher_taps.qkv_names == {f'blocks.{i}.attn.qkv' for i in range(4)}
    assert distillation.student_depth == distillation.teacher_depth == 4  # 2 shared blocks, each applied twice
    distillation.remove()
