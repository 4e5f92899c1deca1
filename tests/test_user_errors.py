"""Every user error is one clear line naming the input, never a traceback; usage errors exit 2, other inputs 1.

Each case runs the real command line (``leanvit.cli.main``) on one bad input. Files and folders the cases need are
made in ``tmp_path``: a placeholder ``{tmp}`` in an argument becomes that folder.
"""

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_eval_cli import KWARGS, save_run_checkpoint

from leanvit.cli import main

USAGE, INPUT = 2, 1


def make_files(tmp: Path) -> None:
    """The bad (and good) files the cases below name."""
    (tmp / 'a_file').write_text('not a folder')
    (tmp / 'a_folder').mkdir()
    (tmp / 'malformed.yaml').write_text('epochs: [1, 2\nlr: 0.1\n')
    (tmp / 'list.yaml').write_text('- epochs: 1\n- lr: 0.1\n')
    (tmp / 'wrong_type.yaml').write_text('batch_size: ten\n')
    (tmp / 'lr_string.yaml').write_text('lr: 1e-3\n')
    (tmp / 'unknown_key.yaml').write_text('epochs: 1\nlearning_rate: 0.1\n')
    (tmp / 'python_tag.yaml').write_text(f'epochs: !!python/object/apply:os.system ["touch {tmp}/pwned"]\n')
    (tmp / 'empty.pth').write_bytes(b'')
    (tmp / 'garbage.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": not json}')
    torch.save({'logits': torch.zeros(3, 10)}, tmp / 'pickled_logits.safetensors')
    save_file({'other': torch.zeros(3)}, tmp / 'no_logits.safetensors')
    with open(tmp / 'code.pth', 'wb') as f:
        pickle.dump({'w': torch.zeros(1), 'fn': os.system}, f)
    _, checkpoint = save_run_checkpoint(tmp / 'run', KWARGS)
    (tmp / 'bad_sidecar').mkdir()
    (tmp / 'bad_sidecar' / 'best.safetensors').write_bytes(checkpoint.read_bytes())
    (tmp / 'bad_sidecar' / 'best.json').write_text('{"model": "test_sret", "model_kwargs": [1]}')


TRAIN = ('train', '--model', 'test_sret', '--img-size', '32', '--epochs', '1', '--no-progress',
         '--output', '{tmp}/out')

CASES = {
    # argument values: ranges, types, finiteness
    'epochs 0': (USAGE, [*TRAIN, '--epochs', '0'], ['argument --epochs: must be an integer >= 1, got 0']),
    'accum-steps 0': (USAGE, [*TRAIN, '--accum-steps', '0'], ['--accum-steps', 'got 0']),
    'img-size 0': (USAGE, [*TRAIN, '--img-size', '0'], ['--img-size', '>= 1', 'got 0']),
    'img-size -32': (USAGE, [*TRAIN, '--img-size', '-32'], ['--img-size', 'got -32']),
    'ema-decay 2': (USAGE, [*TRAIN, '--ema-decay', '2'], ['--ema-decay', 'in [0, 1)', 'got 2.0']),
    'batch-size 0': (USAGE, [*TRAIN, '--batch-size', '0'], ['--batch-size', 'got 0']),
    'lr nan': (USAGE, [*TRAIN, '--lr', 'nan'], ['--lr', 'got nan']),
    'lr -1': (USAGE, [*TRAIN, '--lr', '-1'], ['--lr', '> 0']),
    'val-split 1.5': (USAGE, [*TRAIN, '--val-split', '1.5'], ['--val-split', 'in (0, 1)']),
    'val-split 0': (USAGE, [*TRAIN, '--val-split', '0'], ['--val-split', 'in (0, 1)', 'got 0.0']),
    'val-split not a number': (USAGE, [*TRAIN, '--val-split', 'half'], ['--val-split', 'in (0, 1)', "got 'half'"]),
    'holdout 1': (USAGE, [*TRAIN, '--holdout', '1'], ['--holdout', 'in [0, 1)', 'got 1.0']),
    'drop-path 1': (USAGE, [*TRAIN, '--drop-path', '1'], ['--drop-path', 'in [0, 1)', 'got 1.0']),
    'smoothing -0.1': (USAGE, [*TRAIN, '--smoothing', '-0.1'], ['--smoothing', 'in [0, 1)', 'got -0.1']),
    're-prob 1.5': (USAGE, [*TRAIN, '--re-prob', '1.5'], ['--re-prob', 'in [0, 1]', 'got 1.5']),
    'mixup inf': (USAGE, [*TRAIN, '--mixup', 'inf'], ['--mixup', '>= 0', 'got inf']),
    'seed -1': (USAGE, [*TRAIN, '--seed', '-1'], ['--seed', '>= 0', 'got -1']),
    'kd-alpha 3': (USAGE, [*TRAIN, '--kd-alpha', '3'], ['--kd-alpha', 'in [0, 1]']),
    'epochs not a number': (USAGE, [*TRAIN, '--epochs', 'ten'], ['--epochs', "'ten'"]),
    'kd unknown': (USAGE, [*TRAIN, '--kd', 'mse'], ['kd (--kd) must be one of', 'soft_ce', "'mse'"]),
    'amp unknown': (USAGE, [*TRAIN, '--amp', 'fp8'], ['--amp', "'fp8'"]),
    'device unknown': (USAGE, [*TRAIN, '--device', 'gpu0'], ['--device', "'gpu0'"]),
    'bad-images unknown': (USAGE, [*TRAIN, '--bad-images', 'ignore'], ['--bad-images', "'ignore'"]),
    'objective unknown': (USAGE, [*TRAIN, '--objectives', '{"imitation": {}}'], ["unknown objective 'imitation'"]),
    'objective pattern invalid': (USAGE, [*TRAIN, '--teacher', 'test_sret', '--objectives',
                                          '{"module_imitation": {"relation": 1, "student_blocks": "stages.(\\\\d+"}}'],
                                  ['module_imitation', 'missing ), unterminated subpattern']),
    'opt unknown': (USAGE, [*TRAIN, '--opt', 'adamm'], ["opt (--opt) 'adamm' is not a timm optimizer"]),
    'sched unknown': (USAGE, [*TRAIN, '--sched', 'cosinus'], ["sched (--sched) 'cosinus'"]),
    'auto-augment unknown': (USAGE, [*TRAIN, '--auto-augment', 'randaug'], ["--auto-augment) 'randaug'"]),
    'teacher unknown': (USAGE, [*TRAIN, '--teacher', 'deit_tinny'], ["unknown model 'deit_tinny'"]),
    'model-kwargs of the wrong type': (USAGE, [*TRAIN, '--model-kwargs', '{"drop_rate": 5}'],
                                       ['cannot build model test_sret', 'drop_rate']),
    'model unknown': (USAGE, [*TRAIN, '--model', 'sret_tt'], ["unknown model 'sret_tt'", 'sret_t']),
    'model-kwargs not an object': (USAGE, [*TRAIN, '--model-kwargs', '[1, 2]'], ['--model-kwargs', 'JSON object']),
    'model-kwargs not JSON': (USAGE, [*TRAIN, '--model-kwargs', '{num_classes: 3}'], ['--model-kwargs', 'JSON']),
    'model-kwargs unknown argument': (USAGE, [*TRAIN, '--model-kwargs', '{"depth_of_field": 3}'],
                                      ['test_sret', 'depth_of_field']),
    # recipes
    'recipe malformed': (USAGE, [*TRAIN, '--config', '{tmp}/malformed.yaml'], ['{tmp}/malformed.yaml', 'YAML']),
    'recipe a list': (USAGE, [*TRAIN, '--config', '{tmp}/list.yaml'], ['{tmp}/list.yaml', 'mapping', 'list']),
    'recipe wrong type': (USAGE, [*TRAIN, '--config', '{tmp}/wrong_type.yaml'],
                          ['{tmp}/wrong_type.yaml', 'batch_size', "'ten'"]),
    'recipe lr 1e-3': (USAGE, [*TRAIN, '--config', '{tmp}/lr_string.yaml'], ['lr (--lr)', '1.0e-3']),
    'recipe unknown key': (USAGE, [*TRAIN, '--config', '{tmp}/unknown_key.yaml'], ['learning_rate']),
    'recipe python tag': (USAGE, [*TRAIN, '--config', '{tmp}/python_tag.yaml'], ['{tmp}/python_tag.yaml', 'python']),
    'recipe missing': (INPUT, [*TRAIN, '--config', '{tmp}/absent.yaml'], ['{tmp}/absent.yaml', 'No such file']),
    'recipe a folder': (INPUT, [*TRAIN, '--config', '{tmp}/a_folder'], ['{tmp}/a_folder']),
    # files and folders
    'output a file': (INPUT, [*TRAIN, '--output', '{tmp}/a_file'], ['{tmp}/a_file is a file, not a folder']),
    'data missing': (INPUT, [*TRAIN, '--data', '{tmp}/nowhere', '--val-split', '0.2'], ['{tmp}/nowhere']),
    'teacher logits pickled': (INPUT, [*TRAIN, '--teacher-logits', '{tmp}/pickled_logits.safetensors'],
                               ['{tmp}/pickled_logits.safetensors']),
    'teacher logits without logits': (INPUT, [*TRAIN, '--teacher-logits', '{tmp}/no_logits.safetensors'],
                                      ['{tmp}/no_logits.safetensors', 'logits']),
    'teacher checkpoint carrying code': (INPUT, [*TRAIN, '--teacher', 'test_sret', '--teacher-checkpoint',
                                                 '{tmp}/code.pth'], ['{tmp}/code.pth', 'could run code']),
    'eval checkpoint a folder': (INPUT, ['eval', '--checkpoint', '{tmp}/a_folder'], ['{tmp}/a_folder is a folder']),
    'eval zero-byte pth': (INPUT, ['eval', '--checkpoint', '{tmp}/empty.pth', '--model', 'test_sret'],
                           ['{tmp}/empty.pth', 'empty']),
    'eval corrupt safetensors': (INPUT, ['eval', '--checkpoint', '{tmp}/garbage.safetensors', '--model', 'test_sret'],
                                 ['{tmp}/garbage.safetensors', 'corrupt']),
    'eval sidecar kwargs a list': (INPUT, ['eval', '--checkpoint', '{tmp}/bad_sidecar/best.safetensors'],
                                   ['{tmp}/bad_sidecar/best.json', 'field "model_kwargs"']),
    'eval weights of another model': (INPUT, ['eval', '--checkpoint', '{tmp}/run/best.safetensors', '--model',
                                              'test_riformer', '--model-kwargs', '{"num_classes": 10}'],
                                      ['{tmp}/run/best.safetensors', 'cannot be converted for RIFormer']),
    'eval without model': (USAGE, ['eval', '--checkpoint', '{tmp}/empty.pth'], ['pass the model name (--model)']),
    'eval batch-size 0': (USAGE, ['eval', '--checkpoint', '{tmp}/run/best.safetensors', '--batch-size', '0'],
                          ['--batch-size', '>= 1']),
    'export atol -1': (USAGE, ['export', '--checkpoint', '{tmp}/run/best.safetensors', '--output', '{tmp}/m.onnx',
                               '--atol', '-1'], ['--atol', '>= 0']),
    'export atol nan': (USAGE, ['export', '--checkpoint', '{tmp}/run/best.safetensors', '--output', '{tmp}/m.onnx',
                                '--atol', 'nan'], ['--atol', 'nan']),
    'export output a folder': (INPUT, ['export', '--checkpoint', '{tmp}/run/best.safetensors', '--format',
                                       'torchscript', '--output', '{tmp}/a_folder'], ['{tmp}/a_folder is a folder']),
    'export output in a missing folder': (INPUT, ['export', '--checkpoint', '{tmp}/run/best.safetensors', '--format',
                                                  'torchscript', '--output', '{tmp}/a_file/m.pt'],
                                          ['{tmp}/a_file is a file, not a folder']),
    'export output without a format': (USAGE, ['export', '--checkpoint', '{tmp}/run/best.safetensors', '--output',
                                               '{tmp}/model'], ['--output {tmp}/model: name the file .onnx']),
    'export without output': (USAGE, ['export', '--checkpoint', '{tmp}/run/best.safetensors'],
                              ['the following arguments are required: --output']),
    'profile img-size 0': (USAGE, ['profile', '--model', 'test_sret', '--img-size', '0'], ['--img-size', '>= 1']),
    'profile unknown model': (USAGE, ['profile', '--model', 'sret_xl'], ["unknown model 'sret_xl'"]),
    'profile unknown model, positional': (USAGE, ['profile', 'sret_xl'], ["unknown model 'sret_xl'"]),
    'profile two model names': (USAGE, ['profile', 'test_sret', '--model', 'test_riformer'],
                                ['two model names: test_sret and --model test_riformer; give one']),
    'profile without model': (USAGE, ['profile'], ['profile needs --model NAME']),
    'teacher-logits output a folder': (INPUT, ['teacher-logits', '--checkpoint', '{tmp}/run/best.safetensors',
                                               '--output', '{tmp}/a_folder'], ['{tmp}/a_folder is a folder']),
    'teacher-logits val-split 1': (USAGE, ['teacher-logits', '--checkpoint', '{tmp}/run/best.safetensors',
                                           '--val-split', '1', '--output', '{tmp}/l.safetensors'],
                                   ['argument --val-split: must be a number in (0, 1), got 1.0']),
    'teacher-logits val-split nan': (USAGE, ['teacher-logits', '--checkpoint', '{tmp}/run/best.safetensors',
                                             '--val-split', 'nan', '--output', '{tmp}/l.safetensors'],
                                     ['--val-split', 'in (0, 1)', 'got nan']),
    'teacher-logits seed -1': (USAGE, ['teacher-logits', '--checkpoint', '{tmp}/run/best.safetensors', '--seed', '-1',
                                       '--output', '{tmp}/l.safetensors'], ['--seed', '>= 0', 'got -1']),
    'grad-norms val-split 0': (USAGE, ['analyze', 'grad-norms', '--model', 'test_sret', '--val-split', '0',
                                       '--output', '{tmp}/gn'],
                               ['leanvit analyze grad-norms: error: argument --val-split', 'in (0, 1)', 'got 0.0']),
    'cka val-split 2': (USAGE, ['analyze', 'cka', '--model-a', 'test_sret', '--model-b', 'test_sret', '--val-split',
                                '2', '--output', '{tmp}/cka'], ['--val-split', 'in (0, 1)', 'got 2.0']),
    'search mutation-prob 1.5': (USAGE, ['search', '--mutation-prob', '1.5', '--output', '{tmp}/s'],
                                 ['argument --mutation-prob: must be a number in [0, 1], got 1.5']),
    'search crossover-share -0.5': (USAGE, ['search', '--crossover-share', '-0.5', '--output', '{tmp}/s'],
                                    ['--crossover-share', 'in [0, 1]', 'got -0.5']),
    'search holdout 1': (USAGE, ['search', '--holdout', '1', '--output', '{tmp}/s'], ['--holdout', 'in [0, 1)']),
    'search teacher': (USAGE, ['search', '--teacher', 'sret_t', '--output', '{tmp}/s'],
                       ['leanvit search: error: --teacher does not apply to leanvit search']),
    'search model': (USAGE, ['search', '--model=sret_t', '--output', '{tmp}/s'],
                     ['--model does not apply to leanvit search: it trains the GLiT supernet']),
    'compress val-split 1': (USAGE, ['compress', '--teacher', 'vit_tiny_patch16_224', '--val-split', '1'],
                             ['--val-split', 'in (0, 1)', 'got 1.0']),
    'compress kd-alpha 2': (USAGE, ['compress', '--teacher', 'vit_tiny_patch16_224', '--kd-alpha', '2'],
                            ['--kd-alpha', 'in [0, 1]', 'got 2.0']),
    'compress model': (USAGE, ['compress', '--teacher', 'vit_tiny_patch16_224', '--model', 'sret_t'],
                       ['--model does not apply to leanvit compress: the student is built from the teacher']),
    'compress init-checkpoint': (USAGE, ['compress', '--teacher', 'vit_tiny_patch16_224', '--init-checkpoint', 'x'],
                                 ['--init-checkpoint does not apply to leanvit compress']),
    'compress teacher-logits': (USAGE, ['compress', '--teacher', 'vit_tiny_patch16_224', '--teacher-logits', 'x'],
                                ['--teacher-logits does not apply to leanvit compress']),
    'unknown command': (USAGE, ['trian'], ["invalid choice: 'trian'", 'leanvit --help']),
    'compress without a teacher': (USAGE, ['compress', '--output', '{tmp}/compress_none'],
                                   ['compress needs a teacher: --teacher-checkpoint FILE']),
    'compress share 0': (USAGE, ['compress', '--teacher', 'vit_tiny_patch16_224', '--share', '0'],
                         ['--share', 'must be an integer >= 1, got 0']),
    'compress a CNN': (USAGE, ['compress', '--teacher', 'resnet18', '--output', '{tmp}/compress_cnn'],
                       ['cannot multiplex a ResNet; expected a timm VisionTransformer']),
    'compress shared-init unknown': (USAGE, ['compress', '--teacher', 'vit_tiny_patch16_224', '--teacher-kwargs',
                                             '{"patch_size": 8, "depth": 4, "embed_dim": 24, "num_heads": 3}',
                                             '--img-size', '32', '--shared-init', 'last',
                                             '--output', '{tmp}/compress_init'],
                                     ["init (--shared-init) must be one of first, mean or the index of a layer",
                                      "got 'last'"]),
}


@pytest.fixture(scope='module')
def files(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp('inputs')
    make_files(tmp)
    return tmp


@pytest.mark.parametrize('case', CASES)
def test_a_bad_input_is_one_line_naming_it(case, files, capsys):
    code, argv, expected = CASES[case]
    argv = [a.replace('{tmp}', str(files)) for a in argv]
    try:
        returned = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        returned = e.code
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith('leanvit'), err
    for part in expected:
        assert part.replace('{tmp}', str(files)) in err, (part, err)
    assert returned == code, err
    assert not (files / 'pwned').exists()


def test_the_deprecated_out_says_so_in_one_line_before_the_error_it_meets(files, capsys):
    """--out still works for one release, as --output; its warning is one line of its own, the error another."""
    argv = ['teacher-logits', '--checkpoint', f'{files}/run/best.safetensors', '--out', f'{files}/a_folder']
    assert main(argv) == INPUT
    warning, error = capsys.readouterr().err.splitlines()
    assert warning == 'leanvit teacher-logits: warning: --out is deprecated; use --output'
    assert error.startswith('leanvit teacher-logits: error: ') and f'{files}/a_folder is a folder' in error
