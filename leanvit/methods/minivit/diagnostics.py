"""The two diagnostics of MiniViT (Zhang et al., "MiniViT: Compressing Vision Transformers with Weight Multiplexing",
CVPR 2022, Sec. 3.1, Fig. 2-3), which the official code does not ship.

- ``gradient_norms``: the gradient l2-norm of each transformer layer over training steps (Fig. 2);
- ``layer_cka``: linear CKA (Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019)
  between every block output of one model and every block output of another on the same images (Fig. 3).
The paper uses them to show what plain weight sharing does to training and to the layers' features.

``analyze_gradient_norms`` and ``analyze_cka`` are what ``leanvit analyze grad-norms`` / ``cka`` run: they load the
models and the data as training and evaluation do and write a CSV and a PNG.

Choices made where the paper is silent:
- A layer is a block module, as `leanvit.methods.features.blocks_by_stage` finds it: ``blocks.N`` in timm's ViT /
  DeiT, ``stages.0.blocks.N`` in Mini-DeiT, ``layers.S.blocks.B`` in timm's Swin, ``stages.S.blocks.B`` in Mini-Swin
  and leanvit's other staged models, ``blocks.S.B`` in GFNet-H.
- Gradient norms are per distinct parameter group: a block whose weights are shared and applied several times per
  forward has one gradient tensor per parameter (the sum over its applications), so it is one series. Parameters
  outside the block modules (patch embedding, head, per-application modules kept outside a block as SReT's) are not
  reported.
- CKA features are per application: a shared block applied twice yields ``blocks.0#0`` and ``blocks.0#1``, in
  application order. Each image's block output is mean-pooled over its tokens (a class token included) to one
  C-vector, so the features of n images are an (n, C) matrix per layer, small enough to keep for a few thousand
  images.
"""

import csv
import itertools
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.utils import random_seed
from torch import nn
from torch.nn.utils import get_total_norm
from torch.utils.data import DataLoader, Subset

from leanvit.errors import DataError, TrainingDivergedError, UsageError
from leanvit.io.data import build_datasets
from leanvit.io.files import atomic_write
from leanvit.methods.features import LAYOUTS, as_tokens, blocks_by_stage
from leanvit.models import create_model
from leanvit.train.evaluation import data_config, load_trained_model

# Past this many layers the names no longer fit beside the heat map; the axes then show layer indices.
NAMED_AXES_MAX_LAYERS = 40


def block_modules(model: nn.Module, pattern: str | None = None) -> dict[str, nn.Module]:
    """The block modules of ``model`` by name, in forward order: `blocks_by_stage`'s, stages run together.

    ``pattern`` (a regular expression for the names, the outermost matches) overrides them. A module registered under
    two names is listed once, under its first.

    Raises:
        UsageError: No blocks were found, or ``pattern`` is not a regular expression or matches no module.
    """
    try:
        stages = blocks_by_stage(model, pattern)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return {name: model.get_submodule(name) for stage in stages for name in stage}


def endless(loader: Iterable) -> Iterator:
    """The batches of ``loader``, epoch after epoch (a shuffling loader reshuffles each epoch)."""
    while True:
        yield from loader


def gradient_norms(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int, *,
                   lr: float = 1e-3, weight_decay: float = 0.05,
                   pattern: str | None = None) -> dict[str, list[float]]:
    """Train ``model`` for ``steps`` steps and record each block's gradient l2-norm at every step (Fig. 2).

    Each step is plain cross-entropy on one batch and one AdamW step (timm's ``create_optimizer_v2``, as the training
    engine builds it: no weight decay on 1-D parameters). A block's norm is that of all its parameters' gradients
    together, taken before the optimizer step; a shared block has one gradient per parameter, so one series.

    Args:
        model: The model, on the device to train on; it is put in training mode and its weights change.
        batches: ``(images, labels)`` pairs, at least ``steps`` of them (``endless(loader)`` repeats a loader).
        steps: Optimisation steps.
        lr: AdamW's learning rate.
        weight_decay: AdamW's weight decay.
        pattern: Names of the block modules, to override the ones found (see ``block_modules``).

    Returns:
        Block module name -> its gradient norm at each step, blocks in model order.

    Raises:
        ValueError: ``steps`` < 1, or ``batches`` ran out first.
        TrainingDivergedError: The loss became NaN or infinite.
    """
    if steps < 1:
        raise UsageError(f'steps must be >= 1, got {steps}')
    groups = {name: list(block.parameters()) for name, block in block_modules(model, pattern).items()}
    optimizer = create_optimizer_v2(model, opt='adamw', lr=lr, weight_decay=weight_decay)
    device = next(model.parameters()).device
    norms = {name: [] for name in groups}
    model.train()
    step = 0
    for step, (images, labels) in enumerate(itertools.islice(batches, steps), start=1):
        loss = F.cross_entropy(model(images.to(device)), labels.to(device))
        if not torch.isfinite(loss):
            raise TrainingDivergedError(f'loss is {loss.item()} at step {step}; lower the learning rate')
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        step_norms = torch.stack([get_total_norm([p.grad for p in params if p.grad is not None]).to(device)
                                  for params in groups.values()])
        for name, norm in zip(groups, step_norms.tolist()):  # one host sync per step
            norms[name].append(norm)
        optimizer.step()
    if step < steps:
        raise ValueError(f'the batches ran out after {step} of {steps} steps')
    return norms


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two feature matrices of the same n examples, ``x`` (n, p) and ``y`` (n, q).

    CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), columns centred first (Kornblith et al. 2019, Eq. 5), in
    float64. It lies in [0, 1], is 1 for ``x`` against itself and is invariant to orthogonal transforms and isotropic
    scaling of either side. NaN where either side is constant over the examples.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f'linear CKA needs two (n, features) matrices of the same n, got {tuple(x.shape)} and '
                         f'{tuple(y.shape)}')
    x, y = x.double(), y.double()
    x, y = x - x.mean(0), y - y.mean(0)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    return (cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y))).item()


class BlockOutputs:
    """Forward hooks that record, for one forward at a time, every block application's output in call order."""

    def __init__(self, model: nn.Module, pattern: str | None = None):
        self.model = model
        self.calls: list[tuple[str, torch.Tensor]] = []
        self._handles = [block.register_forward_hook(self._recorder(name))
                         for name, block in block_modules(model, pattern).items()]

    def _recorder(self, name: str):
        def record(module: nn.Module, args: tuple, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f'block {name} of {type(self.model).__name__} returns a {type(output).__name__}, '
                                 f'not a tensor; choose other block modules (block pattern)')
            self.calls.append((name, output))
        return record

    def __call__(self, images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """(block name, output) of each block application while the model runs on ``images``."""
        self.calls = []
        self.model(images)
        return self.calls

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self.calls = []


def application_names(blocks: list[str]) -> list[str]:
    """A layer name per block call: the block's name, or ``name#r`` (r-th application) for a block called repeatedly."""
    calls, seen = Counter(blocks), Counter()
    names = []
    for block in blocks:
        names.append(f'{block}#{seen[block]}' if calls[block] > 1 else block)
        seen[block] += 1
    return names


def infer_layout(outputs: list[torch.Tensor]) -> str:
    """The layout of a model's block outputs: (B, N, C) tokens, or whichever of NCHW and NHWC has square maps in every
    block (channel counts change from stage to stage, so only one of them fits a model with square inputs)."""
    if all(x.ndim == 3 for x in outputs):
        return 'NLC'
    if all(x.ndim == 4 for x in outputs):
        fits = [layout for layout, (h, w) in (('NCHW', (2, 3)), ('NHWC', (1, 2)))
                if all(x.shape[h] == x.shape[w] for x in outputs)]
        if len(fits) == 1:
            return fits[0]
    shapes = sorted({tuple(x.shape[1:]) for x in outputs})
    raise UsageError(f'cannot tell the layout of block outputs of shapes {shapes} (batch dimension left out); pass '
                     f'it: one of {", ".join(LAYOUTS)}')


@dataclass
class CKAMatrix:
    """Linear CKA between every layer of model A (rows) and every layer of model B (columns) over ``images`` images."""
    layers_a: list[str]
    layers_b: list[str]
    values: torch.Tensor
    images: int

    def rows(self) -> list[tuple[str, str, float]]:
        """(layer_a, layer_b, cka) for every pair, row by row."""
        return [(a, b, self.values[i, j].item()) for i, a in enumerate(self.layers_a)
                for j, b in enumerate(self.layers_b)]


class _PooledFeatures:
    """One model's per-image block features, mean-pooled over tokens, gathered batch by batch; a context manager that
    removes its hooks on exit."""

    def __init__(self, model: nn.Module, pattern: str | None, layout: str):
        if layout != 'auto' and layout not in LAYOUTS:
            raise UsageError(f'layout must be auto or one of {", ".join(LAYOUTS)}, got {layout!r}')
        self.model, self.layout = model.eval(), layout
        self.outputs = BlockOutputs(model, pattern)
        self.layers: list[str] | None = None
        self.features: list[list[torch.Tensor]] = []

    def add(self, images: torch.Tensor) -> None:
        calls = self.outputs(images.to(next(self.model.parameters()).device))
        layers = application_names([name for name, _ in calls])
        if self.layers is None:
            self.layers, self.features = layers, [[] for _ in layers]
            if self.layout == 'auto':
                self.layout = infer_layout([output for _, output in calls])
        elif layers != self.layers:  # e.g. a model that draws its depth per forward, left in training mode
            raise ValueError(f'{type(self.model).__name__} ran other block applications on this batch ({layers}) '
                             f'than on the first ({self.layers})')
        for features, (_, output) in zip(self.features, calls):
            features.append(as_tokens(output, self.layout).float().mean(1).cpu())

    def matrices(self) -> list[torch.Tensor]:
        """The (n images, C) features of each layer."""
        return [torch.cat(features) for features in self.features]

    def __enter__(self) -> '_PooledFeatures':
        return self

    def __exit__(self, *exc):
        self.outputs.remove()


@torch.inference_mode()
def layer_cka(model_a: nn.Module, model_b: nn.Module, batches: Iterable, batches_b: Iterable | None = None, *,
              pattern_a: str | None = None, pattern_b: str | None = None, layout_a: str = 'auto',
              layout_b: str = 'auto') -> CKAMatrix:
    """Linear CKA between every block output of ``model_a`` and every block output of ``model_b`` (Fig. 3).

    Both models run in eval mode on the same images; a layer's feature of an image is its block output mean-pooled
    over the tokens, and ``linear_cka`` compares the (n, C) features of two layers over all n images.

    Args:
        model_a, model_b: The models, each on its device; they may be one model.
        batches: Image batches for model A, and for model B unless ``batches_b`` is given: image tensors, or tuples
            whose first item is the images, as a DataLoader yields ``(images, labels)``.
        batches_b: The same images for model B, in the same order, where B needs another input pipeline.
        pattern_a, pattern_b: Names of each model's block modules, to override the ones found (see
            ``block_modules``).
        layout_a, layout_b: Layout of each model's block outputs: ``NLC`` tokens, ``NCHW`` or ``NHWC`` maps, or
            ``auto`` (see ``infer_layout``).

    Returns:
        The CKA matrix, layers named in application order (``blocks.0#1`` for a shared block's second application).
    """
    pairs = ((batch, batch) for batch in batches) if batches_b is None else itertools.zip_longest(batches, batches_b)
    # The hooks come off the models however the loop ends.
    with _PooledFeatures(model_a, pattern_a, layout_a) as features_a, \
            _PooledFeatures(model_b, pattern_b, layout_b) as features_b:
        for batch_a, batch_b in pairs:
            if batch_a is None or batch_b is None:
                raise ValueError('batches and batches_b hold different numbers of batches; they must be the same '
                                 'images')
            images_a, images_b = (batch[0] if isinstance(batch, (tuple, list)) else batch
                                  for batch in (batch_a, batch_b))
            if len(images_a) != len(images_b):
                raise ValueError(f'a batch of {len(images_a)} images for model A met one of {len(images_b)} for '
                                 f'model B')
            features_a.add(images_a)
            features_b.add(images_b)
    if features_a.layers is None:
        raise ValueError('layer_cka got no batches')
    matrices_a, matrices_b = features_a.matrices(), features_b.matrices()
    values = torch.tensor([[linear_cka(x, y) for y in matrices_b] for x in matrices_a], dtype=torch.float64)
    return CKAMatrix(features_a.layers, features_b.layers, values, len(matrices_a[0]))


def load_model(name: str | None, kwargs: dict | None, checkpoint: str | os.PathLike | None,
               trust: bool = False) -> tuple[nn.Module, str, dict]:
    """The model ``checkpoint`` holds (see ``load_trained_model``), or a new ``name`` model without one."""
    if checkpoint is not None:
        return load_trained_model(checkpoint, name, kwargs, trust=trust)
    if name is None:
        raise UsageError('name the model (--model), or give the checkpoint of a leanvit run, whose .json names it')
    kwargs = dict(kwargs or {})
    return create_model(name, **kwargs), name, kwargs


def analyze_gradient_norms(output: str | os.PathLike, *, model_name: str | None = None,
                           model_kwargs: dict | None = None, checkpoint: str | os.PathLike | None = None,
                           trust: bool = False, data: str | None = None, val_split: float | None = None,
                           steps: int = 100, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.05,
                           augment: str = 'light', seed: int = 0, pattern: str | None = None) -> dict:
    """Train a model ``steps`` steps on ``data``'s training split; write ``grad_norms.csv`` and ``grad_norms.png``.

    The model is built (``seed`` seeds its initialisation) or loaded from ``checkpoint``; a classifier whose class
    count is not the data's is replaced by a new one (``reset_classifier``), to fine-tune a checkpoint on other data.
    The data pipeline is the training engine's: ``build_datasets`` with the model's input configuration and the
    ``augment`` preset, batches reshuffled each epoch. Training runs on CUDA where there is one.

    Returns:
        What was run, for a report: model, data, device, steps, layers, whether the head was replaced, the files.
    """
    random_seed(seed)  # initialisation, data order and augmentation, as in training
    model, name, kwargs = load_model(model_name, model_kwargs, checkpoint, trust)
    bundle = build_datasets(data, data_config(model, kwargs.get('img_size')), val_split=val_split, augment=augment,
                            seed=seed)
    head_replaced = model.num_classes != bundle.num_classes
    if head_replaced:
        model.reset_classifier(bundle.num_classes)
    loader = DataLoader(bundle.train, batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    if len(loader) == 0:
        raise UsageError(f'{len(bundle.train)} training images make no full batch of --batch-size {batch_size}')
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    norms = gradient_norms(model.to(device), endless(loader), steps, lr=lr, weight_decay=weight_decay,
                           pattern=pattern)
    output = Path(output)
    _write_csv(output / 'grad_norms.csv', ('step', 'layer', 'norm'),
               [(step, layer, norm) for layer, series in norms.items() for step, norm in enumerate(series, start=1)])
    plot_gradient_norms(norms, output / 'grad_norms.png', title=f'{name}: gradient l2-norm per block')
    return dict(model=name, model_kwargs=kwargs, data=bundle.description, device=str(device), steps=steps,
                layers=list(norms), head_replaced=head_replaced,
                files=[str(output / 'grad_norms.csv'), str(output / 'grad_norms.png')])


def analyze_cka(output: str | os.PathLike, *, model_a: str | None = None, model_kwargs_a: dict | None = None,
                checkpoint_a: str | os.PathLike | None = None, model_b: str | None = None,
                model_kwargs_b: dict | None = None, checkpoint_b: str | os.PathLike | None = None,
                trust: bool = False, data: str | None = None, split: str = 'val', val_split: float | None = None,
                seed: int = 0, max_images: int | None = 1000, batch_size: int = 64,
                pattern_a: str | None = None, pattern_b: str | None = None, layout_a: str = 'auto',
                layout_b: str = 'auto') -> dict:
    """Linear CKA between the block outputs of two models on the first ``max_images`` images of ``data``'s ``split``;
    write ``cka.csv`` and ``cka.png``.

    Each model sees the images through its own evaluation transform (a training split too: no augmentation), so
    models of other input sizes compare on the same images.

    Returns:
        What was compared, for a report: the models, the data, the images, the layers of each model, the files.
    """
    if split not in ('train', 'val'):
        raise UsageError(f'split must be train or val, got {split!r}')
    model_a, name_a, kwargs_a = load_model(model_a, model_kwargs_a, checkpoint_a, trust)
    model_b, name_b, kwargs_b = load_model(model_b, model_kwargs_b, checkpoint_b, trust)
    cfg_a, cfg_b = data_config(model_a, kwargs_a.get('img_size')), data_config(model_b, kwargs_b.get('img_size'))

    def loader(cfg: dict) -> tuple[DataLoader, str]:
        bundle = build_datasets(data, cfg, val_split=val_split, augment='none', seed=seed)
        images = getattr(bundle, split)
        if max_images is not None and max_images < len(images):
            images = Subset(images, range(max_images))
        return DataLoader(images, batch_size), bundle.description

    batches_a, description = loader(cfg_a)
    batches_b = None if cfg_b == cfg_a else loader(cfg_b)[0]
    if len(batches_a.dataset) < 2:
        raise DataError(f'the {split} split of {description} holds {len(batches_a.dataset)} image(s); CKA needs 2 or '
                        f'more')
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    cka = layer_cka(model_a.to(device), model_b.to(device), batches_a, batches_b, pattern_a=pattern_a,
                    pattern_b=pattern_b, layout_a=layout_a, layout_b=layout_b)
    output = Path(output)
    _write_csv(output / 'cka.csv', ('layer_a', 'layer_b', 'cka'), cka.rows())
    plot_cka(cka, output / 'cka.png', name_a, name_b)
    return dict(model_a=name_a, model_b=name_b, data=description, split=split, images=cka.images,
                layers_a=cka.layers_a, layers_b=cka.layers_b,
                files=[str(output / 'cka.csv'), str(output / 'cka.png')])


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    def write(tmp):
        with open(tmp, 'w', newline='') as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
    atomic_write(path, write)


def plot_gradient_norms(norms: dict[str, list[float]], path: str | os.PathLike, title: str = '') -> None:
    """Write one line per block over the steps as a PNG, log scale, coloured from the first block to the last."""
    # A bare Figure with the Agg canvas: pyplot and its global backend stay as the caller (a notebook) set them.
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    colours = colormaps['viridis'].resampled(max(len(norms), 2))
    for index, (layer, series) in enumerate(norms.items()):
        ax.plot(range(1, len(series) + 1), series, color=colours(index), linewidth=1, label=layer)
    # Norms of different blocks differ by orders of magnitude; zeros (a block without gradient) cannot be drawn on a
    # log axis, so the axis is linear then.
    if all(norm > 0 for series in norms.values() for norm in series):
        ax.set_yscale('log')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel('step')
    ax.set_ylabel('gradient l2-norm')
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc='center left', bbox_to_anchor=(1.01, 0.5), ncols=1 + len(norms) // 25)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=120))


def plot_cka(cka: CKAMatrix, path: str | os.PathLike, name_a: str = 'model A', name_b: str = 'model B') -> None:
    """Write the CKA matrix as a PNG heat map on a fixed 0-1 scale: model A's layers down, model B's across."""
    from matplotlib.figure import Figure

    rows, columns = cka.values.shape
    fig = Figure(figsize=(min(4 + 0.3 * columns, 20), min(3 + 0.3 * rows, 20)))
    ax = fig.subplots()
    fig.colorbar(ax.imshow(cka.values.numpy(), cmap='magma', vmin=0, vmax=1), ax=ax, fraction=0.046, pad=0.04,
                 label='linear CKA')
    if max(rows, columns) <= NAMED_AXES_MAX_LAYERS:
        ax.set_xticks(range(columns), cka.layers_b, rotation=90, fontsize=7)
        ax.set_yticks(range(rows), cka.layers_a, fontsize=7)
    ax.set_xlabel(f'{name_b} layer')
    ax.set_ylabel(f'{name_a} layer')
    ax.set_title(f'linear CKA over {cka.images} images', fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=120))
