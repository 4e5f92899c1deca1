"""``leanvit predict``: probabilities are the model's softmax on the eval transform, predictions agree with what
``leanvit eval`` computes image by image, an exported file predicts what its checkpoint does, odd pixel modes read
as they mean, and every bad input is one line that names it."""

import csv
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_digits
from test_eval_cli import save_run_checkpoint
from timm.utils.model import reparameterize_model
from torch.utils.data import DataLoader

import leanvit.cli
from leanvit.deploy.predict import predict, recorded_class_names
from leanvit.io.data import build_datasets, digits_split
from leanvit.train.evaluation import data_config, evaluate_checkpoint, evaluate_model

KWARGS = dict(img_size=32, num_classes=10)
# Class folders of the run's recorded data: names that are not their own indices, in an order that is not sorted.
CLASS_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')


@pytest.fixture(scope='module')
def word_data(tmp_path_factory):
    """An image folder (train/ + val/) of ten classes named by ``CLASS_WORDS``: the data the run records."""
    root = tmp_path_factory.mktemp('words')
    for split in ('train', 'val'):
        for value, word in enumerate(CLASS_WORDS):
            (root / split / word).mkdir(parents=True)
            Image.new('RGB', (8, 8), (20 * value,) * 3).save(root / split / word / 'a.png')
    return root


@pytest.fixture(scope='module')
def run(tmp_path_factory, word_data):
    """A test_sret run checkpoint whose .json records ``word_data`` as the data it trained on."""
    model, checkpoint = save_run_checkpoint(tmp_path_factory.mktemp('run'), KWARGS)
    sidecar = checkpoint.with_suffix('.json')
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(dict(meta, config=dict(data=str(word_data), val_split=None, seed=0))))
    return model.eval(), checkpoint


@pytest.fixture(scope='module')
def class_names(run, word_data):
    """The class names ``build_datasets`` gives the run's data."""
    model, _ = run
    return build_datasets(str(word_data), data_config(model)).class_names


@pytest.fixture(scope='module')
def digits_val(tmp_path_factory):
    """The 360 validation digits as 8x8 greyscale PNGs, ``LABEL/POSITION.png``: the pixels the bundled digits give,
    so each file becomes the tensor its image becomes in ``leanvit eval``. Returns the folder and the labels."""
    root = tmp_path_factory.mktemp('digits_val')
    digits = load_digits()
    _, val_indices = digits_split()
    for position, index in enumerate(val_indices):
        folder = root / str(digits.target[index])
        folder.mkdir(exist_ok=True)
        Image.fromarray(np.round(digits.images[index] * (255 / 16)).astype(np.uint8)).save(
            folder / f'{position:03d}.png')
    return root, digits.target[val_indices].tolist()


@pytest.fixture(scope='module')
def digits_predictions(run, digits_val):
    _, checkpoint = run
    folder, _ = digits_val
    return predict(checkpoint, folder, top_k=3)


def position(prediction) -> int:
    """The index into the digits val split of the image a prediction is for."""
    return int(prediction.path.rsplit('/', 1)[-1].removesuffix('.png'))


def reference_probabilities(model, images: list[Image.Image]) -> torch.Tensor:
    """Softmax of ``model`` on RGB ``images`` through timm's eval transform of its data config at 32 x 32."""
    cfg = dict(timm.data.resolve_data_config({}, model=model), input_size=(3, 32, 32))
    transform = timm.data.create_transform(**cfg, is_training=False)
    with torch.no_grad():
        return model(torch.stack([transform(image) for image in images])).softmax(-1)


def assert_matches_reference(predictions, reference: torch.Tensor, k: int) -> None:
    """Each prediction's probabilities are the reference's k largest, each at the class it names."""
    assert len(predictions) == len(reference)
    for prediction, probabilities in zip(predictions, reference):
        assert len(prediction.classes) == k
        np.testing.assert_allclose(prediction.probabilities, probabilities[list(prediction.classes)], atol=1e-5)
        np.testing.assert_allclose(prediction.probabilities, probabilities.topk(k).values, atol=1e-5)


def run_predict(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    """``leanvit predict ARGV`` through ``leanvit.cli.main``: its exit codes and one-line errors."""
    code = leanvit.cli.main(['predict', *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_probabilities_are_the_softmax_of_the_model_on_the_eval_transform(run, class_names, tmp_path):
    model, checkpoint = run
    generator = np.random.default_rng(0)
    images = [Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))
              for height, width in ((32, 32), (20, 45), (64, 17), (8, 8), (33, 31))]
    for i, image in enumerate(images):
        image.save(tmp_path / f'{i}.png')
    predictions = predict(checkpoint, [tmp_path / f'{i}.png' for i in range(len(images))], top_k=4, batch_size=2)
    assert [p.path for p in predictions] == [str(tmp_path / f'{i}.png') for i in range(len(images))]
    assert_matches_reference(predictions, reference_probabilities(model, images), k=4)
    for prediction in predictions:
        assert list(prediction.names) == [class_names[c] for c in prediction.classes]
    assert set(class_names) == set(CLASS_WORDS) and class_names != list(CLASS_WORDS), 'names must not be indices'


def test_top1_agrees_with_leanvit_eval_image_by_image(run, digits_val, digits_predictions, tmp_path):
    model, checkpoint = run
    folder, labels = digits_val
    # What `leanvit eval` runs: the re-parameterized model on the bundled digits' val split.
    cfg = data_config(model)
    evaluation = evaluate_model(reparameterize_model(model), DataLoader(build_datasets(None, cfg).val, 64))
    assert len(digits_predictions) == len(labels) == 360
    assert [p.path for p in digits_predictions] == sorted(str(p) for p in folder.rglob('*.png'))
    predicted = {position(p): p.classes[0] for p in digits_predictions}
    assert [predicted[i] for i in range(len(labels))] == evaluation.predictions.tolist()
    assert len(set(predicted.values())) > 2, 'predictions of one class would make this check weak'

    # And what `leanvit eval` reports: its confusion matrix is the one of these predictions.
    report = evaluate_checkpoint(checkpoint, tmp_path, data='digits')
    confusion = np.zeros((10, 10), dtype=int)
    for prediction in digits_predictions:
        confusion[labels[position(prediction)], prediction.classes[0]] += 1
    assert report['images'] == 360 and report['confusion_matrix'] == confusion.tolist()


# The ONNX file takes batches of 7 only: 360 images end in a batch of 3, which must be padded to run at all (a
# file of any batch size runs as the TorchScript one does; `leanvit eval`'s tests run one).
@pytest.mark.parametrize('fmt, suffix, options', [('onnx', '.onnx', ['--static-batch', '--batch-size', '7']),
                                                  ('torchscript', '.pt', [])])
def test_an_exported_file_predicts_what_its_checkpoint_does(run, digits_val, digits_predictions, class_names,
                                                            tmp_path, capsys, fmt, suffix, options):
    _, checkpoint = run
    folder, _ = digits_val
    exported = tmp_path / f'model{suffix}'
    assert leanvit.cli.main(['export', '--checkpoint', str(checkpoint), '--format', fmt, '--output', str(exported),
                             *options]) == 0
    capsys.readouterr()
    from_export = predict(exported, folder, top_k=3, batch_size=100)
    assert [p.path for p in from_export] == [p.path for p in digits_predictions]
    for got, expected in zip(from_export, digits_predictions):
        np.testing.assert_allclose(got.probabilities, expected.probabilities, atol=1e-4)
        if expected.probabilities[0] - expected.probabilities[1] > 1e-4:  # a near tie may rank either way
            assert got.classes[0] == expected.classes[0]
        assert list(got.names) == [class_names[c] for c in got.classes]  # from the metadata's record of the run


def test_odd_pixel_modes_read_as_the_colours_they_mean(run, tmp_path):
    model, checkpoint = run
    generator = np.random.default_rng(1)
    grey = generator.integers(0, 256, (24, 24), dtype=np.uint8)
    rgb = generator.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(16)
    files = {  # file: (image saved, the RGB image it means)
        'grey.png': (Image.fromarray(grey), Image.fromarray(grey).convert('RGB')),
        'alpha.png': (Image.fromarray(np.dstack([rgb, generator.integers(0, 256, (24, 24), dtype=np.uint8)])),
                      Image.fromarray(rgb)),
        'palette.png': (palette, palette.convert('RGB')),
        # 16-bit: v * 257 spans 0..65535 as v spans 0..255, so it means the 8-bit image v.
        'sixteen.png': (Image.fromarray(grey.astype(np.uint16) * 257), Image.fromarray(grey).convert('RGB')),
    }
    for name, (image, _) in files.items():
        image.save(tmp_path / name)
    assert [Image.open(tmp_path / name).mode for name in files] in (['L', 'RGBA', 'P', 'I;16'],
                                                                    ['L', 'RGBA', 'P', 'I'])
    predictions = predict(checkpoint, tmp_path, top_k=10)
    ordered = sorted(files)  # a folder's files come sorted
    assert [p.path for p in predictions] == [str(tmp_path / name) for name in ordered]
    assert_matches_reference(predictions, reference_probabilities(model, [files[name][1] for name in ordered]), k=10)


def test_cli_prints_a_line_per_image_and_writes_the_same_csv(run, digits_val, monkeypatch, capsys, tmp_path):
    _, checkpoint = run
    folder, _ = digits_val
    images = [folder / '3', sorted((folder / '0').iterdir())[0]]  # a folder, then a file
    out = tmp_path / 'predictions.csv'
    code, stdout, err = run_predict(monkeypatch, capsys, '--checkpoint', checkpoint, *images, '--output', out,
                                    '--top-k', 2, '--threads', 1)
    assert code == 0, err
    expected = predict(checkpoint, images, top_k=2)
    lines = stdout.splitlines()
    assert lines[-1] == f'wrote {out}' and len(lines) == len(expected) + 1
    for line, prediction in zip(lines, expected):
        path, ranked = line.split('   ', 1)
        assert path.rstrip() == prediction.path
        assert ranked.split('  ') == [f'{n} ({p:.3f})' for n, p in zip(prediction.names, prediction.probabilities)]
    with open(out, newline='') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['path', 'class_1', 'name_1', 'prob_1', 'class_2', 'name_2', 'prob_2']
    assert [row[0] for row in rows[1:]] == [p.path for p in expected]
    for row, prediction in zip(rows[1:], expected):
        assert [int(row[1]), int(row[4])] == list(prediction.classes)
        assert [row[2], row[5]] == list(prediction.names)
        np.testing.assert_allclose([float(row[3]), float(row[6])], prediction.probabilities, atol=1e-5)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith('.tmp')]


def test_any_checkpoint_with_a_model_name_gets_class_indices(run, digits_val, monkeypatch, capsys, tmp_path):
    model, checkpoint = run
    folder, _ = digits_val
    weights = tmp_path / 'weights.pth'
    torch.save({'model': model.state_dict()}, weights)
    code, _, err = run_predict(monkeypatch, capsys, '--checkpoint', weights, folder / '5')
    assert code == 2 and 'pass the model name (--model)' in err
    code, stdout, err = run_predict(monkeypatch, capsys, '--checkpoint', weights, folder / '5', '--model', 'test_sret',
                                    '--model-kwargs', json.dumps(KWARGS), '--threads', 1)
    assert code == 0, err
    expected = predict(checkpoint, folder / '5')
    assert len(stdout.splitlines()) == len(expected)
    for line, prediction in zip(stdout.splitlines(), expected):  # the run's predictions, named by index
        assert line.split()[1::2] == [str(c) for c in prediction.classes]


@pytest.mark.parametrize('layout', ['train/ + val/', 'class folders'])
def test_class_names_are_those_build_datasets_gives(layout, tmp_path):
    cfg = dict(input_size=(3, 8, 8))
    for split in ('train', 'val') if layout == 'train/ + val/' else ('',):
        (tmp_path / split).mkdir(exist_ok=True)
        (tmp_path / split / 'notes.txt').write_text('a file beside the class folders is no class')
        for value, name in enumerate(('b', 'a', 'C', 'é')):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new('L', (4, 4), 40 * value + i).save(tmp_path / split / name / f'{i}.png')
    split = {} if layout == 'train/ + val/' else dict(val_split=0.5)
    expected = build_datasets(str(tmp_path), cfg, **split).class_names
    assert recorded_class_names(dict(data=str(tmp_path), **split), cfg, 4, 'test') == expected
    with pytest.warns(UserWarning, match='now has 4 classes, the model 5; showing class indices'):
        assert recorded_class_names(dict(data=str(tmp_path)), cfg, 5, 'test') is None
    with pytest.warns(UserWarning, match=f'the data the run trained on \\({tmp_path / "gone"}\\) cannot be read'):
        assert recorded_class_names(dict(data=str(tmp_path / 'gone')), cfg, 4, 'test') is None
    assert recorded_class_names({}, cfg, 4, 'test') is None


def test_top_k_above_the_class_count_gives_every_class(run, digits_val, monkeypatch, capsys, tmp_path):
    _, checkpoint = run
    folder, _ = digits_val
    out = tmp_path / 'all.csv'
    code, stdout, err = run_predict(monkeypatch, capsys, '--checkpoint', checkpoint, folder / '7', '--top-k', 12,
                                    '--output', out, '--threads', 1)
    assert code == 0, err
    with open(out, newline='') as f:
        rows = list(csv.reader(f))
    assert rows[0][-3:] == ['class_10', 'name_10', 'prob_10']
    for row in rows[1:]:
        assert sorted(int(c) for c in row[1::3]) == list(range(10))
        probabilities = [float(p) for p in row[3::3]]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) == pytest.approx(1)
    assert all(len(line.split()) == 21 for line in stdout.splitlines()[:-1])  # the path, then 10 x name (p)
    with pytest.raises(SystemExit) as exit_info:
        run_predict(monkeypatch, capsys, '--checkpoint', checkpoint, folder / '7', '--top-k', 0)
    assert exit_info.value.code == 2


@pytest.mark.parametrize('problem', ['missing', 'empty folder', 'corrupt image', 'neither'])
def test_bad_image_paths_are_one_line_that_names_them(run, digits_val, monkeypatch, capsys, tmp_path, problem):
    _, checkpoint = run
    folder, _ = digits_val
    images = tmp_path / 'images'
    images.mkdir()
    Image.new('RGB', (8, 8)).save(images / 'good.png')
    if problem == 'missing':
        bad, message = tmp_path / 'nope.png', f'image path {tmp_path / "nope.png"} does not exist'
    elif problem == 'empty folder':
        bad = tmp_path / 'empty'
        (bad / 'sub').mkdir(parents=True)
        (bad / 'sub' / 'notes.txt').write_text('no images here')
        message = f'{bad} holds no image files (looked for .jpg'
    elif problem == 'corrupt image':
        bad = images / 'broken.png'
        bad.write_bytes(b'\x89PNG\r\n\x1a\n' + b'truncated')
        bad, message = images, f'cannot read image {bad}: '
    else:
        import os

        bad, message = tmp_path / 'fifo', f'{tmp_path / "fifo"} is neither an image file nor a folder'
        os.mkfifo(bad)
    out = tmp_path / 'predictions.csv'
    out.write_text('the previous predictions')
    code, stdout, err = run_predict(monkeypatch, capsys, '--checkpoint', checkpoint, folder / '1', bad,
                                    '--output', out, '--threads', 1)
    assert code == 1 and stdout == ''
    assert err.startswith('leanvit predict: error: ') and err.count('\n') == 1 and message in err, err
    assert out.read_text() == 'the previous predictions'
