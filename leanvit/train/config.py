"""What defines a training run, as plain data, checked where it is made.

``TrainConfig`` is read from YAML recipes and overridden by command-line flags. Every field is checked on
construction (type, range, finiteness), so a bad value is a ``UsageError`` that names the field and the expected
value before any model or data is built. This module imports neither torch nor timm: ``leanvit train --help`` and
argument errors answer without loading them.
"""

import dataclasses
import math
import types
import typing
from pathlib import Path

import yaml

from leanvit.errors import UsageError


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


def bounded(default, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False):
    """A dataclass field whose numeric value must lie in ``Interval(low, high, low_open, high_open)``."""
    return dataclasses.field(default=default, metadata={'range': Interval(low, high, low_open, high_open)})


# Keys of older recipes that moved into an objective's section.
MOVED = {'imitate_block_output': 'module_imitation.block_output',
         'imitate_mixer_output': 'module_imitation.mixer_output', 'imitate_relation': 'module_imitation.relation',
         'imitation_blocks': 'module_imitation.student_blocks',
         'teacher_imitation_blocks': 'module_imitation.teacher_blocks',
         'teacher_imitation_layout': 'module_imitation.teacher_layout'}
FRACTION = dict(low=0., high=1., high_open=True)   # a probability-like rate that must stay below 1


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run. Recipes are YAML files of these fields; command-line flags override them."""
    model: str = 'sret_t'
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    img_size: int | None = bounded(None, 1)   # None: the model's default input size
    data: str | None = None              # None: scikit-learn's digits; else an ImageFolder path
    val_split: float | None = bounded(None, 0., 1., low_open=True, high_open=True)
    bad_images: str = 'stop'
    output: str = 'runs/train'
    epochs: int = bounded(10, 1)
    batch_size: int = bounded(64, 1)
    opt: str = 'adamw'
    lr: float = bounded(1e-3, 0., low_open=True)
    weight_decay: float = bounded(0.05, 0.)
    sched: str = 'cosine'
    warmup_epochs: int = bounded(0, 0)
    min_lr: float = bounded(1e-5, 0.)
    clip_grad: float | None = bounded(None, 0., low_open=True)
    accum_steps: int = bounded(1, 1)
    ema_decay: float = bounded(0., **FRACTION)
    drop_path: float = bounded(0., **FRACTION)
    smoothing: float = bounded(0., **FRACTION)
    augment: bool = True                 # False: train on the evaluation transform (deterministic inputs)
    auto_augment: str | None = None
    re_prob: float = bounded(0., 0., 1.)
    mixup: float = bounded(0., 0.)       # Mixup / CutMix alphas (timm's Mixup); 0 disables each
    cutmix: float = bounded(0., 0.)
    teacher: str | None = None
    teacher_checkpoint: str | None = None
    teacher_kwargs: dict = dataclasses.field(default_factory=dict)
    trust_teacher_checkpoint: bool = False   # unpickle the teacher's .pth fully (can run code): trusted files only
    teacher_logits: str | None = None    # precomputed by `leanvit teacher-logits`, instead of a live teacher
    kd: str = 'soft_ce'
    kd_alpha: float = bounded(0.5, 0., 1.)
    kd_tau: float = bounded(1.0, 0., low_open=True)
    # Auxiliary objectives by name, each with its options (leanvit.train.objectives), e.g.
    # {module_imitation: {relation: 1.0}}
    objectives: dict = dataclasses.field(default_factory=dict)
    init_from_teacher: bool = False      # copy every same-name, same-shape teacher weight but the token mixers
    seed: int = bounded(0, 0)
    deterministic: bool = False
    device: str | None = None            # None: CUDA if available, else CPU (torchrun: this rank's GPU)
    amp: str = 'none'                    # 'none', 'bf16' (CPU or CUDA) or 'fp16' (CUDA, with loss scaling)
    channels_last: bool = False
    compile: bool = False
    num_workers: int = bounded(0, 0)
    save_every_steps: int = bounded(0, 0)   # 0: checkpoint at the end of each epoch only
    keep_last: int = bounded(2, 1)
    progress: bool = True

    def __post_init__(self):
        for field in dataclasses.fields(self):
            check_value(field, getattr(self, field.name))
        if self.bad_images not in ('stop', 'skip'):
            raise UsageError(f"bad_images (--bad-images) must be 'stop' or 'skip', got {self.bad_images!r}")
        for name in ('model', 'output'):
            if not getattr(self, name).strip():
                raise UsageError(f'{name} (--{flag(name)}) must not be empty')

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
        moved = [f'{key} is now objectives.{MOVED[key]}' for key in unknown if key in MOVED]
        if moved:
            raise UsageError(f'recipe {path}: {"; ".join(moved)} (one section per auxiliary objective)')
        if unknown:
            raise UsageError(f'recipe {path}: unknown keys {unknown}; valid keys: {sorted(names)}')
        try:
            return cls(**{**values, **overrides})
        except UsageError as e:
            raise UsageError(f'recipe {path}: {e}') from None


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
