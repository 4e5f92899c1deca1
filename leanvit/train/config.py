"""What defines a training run, as plain data, checked where it is made.

``TrainConfig`` is read from YAML recipes and overridden by command-line flags. Every field is checked on
construction (type, range, finiteness), so a bad value is a ``UsageError`` that names the field and the expected
value before any model or data is built. This module imports neither torch nor timm: ``leanvit train --help`` and
argument errors answer without loading them.
"""

import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path

import yaml

from leanvit.errors import UsageError
from leanvit.io.data import FASHION_MNIST


@dataclasses.dataclass(frozen=True)
class Interval:
    """The values a number may take: ``low``/``high`` bounds, each closed unless marked open; None: unbounded."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f'in {"(" if self.low_open else "["}{self.low:g}, {self.high:g}{")" if self.high_open else "]"}'
        if self.low is not None:
            return f'{">" if self.low_open else ">="} {self.low:g}'
        return f'{"<" if self.high_open else "<="} {self.high:g}' if self.high is not None else 'any'


def option(default, group: str, help: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False):
    """A TrainConfig field: its default, its help line and topic for ``leanvit train --help``, and for numbers the
    interval its value must lie in. A mutable default (a dict) is copied for each config."""
    metadata = {'group': group, 'help': help}
    if low is not None or high is not None:
        metadata['range'] = Interval(low, high, low_open, high_open)
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# Topics of `leanvit train --help`, in order.
GROUPS = {'data': 'data', 'model': 'model', 'optimisation': 'optimisation', 'distillation': 'distillation',
          'checkpoints': 'checkpoints and output', 'hardware': 'hardware'}
# Settings a resumed run may change: they change how it runs, not what it computes.
RESUMABLE = frozenset({'output', 'progress', 'num_workers', 'threads', 'save_every_steps', 'keep_last', 'device',
                       'compile', 'log'})
FRACTION = dict(low=0., high=1., high_open=True)   # a probability-like rate that must stay below 1



def as_recorded(value):
    """``value`` as it reads back from the run's JSON record: tuples (e.g. in model_kwargs) become lists."""
    if isinstance(value, (list, tuple)):
        return [as_recorded(v) for v in value]
    if isinstance(value, dict):
        return {k: as_recorded(v) for k, v in value.items()}
    return value


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run. Recipes are YAML files of these fields; command-line flags override them."""
    model: str = option('sret_t', 'model', 'model name, any leanvit or timm model (`leanvit models --all`)')
    model_kwargs: dict = option({}, 'model', "model arguments as a JSON object, e.g. '{\"num_blocks\": [2, 4, 2]}'")
    arch: str | None = option(None, 'model', "architecture file (JSON or YAML) of a model built from one, e.g. "
                                             "glit_custom with a searched best_arch.json; its contents are recorded")
    img_size: int | None = option(None, 'model', "input resolution (none: the model's default)", low=1)
    data: str | None = option(None, 'data', 'an image folder (class folders, or train/ and val/ of them), '
                                            'torch/NAME:ROOT, or none for the bundled digits')
    val_split: float | None = option(None, 'data', 'fraction of each class held out for validation, for a folder '
                                                   'without train/ and val/', low=0., high=1., low_open=True,
                                     high_open=True)
    holdout: float = option(0., 'data', 'fraction of each class of the training split never trained on, held out '
                            'for architecture search (0: none)', low=0., high=1., high_open=True)
    train_images: int | None = option(None, 'data', 'train on a stratified subset of this many training images '
                                      '(none: all); validation stays whole', low=1)
    bad_images: str = option('stop', 'data', 'unreadable images: stop (naming them) or skip (and count them)')
    output: str = option('runs/train', 'checkpoints', 'run directory; running again resumes the run in it')
    epochs: int = option(10, 'optimisation', 'training epochs', low=1)
    batch_size: int = option(64, 'optimisation', 'images per optimizer step (global, over all processes)', low=1)
    opt: str = option('adamw', 'optimisation', 'timm optimizer name (timm.optim.list_optimizers())')
    lr: float = option(1e-3, 'optimisation', 'peak learning rate', low=0., low_open=True)
    weight_decay: float = option(0.05, 'optimisation', 'weight decay (not on 1-D parameters)', low=0.)
    sched: str = option('cosine', 'optimisation', 'timm scheduler: cosine, tanh, step, multistep, plateau, poly')
    warmup_epochs: int = option(0, 'optimisation', 'epochs of linear learning-rate warm-up', low=0)
    min_lr: float = option(1e-5, 'optimisation', 'learning rate at the end of the schedule', low=0.)
    clip_grad: float | None = option(None, 'optimisation', 'gradient-norm clipping (none: off)', low=0.,
                                     low_open=True)
    accum_steps: int = option(1, 'optimisation', 'micro-batches per optimizer step (gradient accumulation)', low=1)
    ema_decay: float = option(0., 'optimisation', 'decay of an EMA copy of the weights, which is then evaluated '
                                                  '(0: no EMA)', **FRACTION)
    drop_path: float = option(0., 'model', 'stochastic-depth rate', **FRACTION)
    smoothing: float = option(0., 'optimisation', 'label smoothing', **FRACTION)
    augment: str = option('light', 'data', 'training-transform preset: none, light (no flip, mild crops) or '
                                           'imagenet (README, "Augmentation")')
    auto_augment: str | None = option(None, 'data', "timm auto-augment policy, e.g. 'rand-m9-mstd0.5-inc1'")
    re_prob: float = option(0., 'data', 'random-erasing probability', low=0., high=1.)
    mixup: float = option(0., 'data', 'Mixup alpha (0: off)', low=0.)
    cutmix: float = option(0., 'data', 'CutMix alpha (0: off)', low=0.)
    teacher: str | None = option(None, 'distillation', 'teacher model name (none: train on labels)')
    teacher_checkpoint: str | None = option(None, 'distillation', "the teacher's weights (.safetensors or .pth)")
    teacher_kwargs: dict = option({}, 'distillation', 'teacher model arguments as a JSON object')
    trust_teacher_checkpoint: bool = option(False, 'distillation', "unpickle the teacher's .pth fully, which can "
                                                                   'run code it carries: trusted files only')
    teacher_logits: str | None = option(None, 'distillation', 'teacher logits stored by `leanvit teacher-logits`, '
                                                              'instead of a live teacher (much faster)')
    kd: str = option('soft_ce', 'distillation', 'distillation loss: soft_ce, kl_batchmean, deit_soft, deit_hard')
    kd_alpha: float = option(0.5, 'distillation', 'weight of the distillation term (1: no ground-truth term)',
                             low=0., high=1.)
    kd_tau: float = option(1.0, 'distillation', 'distillation temperature', low=0., low_open=True)
    objectives: dict = option({}, 'distillation', 'auxiliary objectives with their options as a JSON object, e.g. '
                                                  '\'{"module_imitation": {"relation": 1}}\'')
    init_checkpoint: str | None = option(None, 'model', "start from this checkpoint's weights wherever names and "
                                                        'shapes agree (a fine-tune at another resolution, a compressed '
                                                        'student); init.json lists what was not copied')
    init_from_teacher: bool = option(False, 'distillation', 'start from every teacher weight of the same name and '
                                                            'shape (token mixers excepted)')
    seed: int = option(0, 'optimisation', 'seed of initialisation, data order, augmentation and split', low=0)
    deterministic: bool = option(False, 'hardware', 'deterministic algorithms only (slower)')
    device: str | None = option(None, 'hardware', 'cpu, cuda or cuda:N (none: CUDA if available)')
    amp: str = option('none', 'hardware', 'mixed precision: none, bf16 (CPU or CUDA) or fp16 (CUDA)')
    channels_last: bool = option(False, 'hardware', 'channels-last memory format')
    compile: bool = option(False, 'hardware', 'torch.compile the model')
    num_workers: int = option(0, 'hardware', 'data-loader worker processes', low=0)
    threads: int | None = option(None, 'hardware', 'compute threads (none: OMP_NUM_THREADS if set, else the CPUs '
                                                   'this process may use that other processes are not busy on, less '
                                                   'the data-loader workers)', low=1)
    save_every_steps: int = option(0, 'checkpoints', 'also checkpoint every N steps (0: at the end of each epoch '
                                                     'only)', low=0)
    keep_last: int = option(2, 'checkpoints', 'step checkpoints kept (best.* is kept apart)', low=1)
    progress: bool = option(True, 'checkpoints', 'progress bar')
    log: str | None = option(None, 'checkpoints', 'also log the run to tensorboard, mlflow or both '
                                                  '(tensorboard,mlflow): losses, accuracy, learning rate, gradient '
                                                  'norm, images, settings (docs/tracking.md)')

    def __post_init__(self):
        for field in dataclasses.fields(self):
            check_value(field, getattr(self, field.name))
        if self.bad_images not in ('stop', 'skip'):
            raise UsageError(f"bad_images (--bad-images) must be 'stop' or 'skip', got {self.bad_images!r}")
        for name in ('model', 'output'):
            if not getattr(self, name).strip():
                raise UsageError(f'{name} (--{flag(name)}) must not be empty')

    def applicable(self) -> dict:
        """The settings as a dict, without those that do nothing in this run (distillation settings of a run that
        trains on labels, ``val_split`` of a dataset with its own split): what ``config.yaml`` records."""
        values = dataclasses.asdict(self)
        if self.teacher is None and self.teacher_logits is None:
            for name in ('teacher_checkpoint', 'teacher_kwargs', 'trust_teacher_checkpoint', 'kd', 'kd_alpha', 'kd_tau',
                         'init_from_teacher'):
                values.pop(name)
        if self.val_split is None:
            values.pop('val_split')
        return values

    def differences(self, recorded: dict) -> list[str]:
        """``'name: recorded -> now'`` for each setting that differs from ``recorded`` (the config a checkpoint was
        saved with), except those a resumed run may change (``RESUMABLE``). Data paths compare as absolute paths."""
        recorded = dict(recorded, **({'data': absolute_data(recorded['data'])}
                                     if isinstance(recorded.get('data'), str) else {}))
        return [f'{name}: {recorded[name]!r} -> {value!r}'
                for name, value in dataclasses.asdict(dataclasses.replace(self, data=absolute_data(self.data))).items()
                if name in recorded and name not in RESUMABLE and recorded[name] != as_recorded(value)]

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> 'TrainConfig':
        """The recipe at ``path`` (a YAML mapping of field names to values) with ``overrides`` applied."""
        text = Path(path).read_text()
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:  # also a `!!python/...` tag: safe_load constructs plain data only
            raise UsageError(f'recipe {path} is not plain YAML: {" ".join(str(e).split())}') from None
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise UsageError(f'recipe {path} must be a mapping of keys to values (key: value lines), '
                             f'got a YAML {type(values).__name__}')
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(map(str, set(values) - set(names)))
        if unknown:
            raise UsageError(f'recipe {path}: unknown keys {unknown}; valid keys: {sorted(names)}')
        try:
            return cls(**{**values, **overrides})
        except UsageError as e:
            raise UsageError(f'recipe {path}: {e}') from None


def read_architecture_file(path: str) -> object:
    """The data in an architecture file (``--arch``): JSON, or YAML for .yaml / .yml."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UsageError(f'arch (--arch): cannot read {path}: {e.strerror}') from None
    try:
        return yaml.safe_load(text) if path.endswith(('.yaml', '.yml')) else json.loads(text)
    except (ValueError, yaml.YAMLError) as e:
        raise UsageError(f'arch (--arch): {path} is not valid {"YAML" if path.endswith(("yaml", "yml")) else "JSON"}: '
                         f'{" ".join(str(e).split())}') from None


def absolute_data(data: str | None) -> str | None:
    """``data`` with its folder made absolute (an image folder, or the ROOT of ``torch/NAME:ROOT`` and
    ``fashion-mnist:ROOT``), so that a run
    records where its images are, not where they were from the folder it was started in."""
    if data is None or data in ('digits', FASHION_MNIST) or '://' in data:
        return data
    if data.startswith(('torch/', FASHION_MNIST + ':')):
        name, colon, root = data.partition(':')
        return f'{name}:{os.path.abspath(root)}' if root else data
    return os.path.abspath(data)


def flag(name: str) -> str:
    """The command-line flag of a field, without its dashes."""
    return name.replace('_', '-')


def value_types(field: dataclasses.Field) -> tuple[type, ...]:
    """The types a field's annotation admits (``int | None`` -> ``(int, NoneType)``)."""
    annotation = field.type
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def check_value(field: dataclasses.Field, value) -> None:
    """Raise a UsageError naming ``field`` unless ``value`` has its type and lies in its range."""
    kinds = value_types(field)
    if value is None and type(None) in kinds:
        return
    kind = next(k for k in kinds if k is not type(None))
    names = {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string',
             dict: 'a mapping (JSON object) of argument names to values'}
    valid_range = field.metadata.get('range')
    expected = names[kind] + (f' {valid_range}' if valid_range else '') + (' or null' if type(None) in kinds else '')
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif kind is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
    else:
        ok = isinstance(value, kind)
    if ok and valid_range is not None:
        ok = value in valid_range
    if not ok:
        hint = ' (YAML reads a number without a dot, such as 1e-3, as a string: write 1.0e-3)' \
            if kind is float and isinstance(value, str) else ''
        raise UsageError(f'{field.name} (--{flag(field.name)}) must be {expected}, got {value!r}{hint}')
