import contextlib
import json
import os
import re
import signal
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

import leanvit
from leanvit.errors import LeanvitError, UsageError
from leanvit.io.data import BadImageError, LabelledImages, build_datasets, digits_split, display_name
from leanvit.train.evaluation import evaluate_checkpoint, plot_confusion_matrix

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
CFG = dict(input_size=(3, 32, 32), mean=MEAN, std=STD, interpolation='bicubic', crop_pct=0.875)


def write_images(folder, counts: dict[str, int], colour=(255, 0, 128)):
    """``counts[name]`` solid-colour 8x8 PNGs in ``folder/name``; returns the folder."""
    for name, count in counts.items():
        os.makedirs(folder / name, exist_ok=True)
        for i in range(count):
            Image.new('RGB', (8, 8), colour).save(folder / name / f'{i}.png')
    return folder


def labels_of(dataset: LabelledImages) -> Counter:
    return Counter(dataset.labels)


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, val = digits_split()
    again_train, again_val = digits_split()
    assert (len(train), len(val)) == (1437, 360)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    assert not set(train) & set(val) and len(set(train) | set(val)) == 1797
    labels = load_digits().target
    for digit, count in Counter(labels).items():
        assert abs(Counter(labels[val])[digit] - 0.2 * count) <= 1


def test_digits_bundle_samples_are_normalised_at_the_model_input_size():
    bundle = build_datasets(None, CFG)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (1437, 360, 10)
    assert bundle.class_names == [str(d) for d in range(10)]
    assert labels_of(bundle.val) == Counter(load_digits().target[digits_split()[1]].tolist())
    assert 'RandomHorizontalFlip' not in repr(bundle.train.transform)
    image, label = bundle.val[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < 10
    # The digit's background is 0: its darkest pixel normalises to -mean/std, channel by channel.
    assert torch.allclose(image.amin(dim=(1, 2)), -torch.tensor(MEAN) / torch.tensor(STD), atol=1e-6)
    assert bundle.train[0][0].shape == (3, 32, 32)


def test_folder_sample_is_normalised_with_the_model_mean_and_std(tmp_path):
    write_images(tmp_path / 'train', {'a': 2, 'b': 2})
    write_images(tmp_path / 'val', {'a': 1, 'b': 1})
    image, _ = build_datasets(str(tmp_path), dict(CFG, input_size=(3, 24, 24))).val[0]
    expected = (torch.tensor([255, 0, 128]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert image.shape == (3, 24, 24)
    assert torch.allclose(image, expected[:, None, None].expand_as(image), atol=1e-5)


def test_folder_with_train_and_val_subfolders(tmp_path):
    write_images(tmp_path / 'train', {'cat': 3, 'dog': 2})
    write_images(tmp_path / 'val', {'dog': 1})  # a train class may be absent from val
    bundle = build_datasets(str(tmp_path), CFG)
    assert bundle.class_names == ['cat', 'dog'] and bundle.num_classes == 2
    assert labels_of(bundle.train) == {0: 3, 1: 2} and labels_of(bundle.val) == {1: 1}
    assert bundle.train[0][0].shape == (3, 32, 32) and 'train/ + val/' in bundle.description


def test_folder_val_split_is_stratified_seeded_and_disjoint(tmp_path):
    write_images(tmp_path, {'a': 10, 'b': 10, 'c': 5})
    bundle = build_datasets(str(tmp_path), CFG, val_split=0.2, seed=3)
    assert labels_of(bundle.val) == {0: 2, 1: 2, 2: 1} and labels_of(bundle.train) == {0: 8, 1: 8, 2: 4}
    assert not set(bundle.train.images) & set(bundle.val.images)
    assert build_datasets(str(tmp_path), CFG, val_split=0.2, seed=3).val.images == bundle.val.images
    assert build_datasets(str(tmp_path), CFG, val_split=0.2, seed=4).val.images != bundle.val.images


def test_corrupt_image_stops_with_its_path(tmp_path):
    write_images(tmp_path, {'a': 5, 'b': 5})
    corrupt = tmp_path / 'a' / 'x.png'
    corrupt.write_bytes(b'not an image at all')
    with pytest.raises(BadImageError, match=re.escape(str(corrupt))):
        build_datasets(str(tmp_path), CFG, val_split=0.2)


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    write_images(tmp_path, {'a': 5, 'b': 5})
    corrupt = tmp_path / 'a' / 'x.png'
    corrupt.write_bytes(b'not an image at all')
    with pytest.warns(UserWarning, match='skipped 1 unreadable image file') as record:
        bundle = build_datasets(str(tmp_path), CFG, val_split=0.2, bad_images='skip')
    assert len(record) == 1 and str(corrupt) in str(record[0].message)
    assert bundle.skipped == [str(corrupt)] and len(bundle.train) + len(bundle.val) == 10
    assert str(corrupt) not in bundle.train.images + bundle.val.images


def test_image_that_breaks_after_the_check_is_named_when_loaded(tmp_path):
    write_images(tmp_path / 'train', {'a': 1})
    write_images(tmp_path / 'val', {'a': 1})
    bundle = build_datasets(str(tmp_path), CFG)
    (tmp_path / 'train' / 'a' / '0.png').write_bytes(b'truncated')
    with pytest.raises(BadImageError, match=re.escape(str(tmp_path / 'train' / 'a' / '0.png'))):
        bundle.train[0]


def test_empty_class_folder_is_named(tmp_path):
    write_images(tmp_path, {'a': 5, 'b': 5})
    os.makedirs(tmp_path / 'empty')
    (tmp_path / 'empty' / 'notes.txt').write_text('no images here')
    with pytest.raises(ValueError, match=f'class folder {re.escape(str(tmp_path / "empty"))} holds no images'):
        build_datasets(str(tmp_path), CFG, val_split=0.2)


def test_val_class_missing_from_train_is_named(tmp_path):
    write_images(tmp_path / 'train', {'a': 2})
    write_images(tmp_path / 'val', {'a': 1, 'zebra': 1})
    with pytest.raises(ValueError, match='validation classes missing from .*train: zebra'):
        build_datasets(str(tmp_path), CFG)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / 'nowhere'))):
        build_datasets(str(tmp_path / 'nowhere'), CFG)


@pytest.mark.parametrize('data, kwargs, match', [
    (None, dict(bad_images='ignore'), 'bad_images must be one of'),
    (None, dict(val_split=1.5), 'val_split must be a fraction'),
    ('digits', dict(val_split=0.1), 'has its own validation split'),
    ('hfds/beans', {}, 'local data only'),
    ('torch/mnist', {}, 'name the folder'),
])
def test_arguments_that_do_not_fit_are_refused(data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_datasets(data, CFG, **kwargs)


def test_folder_layout_errors(tmp_path):
    write_images(tmp_path, {'a': 1, 'b': 1})
    with pytest.raises(ValueError, match='pass val_split'):
        build_datasets(str(tmp_path), CFG)
    with pytest.raises(ValueError, match='cannot split'):
        build_datasets(str(tmp_path), CFG, val_split=0.5)
    write_images(tmp_path / 'train', {'a': 1})
    with pytest.raises(ValueError, match='needs both train/ and val/'):
        build_datasets(str(tmp_path), CFG)


def write_idx(path, array: np.ndarray):
    """An IDX file (MNIST's format) of uint8 values."""
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_dataset_read_from_a_local_folder(tmp_path):
    raw = tmp_path / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (('train', 6), ('t10k', 4)):
        write_idx(raw / f'{prefix}-images-idx3-ubyte', rng.integers(0, 256, (count, 28, 28)))
        write_idx(raw / f'{prefix}-labels-idx1-ubyte', np.arange(count) % 10)
    bundle = build_datasets(f'torch/mnist:{tmp_path}', CFG)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (6, 4, 10)
    image, label = bundle.val[3]
    assert image.shape == (3, 32, 32) and label == 3


def test_torchvision_dataset_that_would_need_a_download(tmp_path):
    with pytest.raises(FileNotFoundError, match='never downloads'):
        build_datasets(f'torch/cifar10:{tmp_path}', CFG)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / 'nowhere'))):
        build_datasets(f'torch/cifar10:{tmp_path / "nowhere"}', CFG)


def test_bad_image_error_is_the_leanvit_error():
    assert issubclass(BadImageError, LeanvitError) and issubclass(BadImageError, ValueError)


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise TimeoutError after ``seconds``: a folder walk that loops fails the test instead of hanging it."""
    def expire(signum, frame):
        raise TimeoutError(f'still running after {seconds} s')
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def all_samples(bundle) -> list[tuple[str, int]]:
    return sorted(zip(bundle.train.images + bundle.val.images, bundle.train.labels + bundle.val.labels))


@pytest.mark.parametrize('links', [['loop'], ['loop', 'again']])  # two self-links make os.walk's paths grow as 2**n
def test_link_to_its_own_folder_changes_nothing_and_is_reported(tmp_path, links):
    write_images(tmp_path, {'a': 5, 'b': 5})
    expected = all_samples(build_datasets(str(tmp_path), CFG, val_split=0.2))
    for link in links:
        os.symlink('.', tmp_path / 'a' / link)
    with time_limit(20), pytest.warns(UserWarning, match=f'skipped {len(links)} path') as record:
        bundle = build_datasets(str(tmp_path), CFG, val_split=0.2)
    assert all_samples(bundle) == expected
    assert bundle.skipped_links == [str(tmp_path / 'a' / link) for link in sorted(links)]
    assert f'{len(links)} links skipped' in bundle.description
    assert f'leads back to {tmp_path / "a"}, already listed' in str(record[0].message)


def test_folders_linking_to_each_other_end_with_the_links_named(tmp_path):
    write_images(tmp_path / 'train', {'a': 2, 'b': 3})
    write_images(tmp_path / 'val', {'a': 1, 'b': 1})
    os.symlink(os.path.join('..', 'b'), tmp_path / 'train' / 'a' / 'x')
    os.symlink(os.path.join('..', 'a'), tmp_path / 'train' / 'b' / 'y')
    with time_limit(20), pytest.warns(UserWarning, match='skipped 2 path') as record:
        bundle = build_datasets(str(tmp_path), CFG)
    loops = [str(tmp_path / 'train' / 'a' / 'x' / 'y'), str(tmp_path / 'train' / 'b' / 'y' / 'x')]
    assert all(loop in str(record[0].message) for loop in loops) and bundle.skipped_links == loops
    # A folder linked into a class folder is part of that class: each class holds its own images and the other's.
    assert labels_of(bundle.train) == {0: 5, 1: 5}
    assert str(tmp_path / 'train' / 'a' / 'x' / '2.png') in bundle.train.images


def test_links_to_images_elsewhere_are_followed_once_per_class(tmp_path):
    write_images(tmp_path / 'train', {'a': 2, 'b': 2})
    write_images(tmp_path / 'val', {'a': 1, 'b': 1})
    write_images(tmp_path / 'store', {'more': 3})
    a = tmp_path / 'train' / 'a'
    os.symlink(tmp_path / 'train' / 'b' / '0.png', a / 'from_b.png')  # an image of b, listed under a as well
    os.symlink(tmp_path / 'store' / 'more', a / 'more')  # a folder outside the dataset
    os.symlink('0.png', a / 'z_same.png')  # a second path to a's own image
    with pytest.warns(UserWarning, match='skipped 1 path') as record:
        bundle = build_datasets(str(tmp_path), CFG)
    assert f'same file as {a / "0.png"}, already listed' in str(record[0].message)
    assert bundle.skipped_links == [str(a / 'z_same.png')]
    train = dict(zip(bundle.train.images, bundle.train.labels))
    assert train == {str(a / '0.png'): 0, str(a / '1.png'): 0, str(a / 'from_b.png'): 0,
                     **{str(a / 'more' / f'{i}.png'): 0 for i in range(3)},
                     str(tmp_path / 'train' / 'b' / '0.png'): 1, str(tmp_path / 'train' / 'b' / '1.png'): 1}
    assert list(train) == sorted(train, key=lambda path: (os.path.dirname(path), os.path.basename(path)))
    image, label = bundle.train[bundle.train.images.index(str(a / 'more' / '2.png'))]
    assert image.shape == (3, 32, 32) and label == 0


def test_broken_link_is_reported_not_read(tmp_path):
    write_images(tmp_path, {'a': 5, 'b': 5})
    broken = tmp_path / 'a' / 'gone.png'
    os.symlink(tmp_path / 'nowhere.png', broken)
    with pytest.warns(UserWarning, match=re.escape(f'{broken} (link target unreachable: No such file or directory)')):
        bundle = build_datasets(str(tmp_path), CFG, val_split=0.2)  # under bad_images='stop': nothing unreadable
    assert bundle.skipped_links == [str(broken)] and bundle.skipped == []
    assert len(bundle.train) + len(bundle.val) == 10 and '1 links skipped' in bundle.description


def test_class_folder_holding_only_a_loop_is_empty(tmp_path):
    write_images(tmp_path, {'a': 5})
    os.makedirs(tmp_path / 'b')
    os.symlink('.', tmp_path / 'b' / 'loop')
    with pytest.raises(ValueError, match=f'class folder {re.escape(str(tmp_path / "b"))} holds no images'):
        build_datasets(str(tmp_path), CFG, val_split=0.2)


# Mean 0, std 1, the image's own size and no crop: the tensor is the 8-bit RGB image divided by 255.
PIXEL_CFG = dict(input_size=(3, 4, 4), mean=(0., 0., 0.), std=(1., 1., 1.), interpolation='bicubic', crop_pct=1.0)
PALETTE = [0, 0, 0, 10, 200, 30] + [0] * 762


def saved_pixels(tmp_path, image: Image.Image, filename: str) -> np.ndarray:
    """The (4, 4, 3) 8-bit RGB values the validation split gives for ``image`` saved as ``filename``."""
    for split in ('train', 'val'):
        os.makedirs(tmp_path / split / 'a', exist_ok=True)
        image.save(tmp_path / split / 'a' / filename)
    tensor, _ = build_datasets(str(tmp_path), PIXEL_CFG, augment='none').val[0]
    return (tensor * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def grey_ramp(values, dtype) -> np.ndarray:
    """4x4 pixels whose columns hold ``values``."""
    return np.tile(np.asarray(values, dtype=dtype), (4, 1))


def palette_image(mode: str, transparency=None) -> Image.Image:
    image = Image.new(mode, (4, 4), 1 if mode == 'P' else (1, 100))
    image.putpalette(PALETTE)
    if transparency is not None:
        image.info['transparency'] = transparency
    return image


# Columns of 0, 0.25, 0.61 and 1 x white: 255 * (0.25, 0.61) = 63.75, 155.55 round to 64, 156.
RAMP_8BIT = [0, 64, 156, 255]
SIXTEEN_BIT_RAMP = [0, 16383, 39976, 65535]  # int(fraction * 65535)


def pgm_16bit(path, values: np.ndarray):
    path.write_bytes(b'P5 4 4 65535\n' + values.astype('>u2').tobytes())


@pytest.mark.parametrize('mode, make, filename, expected', [
    ('1', lambda: Image.new('1', (4, 4), 1), 'x.png', (255, 255, 255)),
    ('L', lambda: Image.new('L', (4, 4), 77), 'x.png', (77, 77, 77)),
    ('LA', lambda: Image.new('LA', (4, 4), (77, 10)), 'x.png', (77, 77, 77)),  # alpha dropped, not composited
    ('P', lambda: palette_image('P'), 'x.png', (10, 200, 30)),
    ('P', lambda: palette_image('P', transparency=1), 'x.png', (10, 200, 30)),
    ('P', lambda: palette_image('P', transparency=bytes([0, 128])), 'x.png', (10, 200, 30)),
    ('PA', lambda: palette_image('PA'), 'x.tiff', (10, 200, 30)),
    ('RGB', lambda: Image.new('RGB', (4, 4), (1, 2, 3)), 'x.png', (1, 2, 3)),
    ('RGBA', lambda: Image.new('RGBA', (4, 4), (10, 20, 30, 0)), 'x.png', (10, 20, 30)),
    ('CMYK', lambda: Image.new('CMYK', (4, 4), (10, 20, 30, 40)), 'x.tiff',
     Image.new('CMYK', (1, 1), (10, 20, 30, 40)).convert('RGB').getpixel((0, 0))),
])
def test_8bit_modes_load_as_pillow_converts_them(tmp_path, mode, make, filename, expected):
    image = make()
    assert image.mode == mode
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        pixels = saved_pixels(tmp_path, image, filename)
    assert Image.open(tmp_path / 'val' / 'a' / filename).mode == mode
    assert (pixels == np.array(expected, np.uint8)).all(), pixels[0, 0]
    assert not [w for w in record if 'Palette' in str(w.message)]


@pytest.mark.parametrize('mode, save', [
    ('I;16', lambda path: Image.fromarray(grey_ramp(SIXTEEN_BIT_RAMP, np.uint16)).save(path / 'x.png')),
    ('I;16B', lambda path: Image.frombytes('I;16B', (4, 4), grey_ramp(SIXTEEN_BIT_RAMP, '>u2').tobytes())
     .save(path / 'x.tiff')),
    ('I', lambda path: pgm_16bit(path / 'x.pgm', grey_ramp(SIXTEEN_BIT_RAMP, np.uint16))),
    ('F', lambda path: Image.fromarray(grey_ramp([0, 0.25, 0.61, 1], np.float32)).save(path / 'x.tiff')),
])
def test_16bit_and_float_greyscale_scale_to_8bit(tmp_path, mode, save):
    for split in ('train', 'val'):
        os.makedirs(tmp_path / split / 'a')
        save(tmp_path / split / 'a')
    (path,) = (tmp_path / 'val' / 'a').iterdir()
    assert Image.open(path).mode == mode
    tensor, _ = build_datasets(str(tmp_path), PIXEL_CFG, augment='none').val[0]
    pixels = (tensor * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert (pixels == grey_ramp(RAMP_8BIT, np.uint8)[..., None]).all(), pixels[0]


def test_float_half_grey_rounds_half_up(tmp_path):
    pixels = saved_pixels(tmp_path, Image.fromarray(np.full((4, 4), 0.5, np.float32)), 'x.tiff')
    assert (pixels == 128).all()


@pytest.mark.parametrize('make, filename, match', [
    (lambda: Image.fromarray(np.full((4, 4), 1.5, np.float32)), 'x.tiff',
     r"pixel mode 'F' holds values in \[1.5, 1.5\], outside its range \[0, 1\]"),
    (lambda: Image.fromarray(np.full((4, 4), np.nan, np.float32)), 'x.tiff', r"pixel mode 'F' holds values in \[nan"),
    (lambda: Image.fromarray(np.full((4, 4), 100000, np.int32)), 'x.tiff',
     r"pixel mode 'I' \(32-bit integer\) from a TIFF image has no known white level"),
    (lambda: Image.new('LAB', (4, 4), (50, 0, 0)), 'x.tiff', r"pixel mode 'LAB' is not supported"),
])
def test_modes_without_an_rgb_meaning_are_refused_before_training(tmp_path, make, filename, match):
    write_images(tmp_path, {'a': 5, 'b': 5})
    path = tmp_path / 'a' / filename
    make().save(path)
    with pytest.raises(BadImageError, match=f'{re.escape(str(path))} .*{match}'):
        build_datasets(str(tmp_path), CFG, val_split=0.2)
    with pytest.warns(UserWarning, match='skipped 1 unreadable image file'):
        bundle = build_datasets(str(tmp_path), CFG, val_split=0.2, bad_images='skip')
    assert bundle.skipped == [str(path)]


def test_mode_refused_at_load_time_names_file_and_mode(tmp_path):
    write_images(tmp_path / 'train', {'a': 1})
    write_images(tmp_path / 'val', {'a': 1})
    bundle = build_datasets(str(tmp_path), CFG)
    path = tmp_path / 'train' / 'a' / '0.png'
    Image.fromarray(np.full((4, 4), 2., np.float32)).save(path, format='TIFF')  # replaced after the check
    with pytest.raises(BadImageError, match=f"cannot read image {re.escape(str(path))}: .*pixel mode 'F'"):
        bundle.train[0]


def test_display_name_shows_undecodable_bytes_escaped():
    assert display_name(os.fsdecode(b'caf\xe9')) == 'caf\\xe9'
    assert display_name(os.fsdecode(b'caf\xe8')) != display_name(os.fsdecode(b'caf\xe9'))
    assert display_name('café ☕') == 'café ☕'


def make_folder_named(parent, name: bytes):
    try:
        os.makedirs(os.path.join(os.fsencode(parent), name))
    except (OSError, UnicodeError) as e:
        pytest.skip(f'the file system refuses the folder name {name!r}: {e}')
    return parent / os.fsdecode(name)


def test_class_folder_name_that_is_not_utf8_is_shown_escaped_and_evaluated(tmp_path, monkeypatch):
    data = tmp_path / 'data'
    for split in ('train', 'val'):
        write_images(make_folder_named(data / split, b'caf\xe9'), {'': 2 if split == 'train' else 1})
        write_images(data / split, {'tea': 1}, colour=(0, 90, 0))
    bundle = build_datasets(str(data), CFG)
    assert bundle.class_names == ['caf\\xe9', 'tea'] and labels_of(bundle.train) == {0: 2, 1: 1}
    assert bundle.val[0][0].shape == (3, 32, 32)  # read through the real, undecodable folder name
    assert json.loads(json.dumps(bundle.class_names, ensure_ascii=False).encode('utf-8')) == bundle.class_names

    plot_confusion_matrix(torch.tensor([[2, 0], [1, 0]]), [os.fsdecode(b'caf\xe9'), 'tea'], tmp_path / 'cm.png')
    assert (tmp_path / 'cm.png').read_bytes().startswith(b'\x89PNG')

    torch.manual_seed(0)
    model_kwargs = dict(img_size=32, num_classes=2)
    leanvit.save_weights(leanvit.create_model('test_sret', **model_kwargs), tmp_path / 'best.safetensors')
    (tmp_path / 'best.json').write_text(json.dumps(dict(model='test_sret', model_kwargs=model_kwargs)))

    def plot_fails(*args):
        raise RuntimeError('no plot')
    monkeypatch.setattr('leanvit.train.evaluation.plot_confusion_matrix', plot_fails)
    with pytest.raises(RuntimeError, match='no plot'):
        evaluate_checkpoint(tmp_path / 'best.safetensors', tmp_path / 'failed', data=str(data))
    assert json.loads((tmp_path / 'failed' / 'eval_best.safetensors.json').read_text(encoding='utf-8'))['images'] == 2
    monkeypatch.undo()

    report = evaluate_checkpoint(tmp_path / 'best.safetensors', tmp_path / 'eval', data=str(data))
    written = json.loads((tmp_path / 'eval' / 'eval_best.safetensors.json').read_bytes().decode('utf-8'))
    assert written['class_names'] == report['class_names'] == ['caf\\xe9', 'tea']
    assert (tmp_path / 'eval' / 'confusion_matrix_best.safetensors.png').read_bytes().startswith(b'\x89PNG')


@pytest.mark.parametrize('preset, crop_scale, flips', [('light', (0.8, 1.0), False), ('imagenet', (0.08, 1.0), True)])
def test_augmentation_presets_build_the_transforms_they_name(tmp_path, preset, crop_scale, flips):
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision.transforms import RandomHorizontalFlip

    write_images(tmp_path / 'train', {'a': 2, 'b': 2})
    write_images(tmp_path / 'val', {'a': 1, 'b': 1})
    steps = build_datasets(str(tmp_path), CFG, augment=preset).train.transform.transforms
    (crop,) = [t for t in steps if isinstance(t, RandomResizedCropAndInterpolation)]
    assert crop.scale == crop_scale
    assert any(isinstance(t, RandomHorizontalFlip) for t in steps) == flips


def test_default_augmentation_is_light_and_none_is_the_evaluation_transform(tmp_path):
    import inspect

    write_images(tmp_path / 'train', {'a': 2, 'b': 2})
    write_images(tmp_path / 'val', {'a': 1, 'b': 1})
    assert inspect.signature(build_datasets).parameters['augment'].default == 'light'
    bundle = build_datasets(str(tmp_path), CFG, augment='none')
    assert bundle.train.transform is bundle.val.transform
    with pytest.raises(UsageError, match="augment \\(--augment\\) must be one of none, light, imagenet, got 'heavy'"):
        build_datasets(str(tmp_path), CFG, augment='heavy')


def test_digits_folder_script_writes_the_fixed_split_as_an_image_folder(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location('digits_folder', Path(__file__).parent.parent / 'scripts' /
                                                  'digits_folder.py')
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(tmp_path / 'digits')
    bundle = build_datasets(str(tmp_path / 'digits'), CFG)
    train_idx, val_idx = digits_split()
    assert (len(bundle.train), len(bundle.val), bundle.class_names) == (len(train_idx), len(val_idx),
                                                                        [str(d) for d in range(10)])


def test_renormalizer_maps_one_normalisation_to_another():
    from leanvit.io.data import renormalizer

    imagenet = {'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225)}
    inception = {'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5)}
    pixels = torch.rand(2, 3, 4, 4)
    mean, std = torch.tensor(imagenet['mean']).view(1, 3, 1, 1), torch.tensor(imagenet['std']).view(1, 3, 1, 1)
    as_imagenet = (pixels - mean) / std
    torch.testing.assert_close(renormalizer(imagenet, inception)(as_imagenet), (pixels - 0.5) / 0.5)
    assert renormalizer(imagenet, dict(imagenet)) is None


@pytest.mark.parametrize('name', ['digits', 'fashion-mnist'])
def test_a_folder_named_like_a_bundled_set_is_not_silently_shadowed(tmp_path, monkeypatch, name):
    # `python scripts/digits_folder.py digits` then `--data digits`: the user means the folder.
    (tmp_path / name / 'a').mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=rf'--data {name} names the bundled data set, and ./{name} is a folder here '
                                         rf'too: give ./{name} for the folder'):
        build_datasets(name, CFG)
