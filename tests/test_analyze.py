"""MiniViT's diagnostics: linear CKA against a brute-force reference, layer CKA and gradient norms on tiny models,
the ``leanvit analyze`` command and its errors."""

import copy
import csv
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from test_eval_cli import save_run_checkpoint
from torch import nn
from torch.utils.data import DataLoader

import leanvit
from leanvit.cli import main
from leanvit.errors import UsageError
from leanvit.io.data import build_datasets
from leanvit.methods.features import blocks_by_stage
from leanvit.methods.minivit.diagnostics import (
    block_modules,
    endless,
    gradient_norms,
    infer_layout,
    layer_cka,
    linear_cka,
)
from leanvit.train.evaluation import data_config

USAGE, INPUT = 2, 1
SRET = dict(img_size=32, num_classes=10)
# test_sret's stages hold 2, 2 and 1 shared blocks, each applied twice.
SRET_BLOCKS = ['stages.0.blocks.0', 'stages.0.blocks.1', 'stages.1.blocks.0', 'stages.1.blocks.1', 'stages.2.blocks.0']
VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=24, num_heads=3, num_classes=10)
SWIN = dict(img_size=32, patch_size=4, window_size=4, depths=(1, 2), embed_dim=16, num_heads=(1, 2), num_classes=10)


def reference_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA from its definition over examples: HSIC of the centred Gram matrices (Kornblith et al. 2019, Eq. 3)."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    centring = torch.eye(n, dtype=torch.float64) - 1 / n
    gram_x, gram_y = centring @ x @ x.T @ centring, centring @ y @ y.T @ centring
    hsic = torch.trace(gram_x @ gram_y)
    return (hsic / torch.sqrt(torch.trace(gram_x @ gram_x) * torch.trace(gram_y @ gram_y))).item()


def test_linear_cka_matches_the_gram_definition_and_its_invariances():
    torch.manual_seed(0)
    x = torch.randn(50, 12)
    y = x @ torch.randn(12, 7) + 0.5 * torch.randn(50, 7)
    assert linear_cka(x, y) == pytest.approx(reference_cka(x, y), abs=1e-10)
    assert linear_cka(x, x) == pytest.approx(1, abs=1e-12)
    rotation, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    assert linear_cka(x.double() @ rotation * 3.7 + 5, y) == pytest.approx(linear_cka(x, y), abs=1e-10)
    independent = linear_cka(torch.randn(500, 8), torch.randn(500, 8))
    assert 0 < independent < 0.1


def test_linear_cka_needs_two_matrices_of_the_same_examples():
    with pytest.raises(ValueError, match='same n'):
        linear_cka(torch.randn(5, 3), torch.randn(6, 3))


def sret() -> torch.nn.Module:
    torch.manual_seed(0)
    return leanvit.create_model('test_sret', **SRET)


@pytest.mark.parametrize('name, kwargs', [('test_sret', SRET), ('vit_tiny_patch16_224', VIT),
                                          ('swin_tiny_patch4_window7_224', SWIN), ('test_riformer', {})])
def test_layer_cka_of_a_model_with_itself_has_a_diagonal_of_one(name, kwargs):
    torch.manual_seed(0)
    model = leanvit.create_model(name, **kwargs)
    size = data_config(model, kwargs.get('img_size'))['input_size']
    batches = [torch.randn(6, *size) for _ in range(2)]
    cka = layer_cka(model, model, batches)
    assert cka.images == 12 and cka.layers_a == cka.layers_b
    assert torch.allclose(cka.values.diagonal(), torch.ones(len(cka.layers_a), dtype=torch.float64), atol=1e-6)
    assert not any(module._forward_hooks for module in model.modules())


def test_a_shared_block_gives_one_cka_layer_per_application():
    cka = layer_cka(sret(), sret(), [(torch.randn(4, 3, 32, 32), torch.zeros(4))])
    assert cka.layers_a == [f'{block}#{application}' for block in SRET_BLOCKS for application in (0, 1)]
    assert len(cka.rows()) == 10 * 10


@pytest.mark.parametrize('shapes, layout', [([(2, 17, 8)], 'NLC'), ([(2, 16, 8, 8), (2, 32, 4, 4)], 'NCHW'),
                                            ([(2, 8, 8, 16), (2, 4, 4, 32)], 'NHWC')])
def test_the_layout_of_block_outputs_is_told_from_their_shapes(shapes, layout):
    assert infer_layout([torch.zeros(shape) for shape in shapes]) == layout


def test_an_ambiguous_layout_asks_for_it():
    with pytest.raises(UsageError, match='pass it'):
        infer_layout([torch.zeros(2, 8, 8, 8)])


def staged(stages: str, depths: tuple[int, ...], blocks: str = '.blocks') -> list[list[str]]:
    """Block names ``{stages}.S{blocks}.B`` of stages of ``depths`` blocks."""
    return [[f'{stages}.{stage}{blocks}.{block}' for block in range(depth)] for stage, depth in enumerate(depths)]


# Each family's blocks as blocks_by_stage finds them, from feature_info and the stages' blocks containers: staged
# models list their stages, flat ones their blocks, GFNet-H its stages as containers of blocks.
FOUND_BLOCKS = {
    'test_sret': (SRET, [SRET_BLOCKS[:2], SRET_BLOCKS[2:4], SRET_BLOCKS[4:]]),
    'test_riformer': ({}, staged('stages', (1, 1, 2, 1))),
    'mini_deit_tiny_patch16_224': (dict(img_size=32, patch_size=8, embed_dim=24, depth=4, num_heads=3),
                                   [['stages.0.blocks.0', 'stages.0.blocks.1']]),  # 2 distinct blocks, 4 layers
    'mini_swin_tiny_patch4_window7_224': (dict(img_size=32, window_size=4, embed_dim=12, depths=(2, 4),
                                               num_heads=(1, 2), distinct_blocks=(1, 2)), staged('stages', (1, 2))),
    'glit_tiny_patch16_224': (dict(img_size=32), [[f'blocks.{i}' for i in range(12)]]),
    'gfnet_ti': (dict(img_size=32, depth=2), [['blocks.0', 'blocks.1']]),
    'gfnet_h_ti': (dict(img_size=64), staged('blocks', (3, 3, 10, 3), blocks='')),
    'deit_tiny_patch16_224': ({}, [[f'blocks.{i}' for i in range(12)]]),
    'swin_tiny_patch4_window7_224': ({}, staged('layers', (2, 2, 6, 2))),
    'poolformer_s12': ({}, staged('stages', (2, 2, 6, 2))),
}


@pytest.mark.parametrize('name', FOUND_BLOCKS)
def test_blocks_are_found_by_stage_in_every_family_and_timm_teacher(name):
    kwargs, expected = FOUND_BLOCKS[name]
    model = timm.create_model(name, pretrained=False, **kwargs)
    assert blocks_by_stage(model) == expected
    assert list(block_modules(model)) == [block for stage in expected for block in stage]


def test_a_model_names_its_blocks_or_has_them_found_without_feature_info():
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))

        def block_names(self) -> list[list[str]]:
            return [['body.0'], ['body.1']]

    class Unlisted(nn.Module):  # no feature_info: each outermost blocks container is a stage
        def __init__(self):
            super().__init__()
            shared = nn.Linear(2, 2)
            self.stages = nn.ModuleList([nn.Module(), nn.Module()])
            self.stages[0].blocks = nn.ModuleList([shared, nn.Sequential(nn.Linear(2, 2))])
            self.stages[0].blocks[1].blocks = nn.ModuleList([nn.Linear(2, 2)])  # inside a block: not a stage
            self.stages[1].blocks = nn.Sequential(shared, nn.Linear(2, 2))  # a shared block is listed once

    assert blocks_by_stage(Named()) == [['body.0'], ['body.1']]
    assert blocks_by_stage(Unlisted()) == [['stages.0.blocks.0', 'stages.0.blocks.1'], ['stages.1.blocks.1']]
    with pytest.raises(ValueError, match='found no blocks in Linear'):
        blocks_by_stage(nn.Linear(2, 2))


def test_a_block_pattern_overrides_the_blocks_found():
    assert list(block_modules(sret(), r'stages\.\d+')) == ['stages.0', 'stages.1', 'stages.2']
    assert blocks_by_stage(sret(), r'stages\.(\d+)\.blocks\.1') == [['stages.0.blocks.1'], ['stages.1.blocks.1']]
    with pytest.raises(UsageError, match='matches the block pattern'):
        block_modules(sret(), r'encoder\.\d+')


@pytest.fixture(scope='module')
def digits_batches():
    cfg = data_config(sret())
    return DataLoader(build_datasets(None, cfg).train, batch_size=16, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


def test_gradient_norms_report_a_shared_block_once(digits_batches):
    model = sret()
    images, labels = next(iter(digits_batches))
    expected = copy.deepcopy(model).train()
    torch.manual_seed(1)  # SReT draws a token permutation per training forward
    F.cross_entropy(expected(images), labels).backward()
    shared = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in
                                                   expected.get_submodule('stages.0.blocks.0').parameters()]))
    torch.manual_seed(1)
    norms = gradient_norms(model, endless([(images, labels)]), steps=3)
    assert list(norms) == SRET_BLOCKS
    assert norms['stages.0.blocks.0'][0] == pytest.approx(shared.item(), rel=1e-5)
    assert all(len(series) == 3 and all(0 < n < float('inf') for n in series) for series in norms.values())


def test_gradient_norms_of_a_timm_vit_over_digits(digits_batches):
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', **VIT)
    norms = gradient_norms(model, endless(digits_batches), steps=2)
    assert list(norms) == ['blocks.0', 'blocks.1']
    assert all(len(series) == 2 and all(0 < n < float('inf') for n in series) for series in norms.values())
    with pytest.raises(ValueError, match='ran out after 1 of 2 steps'):
        gradient_norms(model, [next(iter(digits_batches))], steps=2)


def read_csv(path) -> list[dict]:
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def test_cli_writes_the_gradient_norms(tmp_path, capsys):
    assert main(['analyze', 'grad-norms', '--model', 'test_sret', '--model-kwargs', '{"img_size": 32}',
                 '--steps', '2', '--batch-size', '16', '--output', str(tmp_path)]) == 0
    rows = read_csv(tmp_path / 'grad_norms.csv')
    assert [(int(r['step']), r['layer']) for r in rows] == [(s, b) for b in SRET_BLOCKS for s in (1, 2)]
    assert all(float(r['norm']) > 0 for r in rows)
    assert (tmp_path / 'grad_norms.png').read_bytes().startswith(b'\x89PNG')
    assert 'a shared block once' in capsys.readouterr().out


def test_cli_writes_the_cka_of_two_models(tmp_path):
    assert main(['analyze', 'cka', '--model-a', 'test_sret', '--model-kwargs-a', '{"img_size": 32}',
                 '--model-b', 'vit_tiny_patch16_224', '--model-kwargs-b', json.dumps(VIT), '--max-images', '24',
                 '--output', str(tmp_path)]) == 0
    rows = read_csv(tmp_path / 'cka.csv')
    layers_a = [f'{block}#{application}' for block in SRET_BLOCKS for application in (0, 1)]
    assert [(r['layer_a'], r['layer_b']) for r in rows] == [(a, b) for a in layers_a for b in ('blocks.0', 'blocks.1')]
    assert all(0 <= float(r['cka']) <= 1 for r in rows)
    assert (tmp_path / 'cka.png').read_bytes().startswith(b'\x89PNG')


GRAD_NORMS = ('analyze', 'grad-norms', '--model', 'test_sret', '--model-kwargs', '{"img_size": 32}',
              '--output', '{tmp}/out')
CASES = {
    'unknown model': (USAGE, [*GRAD_NORMS, '--model', 'sret_tt'], ["unknown model 'sret_tt'"]),
    'missing checkpoint': (INPUT, [*GRAD_NORMS, '--checkpoint', '{tmp}/absent.safetensors'],
                           ['{tmp}/absent.safetensors does not exist']),
    'steps 0': (USAGE, [*GRAD_NORMS, '--steps', '0'], ['--steps', '>= 1', 'got 0']),
    'blocks not a regex': (USAGE, [*GRAD_NORMS, '--steps', '1', '--blocks', 'blocks.('],
                           ["'blocks.('", 'not a regular expression']),
    'blocks matching nothing': (USAGE, [*GRAD_NORMS, '--steps', '1', '--blocks', 'encoder'], ["'encoder'"]),
    'no model': (USAGE, ['analyze', 'grad-norms', '--output', '{tmp}/out'], ['--model']),
    'cka unknown model b': (USAGE, ['analyze', 'cka', '--model-a', 'test_sret', '--model-b', 'deit_tinny',
                                    '--output', '{tmp}/out'], ["unknown model 'deit_tinny'"]),
    'cka missing checkpoint a': (INPUT, ['analyze', 'cka', '--checkpoint-a', '{tmp}/absent.pth', '--model-a',
                                         'test_sret', '--model-b', 'test_sret', '--output', '{tmp}/out'],
                                 ['{tmp}/absent.pth does not exist']),
}


@pytest.mark.parametrize('case', CASES)
def test_a_bad_input_is_one_line_naming_it(case, tmp_path, capsys):
    code, argv, expected = CASES[case]
    try:
        returned = main([a.replace('{tmp}', str(tmp_path)) for a in argv])
    except SystemExit as e:  # argparse's own usage errors
        returned = e.code
    err = capsys.readouterr().err
    assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    for part in expected:
        assert part.replace('{tmp}', str(tmp_path)) in err, (part, err)
    assert returned == code, err



def test_cli_reads_the_models_of_run_checkpoints(tmp_path):
    _, checkpoint = save_run_checkpoint(tmp_path / 'run', SRET)
    assert main(['analyze', 'cka', '--checkpoint-a', str(checkpoint), '--checkpoint-b', str(checkpoint),
                 '--max-images', '16', '--output', str(tmp_path / 'cka')]) == 0
    diagonal = [float(r['cka']) for r in read_csv(tmp_path / 'cka' / 'cka.csv') if r['layer_a'] == r['layer_b']]
    assert diagonal == pytest.approx([1.] * 10, abs=1e-6)
    assert main(['analyze', 'grad-norms', '--checkpoint', str(checkpoint), '--steps', '1', '--batch-size', '8',
                 '--output', str(tmp_path / 'grad')]) == 0
    assert len(read_csv(tmp_path / 'grad' / 'grad_norms.csv')) == len(SRET_BLOCKS)
