"""Datasets for training and evaluation: the bundled digits, Fashion-MNIST, any image folder, timm's offline
torchvision datasets.

Every split returns ``(image_tensor, label)`` pairs made by timm's transforms, configured from the model's pretrained
cfg (mean, std, interpolation, crop_pct) through ``timm.data.resolve_data_config``, so a model sees images the way it
was built for. ``build_datasets`` is the one entry point; nothing is ever downloaded.

Image files are listed with symbolic links followed but never in a loop, and decoded to 8-bit RGB with the values
their pixel mode means (``_to_rgb``): a 16-bit or float image is scaled, not clipped, or refused with a
``BadImageError`` naming the file and the mode.
"""

import os
import stat
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import create_dataset, create_transform, resolve_data_config
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes
from torchvision.transforms import Compose

from leanvit.errors import BadImageError, DataError, UsageError


@dataclass(frozen=True)
class Augmentation:
    """A named preset of training transforms: timm's ``create_transform`` arguments and when to pick it."""
    transform: dict | None   # None: the evaluation transform, no randomness at all
    use: str


# Training-transform presets (``--augment``). The default is `light`: on images leanvit knows nothing about, a flip
# or a strong crop can change the class (digits, text, medical images, anything with a left and a right), and a
# small dataset trained for a few epochs learns faster from images close to the ones it is evaluated on. ImageNet
# recipes ask for `imagenet` (with their RandAugment, random erasing, Mixup and CutMix on top).
AUGMENTATIONS = {
    'none': Augmentation(None, 'the evaluation transform (resize, centre crop): deterministic; to compare runs, or '
                               'for very small datasets'),
    'light': Augmentation(dict(scale=(0.8, 1.0), ratio=(0.9, 1.1), hflip=0., color_jitter=0.),
                          'random-resized crop of 80-100 % of the image, aspect 0.9-1.1; no flip, no colour change: '
                          'safe for any images'),
    'imagenet': Augmentation(dict(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, color_jitter=0.4),
                             "timm's ImageNet training transform: crop of 8-100 %, aspect 3/4-4/3, horizontal flip, "
                             'colour jitter 0.4; for large sets of natural photos, many epochs'),
}
# The name that selects Fashion-MNIST (leanvit.io.fashion_mnist), alone or as 'fashion-mnist:FOLDER'.
FASHION_MNIST = 'fashion-mnist'
# The fixed digits split: 1,437 train / 360 val images, stratified by class.
DIGITS_SPLIT = dict(test_size=0.2, random_state=0)
BAD_IMAGE_POLICIES = ('stop', 'skip')
# timm dataset prefixes that stream or download from the network; leanvit only reads local data.
_NETWORK_PREFIXES = ('hfds/', 'hfids/', 'tfds/', 'wds/')
# Pixel modes whose 8-bit channels Pillow's convert('RGB') maps to the colours they mean: alpha is dropped, CMYK goes
# through Pillow's plain formula (no ICC profile). LAB is not here: Pillow copies its channels as if they were RGB.
_RGB_CONVERTIBLE_MODES = frozenset({'1', 'L', 'LA', 'P', 'PA', 'RGB', 'RGBA', 'RGBX', 'CMYK', 'YCbCr', 'HSV'})
# Formats that Pillow opens as 32-bit mode 'I' although their samples are 16-bit at 0..65535: 16-bit greyscale PNG in
# some Pillow versions (others give 'I;16'), and PGM with any maxval above 255, which Pillow rescales to 0..65535.
_SIXTEEN_BIT_I_FORMATS = ('PNG', 'PPM')


@dataclass
class DataBundle:
    """The two splits of one dataset and what a model needs to know about it.

    Attributes:
        train: Training split of ``(image_tensor, label)`` pairs, randomly augmented.
        val: Validation split of ``(image_tensor, label)`` pairs, resized and center-cropped.
        num_classes: Number of classes, the size of the model's classifier.
        class_names: ``class_names[label]`` is the name of ``label``.
        description: One line for logs: the source, the split and the sizes.
        skipped: Paths of unreadable images dropped under ``bad_images='skip'``.
        skipped_links: Paths not followed while listing an image folder, each named in one warning with its reason:
            broken symbolic links, links back into a folder already listed and second paths to an image file already
            listed under the same class.
        held_out: Under ``holdout``, the part of the training split kept out of ``train``, with the validation
            transform: what an architecture search scores candidates on, so that it never sees ``val``.
    """
    train: Dataset
    val: Dataset
    num_classes: int
    class_names: list[str]
    description: str
    skipped: list[str] = field(default_factory=list)
    skipped_links: list[str] = field(default_factory=list)
    held_out: Dataset | None = None


class LabelledImages(Dataset):
    """Images with integer labels, transformed on access; each image is a PIL image in memory or an RGB file path."""

    def __init__(self, images: Sequence[Image.Image | str], labels: Sequence[int], transform: Callable):
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        if isinstance(image, str):
            image = _load_rgb(image)
        return self.transform(image), self.labels[index]


def renormalizer(source_cfg: dict, target_cfg: dict):
    """A function taking a batch normalised with ``source_cfg``'s mean and std to ``target_cfg``'s, or None when they
    agree: a teacher trained with other statistics than its student's (timm's ViTs use 0.5, most models ImageNet's)
    must see its own, or it sees inputs it was not trained on."""
    if tuple(source_cfg['mean']) == tuple(target_cfg['mean']) and tuple(source_cfg['std']) == tuple(target_cfg['std']):
        return None
    def stats(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(cfg['mean']).view(1, -1, 1, 1), torch.tensor(cfg['std']).view(1, -1, 1, 1)
    (source_mean, source_std), (target_mean, target_std) = stats(source_cfg), stats(target_cfg)
    scale, shift = source_std / target_std, (source_mean - target_mean) / target_std

    def renormalize(images: torch.Tensor) -> torch.Tensor:
        return images * scale.to(images) + shift.to(images)
    return renormalize


class WithIndex(Dataset):
    """``dataset``'s samples with their index appended, ``(image, label, index)``: for per-sample lookups such as
    precomputed teacher logits."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, label, index


def build_datasets(
        data: str | None,
        model_cfg: dict,
        *,
        val_split: float | None = None,
        auto_augment: str | None = None,
        re_prob: float = 0.,
        augment: str = 'light',
        bad_images: str = 'stop',
        seed: int = 0,
        holdout: float = 0.,
        train_images: int | None = None,
) -> DataBundle:
    """Train and validation datasets, transformed for the model described by ``model_cfg``.

    Args:
        data: Which data:
            ``None`` or ``'digits'``: scikit-learn's bundled handwritten digits (1,797 8x8 grayscale images, 10
            classes), as RGB images upscaled to the model's input size, with the fixed stratified split
            ``train_test_split(test_size=0.2, stratify=labels, random_state=0)``: 1,437 train / 360 val images.
            A folder path: either with ``train/`` and ``val/`` subfolders of class folders, or itself a folder of
            class folders split by ``val_split``. Files are listed like torchvision's ``ImageFolder`` (the class
            folders are the immediate subfolders, image extensions ``IMG_EXTENSIONS`` in any case), except that
            symbolic links never loop or list one file twice under a class (see ``_list_images``); each path not
            followed is named in one warning and in ``DataBundle.skipped_links``. Class names that are not valid
            UTF-8 are shown with ``display_name``.
            ``'fashion-mnist'`` or ``'fashion-mnist:FOLDER'``: Fashion-MNIST (70,000 28x28 greyscale clothing
            photos, 10 classes, the official 60,000 / 10,000 split) as RGB, from the folder that
            ``python -m leanvit.io.fashion_mnist`` fills once (see ``leanvit.io.fashion_mnist``) or from FOLDER.
            ``'torch/NAME:ROOT'``: timm's torchvision dataset NAME (e.g. ``torch/cifar10``) already stored in ROOT.
        model_cfg: The model's ``pretrained_cfg``: ``input_size``, ``mean``, ``std``, ``interpolation`` and
            ``crop_pct`` configure the transforms. A model created with another ``img_size`` needs
            ``{**model.pretrained_cfg, 'input_size': (3, *model.img_size)}``.
        val_split: Fraction of each class held out for validation, for a single folder of class folders only.
        auto_augment: timm auto-augment string for training, e.g. ``'rand-m9-mstd0.5'`` (RandAugment); None for none.
        re_prob: Random-erasing probability for training.
        augment: The training-transform preset, a key of ``AUGMENTATIONS``: ``'none'`` gives the training split the
            deterministic evaluation transform, ``'light'`` mild scale jitter only, ``'imagenet'`` timm's ImageNet
            training transform.
        bad_images: What to do with image files that cannot be decoded, or whose pixel mode or values have no 8-bit
            RGB meaning (see ``_to_rgb``): ``'stop'`` raises a ``BadImageError`` naming them, ``'skip'`` drops them
            with one warning and lists them in ``DataBundle.skipped``. Every file is decoded and converted once here
            (in parallel threads), so a bad file is found before training starts.
        seed: Seed of the ``val_split`` and ``holdout`` splits; the same seed and data give the same splits.
        holdout: Fraction of each class of the training split held out of ``train`` into ``held_out`` (0: none).
        train_images: Train on a stratified subset of this many images of the training split, drawn by ``seed``
            after the ``holdout`` (None: all). The validation split and ``held_out`` stay whole, so runs on subsets
            of different sizes are scored on the same images.

    Returns:
        The splits, the class names and a one-line description.

    Raises:
        FileNotFoundError: ``data`` names a folder or a torchvision dataset that is not there.
        ValueError: An argument does not fit the data, a class folder holds no images, or a validation class is
            missing from training.
        BadImageError: Under ``bad_images='stop'``, an image file cannot be decoded or converted to RGB.
    """
    if bad_images not in BAD_IMAGE_POLICIES:
        raise UsageError(f'bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}')
    if val_split is not None and not 0 < val_split < 1:
        raise UsageError(f'val_split must be a fraction between 0 and 1, got {val_split}')
    if not 0 <= holdout < 1:
        raise UsageError(f'holdout must be a fraction in [0, 1), got {holdout}')
    if train_images is not None and train_images < 1:
        raise UsageError(f'train_images must be a positive number of images, got {train_images}')
    bundle = _build(data, model_cfg, val_split, auto_augment, re_prob, augment, bad_images, seed)
    bundle = _hold_out(bundle, holdout, seed) if holdout else bundle
    return _subset(bundle, train_images, seed) if train_images is not None else bundle


def _build(data: str | None, model_cfg: dict, val_split: float | None, auto_augment: str | None, re_prob: float,
           augment: str, bad_images: str, seed: int) -> DataBundle:
    if augment not in AUGMENTATIONS:
        raise UsageError(f'augment (--augment) must be one of {", ".join(AUGMENTATIONS)}, got {augment!r}')
    is_digits = data in (None, 'digits')
    if data in ('digits', FASHION_MNIST) and os.path.isdir(data):  # `digits_folder.py digits`, then --data digits
        raise UsageError(f'--data {data} names the bundled data set, and ./{data} is a folder here too: give '
                         f'./{data} for the folder, or run from another folder for the bundled set')
    preset = AUGMENTATIONS[augment].transform
    train_tf, val_tf = _transforms(model_cfg, auto_augment, re_prob, **(preset or {}))
    if preset is None:
        train_tf = val_tf
    is_fashion = data is not None and (data == FASHION_MNIST or data.startswith(FASHION_MNIST + ':'))
    if is_digits or is_fashion or data.startswith('torch/'):
        if val_split is not None:
            raise UsageError(f'{data or "digits"} has its own validation split; val_split applies to a folder of '
                             f'class folders only')
        if is_fashion:
            return _fashion_mnist_datasets(data.partition(':')[2], train_tf, val_tf)
        return _digits_datasets(train_tf, val_tf) if is_digits else _torchvision_datasets(data, train_tf, val_tf)
    if data.lower().startswith(_NETWORK_PREFIXES):
        raise UsageError(f'{data}: leanvit reads local data only; export it as an image folder or use a torch/ name')
    return _folder_datasets(data, val_split, seed, bad_images, train_tf, val_tf)


def _hold_out(bundle: DataBundle, fraction: float, seed: int) -> DataBundle:
    """``bundle`` with a stratified ``fraction`` of its training split moved to ``held_out`` (validation transform)."""
    train, val = bundle.train, bundle.val
    if not isinstance(train, LabelledImages) or not isinstance(val, LabelledImages):
        raise UsageError('holdout applies to the digits and to image folders, not to torch/ datasets')
    from sklearn.model_selection import train_test_split  # scikit-learn takes a second to import: on use only

    try:
        keep, held = train_test_split(np.arange(len(train.labels)), test_size=fraction, stratify=train.labels,
                                      random_state=seed)
    except ValueError as e:  # too few images in a class
        raise DataError(f'cannot hold out {fraction} of each class of the training split: {e}') from None
    kept = LabelledImages([train.images[i] for i in keep], [train.labels[i] for i in keep], train.transform)
    held_out = LabelledImages([train.images[i] for i in held], [train.labels[i] for i in held], val.transform)
    return replace(bundle, train=kept, held_out=held_out,
                               description=f'{bundle.description}; {len(held_out)} training images held out '
                                           f'(holdout={fraction}, seed={seed}), {len(kept)} trained on')


def _subset(bundle: DataBundle, size: int, seed: int) -> DataBundle:
    """``bundle`` training on a stratified ``size`` of its training images (the rest unused)."""
    train = bundle.train
    if not isinstance(train, LabelledImages):
        raise UsageError('train_images applies to the bundled data sets and to image folders, not to torch/ datasets')
    if size >= len(train.labels):
        if size > len(train.labels):
            raise UsageError(f'train_images is {size}, but the training split holds {len(train.labels)} images')
        return bundle
    from sklearn.model_selection import train_test_split

    try:
        keep, _ = train_test_split(np.arange(len(train.labels)), train_size=size, stratify=train.labels,
                                   random_state=seed)
    except ValueError as e:  # fewer images than classes
        raise UsageError(f'cannot draw {size} training images with every class in them: {e}') from None
    keep = np.sort(keep)  # the data order is the sampler's, not the draw's
    subset = LabelledImages([train.images[i] for i in keep], [train.labels[i] for i in keep], train.transform)
    return replace(bundle, train=subset, description=f'{bundle.description}; trained on a stratified {size} of '
                                                     f'its {len(train.labels)} training images (seed {seed})')


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """The fixed digits split as (train, val) indices into ``load_digits()``: 1,437 and 360, stratified by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    return train_test_split(np.arange(len(labels)), stratify=labels, **DIGITS_SPLIT)


def _transforms(model_cfg: dict, auto_augment: str | None, re_prob: float, **train_aug) -> tuple[Callable, Callable]:
    cfg = resolve_data_config(pretrained_cfg=model_cfg)
    common = dict(input_size=cfg['input_size'], interpolation=cfg['interpolation'], mean=cfg['mean'], std=cfg['std'])
    try:
        train = create_transform(**common, is_training=True, auto_augment=auto_augment, re_prob=re_prob, **train_aug)
    except (AssertionError, ValueError, KeyError) as e:  # timm checks the policy string with asserts
        raise UsageError(f"auto_augment (--auto-augment) {auto_augment!r} is not a timm auto-augment policy such as "
                         f"'rand-m9-mstd0.5-inc1', 'augmix-m5-w4-d2' or 'original': {e}") from None
    val = create_transform(**common, crop_pct=cfg['crop_pct'], crop_mode=cfg['crop_mode'])
    return train, val


def _digits_datasets(train_tf: Callable, val_tf: Callable) -> DataBundle:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Values are 0..16; timm's transforms want 8-bit RGB PIL images.
    images = [Image.fromarray(np.round(x * (255 / 16)).astype(np.uint8)).convert('RGB') for x in digits.images]
    labels = digits.target.tolist()
    train_idx, val_idx = digits_split()
    train = LabelledImages([images[i] for i in train_idx], [labels[i] for i in train_idx], train_tf)
    val = LabelledImages([images[i] for i in val_idx], [labels[i] for i in val_idx], val_tf)
    return DataBundle(train, val, 10, [str(d) for d in range(10)],
                      f'digits (scikit-learn, 8x8 grayscale): {len(train)} train / {len(val)} val images, 10 classes, '
                      f'fixed stratified split (random_state={DIGITS_SPLIT["random_state"]})')


def _fashion_mnist_datasets(folder: str, train_tf: Callable, val_tf: Callable) -> DataBundle:
    from leanvit.io import fashion_mnist

    root = Path(folder) if folder else fashion_mnist.default_folder()
    splits = {}
    for split, transform in (('train', train_tf), ('val', val_tf)):
        images, labels = fashion_mnist.load_split(root, split)
        # Greyscale as RGB, like the digits: timm's transforms and the models' 3-channel stems want RGB.
        splits[split] = LabelledImages([Image.fromarray(x).convert('RGB') for x in images], labels.tolist(), transform)
    train, val = splits['train'], splits['val']
    return DataBundle(train, val, len(fashion_mnist.CLASSES), list(fashion_mnist.CLASSES),
                      f'Fashion-MNIST (28x28 greyscale clothing, from {root}): {len(train)} train / {len(val)} val '
                      f'images, 10 classes, the official split')


def typical_image_size(dataset: Dataset, samples: int = 64) -> tuple[int, int] | None:
    """The median width and height of up to ``samples`` images spread over ``dataset`` (a `LabelledImages`; files
    are opened for their header only), or None for another kind of dataset or an empty one."""
    images = getattr(dataset, 'images', None)
    if not images:
        return None
    sizes = []
    for image in images[::max(1, len(images) // samples)][:samples]:
        try:
            if isinstance(image, str):
                with Image.open(image) as opened:
                    image = opened
            sizes.append(image.size)
        except Exception:  # noqa: BLE001 - an unreadable file is the loader's to report, not this estimate's
            continue
    if not sizes:
        return None
    return int(np.median([w for w, _ in sizes])), int(np.median([h for _, h in sizes]))


def display_name(name: str) -> str:
    """``name`` printable and encodable as UTF-8: bytes that were not UTF-8 are shown as ``\\xNN``.

    A file name that is not valid UTF-8 reaches Python as a str with lone surrogates (``os.fsdecode``'s
    surrogateescape), which matplotlib, UTF-8 files and terminals refuse. ``b'caf\\xe9'`` becomes ``'caf\\\\xe9'``:
    backslashreplace rather than U+FFFD, so that two names differing only in such bytes stay two names. A valid name
    comes back unchanged.
    """
    return name.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')


def _folder_datasets(root: str, val_split: float | None, seed: int, bad_images: str,
                     train_tf: Callable, val_tf: Callable) -> DataBundle:
    if not os.path.isdir(root):
        raise FileNotFoundError(f'dataset folder {root} does not exist')
    train_dir, val_dir = os.path.join(root, 'train'), os.path.join(root, 'val')
    if os.path.isdir(train_dir) or os.path.isdir(val_dir):
        if not (os.path.isdir(train_dir) and os.path.isdir(val_dir)):
            raise DataError(f'{root} needs both train/ and val/ subfolders, or neither (then pass val_split)')
        if val_split is not None:
            raise DataError(f'{root} has train/ and val/ subfolders, so val_split does not apply')
        classes, class_to_idx = find_classes(train_dir)
        missing = sorted(set(find_classes(val_dir)[0]) - set(classes))
        if missing:
            raise DataError(f'validation classes missing from {train_dir}: {", ".join(map(display_name, missing))}')
        (train, train_links), (val, val_links) = _scan(train_dir, class_to_idx), _scan(val_dir, class_to_idx)
        skipped_links = train_links + val_links
        layout = 'train/ + val/'
    else:
        if val_split is None:
            raise DataError(f'{root} has no train/ and val/ subfolders: pass val_split to split its class folders')
        classes, class_to_idx = find_classes(root)
        samples, skipped_links = _scan(root, class_to_idx)
        train, val = _stratified_split(samples, val_split, seed, root)
        layout = f'val_split={val_split}, seed={seed}'
    if skipped_links:
        warnings.warn(f'skipped {len(skipped_links)} path(s) while listing {root}: {_listing(skipped_links)}',
                      stacklevel=3)
    skipped = _find_unreadable([path for path, _ in train + val], bad_images)
    if skipped:
        bad = set(skipped)
        train, val = [s for s in train if s[0] not in bad], [s for s in val if s[0] not in bad]
    description = (f'image folder {display_name(root)} ({layout}): {len(train)} train / {len(val)} val images, '
                   f'{len(classes)} classes'
                   + (f', {len(skipped)} unreadable images skipped' if skipped else '')
                   + (f', {len(skipped_links)} links skipped' if skipped_links else ''))
    return DataBundle(_labelled(train, train_tf), _labelled(val, val_tf), len(classes),
                      [display_name(name) for name in classes], description, skipped,
                      [path for path, _ in skipped_links])


def _scan(folder: str, class_to_idx: dict[str, int]) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """(path, label) of every image below ``folder``'s class folders, and (path, reason) of each path not followed.

    A class folder without images is an error; a class with no folder here is not (a validation split may lack one).
    """
    samples, skipped = [], []
    for name in sorted(class_to_idx):
        class_dir = os.path.join(folder, name)
        if not os.path.isdir(class_dir):
            continue
        images, class_skipped = _list_images(class_dir)
        if not images:
            raise DataError(f'class folder {class_dir} holds no images (looked for {", ".join(IMG_EXTENSIONS)})')
        samples += [(path, class_to_idx[name]) for path in images]
        skipped += class_skipped
    return samples, skipped


def _list_images(class_dir: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The image files below ``class_dir``, sorted as torchvision's ``make_dataset`` sorts them, and (path, reason)
    of each path not followed.

    Symbolic links to files and to folders are followed, so a folder of links to images stored elsewhere is a class
    like any other. An image takes the label of the class folder it is listed under, as in ``ImageFolder``: a link in
    ``a/`` to a file in ``b/`` puts that image in both classes. Within one class folder each folder and each image file
    (told apart by device and inode, so hard links count once too) is listed once; skipped, with a reason, are a link
    back into a folder already listed (``ln -s . loop``, or two folders linking to each other, which ``os.walk``
    follows until paths grow too long), a second path to an image already listed, a broken link and a folder that
    cannot be read. The walk is depth-first in sorted order, so which of two paths to one file is kept is the same on
    every file system.
    """
    root_stat = os.stat(class_dir)
    listed_dirs = {(root_stat.st_dev, root_stat.st_ino): class_dir}
    listed_files = {}
    images, skipped = [], []
    pending = [class_dir]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as e:
            skipped.append((directory, f'cannot list it: {e.strerror}'))
            continue
        subdirs = []
        for entry in entries:
            try:
                entry_stat = entry.stat()  # of the link's target
            except OSError as e:  # a broken link, a link to itself, a target behind a folder we may not read
                skipped.append((entry.path, f'link target unreachable: {e.strerror}'))
                continue
            identity = entry_stat.st_dev, entry_stat.st_ino
            if stat.S_ISDIR(entry_stat.st_mode):
                if identity in listed_dirs:
                    skipped.append((entry.path, f'leads back to {listed_dirs[identity]}, already listed'))
                else:
                    listed_dirs[identity] = entry.path
                    subdirs.append(entry.path)
            elif stat.S_ISREG(entry_stat.st_mode) and entry.name.lower().endswith(IMG_EXTENSIONS):
                if identity in listed_files:
                    skipped.append((entry.path, f'same file as {listed_files[identity]}, already listed'))
                else:
                    listed_files[identity] = entry.path
                    images.append((directory, entry.name))
        pending += reversed(subdirs)  # the first subfolder is listed next
    return [os.path.join(directory, name) for directory, name in sorted(images)], skipped


def _stratified_split(samples: list[tuple[str, int]], val_split: float, seed: int, root: str):
    try:
        from sklearn.model_selection import train_test_split

        return train_test_split(samples, test_size=val_split, stratify=[label for _, label in samples],
                                random_state=seed)
    except ValueError as e:  # too few images in a class for a stratified split
        raise DataError(f'cannot split {root} with val_split={val_split}: {e}') from None


def _labelled(samples: list[tuple[str, int]], transform: Callable) -> LabelledImages:
    return LabelledImages([path for path, _ in samples], [label for _, label in samples], transform)


def _listing(problems: list[tuple[str, str]]) -> str:
    """The first three (path, reason) pairs for a message, and how many more there are."""
    return '; '.join(f'{path} ({reason})' for path, reason in problems[:3]) + (
        f'; and {len(problems) - 3} more' if len(problems) > 3 else '')


def _find_unreadable(paths: list[str], bad_images: str) -> list[str]:
    """The paths that do not decode to RGB: raise a BadImageError naming them under 'stop', warn once under 'skip'."""
    with ThreadPoolExecutor() as pool:  # PIL releases the GIL while decoding
        errors = list(pool.map(_decode_error, paths))
    bad = [(path, error) for path, error in zip(paths, errors) if error]
    if not bad:
        return []
    listing = _listing(bad)
    if bad_images == 'stop':
        raise BadImageError(f'{len(bad)} unreadable image file(s): {listing}. '
                            f"Pass bad_images='skip' to train without them.")
    warnings.warn(f'skipped {len(bad)} unreadable image file(s) of {len(paths)}: {listing}', stacklevel=4)
    return [path for path, _ in bad]


def _decode_error(path: str) -> str | None:
    """Why ``path`` does not decode as an RGB image the way ``_load_rgb`` will read it, or None if it does."""
    try:
        with Image.open(path) as image:
            image.draft(image.mode, (1, 1))  # a JPEG decodes at 1/8 scale: every byte is still read
            _to_rgb(image)
    except Exception as e:  # PIL signals a corrupt file with OSError, SyntaxError, ValueError, zlib or struct errors
        return f'{type(e).__name__}: {e}'
    return None


def _load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return _to_rgb(image)
    except Exception as e:  # a file that changed after it was checked: name it
        raise BadImageError(f'cannot read image {path}: {type(e).__name__}: {e}') from e


def _to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB with the brightness its pixel mode means; ``image.convert('RGB')`` alone clips 16-bit
    greyscale to white and float to black.

    - 8-bit modes (``_RGB_CONVERTIBLE_MODES``) convert as Pillow converts them. Alpha (LA, PA, RGBA) is dropped, not
      composited: a transparent pixel shows the colour stored under it, as torchvision's ``pil_loader`` always did. A
      palette image goes through RGBA, so that its transparency is dropped the same way and without Pillow's warning.
    - 16-bit greyscale ('I;16', 'I;16B', ..., and mode 'I' from the ``_SIXTEEN_BIT_I_FORMATS``) maps 0..65535 to
      0..255. Other mode 'I' images (32-bit or signed TIFF) are refused: nothing in the file says which value is white.
    - Float greyscale ('F') maps 0..1 to 0..255.

    Scaled values are rounded to the nearest integer, halves up (0.5 * 255 = 127.5 -> 128). A value outside the mode's
    range is refused rather than clipped, as is every other mode (LAB, whose channels Pillow would copy as RGB, ...).

    Raises:
        ValueError: The mode is not supported, or a value lies outside its range; the message names the mode and the
            values found. Callers add the file's path.
    """
    mode = image.mode
    if mode in ('P', 'PA'):
        return image.convert('RGBA').convert('RGB')
    if mode in _RGB_CONVERTIBLE_MODES:
        return image.convert('RGB')
    if mode == 'F':
        white = 1.
    elif mode in ('I;16', 'I;16L', 'I;16B', 'I;16N') or (mode == 'I' and image.format in _SIXTEEN_BIT_I_FORMATS):
        white = 65535.
    elif mode == 'I':
        raise ValueError(f"pixel mode 'I' (32-bit integer) from a {image.format or 'Pillow'} image has no known white "
                         f'level; save it as 8- or 16-bit')
    else:
        raise ValueError(f'pixel mode {mode!r} is not supported; convert it to RGB, L, 16-bit greyscale or float')
    values = np.asarray(image, dtype=np.float64)
    low, high = values.min(), values.max()
    if not 0 <= low <= high <= white:  # also refuses NaN, for which every comparison is False
        raise ValueError(f'pixel mode {mode!r} holds values in [{low:g}, {high:g}], outside its range [0, {white:g}] '
                         f'(black to white); rescale it into that range')
    grey = np.floor(values * (255 / white) + 0.5).astype(np.uint8)
    return Image.fromarray(grey).convert('RGB')


def _torchvision_datasets(data: str, train_tf: Callable, val_tf: Callable) -> DataBundle:
    name, _, root = data.partition(':')
    if not root:
        raise UsageError(f"{data}: name the folder that holds the dataset, e.g. '{name}:/data/{name[len('torch/'):]}'")
    if not os.path.isdir(root):
        raise FileNotFoundError(f'dataset folder {root} (for {name}) does not exist')
    # Grayscale datasets (MNIST) give 'L' images; the model's 3-channel mean/std need RGB.
    try:
        train = create_dataset(name, root=root, split='train', download=False, transform=Compose([_to_rgb, train_tf]))
        val = create_dataset(name, root=root, split='validation', download=False, transform=Compose([_to_rgb, val_tf]))
    except RuntimeError as e:  # torchvision: "Dataset not found ... You can use download=True to download it"
        raise FileNotFoundError(f'{name} is not stored in {root}, and leanvit never downloads: fetch it once with '
                                f'torchvision (download=True) and point at that folder. torchvision: {e}') from None
    # ImageNet's classes are tuples of synonyms: the first names the class.
    classes = [c if isinstance(c, str) else c[0] for c in train.classes]
    return DataBundle(train, val, len(classes), classes,
                      f'{name} from {root}: {len(train)} train / {len(val)} val images, {len(classes)} classes')
