"""Datasets for training and evaluation: the bundled digits, any image folder, timm's offline torchvision datasets.

Every split returns ``(image_tensor, label)`` pairs made by timm's transforms, configured from the model's pretrained
cfg (mean, std, interpolation, crop_pct) through ``timm.data.resolve_data_config``, so a model sees images the way it
was built for. ``build_datasets`` is the one entry point; nothing is ever downloaded.
"""

import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.data import create_dataset, create_transform, resolve_data_config
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset, pil_loader
from torchvision.transforms import Compose

# The digits are 8x8: a horizontal flip turns some digits into others or into no digit at all, and a strong
# random-resized crop cuts away strokes that decide the class. Only mild scale / aspect jitter is kept.
DIGITS_TRAIN_AUG = dict(scale=(0.8, 1.0), ratio=(0.9, 1.1), hflip=0., color_jitter=0.)
# The fixed digits split: 1,437 train / 360 val images, stratified by class.
DIGITS_SPLIT = dict(test_size=0.2, random_state=0)
BAD_IMAGE_POLICIES = ('stop', 'skip')
# timm dataset prefixes that stream or download from the network; leanvit only reads local data.
_NETWORK_PREFIXES = ('hfds/', 'hfids/', 'tfds/', 'wds/')


class BadImageError(ValueError):
    """An image file that cannot be opened or decoded; the message names its path."""


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
    """
    train: Dataset
    val: Dataset
    num_classes: int
    class_names: list[str]
    description: str
    skipped: list[str] = field(default_factory=list)


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
        augment: bool = True,
        bad_images: str = 'stop',
        seed: int = 0,
) -> DataBundle:
    """Train and validation datasets, transformed for the model described by ``model_cfg``.

    Args:
        data: Which data:
            ``None`` or ``'digits'``: scikit-learn's bundled handwritten digits (1,797 8x8 grayscale images, 10
            classes), as RGB images upscaled to the model's input size, with the fixed stratified split
            ``train_test_split(test_size=0.2, stratify=labels, random_state=0)``: 1,437 train / 360 val images.
            Training augmentation is mild (``DIGITS_TRAIN_AUG``: no horizontal flip, small scale jitter).
            A folder path: either with ``train/`` and ``val/`` subfolders of class folders, or itself a folder of
            class folders split by ``val_split``. Files are listed like torchvision's ``ImageFolder``.
            ``'torch/NAME:ROOT'``: timm's torchvision dataset NAME (e.g. ``torch/cifar10``) already stored in ROOT.
        model_cfg: The model's ``pretrained_cfg``: ``input_size``, ``mean``, ``std``, ``interpolation`` and
            ``crop_pct`` configure the transforms. A model created with another ``img_size`` needs
            ``{**model.pretrained_cfg, 'input_size': (3, *model.img_size)}``.
        val_split: Fraction of each class held out for validation, for a single folder of class folders only.
        auto_augment: timm auto-augment string for training, e.g. ``'rand-m9-mstd0.5'`` (RandAugment); None for none.
        re_prob: Random-erasing probability for training.
        augment: False gives the training split the deterministic evaluation transform (no augmentation at all).
        bad_images: What to do with image files that cannot be decoded: ``'stop'`` raises a ``BadImageError`` naming
            them, ``'skip'`` drops them with one warning and lists them in ``DataBundle.skipped``. Every file is
            decoded once here (in parallel threads), so a bad file is found before training starts.
        seed: Seed of the ``val_split`` split; the same seed and folder give the same split.

    Returns:
        The splits, the class names and a one-line description.

    Raises:
        FileNotFoundError: ``data`` names a folder or a torchvision dataset that is not there.
        ValueError: An argument does not fit the data, a class folder holds no images, or a validation class is
            missing from training.
        BadImageError: Under ``bad_images='stop'``, an image file cannot be decoded.
    """
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ValueError(f'bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}')
    if val_split is not None and not 0 < val_split < 1:
        raise ValueError(f'val_split must be a fraction between 0 and 1, got {val_split}')
    is_digits = data in (None, 'digits')
    train_tf, val_tf = _transforms(model_cfg, auto_augment, re_prob, **(DIGITS_TRAIN_AUG if is_digits else {}))
    if not augment:
        train_tf = val_tf
    if is_digits or data.startswith('torch/'):
        if val_split is not None:
            raise ValueError(f'{data or "digits"} has its own validation split; val_split applies to a folder of '
                             f'class folders only')
        return _digits_datasets(train_tf, val_tf) if is_digits else _torchvision_datasets(data, train_tf, val_tf)
    if data.lower().startswith(_NETWORK_PREFIXES):
        raise ValueError(f'{data}: leanvit reads local data only; export it as an image folder or use a torch/ name')
    return _folder_datasets(data, val_split, seed, bad_images, train_tf, val_tf)


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """The fixed digits split as (train, val) indices into ``load_digits()``: 1,437 and 360, stratified by class."""
    labels = load_digits().target
    return train_test_split(np.arange(len(labels)), stratify=labels, **DIGITS_SPLIT)


def _transforms(model_cfg: dict, auto_augment: str | None, re_prob: float, **train_aug) -> tuple[Callable, Callable]:
    cfg = resolve_data_config(pretrained_cfg=model_cfg)
    common = dict(input_size=cfg['input_size'], interpolation=cfg['interpolation'], mean=cfg['mean'], std=cfg['std'])
    train = create_transform(**common, is_training=True, auto_augment=auto_augment, re_prob=re_prob, **train_aug)
    val = create_transform(**common, crop_pct=cfg['crop_pct'], crop_mode=cfg['crop_mode'])
    return train, val


def _digits_datasets(train_tf: Callable, val_tf: Callable) -> DataBundle:
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


def _folder_datasets(root: str, val_split: float | None, seed: int, bad_images: str,
                     train_tf: Callable, val_tf: Callable) -> DataBundle:
    if not os.path.isdir(root):
        raise FileNotFoundError(f'dataset folder {root} does not exist')
    train_dir, val_dir = os.path.join(root, 'train'), os.path.join(root, 'val')
    if os.path.isdir(train_dir) or os.path.isdir(val_dir):
        if not (os.path.isdir(train_dir) and os.path.isdir(val_dir)):
            raise ValueError(f'{root} needs both train/ and val/ subfolders, or neither (then pass val_split)')
        if val_split is not None:
            raise ValueError(f'{root} has train/ and val/ subfolders, so val_split does not apply')
        classes, class_to_idx = find_classes(train_dir)
        missing = sorted(set(find_classes(val_dir)[0]) - set(classes))
        if missing:
            raise ValueError(f'validation classes missing from {train_dir}: {", ".join(missing)}')
        train, val = _scan(train_dir, class_to_idx), _scan(val_dir, class_to_idx)
        layout = 'train/ + val/'
    else:
        if val_split is None:
            raise ValueError(f'{root} has no train/ and val/ subfolders: pass val_split to split its class folders')
        classes, class_to_idx = find_classes(root)
        train, val = _stratified_split(_scan(root, class_to_idx), val_split, seed, root)
        layout = f'val_split={val_split}, seed={seed}'
    skipped = _find_unreadable([path for path, _ in train + val], bad_images)
    if skipped:
        bad = set(skipped)
        train, val = [s for s in train if s[0] not in bad], [s for s in val if s[0] not in bad]
    description = (f'image folder {root} ({layout}): {len(train)} train / {len(val)} val images, {len(classes)} classes'
                   + (f', {len(skipped)} unreadable images skipped' if skipped else ''))
    return DataBundle(_labelled(train, train_tf), _labelled(val, val_tf), len(classes), classes, description, skipped)


def _scan(folder: str, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """(path, label) of every image below ``folder``'s class folders; a class folder without images is an error."""
    samples = make_dataset(folder, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    found = {label for _, label in samples}
    for name, label in class_to_idx.items():
        class_dir = os.path.join(folder, name)
        if label not in found and os.path.isdir(class_dir):
            raise ValueError(f'class folder {class_dir} holds no images (looked for {", ".join(IMG_EXTENSIONS)})')
    return samples


def _stratified_split(samples: list[tuple[str, int]], val_split: float, seed: int, root: str):
    try:
        return train_test_split(samples, test_size=val_split, stratify=[label for _, label in samples],
                                random_state=seed)
    except ValueError as e:  # too few images in a class for a stratified split
        raise ValueError(f'cannot split {root} with val_split={val_split}: {e}') from None


def _labelled(samples: list[tuple[str, int]], transform: Callable) -> LabelledImages:
    return LabelledImages([path for path, _ in samples], [label for _, label in samples], transform)


def _find_unreadable(paths: list[str], bad_images: str) -> list[str]:
    """The paths that do not decode: raise a BadImageError naming them under 'stop', warn once under 'skip'."""
    with ThreadPoolExecutor() as pool:  # PIL releases the GIL while decoding
        errors = list(pool.map(_decode_error, paths))
    bad = [(path, error) for path, error in zip(paths, errors) if error]
    if not bad:
        return []
    listing = '; '.join(f'{path} ({error})' for path, error in bad[:3]) + (
        f'; and {len(bad) - 3} more' if len(bad) > 3 else '')
    if bad_images == 'stop':
        raise BadImageError(f'{len(bad)} unreadable image file(s): {listing}. '
                            f"Pass bad_images='skip' to train without them.")
    warnings.warn(f'skipped {len(bad)} unreadable image file(s) of {len(paths)}: {listing}', stacklevel=4)
    return [path for path, _ in bad]


def _decode_error(path: str) -> str | None:
    """Why ``path`` does not decode as an image, or None if it does."""
    try:
        with Image.open(path) as image:
            image.draft(image.mode, (1, 1))  # a JPEG decodes at 1/8 scale: every byte is still read
            image.load()
    except Exception as e:  # PIL signals a corrupt file with OSError, SyntaxError, ValueError, zlib or struct errors
        return f'{type(e).__name__}: {e}'
    return None


def _load_rgb(path: str) -> Image.Image:
    try:
        return pil_loader(path)
    except Exception as e:  # a file that changed after it was checked: name it
        raise BadImageError(f'cannot read image {path}: {type(e).__name__}: {e}') from e


def _rgb(image: Image.Image) -> Image.Image:
    return image.convert('RGB')


def _torchvision_datasets(data: str, train_tf: Callable, val_tf: Callable) -> DataBundle:
    name, _, root = data.partition(':')
    if not root:
        raise ValueError(f"{data}: name the folder that holds the dataset, e.g. '{name}:/data/{name[len('torch/'):]}'")
    if not os.path.isdir(root):
        raise FileNotFoundError(f'dataset folder {root} (for {name}) does not exist')
    # Grayscale datasets (MNIST) give 'L' images; the model's 3-channel mean/std need RGB.
    try:
        train = create_dataset(name, root=root, split='train', download=False, transform=Compose([_rgb, train_tf]))
        val = create_dataset(name, root=root, split='validation', download=False, transform=Compose([_rgb, val_tf]))
    except RuntimeError as e:  # torchvision: "Dataset not found ... You can use download=True to download it"
        raise FileNotFoundError(f'{name} is not stored in {root}, and leanvit never downloads: fetch it once with '
                                f'torchvision (download=True) and point at that folder. torchvision: {e}') from None
    # ImageNet's classes are tuples of synonyms: the first names the class.
    classes = [c if isinstance(c, str) else c[0] for c in train.classes]
    return DataBundle(train, val, len(classes), classes,
                      f'{name} from {root}: {len(train)} train / {len(val)} val images, {len(classes)} classes')
