import os
import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from leanvit.data import BadImageError, LabelledImages, build_datasets, digits_split

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
