"""``leanvit eval``: numbers match an independent computation, the confusion matrix adds up, errors are clear."""

import json
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

import leanvit
from leanvit.cli import main
from leanvit.io.data import build_datasets
from leanvit.train.evaluation import data_config, evaluation_files
from leanvit.train.teacher_logits import load_teacher_logits

KWARGS = dict(img_size=32, num_classes=10)
DIGITS_VAL_IMAGES = 360


def save_run_checkpoint(folder, model_kwargs: dict, seed: int = 0):
    """A ``test_sret`` checkpoint laid out like a leanvit run's: weights + a sibling json naming the model."""
    torch.manual_seed(seed)
    model = leanvit.create_model('test_sret', **model_kwargs)
    with torch.no_grad():  # a fresh model predicts one class for every digit; noise spreads its predictions
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    folder.mkdir(parents=True, exist_ok=True)
    leanvit.save_weights(model, folder / 'best.safetensors')
    (folder / 'best.json').write_text(json.dumps(dict(model='test_sret', model_kwargs=model_kwargs)))
    return model, folder / 'best.safetensors'


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    return save_run_checkpoint(tmp_path_factory.mktemp('run'), KWARGS)


@pytest.fixture(scope='module')
def reference(run):
    """Top-1 / top-5 counts and mean loss over the digits val split, computed here without leanvit's evaluation."""
    model, _ = run
    cfg = dict(timm.data.resolve_data_config({}, model=model), input_size=(3, 32, 32))
    loader = DataLoader(build_datasets(None, cfg).val, batch_size=64)
    model.eval()
    correct, correct5, loss, total = 0, 0, 0., 0
    with torch.no_grad():
        for images, targets in loader:
            logits = model(images)
            loss += F.cross_entropy(logits, targets, reduction='sum').item()
            correct += (logits.argmax(-1) == targets).sum().item()
            correct5 += (logits.topk(5).indices == targets[:, None]).any(-1).sum().item()
            total += len(targets)
    return dict(correct=correct, top1=100 * correct / total, top5=100 * correct5 / total, loss=loss / total,
                images=total)


def run_eval(capsys, *argv) -> tuple[int, str, str]:
    code = main(['eval', *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_prints_and_writes_the_metrics_of_an_independent_computation(run, reference, capsys, tmp_path):
    _, checkpoint = run
    code, out, err = run_eval(capsys, '--checkpoint', checkpoint, '--output', tmp_path)
    assert code == 0, err
    assert reference['images'] == DIGITS_VAL_IMAGES
    report = json.loads(evaluation_files(checkpoint, tmp_path)[0].read_text())
    assert report['images'] == DIGITS_VAL_IMAGES
    assert report['top1'] == pytest.approx(reference['top1'])
    assert report['top5'] == pytest.approx(reference['top5'])
    assert report['loss'] == pytest.approx(reference['loss'], rel=1e-5)
    assert report['input_size'] == [3, 32, 32]
    assert f'top-1      {reference["top1"]:.2f}%' in out
    assert f'top-5      {reference["top5"]:.2f}%' in out
    assert f'loss       {reference["loss"]:.4f}' in out
    assert f'images     {DIGITS_VAL_IMAGES}' in out
    assert float(re.search(r'images/s   (\d+\.\d)', out).group(1)) > 0

    confusion = torch.tensor(report['confusion_matrix'])
    assert confusion.shape == (10, 10)
    assert confusion.sum() == DIGITS_VAL_IMAGES
    assert confusion.trace() == reference['correct']
    assert (confusion.sum(0) > 0).sum() > 2, 'predictions of a single class would make these checks weak'
    assert report['class_names'] == [str(d) for d in range(10)]
    assert evaluation_files(checkpoint, tmp_path)[1].read_bytes().startswith(b'\x89PNG')


def test_eval_writes_beside_the_checkpoint_by_default(tmp_path, capsys):
    _, checkpoint = save_run_checkpoint(tmp_path, KWARGS)
    code, _, err = run_eval(capsys, '--checkpoint', checkpoint, '--batch-size', 128)
    assert code == 0, err
    assert evaluation_files(checkpoint, tmp_path)[0].exists() and evaluation_files(checkpoint, tmp_path)[1].exists()


def test_a_checkpoint_without_json_needs_model_and_kwargs(run, reference, tmp_path, capsys):
    model, _ = run
    checkpoint = tmp_path / 'weights.pth'
    torch.save({'model': model.state_dict()}, checkpoint)
    code, _, err = run_eval(capsys, '--checkpoint', checkpoint)
    assert code == 2 and 'pass the model name (--model)' in err

    code, _, err = run_eval(capsys, '--checkpoint', checkpoint, '--model', 'test_sret',
                            '--model-kwargs', json.dumps(KWARGS), '--output', tmp_path)
    assert code == 0, err
    assert json.loads(evaluation_files(checkpoint, tmp_path)[0].read_text())['top1'] == pytest.approx(reference['top1'])


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    code, _, err = run_eval(capsys, '--checkpoint', tmp_path / 'nope.safetensors')
    assert code == 1
    assert f'leanvit eval: error: checkpoint {tmp_path / "nope.safetensors"} does not exist' in err


def test_class_count_mismatch_names_both_numbers(tmp_path, capsys):
    _, checkpoint = save_run_checkpoint(tmp_path, dict(KWARGS, num_classes=7))
    code, _, err = run_eval(capsys, '--checkpoint', checkpoint)
    assert code == 1
    assert 'class count mismatch' in err and 'has 7 classes, the data has 10' in err
    assert not evaluation_files(checkpoint, tmp_path)[0].exists()


def test_plots_leave_the_callers_matplotlib_state_alone(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    from leanvit.train.engine import plot_curves
    from leanvit.train.evaluation import plot_confusion_matrix

    previous = matplotlib.get_backend()
    matplotlib.use('svg')  # a backend the caller chose, other than the Agg canvas the plots are drawn on
    try:
        figure = plt.figure()
        plot_confusion_matrix(torch.tensor([[3, 1], [0, 2]]), ['a', 'b'], tmp_path / 'cm.png')
        plot_curves(tmp_path, [dict(epoch=1, train_loss=1.0, val_loss=1.1, train_top1=50., val_top1=40.)])
        assert (matplotlib.get_backend(), plt.get_fignums()) == ('svg', [figure.number])
        plt.close(figure)
    finally:
        matplotlib.use(previous)
    for name in ('cm.png', 'loss.png', 'accuracy.png'):
        assert (tmp_path / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', name


def test_eval_uses_the_data_the_run_trained_on(tmp_path, capsys):

    from leanvit.train import TrainConfig, train

    for split in ('train', 'val'):
        for label, value in (('dark', 30), ('light', 220)):
            (tmp_path / 'data' / split / label).mkdir(parents=True)
            for i in range(8):
                Image.new('RGB', (16, 16), (value + i,) * 3).save(tmp_path / 'data' / split / label / f'{i}.png')
    train(TrainConfig(model='test_sret', img_size=32, epochs=1, batch_size=8, progress=False,
                      data=str(tmp_path / 'data'), output=str(tmp_path / 'run')))
    capsys.readouterr()
    assert main(['eval', '--checkpoint', str(tmp_path / 'run' / 'best.safetensors')]) == 0
    out = capsys.readouterr().out
    assert f'image folder {tmp_path / "data"} (train/ + val/)' in out and 'the data the run trained on' in out
    report = json.loads((tmp_path / 'run' / 'eval_best.safetensors.json').read_text())
    assert report['images'] == 16 and report['class_names'] == ['dark', 'light']


def test_a_timm_model_trained_at_a_small_size_evaluates_and_profiles_at_it(tmp_path, capsys):
    # The user's commands: train a stock DeiT at --img-size 32, then evaluate its best checkpoint.
    kwargs = '{"embed_dim": 24, "depth": 1, "num_heads": 2}'
    assert main(['train', '--model', 'deit_tiny_patch16_224', '--img-size', '32', '--model-kwargs', kwargs,
                 '--epochs', '1', '--no-progress', '--output', str(tmp_path / 'deit')]) == 0
    out = capsys.readouterr().out
    # 16-pixel patches on 32 pixels: the header says so and how to change it.
    assert 'note       at 32x32 the 16-pixel patches make a 2x2 grid of tokens' in out
    assert '"patch_size": 4' in out
    checkpoint = tmp_path / 'deit' / 'best.safetensors'
    assert main(['eval', '--checkpoint', str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert 'deit_tiny_patch16_224 (3x32x32)' in out
    report = json.loads(evaluation_files(checkpoint, tmp_path / 'deit')[0].read_text())
    assert report['input_size'] == [3, 32, 32] and report['images'] == DIGITS_VAL_IMAGES


def test_train_says_when_the_images_are_far_smaller_than_the_input(tmp_path, capsys):
    # The digits are 8 x 8; without --img-size the model would run at 224 x 224.
    from leanvit.train.engine import input_size_notes
    model = leanvit.create_model('test_sret')
    cfg = {'input_size': (3, 224, 224)}
    notes = input_size_notes(model, cfg, (28, 28), None)
    assert notes == ['the images are about 28x28 pixels but the model runs at 224x224, 64x the pixels per image: '
                     '--img-size 32 suits them']
    assert input_size_notes(model, {'input_size': (3, 32, 32)}, (8, 8), None) == []  # already the size suggested
    assert input_size_notes(model, cfg, (28, 28), 224) == []  # the user chose the size
    assert input_size_notes(model, cfg, (200, 180), None) == []


def test_eval_chooses_threads_as_train_does(tmp_path, capsys, monkeypatch):
    _, checkpoint = save_run_checkpoint(tmp_path, KWARGS)
    code, out, err = run_eval(capsys, '--checkpoint', checkpoint, '--threads', '1')
    assert code == 0, err
    assert '1 threads: --threads' in out and torch.get_num_threads() == 1
    monkeypatch.setenv('OMP_NUM_THREADS', '2')
    code, out, err = run_eval(capsys, '--checkpoint', checkpoint)
    assert code == 0 and '2 threads: OMP_NUM_THREADS' in out
    monkeypatch.delenv('OMP_NUM_THREADS')
    code, out, err = run_eval(capsys, '--checkpoint', checkpoint)
    assert code == 0 and re.search(r'\d+ threads: \d+ usable CPUs, [\d.]+ busy with other processes', out)


@pytest.mark.parametrize('name, kwargs, note', [
    ('gfnet_ti', dict(img_size=32), 'the 16-pixel patches make a 2x2 grid of tokens'),
    ('deit_tiny_patch16_224', dict(img_size=8, patch_size=4), 'the model argument patch_size 1'),
    ('deit_tiny_patch16_224', dict(img_size=32, patch_size=4), None),
    ('sret_t', dict(img_size=32), None),
])
def test_the_patch_grid_note_covers_every_patch_embedding(name, kwargs, note):
    from leanvit.train.engine import input_size_notes
    model = leanvit.create_model(name, **kwargs)
    notes = input_size_notes(model, data_config(model, kwargs['img_size']), None, kwargs['img_size'])
    assert [n for n in notes if 'grid of tokens' in n] == ([] if note is None else [notes[0]])
    assert note is None or note in notes[0]


def test_teacher_logits_default_to_the_data_the_run_trained_on(tmp_path, capsys):
    """A run trained on a folder gets its logits over that folder's training split, as eval reads its val split."""
    for split, count in (('train', 3), ('val', 2)):
        for label in ('a', 'b'):
            (tmp_path / 'data' / split / label).mkdir(parents=True)
            for i in range(count):
                Image.new('RGB', (16, 16), (40 * i,) * 3).save(tmp_path / 'data' / split / label / f'{i}.png')
    _, checkpoint = save_run_checkpoint(tmp_path / 'run', dict(img_size=32, num_classes=2))
    sidecar = checkpoint.with_suffix('.json')
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), 'config': {'data': str(tmp_path / 'data')}}))
    output = tmp_path / 'logits.safetensors'
    assert main(['teacher-logits', '--checkpoint', str(checkpoint), '--output', str(output)]) == 0
    assert 'for 6 training images x 2 classes' in capsys.readouterr().out
    _, metadata = load_teacher_logits(output, 6, 2)
    assert str(tmp_path / 'data') in metadata['data']
