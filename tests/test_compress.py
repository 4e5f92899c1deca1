"""`leanvit.multiplex`: MiniViT students built from pre-trained timm DeiT/ViT and Swin teachers."""

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from PIL import Image

import leanvit
from leanvit.errors import CheckpointError, UsageError
from leanvit.methods.minivit.multiplex import agreement, multiplex
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
    (dict(init='last'), r"init \(--shared-init\) must be one of first, mean or the index of a layer within each group "
                        r"of 2"),
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


TEACHER_KWARGS = {'patch_size': 8, 'embed_dim': 24, 'depth': 4, 'num_heads': 3, 'class_token': False,
                  'global_pool': 'avg', 'fc_norm': False}


@pytest.fixture(scope='module')
def trained_teacher(tmp_path_factory) -> str:
    from leanvit.train import TrainConfig, train

    output = tmp_path_factory.mktemp('teacher')
    train(TrainConfig(model='vit_tiny_patch16_224', model_kwargs=TEACHER_KWARGS, img_size=32, epochs=1,
                      output=str(output)))
    return str(output / (json.loads((output / 'latest.json').read_text())['tag'] + '.safetensors'))


def test_compress_command_distils_the_multiplexed_student(trained_teacher, tmp_path, capsys):
    from leanvit.cli import main

    command = ['compress', '--teacher', 'vit_tiny_patch16_224', '--teacher-kwargs', json.dumps(TEACHER_KWARGS),
               '--teacher-checkpoint', trained_teacher, '--img-size', '32', '--epochs', '1', '--kd-alpha', '1',
               '--output', str(tmp_path)]
    assert main(command) == 0
    out = capsys.readouterr().out
    assert 'untrained student vs teacher on 360 validation images: top-1 agreement' in out
    record = json.loads((tmp_path / 'compress.json').read_text())
    assert record['report']['model'] == 'mini_deit_tiny_patch16_224'
    assert record['report']['groups'] == {'stages.0.blocks.0': ['blocks.0', 'blocks.1'],
                                          'stages.0.blocks.1': ['blocks.2', 'blocks.3']}
    assert 0 <= record['untrained_agreement']['top1_agreement'] <= 1
    # The run started from every tensor of the multiplexed student and distilled with weight distillation.
    init = json.loads((tmp_path / 'init.json').read_text())
    assert init['copied'] and not init['student_only'] and not init['shape_mismatch']
    config = (tmp_path / 'config.yaml').read_text()
    assert 'weight_distillation' in config and 'init_checkpoint' in config
    # Running it again resumes the finished run instead of compressing anew.
    before = (tmp_path / 'multiplexed.safetensors').stat().st_mtime_ns
    assert main(command) == 0
    assert (tmp_path / 'multiplexed.safetensors').stat().st_mtime_ns == before
    capsys.readouterr()
    # Another student in the same folder is refused, naming the setting, and nothing is touched.
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != 'run.lock'}
    assert main(command + ['--share', '4']) == 2
    err = capsys.readouterr().err
    assert f'{tmp_path} holds a compressed student made with other settings (share: 2 -> 4)' in err
    assert 'Traceback' not in err and err.count('\n') == 1
    assert main(command + ['--no-attn-transform']) == 2
    assert 'attn_transform: True -> False' in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != 'run.lock'} == files
    # A crafted record is named by file and field.
    (tmp_path / 'compress.json').write_text(json.dumps(dict(record, report=dict(record['report'], model=[1]))))
    assert main(command) == 1
    assert f'{tmp_path / "compress.json"}: field "report" must hold' in capsys.readouterr().err


def test_init_checkpoint_of_another_model_is_named(trained_teacher, tmp_path):
    from leanvit.train import TrainConfig, train

    with pytest.raises(CheckpointError, match=f'{trained_teacher} cannot be mapped onto SReT: '):
        train(TrainConfig(model='test_sret', img_size=64, epochs=1, init_checkpoint=trained_teacher,
                          output=str(tmp_path)))


def test_init_checkpoint_without_a_matching_weight_is_named(tmp_path):
    from safetensors.torch import save_file

    from leanvit.train import TrainConfig, train

    unrelated = tmp_path / 'unrelated.safetensors'
    save_file({'encoder.weight': torch.zeros(3)}, unrelated)
    with pytest.raises(UsageError, match=f'init_checkpoint {unrelated} has no weight of this model'):
        train(TrainConfig(model='test_sret', img_size=64, epochs=1, init_checkpoint=str(unrelated),
                          output=str(tmp_path / 'run')))


def test_compress_reads_the_teacher_run_and_offers_the_from_scratch_baseline(trained_teacher, tmp_path, capsys):
    from leanvit.cli import main

    # No --teacher, --teacher-kwargs or --img-size: the teacher run's sidecar says how it was built.
    assert main(['compress', '--teacher-checkpoint', trained_teacher, '--epochs', '1', '--no-progress',
                 '--output', str(tmp_path / 'mini')]) == 0
    out = capsys.readouterr().out
    assert 'untrained student vs teacher on 360 validation images' in out
    student = json.loads((tmp_path / 'mini' / 'compress.json').read_text())['report']
    assert student['model_kwargs']['img_size'] == 32 and student['model_kwargs']['patch_size'] == 8

    assert main(['compress', '--teacher-checkpoint', trained_teacher, '--epochs', '1', '--no-progress',
                 '--from-scratch', '--output', str(tmp_path / 'scratch')]) == 0
    capsys.readouterr()
    scratch = json.loads((tmp_path / 'scratch' / 'compress.json').read_text())['report']
    assert (scratch['model'], scratch['model_kwargs']) == (student['model'], student['model_kwargs'])
    config = yaml.safe_load((tmp_path / 'scratch' / 'config.yaml').read_text())
    assert config['teacher'] is None and config['init_checkpoint'] is None and config['objectives'] == {}
    assert not (tmp_path / 'scratch' / 'multiplexed.safetensors').exists()
    assert not (tmp_path / 'scratch' / 'init.json').exists()
    # The two runs train the same architecture: their checkpoints have the same tensors and shapes.
    shapes = [{k: tuple(v.shape) for k, v in leanvit.read_checkpoint(folder / 'best.safetensors').items()}
              for folder in (tmp_path / 'mini', tmp_path / 'scratch')]
    assert shapes[0] == shapes[1]

    for argv, message in [(['--model', 'sret_t'], '--model does not apply to leanvit compress: the student is built '
                                                  'from the teacher'),
                          ([], 'compress needs a teacher: --teacher-checkpoint FILE')]:
        try:
            code = main(['compress', '--output', str(tmp_path / 'x'), *argv])
        except SystemExit as e:  # argparse's own usage errors: compress has no --model to parse
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count('\n') == 1, err


def test_compress_learns_the_teacher_runs_data_unless_told_otherwise(trained_teacher, tmp_path, capsys):
    from leanvit.cli import main

    # The teacher run, as if it had trained on a folder of 2 classes (its head is cut to 2 classes to match).
    folder = tmp_path / 'photos'
    for label in ('a', 'b'):
        (folder / label).mkdir(parents=True)
        for i in range(10):
            Image.new('L', (30, 30), 40 * i + (100 if label == 'b' else 0)).save(folder / label / f'{i}.png')
    weights = leanvit.read_checkpoint(trained_teacher)
    weights['head.weight'], weights['head.bias'] = weights['head.weight'][:2], weights['head.bias'][:2]
    from safetensors.torch import save_file
    save_file(weights, tmp_path / 'teacher.safetensors')
    meta = json.loads(Path(trained_teacher).with_suffix('.json').read_text())
    meta['model_kwargs']['num_classes'] = 2
    meta['config'].update(data=str(folder), val_split=0.5)
    (tmp_path / 'teacher.json').write_text(json.dumps(meta))
    assert main(['compress', '--teacher-checkpoint', str(tmp_path / 'teacher.safetensors'), '--epochs', '1',
                 '--batch-size', '4', '--no-progress', '--output', str(tmp_path / 'mini')]) == 0
    out = capsys.readouterr().out
    assert f"data       the teacher run's: {folder}, val_split 0.5" in out
    assert 'untrained student vs teacher on 10 validation images' in out
    assert yaml.safe_load((tmp_path / 'mini' / 'config.yaml').read_text())['data'] == str(folder)


@pytest.mark.parametrize('kwargs', [{'img_size': [32]}, {'embed_dim': 10 ** 30}])
def test_a_crafted_student_record_is_one_line(trained_teacher, tmp_path, capsys, kwargs):
    message = 'cannot build model mini_deit_tiny_patch16_224'
    from leanvit.cli import main
    command = ['compress', '--teacher-checkpoint', trained_teacher, '--epochs', '1', '--no-progress', '--output',
               str(tmp_path)]
    with pytest.MonkeyPatch.context() as patch:  # only the record is needed: no training
        patch.setattr('leanvit.train.train', lambda config, resume_anyway=False: {})
        assert main(command) == 0
    record = json.loads((tmp_path / 'compress.json').read_text())
    record['report']['model_kwargs'].update(kwargs)
    (tmp_path / 'compress.json').write_text(json.dumps(record))
    capsys.readouterr()
    code = main(command)
    err = capsys.readouterr().err
    assert code == 2 and message in err and 'Traceback' not in err and err.count('\n') == 1, err
