"""Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017): 70,000 28 x 28 greyscale photos of clothing in 10 classes, the
official 60,000 / 10,000 split. Harder than handwritten digits, small enough to train on a CPU. MIT license
(github.com/zalandoresearch/fashion-mnist).

Where the files come from. No package on the registry installs these images with ``pip install``, but the source
distribution of ``tinysom`` 0.2.1 (MIT, on PyPI) carries the four official files, uncompressed. ``fetch`` takes that
archive from the registry's index once, checks it against the SHA-256 pinned below, and keeps only the four files::

    python -m leanvit.io.fashion_mnist            # or: make fashion-mnist

into ``default_folder()`` (``$LEANVIT_DATA/fashion-mnist``, else ``~/.cache/leanvit/fashion-mnist``). Nothing of the
archive is executed or installed. The official ``*-ubyte.gz`` files from Zalando's repository work too: put them in
a folder and name it, ``--data fashion-mnist:FOLDER``. Training and evaluation never touch the network; a missing
file is a ``FileNotFoundError`` that says how to get it.

The files are IDX: a big-endian header (magic number, then one 32-bit size per dimension) and unsigned bytes.
``read_idx`` checks the magic, the shape against the file's length, and the labels against the 10 classes, so a
truncated or crafted file is an error naming it, never a silently short data set.
"""

import gzip
import hashlib
import io
import os
import struct
import sys
import tarfile
import urllib.request
from pathlib import Path

import numpy as np

from leanvit.errors import DataError
from leanvit.io.files import atomic_write

CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
# split -> (images file, labels file, number of images); the official names, with or without .gz
FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 60_000),
         'val': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte', 10_000)}
SIDE = 28
# The archive that carries the files: tinysom 0.2.1's source distribution on PyPI, pinned by its SHA-256.
SOURCE_PACKAGE, SOURCE_VERSION = 'tinysom', '0.2.1'
SOURCE_SHA256 = '723ff9d026518d709a53a4a6b292ba815241d603ee1b977d45e4834f3faaa110'
SOURCE_MEMBER_DIR = 'tinysom-0.2.1/data/Fashion-MNIST/'
INDEX_URL = 'https://pypi.org/simple/{}/'
_IDX_UNSIGNED_BYTE = 0x08


def default_folder() -> Path:
    return Path(os.environ.get('LEANVIT_DATA') or Path.home() / '.cache' / 'leanvit') / 'fashion-mnist'


def read_idx(path: Path, dims: int) -> np.ndarray:
    """The unsigned-byte array of IDX file ``path`` (optionally gzip-compressed) with ``dims`` dimensions."""
    raw = path.read_bytes()
    if raw[:2] == b'\x1f\x8b':
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f'{path}: not a readable gzip file ({e})') from None
    header = 4 + 4 * dims
    if len(raw) < header:
        raise DataError(f'{path}: {len(raw)} bytes, shorter than an IDX header of {dims} dimensions ({header} bytes)')
    zero, kind, found_dims = struct.unpack('>HBB', raw[:4])
    if zero != 0 or kind != _IDX_UNSIGNED_BYTE or found_dims != dims:
        raise DataError(f'{path}: not an IDX file of unsigned bytes with {dims} dimensions (magic '
                        f'{raw[:4].hex()}, expected 0000080{dims})')
    shape = struct.unpack(f'>{dims}I', raw[4:header])
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(f'{path}: its header says {" x ".join(map(str, shape))} = {int(np.prod(shape)):,} bytes of '
                        f'data, the file holds {len(raw) - header:,}; the file is truncated or not Fashion-MNIST')
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) and labels (N,) of ``split`` ('train' or 'val') from ``folder``."""
    images_name, labels_name, count = FILES[split]
    images = read_idx(_find(folder, images_name), 3)
    labels = read_idx(_find(folder, labels_name), 1)
    if images.shape != (count, SIDE, SIDE) or labels.shape != (count,):
        raise DataError(f'{folder}: the {split} split holds images {images.shape} and labels {labels.shape}; '
                        f'Fashion-MNIST has ({count}, {SIDE}, {SIDE}) and ({count},)')
    if labels.max() >= len(CLASSES):
        raise DataError(f'{folder}/{labels_name}: label {labels.max()} outside the {len(CLASSES)} classes 0-9')
    return images, labels


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f'{name}.gz'):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f'Fashion-MNIST file {name} (or {name}.gz) is not in {folder}. Get the data set once with '
        f'`python -m leanvit.io.fashion_mnist` (or `make fashion-mnist`), which keeps it in {default_folder()}; or '
        f"put the official files in a folder and give it as --data fashion-mnist:FOLDER")


def fetch(folder: Path | None = None, archive: bytes | None = None) -> Path:
    """Keep the four Fashion-MNIST files of the pinned source archive in ``folder`` (default ``default_folder()``).

    ``archive`` is the archive's bytes when already at hand; otherwise it is taken from the registry's index. A
    file already there and complete is kept; each file is written atomically, so a killed fetch leaves no partial
    file that a later run would read.
    """
    folder = Path(folder) if folder is not None else default_folder()
    wanted = [name for images, labels, _ in FILES.values() for name in (images, labels)]
    missing = [name for name in wanted if not _complete(folder, name)]
    if not missing:
        return folder
    data = archive if archive is not None else _download()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SOURCE_SHA256:
        raise DataError(f'{SOURCE_PACKAGE} {SOURCE_VERSION} archive has SHA-256 {digest}, expected {SOURCE_SHA256}: '
                        f'not the archive these files are pinned to; nothing was written')
    with tarfile.open(fileobj=io.BytesIO(data), mode='r:gz') as tar:
        for name in missing:
            member = tar.getmember(SOURCE_MEMBER_DIR + name)
            if not member.isreg():  # a link or device is never followed out of the archive
                raise DataError(f'{SOURCE_MEMBER_DIR + name} in the archive is not a regular file')
            content = tar.extractfile(member).read()

            def write(tmp, content=content):
                Path(tmp).write_bytes(content)
            atomic_write(folder / name, write)
    for split in FILES:
        load_split(folder, split)  # every file readable and of the right shape before saying it is there
    return folder


def _complete(folder: Path, name: str) -> bool:
    try:
        return (folder / name).is_file() and read_idx(folder / name, 3 if 'images' in name else 1) is not None
    except DataError:
        return False


def _download() -> bytes:
    """The pinned archive's bytes, found through the registry's JSON index (PEP 691)."""
    import json
    request = urllib.request.Request(INDEX_URL.format(SOURCE_PACKAGE),
                                     headers={'Accept': 'application/vnd.pypi.simple.v1+json'})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)['files']
    wanted = f'{SOURCE_PACKAGE}-{SOURCE_VERSION}.tar.gz'
    url = next((f['url'] for f in files if f['filename'] == wanted), None)
    if url is None:
        raise DataError(f'{wanted} is not on the package index {INDEX_URL.format(SOURCE_PACKAGE)}')
    print(f'fetching {wanted} ({SOURCE_PACKAGE} on PyPI) for its Fashion-MNIST files', file=sys.stderr, flush=True)
    with urllib.request.urlopen(url, timeout=300) as response:
        return response.read()


def main(argv: list[str]) -> int:
    if len(argv) > 1 or (argv and argv[0].startswith('-')):
        print(f'usage: python -m leanvit.io.fashion_mnist [FOLDER]  (default {default_folder()})', file=sys.stderr)
        return 2
    try:
        folder = fetch(Path(argv[0]) if argv else None)
    except (DataError, OSError) as e:  # OSError: urllib's network errors, a folder that cannot be written
        print(f'error: {e}', file=sys.stderr)
        if not isinstance(e, DataError):
            print('Without access to PyPI, put the official Fashion-MNIST files (*-ubyte.gz) in a folder and use '
                  '--data fashion-mnist:FOLDER', file=sys.stderr)
        return 1
    print(f'Fashion-MNIST is in {folder}')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
