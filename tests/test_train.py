"""The training engine: it learns, it distils, it resumes bit-identically after SIGKILL, it stops on NaN."""

import csv
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import leanvit
from leanvit.errors import UsageError
from leanvit.methods.minivit.weight_distillation import WeightDistillation
from leanvit.train import TrainConfig, train
from leanvit.train.run_directory import CheckpointManager

TINY = dict(model='test_sret', img_size=32, batch_size=64, epochs=2, lr=2e-3, warmup_epochs=0, progress=False,
            num_workers=0)
# MiniViT's weight distillation with trainable width adapters: a teacher of twice the student's head width.
ADAPTED = dict(TINY, epochs=1, threads=1, teacher='test_sret', teacher_kwargs=dict(head_dim=[16, 16, 16]),
               objectives={'weight_distillation': {'attention': 0, 'hidden': 1.0, 'hidden_form': 'mse'}})


def run_cli_train(output: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, '-m', 'leanvit.cli', 'train', '--output', str(output)]
    for key, value in TINY.items():
        flag = '--' + key.replace('_', '-')
        args += [flag] if value is True else ['--no-progress'] if value is False else [flag, str(value)]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.Popen(args + list(extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def final_weights(*runs: Path) -> list[dict]:
    """The last checkpoint's weights of each run, after checking that all runs ended at the same step."""
    tags = [json.loads((run / 'latest.json').read_text())['tag'] for run in runs]
    assert len(set(tags)) == 1, tags
    return [load_file(run / f'{tag}.safetensors') for run, tag in zip(runs, tags)]


def assert_close_weights(expected: dict, got: dict):
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)


def summary_without_timing(run: Path) -> list[dict]:
    """summary.csv rows minus the measured speed, which differs between any two runs."""
    with open(run / 'summary.csv') as f:
        return [{k: v for k, v in row.items() if k != 'train_images_per_s'} for row in csv.DictReader(f)]


def test_training_on_digits_learns_and_writes_its_outputs(tmp_path):
    final = train(TrainConfig(**TINY, output=str(tmp_path)))
    assert final['val_top1'] > 30, final  # 10 balanced classes: chance is 10 %
    for name in ('config.yaml', 'summary.csv', 'loss.png', 'accuracy.png', 'latest.json', 'best.safetensors'):
        assert (tmp_path / name).exists(), name
    latest = json.loads((tmp_path / 'latest.json').read_text())['tag']
    meta = json.loads((tmp_path / f'{latest}.json').read_text())
    model = leanvit.create_model(meta['model'], **meta['model_kwargs'])
    leanvit.load_checkpoint(model, tmp_path / f'{latest}.safetensors')
    assert len((tmp_path / 'summary.csv').read_text().strip().splitlines()) == 1 + TINY['epochs']


def test_distillation_from_a_teacher_checkpoint(tmp_path):
    teacher_dir = tmp_path / 'teacher'
    train(TrainConfig(**dict(TINY, epochs=1), output=str(teacher_dir)))
    final = train(TrainConfig(**dict(TINY, epochs=1), output=str(tmp_path / 'student'), teacher='test_sret',
                              teacher_checkpoint=str(teacher_dir / 'best.safetensors'), kd='soft_ce', kd_alpha=1.0))
    assert 0 <= final['val_top1'] <= 100


def test_sigkill_mid_epoch_then_resume_gives_identical_weights(tmp_path):
    reference = run_cli_train(tmp_path / 'reference', '--save-every-steps', '3')
    assert reference.wait(timeout=600) == 0, reference.stdout.read()

    killed = run_cli_train(tmp_path / 'killed', '--save-every-steps', '3')
    deadline = time.time() + 300
    while not list((tmp_path / 'killed').glob('step-000000[4-9].resume.pt')) and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    tag = json.loads((tmp_path / 'killed' / 'latest.json').read_text())['tag']
    assert tag != 'step-0000044', 'the run finished before it could be killed'

    resumed = run_cli_train(tmp_path / 'killed', '--save-every-steps', '3')
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
    expected, got = final_weights(tmp_path / 'reference', tmp_path / 'killed')
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert summary_without_timing(tmp_path / 'reference') == summary_without_timing(tmp_path / 'killed')


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = TrainConfig(**dict(TINY, epochs=1), output=str(tmp_path), save_every_steps=2)
    calls = {'n': 0}
    original = torch.nn.functional.cross_entropy

    def poisoned(logits, targets, **kwargs):
        calls['n'] += 1
        loss = original(logits, targets, **kwargs)
        return loss * float('nan') if calls['n'] == 5 else loss

    monkeypatch.setattr('leanvit.train.engine.F.cross_entropy', poisoned)
    with pytest.raises(FloatingPointError,
                       match=r'loss is nan at epoch 1, step 5.*last good checkpoint is step-0000004'):
        train(config)
    assert json.loads((tmp_path / 'latest.json').read_text())['tag'] == 'step-0000004'


@pytest.mark.parametrize('objective', [False, True], ids=['labels', 'adapted_weight_distillation'])
def test_two_process_data_parallel_matches_one_process(tmp_path, objective):
    # A model without batch statistics (BatchNorm would see half batches) and unaugmented inputs, so that one
    # process and two processes compute the same global-batch gradients. SGD, because Adam turns the float noise of
    # zero gradients (the attention key bias has one) into full-size steps.
    common = ['train', '--model', 'test_vit', '--img-size', '32', '--batch-size', '32', '--epochs', '1',
              '--opt', 'sgd', '--lr', '0.05', '--weight-decay', '0', '--augment', 'none', '--no-progress']
    if objective:  # trainable adapters outside DDP: the same start and the same averaged gradients on every rank
        leanvit.save_weights(leanvit.create_model('test_vit', img_size=32, num_classes=10, embed_dim=48),
                             tmp_path / 'teacher.safetensors')
        common += ['--teacher', 'test_vit', '--teacher-kwargs', '{"embed_dim": 48}', '--teacher-checkpoint',
                   str(tmp_path / 'teacher.safetensors'), '--objectives', json.dumps(ADAPTED['objectives'])]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    single = subprocess.run([sys.executable, '-m', 'leanvit.cli', *common, '--output', str(tmp_path / 'one')],
                            capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stdout + single.stderr
    parallel = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2', '-m', 'leanvit.cli',
         *common, '--output', str(tmp_path / 'two')], capture_output=True, text=True, env=env)
    assert parallel.returncode == 0, parallel.stdout + parallel.stderr
    one, two = final_weights(tmp_path / 'one', tmp_path / 'two')
    assert_close_weights(one, two)
    if objective:
        tag = json.loads((tmp_path / 'one' / 'latest.json').read_text())['tag']
        assert_close_weights(*(CheckpointManager.load_from(tmp_path / run, tag)[2]['objectives']
                               ['weight_distillation']['adapters'] for run in ('one', 'two')))
    one_row, two_row = (summary_without_timing(tmp_path / run)[0] for run in ('one', 'two'))
    assert {k: float(v) for k, v in two_row.items()} == pytest.approx({k: float(v) for k, v in one_row.items()},
                                                                      rel=1e-4)
    assert any(not torch.equal(one[k], v) for k, v in leanvit.create_model(
        'test_vit', img_size=32, num_classes=10).state_dict().items() if k in one)


def test_precomputed_teacher_logits_train_like_the_live_teacher(tmp_path):
    teacher = leanvit.create_model('test_sret', img_size=32, num_classes=10)
    leanvit.save_weights(teacher, tmp_path / 'teacher.safetensors')
    (tmp_path / 'teacher.json').write_text(json.dumps(dict(model='test_sret',
                                                           model_kwargs=dict(img_size=32, num_classes=10))))
    from leanvit.cli import main
    assert main(['teacher-logits', '--checkpoint', str(tmp_path / 'teacher.safetensors'),
                 '--output', str(tmp_path / 'logits.safetensors')]) == 0
    common = dict(TINY, epochs=1, augment='none', kd='soft_ce', kd_alpha=0.5, kd_tau=2.0)
    live = train(TrainConfig(**common, output=str(tmp_path / 'live'), teacher='test_sret',
                             teacher_checkpoint=str(tmp_path / 'teacher.safetensors')))
    stored = train(TrainConfig(**common, output=str(tmp_path / 'stored'),
                               teacher_logits=str(tmp_path / 'logits.safetensors')))
    assert stored['val_loss'] == pytest.approx(live['val_loss'], rel=1e-4)
    assert_close_weights(*final_weights(tmp_path / 'live', tmp_path / 'stored'))


def test_teacher_logits_for_other_data_are_refused(tmp_path):
    from leanvit.train.teacher_logits import save_teacher_logits
    save_teacher_logits(tmp_path / 'logits.safetensors', torch.zeros(100, 10), dict(data='elsewhere'))
    with pytest.raises(ValueError, match=r'hold \(100, 10\) .* training split has 1437 images of 10 classes.*'
                                         r'elsewhere'):
        train(TrainConfig(**TINY, output=str(tmp_path / 'run'), teacher_logits=str(tmp_path / 'logits.safetensors')))
    with pytest.raises(ValueError, match='cannot be used with mixup'):
        train(TrainConfig(**TINY, output=str(tmp_path / 'run2'), mixup=0.8,
                          teacher_logits=str(tmp_path / 'logits.safetensors')))


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    # test_vit has no batch statistics, so two micro-batches of 32 make the same step as one batch of 64.
    common = dict(TINY, model='test_vit', epochs=1, augment='none', opt='sgd', lr=0.05, weight_decay=0.)
    train(TrainConfig(**dict(common, batch_size=64), output=str(tmp_path / 'large')))
    train(TrainConfig(**dict(common, batch_size=32), accum_steps=2, output=str(tmp_path / 'accumulated')))
    assert_close_weights(*final_weights(tmp_path / 'large', tmp_path / 'accumulated'))


def test_bf16_autocast_ema_mixup_and_channels_last_train(tmp_path):
    final = train(TrainConfig(**dict(TINY, epochs=1), output=str(tmp_path), amp='bf16', ema_decay=0.9,
                              mixup=0.8, cutmix=1.0, smoothing=0.1, channels_last=True))
    assert all(math.isfinite(final[k]) for k in ('train_loss', 'val_loss'))
    best = json.loads((tmp_path / 'best.json').read_text())
    assert best['metric'] == final['val_top1']  # best is scored on the EMA weights it saves


def test_unknown_amp_mode_is_named(tmp_path):
    with pytest.raises(UsageError, match=r"amp \(--amp\) must be one of none, bf16, fp16, got 'fp8'"):
        train(TrainConfig(**dict(TINY, epochs=1), output=str(tmp_path), amp='fp8'))


@pytest.mark.parametrize('cpus, busy, workers, processes, expected', [
    (2, 0.1, 0, 1, 2), (2, 1.6, 0, 1, 1), (2, 2.0, 0, 1, 1), (8, 0.4, 2, 1, 6), (8, 0., 0, 2, 4), (4, 5.0, 3, 1, 1)])
def test_default_threads_leave_busy_cpus_and_loader_workers_alone(cpus, busy, workers, processes, expected):
    from leanvit.threads import default_threads

    assert default_threads(cpus, busy, workers, processes) == expected


def test_threads_option_sets_the_compute_threads(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        train(TrainConfig(**dict(TINY, epochs=1), output=str(tmp_path), threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert 'cpu, 1 compute threads (--threads)' in capsys.readouterr().out


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_objective_parameters_train_in_their_own_param_group_and_are_clipped(tmp_path, monkeypatch, restore_threads):
    from leanvit.train import engine
    built = {}

    def spy(name, after=lambda made: None):
        factory = getattr(engine, name)

        def wrapper(*args, **kwargs):
            built[name] = factory(*args, **kwargs)
            after(built[name])
            return built[name]
        monkeypatch.setattr(engine, name, wrapper)

    initial = []
    spy('build_objectives', lambda objectives: initial.extend(
        p.detach().clone() for p in objectives['weight_distillation'].parameters()))
    spy('create_optimizer_v2')
    spy('ModelEmaV3')
    clipped, clip = [], torch.nn.utils.clip_grad_norm_

    def recording_clip(params, *args, **kwargs):
        params = list(params)
        clipped.append({id(p) for p in params})
        return clip(params, *args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, 'clip_grad_norm_', recording_clip)
    train(TrainConfig(**ADAPTED, output=str(tmp_path), clip_grad=1.0, ema_decay=0.9))

    adapters = list(built['build_objectives']['weight_distillation'].parameters())
    assert [tuple(p.shape) for p in adapters] == [(16, 8), (16,), (32, 16), (32,), (64, 32), (64,)]
    assert all(not torch.equal(p, before) for p, before in zip(adapters, initial)), 'the adapters did not train'
    *model_groups, own = built['create_optimizer_v2'].param_groups
    assert list(map(id, own['params'])) == list(map(id, adapters)) and own['weight_decay'] == 0
    assert own['initial_lr'] == model_groups[0]['initial_lr'] == TINY['lr']
    assert own['lr'] == model_groups[0]['lr'] < TINY['lr']  # on the model's schedule
    assert clipped and all({id(p) for p in adapters} <= ids for ids in clipped)
    ema = built['ModelEmaV3'].module
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in ema.modules()), 'hooks copied into the EMA'


def test_objective_parameters_resume_exactly_and_only_with_their_objectives(tmp_path, monkeypatch, restore_threads):
    # A teacher without weights would be initialised from whatever state the global generator is in.
    leanvit.save_weights(leanvit.create_model('test_sret', img_size=32, num_classes=10, head_dim=[16, 16, 16]),
                         tmp_path / 'teacher.safetensors')
    common = dict(ADAPTED, save_every_steps=5, teacher_checkpoint=str(tmp_path / 'teacher.safetensors'))
    train(TrainConfig(**common, output=str(tmp_path / 'reference')))
    interrupted = TrainConfig(**common, output=str(tmp_path / 'interrupted'))
    calls, loss = {'n': 0}, WeightDistillation.loss

    def interrupt_at_step_8(self):
        calls['n'] += 1
        if calls['n'] == 8:
            raise KeyboardInterrupt
        return loss(self)

    with monkeypatch.context() as patch:
        patch.setattr(WeightDistillation, 'loss', interrupt_at_step_8)
        with pytest.raises(KeyboardInterrupt):
            train(interrupted)
    assert json.loads((tmp_path / 'interrupted' / 'latest.json').read_text())['tag'] == 'step-0000005'

    without = dataclasses.replace(interrupted, objectives={})
    with pytest.raises(UsageError, match='other settings .*objectives'):
        train(without)
    with pytest.raises(UsageError, match='optimizer state for other trainable parameters .* resume it with the '
                                         'objectives it was saved with'):
        train(without, resume_anyway=True)

    train(interrupted)
    expected, got = final_weights(tmp_path / 'reference', tmp_path / 'interrupted')
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    tag = json.loads((tmp_path / 'reference' / 'latest.json').read_text())['tag']
    expected, got = (CheckpointManager.load_from(tmp_path / run, tag)[2]['objectives']['weight_distillation']
                     ['adapters'] for run in ('reference', 'interrupted'))
    assert expected.keys() == got.keys() == {'8_to_16.weight', '8_to_16.bias', '16_to_32.weight', '16_to_32.bias',
                                             '32_to_64.weight', '32_to_64.bias'}
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_tuples_in_settings_match_their_recorded_lists():
    # A run's settings are recorded as JSON, where a tuple reads back as a list: not a changed setting on resume.
    config = TrainConfig(model_kwargs={'head_dim': (8, 8, 8)}, teacher_kwargs={'head_dim': (16, 16, 16)})
    recorded = json.loads(json.dumps(dataclasses.asdict(config)))
    assert config.differences(recorded) == []
    assert config.differences(recorded | {'model_kwargs': {'head_dim': [8, 8, 4]}}) == \
        ["model_kwargs: {'head_dim': [8, 8, 4]} -> {'head_dim': (8, 8, 8)}"]


def test_data_parallel_searches_for_unused_parameters_only_where_a_step_leaves_some(monkeypatch):
    # Path sampling trains one sampled path of the supernet per step; without it, and for other models, every
    # parameter gets a gradient in every step and DDP need not search each step's graph for those that do not.
    from types import SimpleNamespace

    from leanvit.train import engine
    from leanvit.train.objectives import build_objectives

    options = []
    monkeypatch.setattr(engine, 'DistributedDataParallel', lambda model, **kwargs: options.append(kwargs) or model)
    supernet = leanvit.create_model('glit_supernet', img_size=32, patch_size=8, num_classes=10, embed_dim=48, depth=2)
    vit = leanvit.create_model('test_vit', img_size=32, num_classes=10)
    declaring = torch.nn.Linear(2, 2)
    declaring.leaves_parameters_unused = True  # a model may declare it too
    for model, objectives, world_size in ((supernet, {'path_sampling': {}}, 2), (supernet, {}, 2), (vit, {}, 2),
                                          (declaring, {}, 2), (supernet, {'path_sampling': {}}, 1)):
        run = SimpleNamespace(model=model, objectives=build_objectives(objectives, model, None), objective_params=[],
                              world_size=world_size, config=SimpleNamespace(compile=False))
        assert engine.wrap_for_training(run) is model
        for objective in run.objectives.values():
            objective.remove()
    assert options == [{'find_unused_parameters': True}, {'find_unused_parameters': False},
                       {'find_unused_parameters': False}, {'find_unused_parameters': True}]
