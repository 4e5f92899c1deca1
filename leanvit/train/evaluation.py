"""Evaluating a trained model: predictions, confusion matrix and metrics over a validation split, and their plot.

``evaluate_checkpoint`` is what ``leanvit eval`` runs. It rebuilds the model a checkpoint holds (from the
``{tag}.json`` beside a leanvit run's ``{tag}.safetensors``, or from a model name for any checkpoint
``leanvit.load_checkpoint`` reads), evaluates it on the validation split at the model's own resolution and writes
``eval_{file}.json`` and ``confusion_matrix_{file}.png``, named after the file evaluated.
"""

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.utils.model import reparameterize_model
from torch import nn
from torch.utils.data import DataLoader

from leanvit.errors import CheckpointError, DataError, TrainingDivergedError, UsageError
from leanvit.io.data import DataBundle, build_datasets, display_name
from leanvit.io.exported import exported_format, load_exported
from leanvit.io.files import atomic_write, write_json
from leanvit.io.model_folder import is_model_folder, read_model_folder
from leanvit.io.weights import load_checkpoint
from leanvit.models import create_model
from leanvit.train.config import TrainConfig
from leanvit.train.run_directory import read_sidecar

# Past 20 classes the counts no longer fit in their cells; past 50 the names on the axes overlap, so the axes show
# class indices instead.
ANNOTATE_MAX_CLASSES = 20
NAMED_AXES_MAX_CLASSES = 50


@dataclasses.dataclass
class Evaluation:
    """What a model predicted over a loader, and the metrics that follow from it.

    Attributes:
        targets: True label of each image, in loader order.
        predictions: Top-1 predicted label of each image.
        confusion: ``confusion[true, predicted]``: image counts, ``num_classes x num_classes``.
        top1: Top-1 accuracy (%).
        top5: Top-k accuracy (%), k = min(5, num_classes).
        loss: Mean cross-entropy.
        seconds: Wall time of the loop over the loader, data loading included.
    """
    targets: torch.Tensor
    predictions: torch.Tensor
    confusion: torch.Tensor
    top1: float
    top5: float
    loss: float
    seconds: float

    @property
    def images(self) -> int:
        return self.targets.numel()

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    def metrics(self) -> dict:
        """Loss, top-1 and top-5 as one dict."""
        return {'loss': self.loss, 'top1': self.top1, 'top5': self.top5}


@torch.inference_mode()
def evaluate_model(model: nn.Module, loader: DataLoader, device: torch.device | str = 'cpu') -> Evaluation:
    """Predictions, confusion matrix and metrics of ``model`` (put in eval mode, on ``device``) over ``loader``."""
    model.eval()
    targets, predictions, loss, top5 = [], [], 0., 0
    start = time.perf_counter()
    for images, labels in loader:
        logits = model(images.to(device)).float().cpu()
        if not torch.isfinite(logits).all():  # a metric of NaN logits would be a number with no meaning
            bad = int((~torch.isfinite(logits)).any(-1).sum())
            raise TrainingDivergedError(f'the model\'s outputs are not finite (NaN or infinite) for {bad} of '
                                        f'{len(labels)} images of a batch: its weights have diverged or are corrupt')
        loss += F.cross_entropy(logits, labels, reduction='sum').item()
        ranked = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        top5 += (ranked == labels[:, None]).any(-1).sum().item()
        targets.append(labels)
        predictions.append(ranked[:, 0])
    seconds = time.perf_counter() - start
    if not targets:
        raise ValueError('the loader holds no images to evaluate')
    targets, predictions = torch.cat(targets), torch.cat(predictions)
    num_classes, total = logits.shape[-1], targets.numel()
    confusion = torch.bincount(targets * num_classes + predictions, minlength=num_classes ** 2)
    confusion = confusion.view(num_classes, num_classes)
    return Evaluation(targets, predictions, confusion, top1=100 * confusion.trace().item() / total,
                      top5=100 * top5 / total, loss=loss / total, seconds=seconds)


def plot_confusion_matrix(confusion: torch.Tensor, class_names: list[str], path: str | os.PathLike) -> None:
    """Write ``confusion[true, predicted]`` as a PNG: class names on the axes, counts in the cells up to 20 classes.

    Names are drawn through ``leanvit.io.data.display_name``: matplotlib cannot draw a folder name that is not UTF-8.
    """
    # A bare Figure with the Agg canvas: pyplot and its global backend stay as the caller (a notebook) set them,
    # and the figure is freed with its last reference.
    from matplotlib.figure import Figure

    counts = confusion.cpu().numpy()
    names = [display_name(name) for name in class_names]
    n = len(names)
    side = min(3 + 0.4 * n, 20)
    fig = Figure(figsize=(side + 1, side))
    ax = fig.subplots()
    fig.colorbar(ax.imshow(counts, cmap='Blues'), ax=ax, fraction=0.046, pad=0.04)
    if n <= NAMED_AXES_MAX_CLASSES:
        ax.set_xticks(range(n), names, rotation=90 if max(map(len, names)) > 3 else 0)
        ax.set_yticks(range(n), names)
    if n <= ANNOTATE_MAX_CLASSES:
        dark = counts.max() / 2
        for (true, predicted), count in np.ndenumerate(counts):
            ax.text(predicted, true, str(count), ha='center', va='center', fontsize=8,
                    color='white' if count > dark else 'black')
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=120))


def load_trained_model(checkpoint: str | os.PathLike, model_name: str | None = None,
                       model_kwargs: dict | None = None, trust: bool = False) -> tuple[nn.Module, str, dict]:
    """The model ``checkpoint`` holds, with its weights loaded, and the name and kwargs it was built from (see
    `trained_model_spec`)."""
    name, kwargs = trained_model_spec(checkpoint, model_name, model_kwargs)
    model = create_model(name, **kwargs)
    load_checkpoint(model, checkpoint, trust=trust)
    return model, name, kwargs


def trained_model_spec(checkpoint: str | os.PathLike, model_name: str | None = None,
                       model_kwargs: dict | None = None, name_flag: str = '--model') -> tuple[str, dict]:
    """The model name and kwargs that rebuild the model ``checkpoint`` holds, exactly as its run built it.

    A leanvit run's ``{tag}.safetensors`` has a ``{tag}.json`` beside it that names the model and its kwargs
    (``num_classes``, ``img_size`` and ``arch`` included). ``model_name`` overrides the name (the sidecar's kwargs then
    apply only if it is the same model) and ``model_kwargs`` override the kwargs key by key. Any other checkpoint
    needs ``model_name`` (``name_flag`` is the option that gives it, for the message).
    """
    path = Path(checkpoint)
    if kind := exported_format(path):
        raise CheckpointError(f'{path} is an exported {kind} model, not a checkpoint: `leanvit eval` and `predict` run '
                              f'it as it is; other commands need the checkpoint it was exported from (.safetensors)')
    meta = run_metadata(path)
    name = model_name or meta.get('model')
    if name is None:
        raise UsageError(f'{path} has no {path.with_suffix(".json").name} beside it that names its model: pass the '
                         f'model name ({name_flag}), and its non-default arguments such as num_classes '
                         f'({name_flag}-kwargs)')
    # `pretrained` and `checkpoint_path` would load weights that the checkpoint's replace.
    recorded = {k: v for k, v in meta.get('model_kwargs', {}).items() if k not in ('pretrained', 'checkpoint_path')} \
        if name == meta.get('model') else {}
    return name, dict(recorded, **(model_kwargs or {}))


def run_metadata(checkpoint: Path) -> dict:
    """The validated ``{tag}.json`` beside a leanvit run's ``{tag}.safetensors`` (model, model_kwargs, config), the
    same record of a model folder's ``config.json`` (`leanvit.io.model_folder`), or {} for any other checkpoint."""
    if is_model_folder(checkpoint):
        return read_model_folder(checkpoint)
    if checkpoint.is_dir():
        raise CheckpointError(f'checkpoint {checkpoint} is a folder without a config.json; give a checkpoint file '
                              f'such as {checkpoint / "best.safetensors"}, or a model folder (`leanvit export '
                              f'--format hub`)')
    if not checkpoint.is_file():
        raise FileNotFoundError(f'checkpoint {checkpoint} does not exist')
    sidecar = checkpoint.with_suffix('.json')
    if checkpoint.suffix != '.safetensors' or not sidecar.is_file():
        return {}
    meta = read_sidecar(sidecar)
    for key, kind in (('model', str), ('model_kwargs', dict), ('config', dict)):
        if key in meta and not isinstance(meta[key], kind):
            raise CheckpointError(f'{sidecar}: field "{key}" must be a {"string" if kind is str else "JSON object"}, '
                                  f'got {meta[key]!r}')
    return meta


def data_config(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> dict:
    """The model's data config at the resolution it was built at, not its pretrained cfg's default.

    ``img_size`` is that resolution; leanvit models know it themselves (``model.img_size``).
    """
    cfg = timm.data.resolve_data_config({}, model=model)
    # leanvit models know their resolution; timm's ViT, DeiT and Swin keep it in their patch embedding.
    img_size = img_size or getattr(model, 'img_size', None) or getattr(getattr(model, 'patch_embed', None),
                                                                      'img_size', None)
    if img_size is not None:
        cfg['input_size'] = (cfg['input_size'][0], *((img_size, img_size) if isinstance(img_size, int) else img_size))
    return cfg


def load_for_inference(checkpoint: str | os.PathLike, model_name: str | None = None, model_kwargs: dict | None = None,
                       trust: bool = False) -> tuple:
    """(model, name, kwargs, data config, class count, the run's recorded config) of any file `leanvit eval` and
    `leanvit predict` take: an exported file, run in its runtime and described by its metadata, or a checkpoint,
    rebuilt by `load_trained_model` at the resolution it was built for and re-parameterized for inference (the
    folded form equals the trained one and is what a deployed model runs, so a measured speed is the deployed one).
    """
    if exported_format(checkpoint):
        model, meta = load_exported(checkpoint)
        cfg = dict(meta['data_config'], input_size=tuple(meta['data_config']['input_size']))
        return model, meta['model'], meta['model_kwargs'], cfg, meta['num_classes'], meta['config']
    model, name, kwargs = load_trained_model(checkpoint, model_name, model_kwargs, trust=trust)
    cfg = data_config(model, kwargs.get('img_size'))
    recorded = run_metadata(Path(checkpoint)).get('config') or {}
    return reparameterize_model(model.eval()), name, kwargs, cfg, model.num_classes, recorded


def run_datasets(checkpoint: str | os.PathLike, name: str, num_classes: int, cfg: dict, recorded: dict,
                 data: str | None = None, **options) -> tuple[DataBundle, str]:
    """The datasets a trained model is evaluated on, and where they come from in words: ``data`` if given, else the
    data and split the run trained on (``recorded``, its sidecar's config), else the bundled digits. ``options`` go
    to `build_datasets` (e.g. ``augment='none'`` for a training split through the evaluation transform).

    Raises:
        DataError: The model's class count is not the data's.
    """
    split = {}
    if data is not None:
        source = 'given'
    elif recorded:
        # The run's own data and split; TrainConfig checks the recorded values like any recipe's.
        try:
            run = TrainConfig(**{key: recorded[key] for key in ('data', 'val_split', 'seed') if key in recorded})
        except UsageError as e:
            raise CheckpointError(f'{Path(checkpoint).with_suffix(".json")}: field "config": {e}') from None
        data, split, source = run.data, dict(val_split=run.val_split, seed=run.seed), 'the data the run trained on'
    else:
        source = 'the bundled digits: no --data, and the checkpoint records no run'
    bundle = build_datasets(data, cfg, **split, **options)
    if num_classes != bundle.num_classes:
        raise DataError(f'class count mismatch: checkpoint {checkpoint} ({name}) has {num_classes} classes, '
                         f'the data has {bundle.num_classes} ({bundle.description})')
    return bundle, source


def evaluation_files(checkpoint: str | os.PathLike, output: str | os.PathLike) -> tuple[Path, Path]:
    """Where `evaluate_checkpoint` writes the metrics and the confusion matrix of ``checkpoint`` in ``output``."""
    name = Path(checkpoint).name
    return Path(output) / f'eval_{name}.json', Path(output) / f'confusion_matrix_{name}.png'


def evaluate_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, *, model_name: str | None = None,
                        model_kwargs: dict | None = None, data: str | None = None, batch_size: int = 64,
                        trust: bool = False) -> dict:
    """Evaluate ``checkpoint`` on the validation split of ``data`` and write `evaluation_files` of it: the metrics and
    the confusion matrix, named after the file evaluated, so that evaluating a run's checkpoint and its export in one
    folder keeps both.

    The model is evaluated re-parameterized for inference (``timm.utils.model.reparameterize_model``).

    Args:
        checkpoint: Weights, see ``load_trained_model`` (which ``model_name`` and ``model_kwargs`` go to).
        output: Folder for the two files.
        data: As ``leanvit.io.data.build_datasets`` takes it; None: the data (and split) the run was trained on, as its
            sidecar records it, or the bundled digits for a checkpoint without one.
        batch_size: Images per forward pass.

    Returns:
        The contents of the JSON file: the metrics, what was evaluated, the class names (as ``DataBundle`` shows them,
        UTF-8 whatever the folder names) and the confusion matrix. It is written before the plot, so that a plot that
        fails never costs the metrics.

    Raises:
        FileNotFoundError: The checkpoint or the data is not there.
        ValueError: The model cannot be named, the weights do not fit it, or its class count is not the data's.
    """
    model, name, kwargs, cfg, num_classes, recorded = load_for_inference(checkpoint, model_name, model_kwargs, trust)
    bundle, source = run_datasets(checkpoint, name, num_classes, cfg, recorded, data)
    result = evaluate_model(model, DataLoader(bundle.val, batch_size))
    output = Path(output)
    report = dict(checkpoint=str(checkpoint), model=name, model_kwargs=kwargs, input_size=list(cfg['input_size']),
                  data=bundle.description, data_source=source, images=result.images, batch_size=batch_size,
                  **result.metrics(), images_per_s=result.images_per_s, class_names=bundle.class_names,
                  confusion_matrix=result.confusion.tolist())
    report_file, plot_file = evaluation_files(checkpoint, output)
    write_json(report_file, report)
    plot_confusion_matrix(result.confusion, bundle.class_names, plot_file)
    return report
