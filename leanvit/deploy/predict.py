"""Predicting the classes of image files with a trained model: what ``leanvit predict`` runs.

``predict`` takes any checkpoint ``leanvit eval`` takes (a run's ``.safetensors`` with its ``.json``, any checkpoint
with a model name, an ONNX or TorchScript file ``leanvit export`` wrote) and gives the top-k classes of each image,
with their names and probabilities. Images go through exactly what ``leanvit eval`` feeds the model: decoded to RGB by
``leanvit.io.data`` (odd pixel modes, 16-bit greyscale, palettes) and transformed by the validation transform of the
model's data config, so a validation image gets the class here that it gets in ``eval``.

Class names come from the data the run trained on, as its ``.json`` (or the exported file) records it; a checkpoint
without that record, or whose data is gone, gets its class indices as names.

Neither torch nor timm is imported at module level, like the other command modules.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from leanvit.errors import CheckpointError, DataError, TrainingDivergedError, UsageError
from leanvit.io.data import _list_images, _listing, _load_rgb, _transforms, build_datasets, display_name
from leanvit.io.files import atomic_write
from leanvit.train.config import TrainConfig
from leanvit.train.evaluation import load_for_inference

# The columns of one class in the CSV, in order; the i-th ranked class gets them with suffix _i.
CSV_CLASS_COLUMNS = ('class', 'name', 'prob')


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, most probable first.

    Attributes:
        path: The image file, as found (a folder's files are joined to the folder as it was given).
        classes: Class indices, most probable first.
        names: ``names[i]`` is the name of ``classes[i]``: the class folder's name, or the index as text when the
            checkpoint records no data to take names from.
        probabilities: Softmax probability of each class, over all the model's classes.
    """
    path: str
    classes: tuple[int, ...]
    names: tuple[str, ...]
    probabilities: tuple[float, ...]

    def csv_row(self) -> list:
        """The row of ``write_predictions_csv``: path, then class_i, name_i, prob_i for each ranked class."""

        row = [display_name(self.path)]
        for ranked in zip(self.classes, self.names, self.probabilities):
            row.extend(ranked)
        return row


def predict(checkpoint: str | os.PathLike, paths: str | os.PathLike | Sequence[str | os.PathLike], top_k: int = 5,
            *, model_name: str | None = None, model_kwargs: dict | None = None, trust: bool = False,
            batch_size: int = 64) -> list[Prediction]:
    """The ``top_k`` most probable classes of each image in ``paths``, as ``checkpoint``'s model sees them.

    The model runs on CPU, re-parameterized for inference as ``leanvit eval`` runs it, in batches of ``batch_size``
    images, with the threads torch has (the command line sets them with ``leanvit.threads.choose_threads``).

    Args:
        checkpoint: A run's ``{tag}.safetensors`` (its ``{tag}.json`` names the model and records the data), any
            checkpoint ``leanvit.load_checkpoint`` reads (with ``model_name``), or a file ``leanvit export`` wrote,
            which is run in its own runtime and carries its own model, input pipeline and data record.
        paths: Image files and folders; a folder stands for every image file below it (``IMG_EXTENSIONS``, any
            case, symbolic links followed but never in a loop), in sorted order. A file named directly is read
            whatever its extension.
        top_k: Classes per image. More than the model has gives all of them (as timm's inference script does):
            ``top_k`` is a most, not a demand.
        model_name, model_kwargs, trust: As ``leanvit.train.evaluation.load_trained_model`` takes them; ignored for
            an exported file.
        batch_size: Images per forward pass (an ONNX file exported with ``--static-batch`` runs its own size).

    Returns:
        One ``Prediction`` per image, in the order of ``paths`` (each folder's files sorted).

    Raises:
        FileNotFoundError: The checkpoint or one of ``paths`` does not exist.
        DataError: A folder of ``paths`` holds no image files.
        BadImageError: An image cannot be decoded or converted to RGB; the message names its path.
        UsageError: ``top_k`` or ``batch_size`` is not an integer >= 1, or the model cannot be named.
        TrainingDivergedError: The model's outputs are not finite (corrupt weights).
    """


    for name, value in (('top_k', top_k), ('batch_size', batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f'{name} must be an integer >= 1, got {value!r}')
    images = find_images(paths)  # before the model loads: a mistyped path is reported at once
    model, cfg, num_classes, class_names = load_for_prediction(checkpoint, model_name, model_kwargs, trust)
    transform = eval_transform(cfg)
    k = min(top_k, num_classes)
    predictions = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch_paths = images[start:start + batch_size]
            batch = torch.stack([transform(_load_rgb(path)) for path in batch_paths])
            logits = model(batch).float().cpu()
            finite = torch.isfinite(logits).all(-1)
            if not finite.all():  # a ranking of NaN logits would look like an answer and mean nothing
                bad = [path for path, ok in zip(batch_paths, finite.tolist()) if not ok]
                raise TrainingDivergedError(
                    f"the model's outputs are not finite (NaN or infinite) for {bad[0]}"
                    + (f' and {len(bad) - 1} more images' if len(bad) > 1 else '')
                    + f': the weights of {checkpoint} have diverged or are corrupt')
            top = logits.softmax(-1).topk(k, dim=-1)
            for path, probabilities, classes in zip(batch_paths, top.values.tolist(), top.indices.tolist()):
                predictions.append(Prediction(path, tuple(classes), tuple(class_names[c] for c in classes),
                                              tuple(probabilities)))
    return predictions


def find_images(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The image files ``paths`` names: each file as given, each folder's image files (recursively) in sorted order.

    Folders are listed by ``leanvit.io.data``'s own lister, so a folder gives the files training would take from it;
    a path it does not follow (a broken link, a link loop) is named in one warning.

    Raises:
        UsageError: ``paths`` is empty.
        FileNotFoundError: A path does not exist.
        DataError: A folder holds no image files, or a path is neither a file nor a folder.
    """


    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise UsageError('no images given: name image files or folders of them')
    images = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            found, skipped = _list_images(path)
            if skipped:
                warnings.warn(f'skipped {len(skipped)} path(s) while listing {path}: {_listing(skipped)}',
                              stacklevel=3)
            if not found:
                raise DataError(f'{path} holds no image files (looked for {", ".join(IMG_EXTENSIONS)} in it and '
                                f'its subfolders)')
            images += found
        elif os.path.isfile(path):
            images.append(path)
        elif os.path.lexists(path):
            raise DataError(f'{path} is neither an image file nor a folder')
        else:
            raise FileNotFoundError(f'image path {path} does not exist')
    return images


def load_for_prediction(checkpoint: str | os.PathLike, model_name: str | None = None,
                        model_kwargs: dict | None = None,
                        trust: bool = False) -> tuple[nn.Module, dict, int, list[str]]:
    """The model ``checkpoint`` holds ready to run, its data config, its class count and a name for each class: the
    model and data config `leanvit eval` evaluates (``leanvit.train.evaluation.load_for_inference``)."""

    model, _, _, cfg, num_classes, recorded = load_for_inference(checkpoint, model_name, model_kwargs, trust)
    record = f'{checkpoint}: metadata' if not str(checkpoint).endswith('.safetensors') else \
        str(Path(checkpoint).with_suffix('.json'))
    names = recorded_class_names(recorded, cfg, num_classes, record)
    return model, cfg, num_classes, names or [str(index) for index in range(num_classes)]


def recorded_class_names(recorded: dict, cfg: dict, num_classes: int, record: str) -> list[str] | None:
    """The class names of the data a run recorded (its ``config``), as ``leanvit.io.data.build_datasets`` names them;
    None, with a warning where there is a record, when there is none to read.

    An image folder's names are its class folders (those of ``train/`` where it has one): they are listed, not its
    images decoded, so a large folder costs nothing. The digits and ``torch/`` datasets are built for their names.
    A folder that is gone, or whose class count is no longer the model's, leaves the classes unnamed rather than
    stopping the predictions.

    Args:
        recorded: The run's ``config`` (``{}`` for a checkpoint that records none). A config without ``data`` is
            a run on the bundled digits, as ``leanvit eval`` reads it.
        cfg: The model's data config, which building a dataset needs.
        num_classes: The model's class count.
        record: Where ``recorded`` was read, for messages.

    Raises:
        CheckpointError: The recorded ``data`` is not a value a run can have.
    """


    if not recorded:
        return None
    try:  # the recorded value checked like a recipe's, as `leanvit eval` checks it
        data = TrainConfig(data=recorded.get('data')).data
    except UsageError as e:
        raise CheckpointError(f'{record}: field "config": {e}') from None
    is_folder = data not in (None, 'digits') and not data.startswith('torch/')
    try:
        if is_folder:
            class_root = os.path.join(data, 'train') if os.path.isdir(os.path.join(data, 'train')) else data
            names = [display_name(name) for name in find_classes(class_root)[0]]
        else:
            names = build_datasets(data, cfg).class_names
    except (OSError, DataError) as e:
        warnings.warn(f'no class names: the data the run trained on ({data}) cannot be read '
                      f'({" ".join(str(e).split())}); showing class indices', stacklevel=3)
        return None
    if len(names) != num_classes:
        warnings.warn(f'no class names: the data the run trained on ({data}) now has {len(names)} classes, the model '
                      f'{num_classes}; showing class indices', stacklevel=3)
        return None
    return names


def eval_transform(cfg: dict) -> Callable:
    """The validation transform of ``leanvit.io.data.build_datasets`` for a model with data config ``cfg``: the same
    function builds it, so an image gets here the tensor it gets in ``leanvit eval``."""

    _, validation = _transforms(cfg, None, 0.)
    return validation


def write_predictions_csv(path: str | os.PathLike, predictions: Sequence[Prediction]) -> None:
    """Write ``predictions`` as CSV: ``path``, then ``class_i, name_i, prob_i`` for i = 1..k; ``path`` is replaced
    only once the whole file is written."""

    k = max((len(p.classes) for p in predictions), default=0)
    header = ['path'] + [f'{column}_{i}' for i in range(1, k + 1) for column in CSV_CLASS_COLUMNS]

    def write(tmp: str) -> None:
        with open(tmp, 'w', newline='', encoding='utf-8') as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(p.csv_row() for p in predictions)

    atomic_write(path, write)


def format_predictions(predictions: Sequence[Prediction]) -> list[str]:
    """One line per image: its path, padded to the longest, then ``name (probability)`` of each ranked class."""

    shown = [display_name(p.path) for p in predictions]  # a name that is not UTF-8 cannot be printed as it is
    width = max(map(len, shown), default=0)
    return [f'{path:<{width}}   ' + '  '.join(f'{name} ({probability:.3f})'
                                           for name, probability in zip(p.names, p.probabilities))
            for path, p in zip(shown, predictions)]
