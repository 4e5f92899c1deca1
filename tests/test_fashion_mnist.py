"""Fashion-MNIST: the IDX reader against crafted files, the fetch against crafted archives (no network), the data
source end to end where the files are on this machine (skipped where they are not)."""

import gzip
import hashlib
import io
import struct
import tarfile

import numpy as np
import pytest

from leanvit.errors import DataError, UsageError
from leanvit.io import fashion_mnist
from leanvit.io.data import build_datasets
from leanvit.train.config import absolute_data

CFG = {'input_size': (3, 32, 32), 'mean': (0.5,) * 3, 'std': (0.5,) * 3, 'interpolation': 'bilinear',
       'crop_pct': 1.0}


def idx(array: np.ndarray) -> bytes:
    return struct.pack('>HBB', 0, 8, array.ndim) + struct.pack(f'>{array.ndim}I', *array.shape) + \
        array.astype(np.uint8).tobytes()


def small_split(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 28, 28), dtype=np.uint8), np.arange(count, dtype=np.uint8) % 10


@pytest.fixture
def small_files(monkeypatch):
    """Fashion-MNIST's layout at 20 train / 10 val images."""
    monkeypatch.setattr(fashion_mnist, 'FILES', {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 20),
                                                 'val': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte', 10)})
    return {'train-images-idx3-ubyte': small_split(20, 0)[0], 'train-labels-idx1-ubyte': small_split(20, 0)[1],
            't10k-images-idx3-ubyte': small_split(10, 1)[0], 't10k-labels-idx1-ubyte': small_split(10, 1)[1]}


def write_files(folder, files, compress=False):
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in files.items():
        data = idx(array)
        if compress:
            (folder / f'{name}.gz').write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


def archive(files, member_dir=fashion_mnist.SOURCE_MEMBER_DIR, link=None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w:gz') as tar:
        for name, array in files.items():
            data = idx(array)
            info = tarfile.TarInfo(member_dir + name)
            if name == link:
                info.type, info.linkname = tarfile.SYMTYPE, '/etc/passwd'
                tar.addfile(info)
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        setup = b'raise SystemExit("never run")'
        info = tarfile.TarInfo('tinysom-0.2.1/setup.py')
        info.size = len(setup)
        tar.addfile(info, io.BytesIO(setup))
    return buffer.getvalue()


@pytest.mark.parametrize('compress', [False, True])
def test_reads_raw_and_gzipped_files_as_the_arrays_written(tmp_path, small_files, compress):
    write_files(tmp_path, small_files, compress)
    images, labels = fashion_mnist.load_split(tmp_path, 'train')
    np.testing.assert_array_equal(images, small_files['train-images-idx3-ubyte'])
    np.testing.assert_array_equal(labels, small_files['train-labels-idx1-ubyte'])


def test_crafted_and_truncated_files_are_errors_naming_the_file(tmp_path, small_files):
    write_files(tmp_path, small_files)
    path = tmp_path / 'train-images-idx3-ubyte'
    good = path.read_bytes()
    path.write_bytes(good[:-5])
    with pytest.raises(DataError, match=r'train-images-idx3-ubyte: its header says 20 x 28 x 28 = 15,680 bytes of '
                                        r'data, the file holds 15,675'):
        fashion_mnist.load_split(tmp_path, 'train')
    path.write_bytes(b'\x00\x00\x0d\x03' + good[4:])  # float data, not unsigned bytes
    with pytest.raises(DataError, match='not an IDX file of unsigned bytes with 3 dimensions'):
        fashion_mnist.load_split(tmp_path, 'train')
    path.write_bytes(b'\x00\x00')
    with pytest.raises(DataError, match='shorter than an IDX header of 3 dimensions'):
        fashion_mnist.load_split(tmp_path, 'train')
    path.write_bytes(b'\x1f\x8b' + b'not gzip')
    with pytest.raises(DataError, match='not a readable gzip file'):
        fashion_mnist.load_split(tmp_path, 'train')
    path.write_bytes(idx(np.zeros((20, 27, 28))))
    with pytest.raises(DataError, match=r'holds images \(20, 27, 28\).*Fashion-MNIST has \(20, 28, 28\)'):
        fashion_mnist.load_split(tmp_path, 'train')
    path.write_bytes(good)
    (tmp_path / 'train-labels-idx1-ubyte').write_bytes(idx(np.full(20, 10)))
    with pytest.raises(DataError, match='label 10 outside the 10 classes'):
        fashion_mnist.load_split(tmp_path, 'train')


def test_a_missing_file_says_how_to_get_the_data(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'python -m leanvit\.io\.fashion_mnist.*--data fashion-mnist:FOLDER'):
        fashion_mnist.load_split(tmp_path, 'val')


def test_fetch_keeps_only_the_four_files_of_the_pinned_archive(tmp_path, small_files, monkeypatch):
    data = archive(small_files)
    with pytest.raises(DataError, match=f'expected {fashion_mnist.SOURCE_SHA256}: not the archive'):
        fashion_mnist.fetch(tmp_path / 'a', archive=data)
    assert not (tmp_path / 'a').exists()

    monkeypatch.setattr(fashion_mnist, 'SOURCE_SHA256', hashlib.sha256(data).hexdigest())
    folder = fashion_mnist.fetch(tmp_path / 'b', archive=data)
    assert sorted(p.name for p in folder.iterdir()) == sorted(small_files)
    np.testing.assert_array_equal(fashion_mnist.load_split(folder, 'val')[0], small_files['t10k-images-idx3-ubyte'])
    # Complete files are kept: a second fetch needs no archive at all.
    assert fashion_mnist.fetch(folder, archive=b'never read') == folder


def test_fetch_refuses_a_link_in_the_archive(tmp_path, small_files, monkeypatch):
    data = archive(small_files, link='train-labels-idx1-ubyte')
    monkeypatch.setattr(fashion_mnist, 'SOURCE_SHA256', hashlib.sha256(data).hexdigest())
    with pytest.raises(DataError, match='train-labels-idx1-ubyte in the archive is not a regular file'):
        fashion_mnist.fetch(tmp_path, archive=data)
    assert not (tmp_path / 'train-labels-idx1-ubyte').exists()


def test_the_data_source_reads_a_named_folder_and_draws_stratified_subsets(tmp_path, small_files):
    write_files(tmp_path, small_files, compress=True)
    bundle = build_datasets(f'fashion-mnist:{tmp_path}', CFG)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (20, 10, 10)
    assert bundle.class_names[0] == 'T-shirt/top' and 'official split' in bundle.description
    image, label = bundle.val[3]
    assert tuple(image.shape) == (3, 32, 32) and label == 3
    subset = build_datasets(f'fashion-mnist:{tmp_path}', CFG, train_images=10, seed=1)
    assert sorted(subset.train.labels) == list(range(10)) and len(subset.val) == 10  # one per class; val whole
    assert subset.train.labels == build_datasets(f'fashion-mnist:{tmp_path}', CFG, train_images=10,
                                                 seed=1).train.labels
    with pytest.raises(UsageError, match='train_images is 21, but the training split holds 20 images'):
        build_datasets(f'fashion-mnist:{tmp_path}', CFG, train_images=21)
    with pytest.raises(UsageError, match='cannot draw 5 training images with every class in them'):
        build_datasets(f'fashion-mnist:{tmp_path}', CFG, train_images=5)
    with pytest.raises(UsageError, match='fashion-mnist has its own validation split'):
        build_datasets('fashion-mnist', CFG, val_split=0.2)


def test_a_run_records_where_the_files_are(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_data('fashion-mnist') == 'fashion-mnist'
    assert absolute_data('fashion-mnist:files') == f'fashion-mnist:{tmp_path / "files"}'


@pytest.mark.skipif(not (fashion_mnist.default_folder() / 't10k-labels-idx1-ubyte').is_file(),
                    reason='Fashion-MNIST is not on this machine (python -m leanvit.io.fashion_mnist fetches it)')
def test_the_real_data_set_has_the_official_split():
    bundle = build_datasets('fashion-mnist', CFG)
    assert (len(bundle.train), len(bundle.val)) == (60_000, 10_000)
    assert np.bincount(bundle.val.labels).tolist() == [1000] * 10


def test_the_fetch_command_without_the_network_is_one_clear_error(tmp_path, monkeypatch, capsys):
    import urllib.error

    def offline():
        raise urllib.error.URLError('no route to host')
    monkeypatch.setattr(fashion_mnist, '_download', offline)
    assert fashion_mnist.main([str(tmp_path / 'data')]) == 1
    err = capsys.readouterr().err
    assert 'no route to host' in err and '--data fashion-mnist:FOLDER' in err
    assert fashion_mnist.main(['--help']) == 2
