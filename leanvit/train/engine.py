"""The training loop: config, data, model, optimizer, loop, checkpoints — top to bottom, no framework.

``train(config)`` trains (or distils) one model and returns its final validation metrics. Everything a run writes
goes to ``config.output``: checkpoints (see ``leanvit.train.run_directory``), ``config.yaml``, ``summary.csv`` and
the loss / accuracy plots. A run resumes exactly where a killed run stopped: checkpoints are taken at step
granularity, with the RNG state, and the data order of an epoch depends only on (seed, epoch).
"""

import contextlib
import csv
import dataclasses
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3, random_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from leanvit.errors import RunDirectoryError, TrainingDivergedError, UsageError
from leanvit.io.data import AUGMENTATIONS, DataBundle, WithIndex, build_datasets, renormalizer, typical_image_size
from leanvit.io.files import atomic_write, write_json
from leanvit.io.weights import check_state_dict_fits, load_checkpoint
from leanvit.models import create_model
from leanvit.profiler import count_params
from leanvit.threads import choose_threads
from leanvit.train.config import TrainConfig, absolute_data, as_recorded, read_architecture_file
from leanvit.train.distillation import KD_LOSSES, distillation_loss
from leanvit.train.evaluation import data_config, evaluate_model, plot_confusion_matrix, trained_model_spec
from leanvit.train.initialization import init_from_checkpoint, init_from_teacher
from leanvit.train.objectives import Objective, build_objectives, check_objective_names
from leanvit.train.run_directory import CheckpointManager, RunLock, read_sidecar, rng_state, set_rng_state
from leanvit.train.teacher_logits import load_teacher_logits
from leanvit.train.tracking import Tracker, parse_backends, versions

AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
# Progress is printed, and losses checked for NaN, every this many steps (and before each checkpoint): reading the
# running metrics waits for the device.
LOG_EVERY_STEPS = 10


class EpochSampler(Sampler):
    """A shuffled order that depends only on (seed, epoch), starting ``start`` samples in (to resume mid-epoch).

    Under data parallelism each global batch of ``batch_size`` samples is cut into ``world_size`` contiguous
    slices and this rank reads its slice, so N processes see exactly the samples one process would.
    """

    def __init__(self, size: int, seed: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.epoch, self.start = size, seed, 0, 0
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def set_position(self, epoch: int, start: int = 0):
        self.epoch, self.start = epoch, start

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        order = order[self.start:]
        usable = len(order) // self.batch_size * self.batch_size
        local = self.batch_size // self.world_size
        batches = order[:usable].view(-1, self.world_size, local)[:, self.rank]
        return iter(batches.flatten().tolist())

    def __len__(self):
        return (self.size - self.start) // self.batch_size * (self.batch_size // self.world_size)


class EpochTraining(NamedTuple):
    """One epoch's training metrics, summed over every process (but the speed)."""
    seen: int
    correct: int
    loss_sum: float
    images_per_s: float  # this process's, over the training steps only


@dataclasses.dataclass(eq=False)
class Run:
    """Everything a run builds before its first step: what the training step, the checkpoints and resume read.

    Attributes:
        config: The run's settings, with its data folder made absolute.
        output: The run directory.
        device: This process's device.
        rank: This process's rank; rank 0 logs and writes the run directory.
        world_size: The processes of the run: one, or one per device under torchrun.
        threads: This process's compute threads, recorded in the checkpoints.
        threads_reason: Why that many, for the header.
        model_kwargs: The student's ``create_model`` arguments but ``num_classes`` (the data's).
        data: The training and validation splits.
        mixup: Mixup / CutMix of the training batches, or None.
        label_loss: The loss against the labels (under mixup, against label distributions).
        sampler: The order of the training split, set to each epoch and to the resumed position.
        train_loader: (image, label, index) micro-batches, this process's share of each global batch.
        val_loader: The validation batches.
        steps_per_epoch: Optimizer steps per epoch.
        model: The student.
        teacher: The live teacher, frozen in eval mode, or None.
        stored_teacher_logits: The teacher's logits of every training image (``--teacher-logits``), or None.
        teacher_input: Renormalises the student's inputs to the teacher's mean and std; None when they agree.
        ema: The exponential moving average of the student's weights, or None.
        objectives: The auxiliary objectives by name (``leanvit.train.objectives``).
        optimizer: The model's param groups, then one group per objective that trains parameters.
        objective_params: The objectives' trainable parameters; outside DDP, so averaged by the step itself.
        scheduler: timm's learning-rate schedule, updated after every optimizer step.
        scaler: The fp16 gradient scaler (a pass-through under other ``amp`` modes).
        checkpoints: Writes the checkpoints on rank 0; None on the other ranks.
        tracker: Logs to TensorBoard / MLflow (``--log``) on rank 0, once the run has resumed; logs nothing
            elsewhere.
    """
    config: TrainConfig
    output: Path
    device: torch.device
    rank: int
    world_size: int
    threads: int
    threads_reason: str
    model_kwargs: dict
    data: DataBundle
    mixup: Mixup | None
    label_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    sampler: EpochSampler
    train_loader: DataLoader
    val_loader: DataLoader
    steps_per_epoch: int
    model: nn.Module
    teacher: nn.Module | None
    stored_teacher_logits: torch.Tensor | None
    teacher_input: Callable[[torch.Tensor], torch.Tensor] | None
    ema: ModelEmaV3 | None
    objectives: dict[str, Objective]
    optimizer: torch.optim.Optimizer
    objective_params: list[nn.Parameter]
    scheduler: Scheduler
    scaler: torch.amp.GradScaler
    checkpoints: CheckpointManager | None
    tracker: Tracker = dataclasses.field(default_factory=Tracker)

    @property
    def is_main(self) -> bool:
        """Whether this process logs and writes the run directory."""
        return self.rank == 0

    @property
    def evaluated_model(self) -> nn.Module:
        """The model validated and kept as ``best``: the EMA when the run keeps one."""
        return self.ema.module if self.ema is not None else self.model


@dataclasses.dataclass
class Progress:
    """Where a run stands: ``step`` optimizer steps into its epoch ``epoch`` (both from 0).

    Attributes:
        epoch: Finished epochs.
        step: Optimizer steps taken in the current epoch.
        history: One row of metrics per finished epoch (``summary.csv``).
        epoch_stats: The current epoch's running training metrics at ``step``, as the run resumed them (zeros at
            the start of an epoch).
        last_checkpoint: The tag of the checkpoint written last or resumed from; None before the first.
    """
    epoch: int = 0
    step: int = 0
    history: list[dict] = dataclasses.field(default_factory=list)
    epoch_stats: dict = dataclasses.field(default_factory=lambda: dict(seen=0, correct=0, loss_sum=0.))
    last_checkpoint: str | None = None


def train(config: TrainConfig, resume_anyway: bool = False) -> dict:
    """Train (or distil) ``config.model`` and return its final validation metrics; see the module docstring.

    A run directory that holds a run resumes it if its settings are ``config``'s (but for ``RESUMABLE`` ones), and
    is a UsageError naming the differences otherwise, unless ``resume_anyway``.
    """
    check_choices(config)
    rank = int(os.environ.get('RANK', 0))
    # Rank 0 owns the run directory for the whole run: a second run on it stops at once instead of mixing files.
    with RunLock(config.output) if rank == 0 else contextlib.nullcontext():
        return _train(config, rank, int(os.environ.get('WORLD_SIZE', 1)), resume_anyway)


def check_choices(config: TrainConfig) -> None:
    """Raise a UsageError for a config value that is not one of its choices (names kept by the modules using them)."""
    for name, value, choices in (('kd', config.kd, KD_LOSSES), ('amp', config.amp, AMP_DTYPES),
                                 ('augment', config.augment, AUGMENTATIONS)):
        if value not in choices:
            raise UsageError(f'{name} (--{name.replace("_", "-")}) must be one of {", ".join(choices)}, '
                             f'got {value!r}')
    check_objective_names(config.objectives)
    parse_backends(config.log)
    if config.opt.lower() not in list_optimizers():
        raise UsageError(f"opt (--opt) {config.opt!r} is not a timm optimizer, such as 'adamw', 'sgd' or 'lamb' "
                         f'(timm.optim.list_optimizers() lists all)')
    if config.device is not None:
        try:
            device = torch.device(config.device)
        except RuntimeError:
            raise UsageError(f"device (--device) must name a torch device such as 'cpu', 'cuda' or 'cuda:1', "
                             f'got {config.device!r}') from None
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise UsageError(f'device (--device) is {config.device!r}, but torch sees no CUDA device here')


def _train(config: TrainConfig, rank: int, world_size: int, resume_anyway: bool) -> dict:
    """``train`` once the run directory is locked: build the run, resume it, train its remaining epochs, finish."""
    run = build_run(config, rank, world_size)
    progress = resume(run, resume_anyway)
    if run.is_main:  # only now: a run directory that failed validation above is left exactly as it was
        write_config(run)
        print_header(run, resumed_from=progress.last_checkpoint)
    forward_model = wrap_for_training(run)
    if progress.epoch >= run.config.epochs and run.is_main:
        print(f'{run.output} already finished its {run.config.epochs} epochs; nothing to train', flush=True)
    if run.is_main:
        run.tracker = open_tracker(run, progress)
    with run.tracker:
        while progress.epoch < run.config.epochs:
            epoch_training = train_one_epoch(run, forward_model, progress)
            validate_and_checkpoint(run, progress, epoch_training)
        return finish(run, progress)


# Building a run: the steps draw from the random generators in this order, so that a seed gives the same run every
# time; the comments in build_run say which orderings matter and why.

def build_run(config: TrainConfig, rank: int, world_size: int) -> Run:
    """Processes, threads, data, teacher, student, loaders, EMA, objectives and optimizer of a run, in this order."""
    # The run records where its images are, so that eval, predict and compress find them from any folder.
    config = dataclasses.replace(config, data=absolute_data(config.data))
    device = start_processes(config, world_size)
    output = Path(config.output)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    threads, threads_reason = set_threads(config, output, world_size)
    model_kwargs = student_kwargs(config)
    # The model's pretrained cfg decides the input pipeline, at the resolution the model is built for.
    input_config = data_config(create_model(config.model, **model_kwargs), config.img_size)
    data, mixup, label_loss = build_data(config, input_config)
    # The teacher is built before the training generators are seeded: its presence must not change the student's
    # initialisation or random draws (KD and label-only runs of one seed start identically).
    teacher, stored_teacher_logits, teacher_input = build_teacher(config, data, mixup, input_config, device)
    random_seed(config.seed)  # torch, numpy and Python's random (timm's transforms draw from the latter)
    model = build_student(config, model_kwargs, data.num_classes, teacher, device, is_main=rank == 0)
    random_seed(config.seed + rank)  # ranks draw different augmentations; DDP broadcasts rank 0's weights
    sampler, train_loader, val_loader, steps_per_epoch = build_loaders(config, data, rank, world_size)
    ema = ModelEmaV3(model, decay=config.ema_decay) if config.ema_decay else None
    # Built after the EMA copy is made: hooks an objective installs must not be copied into the EMA model.
    objectives = build_objectives(config.objectives, model, teacher)
    optimizer, objective_params, scheduler, scaler = build_optimizer(config, model, objectives, steps_per_epoch,
                                                                     device)
    checkpoints = CheckpointManager(output, keep_last=config.keep_last) if rank == 0 else None
    return Run(config=config, output=output, device=device, rank=rank, world_size=world_size, threads=threads,
               threads_reason=threads_reason, model_kwargs=model_kwargs, data=data, mixup=mixup,
               label_loss=label_loss, sampler=sampler, train_loader=train_loader, val_loader=val_loader,
               steps_per_epoch=steps_per_epoch, model=model, teacher=teacher,
               stored_teacher_logits=stored_teacher_logits, teacher_input=teacher_input, ema=ema,
               objectives=objectives, optimizer=optimizer, objective_params=objective_params, scheduler=scheduler,
               scaler=scaler, checkpoints=checkpoints)


def start_processes(config: TrainConfig, world_size: int) -> torch.device:
    """This process's device; with several processes (torchrun), also their process group: gloo on CPU, NCCL on CUDA.

    Raises:
        UsageError: the global batch does not divide among the processes.
    """
    device = torch.device(config.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda' and world_size > 1:
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    if config.batch_size % world_size:
        raise UsageError(f'batch_size {config.batch_size} (global) must be divisible by the {world_size} processes')
    return device


def set_threads(config: TrainConfig, output: Path, world_size: int) -> tuple[int, str]:
    """Set this process's compute threads; return how many and why.

    A resumed run keeps the thread count it started with: other counts sum in other orders, and a resume must give
    the weights an uninterrupted run gives.
    """
    resumed_threads = recorded_threads(output)
    threads, reason = choose_threads(config.threads or resumed_threads, config.num_workers, world_size)
    if resumed_threads and not config.threads:
        reason = 'as the run started'
    return threads, reason


def student_kwargs(config: TrainConfig) -> dict:
    """The student's ``create_model`` arguments but ``num_classes``, which the data decides."""
    model_kwargs = dict(config.model_kwargs, drop_path_rate=config.drop_path)
    if config.arch:  # the architecture itself goes into the checkpoints, so they do not depend on the file
        model_kwargs['arch'] = read_architecture_file(config.arch)
    if config.img_size:
        model_kwargs['img_size'] = config.img_size
    return model_kwargs


def build_data(config: TrainConfig, input_config: dict) -> tuple[DataBundle, Mixup | None, Callable]:
    """The training and validation splits for a model of data config ``input_config``, the batch mixing (Mixup /
    CutMix) if the run asks for it, and the loss against the labels."""
    data = build_datasets(config.data, input_config, val_split=config.val_split, augment=config.augment,
                          auto_augment=config.auto_augment, re_prob=config.re_prob, bad_images=config.bad_images,
                          seed=config.seed, holdout=config.holdout,
                          train_images=config.train_images)
    mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.smoothing,
                  num_classes=data.num_classes) if config.mixup or config.cutmix else None
    # Mixup's targets are distributions that already carry the label smoothing.
    label_loss = SoftTargetCrossEntropy() if mixup is not None else \
        partial(F.cross_entropy, label_smoothing=config.smoothing)
    return data, mixup, label_loss


def build_teacher(config: TrainConfig, data: DataBundle, mixup: Mixup | None, input_config: dict,
                  device: torch.device) -> tuple[nn.Module | None, torch.Tensor | None, Callable | None]:
    """The live teacher, frozen in eval mode, or its stored logits of every training image, or neither; and the
    renormalisation of the student's inputs (data config ``input_config``) to the live teacher's, None where they
    agree.

    Raises:
        UsageError: both a teacher model and stored logits, or stored logits (of unmixed images) with mixup.
    """
    teacher, stored_logits = None, None
    if config.teacher_logits:
        if config.teacher:
            raise UsageError('give either a teacher model or precomputed teacher_logits, not both')
        if mixup is not None:
            raise UsageError('precomputed teacher logits describe unmixed images; they cannot be used with '
                             'mixup/cutmix')
        stored_logits, _ = load_teacher_logits(config.teacher_logits, len(data.train), data.num_classes)
    if config.teacher:
        teacher_name, teacher_kwargs = teacher_spec(config)
        teacher = create_model(teacher_name, num_classes=data.num_classes, **teacher_kwargs)
        if config.teacher_checkpoint:
            load_checkpoint(teacher, config.teacher_checkpoint, trust=config.trust_teacher_checkpoint)
        teacher.to(device).eval().requires_grad_(False)
    teacher_input = renormalizer(input_config, data_config(teacher, config.img_size)) \
        if teacher is not None else None
    return teacher, stored_logits, teacher_input


def build_student(config: TrainConfig, model_kwargs: dict, num_classes: int, teacher: nn.Module | None,
                  device: torch.device, is_main: bool) -> nn.Module:
    """The model to train, on ``device``, initialised from the teacher or from a checkpoint where the run asks.

    The main process reports an initialisation on stdout and in the run directory.

    Raises:
        UsageError: ``init_from_teacher`` without a live teacher, or an ``init_checkpoint`` with no weight of the model.
    """
    output = Path(config.output)
    model = create_model(config.model, num_classes=num_classes, **model_kwargs).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.init_from_teacher and teacher is None:
        raise UsageError('init_from_teacher needs a live teacher model (teacher: NAME), not precomputed '
                         'teacher_logits')
    if config.init_from_teacher:
        report = init_from_teacher(model, teacher)
        if is_main:
            print(f'student initialised from {config.teacher}: {report.summary()}', flush=True)
            write_json(output / 'teacher_init.json', dataclasses.asdict(report))
    if config.init_checkpoint:
        report = init_from_checkpoint(model, config.init_checkpoint)
        if not report.copied:
            raise UsageError(f'init_checkpoint {config.init_checkpoint} has no weight of this model ({config.model}): '
                             f'{report.summary()}')
        if is_main:
            print(f'model initialised from {config.init_checkpoint}: {report.summary()}', flush=True)
            write_json(output / 'init.json', dataclasses.asdict(report))
    return model


def build_loaders(config: TrainConfig, data: DataBundle, rank: int,
                  world_size: int) -> tuple[EpochSampler, DataLoader, DataLoader, int]:
    """The order of the training split, this process's training loader, the validation loader and the optimizer
    steps per epoch.

    Raises:
        UsageError: the training split holds no full optimizer step.
    """
    sampler = EpochSampler(len(data.train), config.seed, config.batch_size, rank, world_size)
    # The loader's own generator: creating an iterator would otherwise draw from the global RNG, which a resumed
    # run restores mid-epoch, and shift every later random draw.
    train_loader = DataLoader(WithIndex(data.train), config.batch_size // world_size, sampler=sampler,
                              drop_last=True, num_workers=config.num_workers,
                              generator=torch.Generator().manual_seed(config.seed))
    val_loader = DataLoader(data.val, config.batch_size, num_workers=config.num_workers)
    steps_per_epoch = len(data.train) // config.batch_size // config.accum_steps
    if steps_per_epoch == 0:
        raise UsageError(f'{len(data.train)} training images give no full step at batch_size {config.batch_size} '
                         f'x accum_steps {config.accum_steps}')
    return sampler, train_loader, val_loader, steps_per_epoch


def build_optimizer(config: TrainConfig, model: nn.Module, objectives: dict[str, Objective], steps_per_epoch: int,
                    device: torch.device) -> tuple[torch.optim.Optimizer, list[nn.Parameter], Scheduler,
                                                   torch.amp.GradScaler]:
    """The optimizer, the objectives' trainable parameters it holds, the learning-rate schedule and the gradient
    scaler.

    timm's factories keep 1-D parameters, like the LRC scalars, out of weight decay. An objective's own trainable
    parameters (weight distillation's width adapters) are one more group each, added before the scheduler records
    each group's initial lr. No weight decay: an adapter is part of a loss, not of the model, and shrinking it would
    only make the hidden-state MSE pull the student's features larger.

    Raises:
        UsageError: ``config.sched`` is not a timm scheduler.
    """
    optimizer = create_optimizer_v2(model, opt=config.opt, lr=config.lr, weight_decay=config.weight_decay)
    objective_params = []
    for objective in objectives.values():
        if params := list(getattr(objective, 'parameters', list)()):
            optimizer.add_param_group(dict(params=params, weight_decay=0.))
            objective_params += params
    try:
        scheduler, _ = create_scheduler_v2(optimizer, sched=config.sched, num_epochs=config.epochs,
                                           warmup_epochs=config.warmup_epochs, min_lr=config.min_lr,
                                           step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    except (ValueError, AssertionError) as e:  # timm names no scheduler list to check against up front
        raise UsageError(f'sched (--sched) {config.sched!r} is not a timm scheduler: {e}') from None
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == 'fp16')
    return optimizer, objective_params, scheduler, scaler


# Resuming.

def resume(run: Run, resume_anyway: bool) -> Progress:
    """Restore ``run`` from the last complete checkpoint of its run directory, if any, and return where it stands.

    Raises:
        UsageError: the checkpoint is of a run with other settings (unless ``resume_anyway``), another architecture
            file's contents, or other objectives' trainable parameters.
        RunDirectoryError: a part of the resume state cannot be restored.
    """
    tag = CheckpointManager.latest_in(run.output)
    if tag is None:
        return Progress()
    weights, meta, state = CheckpointManager.load_from(run.output, tag)
    changed = changed_settings(run, tag, meta, resume_anyway)
    if run.is_main:
        print(f'resuming {run.output} from {tag} (epoch {meta["epoch"]}, step {meta["step"]})'
              + (f' with changed settings: {"; ".join(changed)}' if changed else ''), flush=True)
    check_state_dict_fits(run.model, weights, source=str(run.output / f'{tag}.safetensors'))
    run.model.load_state_dict(weights)
    restore_training_state(run, state, run.output / f'{tag}.resume.pt')
    if not run.is_main:
        # Only rank 0's generators are saved; the others restart from (seed, rank, position).
        random_seed(run.config.seed + run.rank + 7919 * (meta['epoch'] * run.steps_per_epoch + meta['step']))
    return Progress(epoch=meta['epoch'], step=meta['step'], history=meta['history'], epoch_stats=meta['epoch_stats'],
                    last_checkpoint=tag)


def changed_settings(run: Run, tag: str, meta: dict, resume_anyway: bool) -> list[str]:
    """The settings of ``run`` that differ from those its checkpoint ``tag`` (metadata ``meta``) was saved with.

    Raises:
        UsageError: settings differ and not ``resume_anyway``; or the architecture file's contents differ, whatever
            ``resume_anyway`` says.
    """
    config = run.config
    changed = config.differences(meta.get('config') or {})
    recorded_arch = (meta.get('model_kwargs') or {}).get('arch')
    if config.arch and recorded_arch is not None and recorded_arch != as_recorded(run.model_kwargs['arch']):
        # Same file name, other contents: the run's weights do not fit the new architecture.
        raise UsageError(f'arch (--arch) {config.arch} describes another architecture than the one the run in '
                         f'{run.output} was trained with (recorded in {run.output / f"{tag}.json"}): restore the '
                         f'file, or train the new architecture in another --output')
    if changed and not resume_anyway:
        raise UsageError(f'run directory {run.output} holds a run with other settings ({"; ".join(changed)}): run '
                         f'with its settings to resume it, choose another output for a new run, or pass '
                         f'--resume-anyway to resume it with the new ones')
    return changed


def restore_training_state(run: Run, state: dict, resume_file: Path) -> None:
    """Restore the optimizer, scheduler, scaler, EMA, objectives and (on rank 0) the generators from ``state``.

    Raises:
        UsageError: the optimizer state is of other trainable parameters (other objectives).
        RunDirectoryError: a part of ``state`` cannot be restored.
    """
    try:
        run.optimizer.load_state_dict(state['optimizer'])
    except ValueError as e:  # torch's check of the parameter groups and their sizes
        raise UsageError(f'{resume_file} holds optimizer state for other trainable parameters than this run\'s '
                         f'model and objectives ({e}): resume it with the objectives it was saved with') from None
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise RunDirectoryError(f'{resume_file}: field "optimizer" cannot be restored ({type(e).__name__}: {e}); '
                                f'the file is corrupt or was not written by leanvit')
    check_optimizer_state(run.optimizer, resume_file)
    saved_objectives = state.get('objectives', {})
    if not isinstance(saved_objectives, dict):
        raise RunDirectoryError(f'{resume_file}: field "objectives" must be a dict of objective states, got '
                                f'{type(saved_objectives).__name__}')
    parts = [('scheduler', lambda: run.scheduler.load_state_dict(state['scheduler'])),
             ('scaler', lambda: run.scaler.load_state_dict(state['scaler']))]
    parts += [('ema', lambda: run.ema.load_state_dict(state['ema']))] if run.ema is not None else []
    parts += [(f'objectives.{name}', partial(objective.load_state_dict, saved_objectives.get(name, {})))
              for name, objective in run.objectives.items()]
    parts += [('rng', lambda: set_rng_state(state['rng']))] if run.is_main else []
    for part, restore in parts:
        # The file was read weights-only, so it holds only tensors and plain data, but their layout is not
        # checked: a crafted or damaged part is named instead of failing deep inside torch.
        try:
            restore()
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            raise RunDirectoryError(f'{resume_file}: field "{part}" cannot be restored '
                                    f'({" ".join(str(e).split())[:200] or type(e).__name__}); the file is corrupt '
                                    f'or was not written by leanvit: move the run directory aside to start '
                                    f'over') from None


# Before the first step.

def write_config(run: Run) -> None:
    """``config.yaml``: the settings that apply to the run."""
    atomic_write(run.output / 'config.yaml',
                 lambda tmp: Path(tmp).write_text(yaml.safe_dump(run.config.applicable())))


def print_header(run: Run, resumed_from: str | None) -> None:
    """What the run trains, on what, how, and where it writes, before its first step."""
    config, teacher = run.config, run.teacher
    teacher_line = (f'{config.teacher} ({config.kd}, alpha {config.kd_alpha}, tau {config.kd_tau})' if teacher
                    else f'stored logits {config.teacher_logits}' if run.stored_teacher_logits is not None
                    else 'none (labels)')
    if run.teacher_input is not None:
        teacher_line += "; its inputs renormalised to its own mean and std"
    if teacher is not None and config.augment == 'none' and run.mixup is None and not run.objectives:
        # The teacher's forward is most of a distillation step; here its inputs repeat every epoch.
        teacher_line += ('; it sees the same images every epoch: `leanvit teacher-logits` stores its logits '
                         'once, and --teacher-logits trains without running it')
    input_config = data_config(run.model, config.img_size)
    print('\n'.join([
        f'model      {config.model}: {count_params(run.model):,} parameters, input '
        f'{"x".join(map(str, input_config["input_size"]))}',
        f'data       {run.data.description}',
        f'augment    {config.augment}: {AUGMENTATIONS[config.augment].use}'
        + (f', auto-augment {config.auto_augment}' if config.auto_augment else '')
        + (f', mixup {config.mixup} / cutmix {config.cutmix}' if run.mixup is not None else ''),
        f'teacher    {teacher_line}' + (f'; objectives {", ".join(run.objectives)}' if run.objectives else ''),
        f'device     {run.device}, {run.threads} compute threads ({run.threads_reason}), {config.num_workers} '
        f'data-loader workers, {run.world_size} process(es)',
        f'output     {run.output} ({f"resuming from {resumed_from}" if resumed_from else "new run"})',
        *(f'note       {note}' for note in input_size_notes(run.model, input_config, typical_image_size(run.data.train),
                                                            config.img_size)),
    ]), flush=True)


def open_tracker(run: Run, progress: Progress) -> Tracker:
    """The run's TensorBoard / MLflow logs (``--log``), continued where the run resumes; the settings and versions
    are logged once per run folder. A backend added to a resumed run logs from there on (its settings included)."""
    resumed_at = progress.epoch * run.steps_per_epoch + progress.step
    tracker = Tracker.open(run.config.log, run.output, name='/'.join(run.output.resolve().parts[-2:]),
                           purge_from=resumed_at + 1)
    if progress.epoch >= run.config.epochs and not tracker.settings_due:
        tracker.close()  # a finished run started again: its curves and files are logged already
        return Tracker()
    if tracker.active:
        tracker.params(dict(run.config.applicable(), **versions()), yaml.safe_dump(run.config.applicable()))
    return tracker


def wrap_for_training(run: Run) -> nn.Module:
    """The module the training step calls: the model, under DDP when the run has several processes, compiled if the
    run asks."""
    forward_model = run.model
    if run.world_size > 1:
        forward_model = DistributedDataParallel(run.model, **ddp_options(run.model, run.objectives.values()))
        for param in run.objective_params:  # outside DDP, and drawn with each rank's seed: start from rank 0's, as DDP
            dist.broadcast(param.detach(), 0)
    if run.config.compile:
        forward_model = torch.compile(forward_model)
    return forward_model


def ddp_options(model: nn.Module, objectives: Iterable[Objective]) -> dict:
    """``DistributedDataParallel``'s options for ``model`` trained with ``objectives``.

    DDP expects a gradient of every parameter in every step, and fails on a step that leaves some without one (a
    step that trains a sampled path or depth of the network) unless it searches each step's graph for them
    (``find_unused_parameters``), a cost every step pays. So it searches only where the model or one of the
    objectives declares ``leaves_parameters_unused`` (see ``leanvit.train.objectives``).
    """
    return dict(find_unused_parameters=any(getattr(source, 'leaves_parameters_unused', False)
                                           for source in (model, *objectives)))


# Training.

def micro_batch_loss(run: Run, forward_model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                     indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and loss terms of one micro-batch, which sum to its loss: ``labels`` or ``distillation``, plus one term
    per auxiliary objective, by its name."""
    config = run.config
    with torch.autocast(run.device.type, dtype=AMP_DTYPES[config.amp], enabled=config.amp != 'none'):
        logits = forward_model(images).float()
        if run.teacher is None and run.stored_teacher_logits is None:
            terms = {'labels': run.label_loss(logits, targets)}
        else:
            if run.stored_teacher_logits is not None:
                teacher_logits = run.stored_teacher_logits[indices].to(run.device)
            else:
                with torch.no_grad():
                    teacher_logits = run.teacher(run.teacher_input(images) if run.teacher_input else images).float()
            terms = {'distillation': distillation_loss(logits, targets, teacher_logits, config.kd, config.kd_alpha,
                                                       config.kd_tau)}
        for name, objective in run.objectives.items():
            terms[name] = objective.loss()
    return logits, terms


class Step(NamedTuple):
    """One optimizer step's metrics, as tensors on the device (read by the host only when logged)."""
    seen: int
    correct: torch.Tensor
    loss_sum: torch.Tensor
    losses: torch.Tensor  # each micro-batch's loss, for the finiteness check
    term_sums: dict[str, torch.Tensor]  # each loss term summed over the step's images
    grad_norm: torch.Tensor | None  # the gradients' total norm, where measured (clipping, or asked for)


def train_step(run: Run, forward_model: nn.Module, batches: Iterator, measure_grad_norm: bool = False) -> Step:
    """One optimizer step over ``accum_steps`` micro-batches of ``batches``, without a host sync."""
    config = run.config
    seen, correct, loss_sum, losses, term_sums = 0, 0, 0, [], {}
    for micro_step in range(config.accum_steps):
        images, targets, indices = next(batches)
        images, targets = images.to(run.device, non_blocking=True), targets.to(run.device, non_blocking=True)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = targets
        if run.mixup is not None:
            images, targets = run.mixup(images, targets)
        # Gradients are averaged across processes only on the last micro-step of an accumulation.
        sync = micro_step == config.accum_steps - 1 or run.world_size == 1
        with contextlib.nullcontext() if sync else forward_model.no_sync():
            logits, terms = micro_batch_loss(run, forward_model, images, targets, indices)
            loss = sum(terms.values())
            run.scaler.scale(loss / config.accum_steps).backward()
        seen += labels.numel()
        correct = correct + (logits.argmax(-1) == labels).sum()
        loss_sum = loss_sum + loss.detach().double() * labels.numel()
        for name, term in terms.items():
            term_sums[name] = term_sums.get(name, 0) + term.detach().double() * labels.numel()
        losses.append(loss.detach())
    if run.world_size > 1:  # DDP averages the model's gradients only
        for param in (p for p in run.objective_params if p.grad is not None):
            dist.all_reduce(param.grad)
            param.grad /= run.world_size
    grad_norm = None
    if config.clip_grad or measure_grad_norm:
        run.scaler.unscale_(run.optimizer)
        params = [*run.model.parameters(), *run.objective_params]
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, config.clip_grad) if config.clip_grad else
                     torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params
                                                           if p.grad is not None])))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return Step(seen, correct, loss_sum, torch.stack(losses), term_sums, grad_norm)


@dataclasses.dataclass
class LogWindow:
    """The training metrics of this process since the last logged step, for ``--log``: loss terms, speed, norm."""
    start: float = dataclasses.field(default_factory=time.perf_counter)
    seen: int = 0
    term_sums: dict = dataclasses.field(default_factory=dict)
    grad_norm: torch.Tensor | None = None

    def add(self, step: Step) -> None:
        self.seen += step.seen
        for name, value in step.term_sums.items():
            self.term_sums[name] = self.term_sums.get(name, 0) + value
        self.grad_norm = step.grad_norm if step.grad_norm is not None else self.grad_norm

    def scalars(self, run: Run) -> dict[str, float]:
        """The window's values by tag (one host sync): the loss and each of its terms, by image."""
        now = time.perf_counter()
        values = {f'train/loss/{name}': value.item() / self.seen for name, value in self.term_sums.items()}
        values['train/loss'] = sum(values.values())
        values['train/lr'] = run.optimizer.param_groups[0]['lr']
        values['train/images_per_s'] = run.world_size * self.seen / (now - self.start)
        if self.grad_norm is not None:
            values['train/grad_norm'] = self.grad_norm.item()
        return values


def train_one_epoch(run: Run, forward_model: nn.Module, progress: Progress) -> EpochTraining:
    """Train the rest of epoch ``progress.epoch``, checkpointing every ``save_every_steps`` steps within it.

    The running metrics stay on the device; the host reads them (one sync) only to log or to save.

    Raises:
        TrainingDivergedError: a loss is NaN or infinite.
    """
    config = run.config
    run.model.train()
    run.sampler.set_position(progress.epoch, progress.step * config.batch_size * config.accum_steps)
    batches = iter(run.train_loader)
    bar = tqdm(total=run.steps_per_epoch, initial=progress.step, desc=f'epoch {progress.epoch + 1}/{config.epochs}',
               # None: no bar when the output is not a terminal (a log file gets the epoch lines only)
               disable=None if config.progress and run.is_main else True, leave=False)
    # Running training metrics of this epoch (restored on resume, so the summary matches an uninterrupted run).
    seen = progress.epoch_stats['seen']
    correct = torch.tensor(progress.epoch_stats['correct'], device=run.device)
    loss_sum = torch.tensor(progress.epoch_stats['loss_sum'], dtype=torch.float64, device=run.device)
    unchecked, start, start_seen = [], time.perf_counter(), seen
    window = LogWindow()
    while progress.step < run.steps_per_epoch:
        logs_now = (progress.step + 1) % LOG_EVERY_STEPS == 0 or progress.step + 1 == run.steps_per_epoch
        step = train_step(run, forward_model, batches, measure_grad_norm=logs_now and run.tracker.active)
        seen, correct, loss_sum = seen + step.seen, correct + step.correct, loss_sum + step.loss_sum
        window.add(step)
        progress.step += 1
        unchecked.append((progress.step, step.losses))
        run_step = progress.epoch * run.steps_per_epoch + progress.step
        run.scheduler.step_update(run_step)
        if run.ema is not None:
            run.ema.update(run.model, step=run_step)
        bar.update()
        to_save = (config.save_every_steps and progress.step % config.save_every_steps == 0
                   and progress.step < run.steps_per_epoch)
        if to_save or logs_now:
            check_finite(unchecked, progress.epoch, progress.last_checkpoint, run.output)
            bar.set_postfix(loss=f'{loss_sum.item() / seen:.4f}', acc=f'{100 * correct.item() / seen:.1f}',
                            img_s=f'{run.world_size * (seen - start_seen) / (time.perf_counter() - start):.0f}')
        if logs_now and run.tracker.active:
            run.tracker.scalars(window.scalars(run), run_step)
            window = LogWindow()
        if to_save:
            progress.last_checkpoint = save_checkpoint(
                run, progress, dict(seen=seen, correct=correct.item(), loss_sum=loss_sum.item()))
    bar.close()
    images_per_s = (seen - start_seen) / (time.perf_counter() - start)

    totals = torch.stack([torch.tensor(seen, dtype=torch.float64, device=run.device), correct.double(), loss_sum])
    if run.world_size > 1:  # the epoch's training metrics over every process's share
        dist.all_reduce(totals)
    return EpochTraining(int(totals[0]), int(totals[1]), float(totals[2]), images_per_s)


def validate_and_checkpoint(run: Run, progress: Progress, training: EpochTraining) -> None:
    """Validate the model at the end of epoch ``progress.epoch``, record the epoch, and checkpoint and report it."""
    evaluation = evaluate_model(run.evaluated_model, run.val_loader, run.device)
    metrics = evaluation.metrics()
    seen = max(training.seen, 1)
    progress.history.append(dict(epoch=progress.epoch + 1, train_loss=training.loss_sum / seen,
                                 train_top1=100 * training.correct / seen, val_loss=metrics['loss'],
                                 val_top1=metrics['top1'], val_top5=metrics['top5'],
                                 lr=run.optimizer.param_groups[0]['lr'],
                                 train_images_per_s=round(training.images_per_s, 1)))
    if run.tracker.active:  # before the checkpoint: a run killed in between logs this epoch again, see tracking.py
        log_epoch(run, progress.history[-1], evaluation, (progress.epoch + 1) * run.steps_per_epoch)
    progress.epoch, progress.step, progress.epoch_stats = progress.epoch + 1, 0, dict(seen=0, correct=0, loss_sum=0.)
    progress.last_checkpoint = save_checkpoint(run, progress, progress.epoch_stats, metrics)
    if run.is_main:
        write_summary(run.output, progress.history)
        last = progress.history[-1]
        print(f'epoch {progress.epoch}/{run.config.epochs}: train loss {last["train_loss"]:.4f}, train top-1 '
              f'{last["train_top1"]:.2f}%, val top-1 {metrics["top1"]:.2f}%, val loss {metrics["loss"]:.4f}, '
              f'{last["train_images_per_s"]:.0f} train images/s', flush=True)


def log_epoch(run: Run, row: dict, evaluation, step: int) -> None:
    """An epoch's row of ``summary.csv`` and its validation confusion matrix, to the run's ``--log`` backends."""
    run.tracker.scalars({'epoch': row['epoch'], 'train/epoch_loss': row['train_loss'],
                         'train/epoch_top1': row['train_top1'], 'val/loss': row['val_loss'],
                         'val/top1': row['val_top1'], 'val/top5': row['val_top5']}, step)
    with tempfile.TemporaryDirectory() as folder:
        png = Path(folder) / 'confusion_matrix.png'
        plot_confusion_matrix(evaluation.confusion, run.data.class_names, png)
        run.tracker.image('val/confusion_matrix', png, step)


def save_checkpoint(run: Run, progress: Progress, epoch_stats: dict, metrics: dict | None = None) -> str:
    """Checkpoint the run at ``progress`` (rank 0 writes it) and return the checkpoint's tag.

    Args:
        run: The run.
        progress: Where the run stands.
        epoch_stats: The running training metrics of the epoch at ``progress.step``, as host numbers.
        metrics: The validation metrics at the end of an epoch; None mid-epoch.
    """
    tag = f'step-{progress.epoch * run.steps_per_epoch + progress.step:07d}'
    if run.is_main:
        config = run.config
        meta = dict(model=config.model, model_kwargs=dict(run.model_kwargs, num_classes=run.data.num_classes),
                    threads=run.threads, epoch=progress.epoch, step=progress.step, metrics=metrics,
                    history=progress.history, epoch_stats=epoch_stats, config=dataclasses.asdict(config))
        state = dict(optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
                     scaler=run.scaler.state_dict(), rng=rng_state(),
                     ema=run.ema.state_dict() if run.ema is not None else None,
                     objectives={name: objective.state_dict() for name, objective in run.objectives.items()})
        run.checkpoints.save(tag, run.model, meta, state, metric=metrics['top1'] if metrics else None,
                             evaluated_model=run.evaluated_model)
    return tag


def finish(run: Run, progress: Progress) -> dict:
    """Detach the objectives, write the curves and ``final.json`` (the last epoch's metrics), and return them."""
    for objective in run.objectives.values():
        objective.remove()
    final = progress.history[-1] if progress.history else {}
    if run.is_main:
        plot_curves(run.output, progress.history)
        write_json(run.output / 'final.json', final)
        log_files(run, progress)
    if run.world_size > 1:
        dist.barrier()
    return final


def log_files(run: Run, progress: Progress) -> None:
    """The run's plots as images, and its best checkpoint, summary and settings as files (MLflow's artifacts)."""
    if not run.tracker.active:
        return
    step = progress.epoch * run.steps_per_epoch
    for name in ('accuracy', 'loss'):
        if (run.output / f'{name}.png').is_file():
            run.tracker.image(f'curves/{name}', run.output / f'{name}.png', step)
    for name in ('best.safetensors', 'best.json', 'summary.csv', 'config.yaml', 'final.json'):
        if (run.output / name).is_file():
            run.tracker.artifact(run.output / name, 'run')


def input_size_notes(model: nn.Module, cfg: dict, image_size: tuple[int, int] | None,
                     img_size: int | None) -> list[str]:
    """What a user should know about the input size before waiting for epochs: the images are far smaller or larger
    than what the model runs at (``img_size`` None: its default), or a patch grid so coarse that attention has next
    to nothing to attend to."""
    notes = []
    height, width = cfg['input_size'][1:]
    if image_size is not None and not img_size:
        side = max(image_size)
        ratio = height * width / (image_size[0] * image_size[1])
        suggested = max(32, -(-side // 16) * 16)
        if (ratio >= 4 or ratio <= 1 / 4) and suggested != width:
            notes.append(f'the images are about {image_size[0]}x{image_size[1]} pixels but the model runs at '
                         f'{width}x{height}, {ratio:.3g}x the pixels per image: --img-size {suggested} suits them')
    # The patch embedding of timm's ViTs and leanvit's isotropic models: its patch size, or its conv's stride.
    patch_embed = getattr(model, 'patch_embed', None)
    proj = getattr(patch_embed, 'proj', None)
    patch = getattr(patch_embed, 'patch_size', None) or (proj.stride if isinstance(proj, nn.Conv2d) else None)
    if patch is not None:
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        grid = (height // patch[0], width // patch[1])
        smaller = max(1, min(height, width) // 8)  # an 8 x 8 grid
        if min(grid) < 4 and smaller < patch[0]:
            notes.append(f'at {width}x{height} the {patch[0]}-pixel patches make a {grid[0]}x{grid[1]} grid of '
                         f'tokens: small images want smaller patches, e.g. the model argument patch_size {smaller} '
                         f'(--model-kwargs \'{{"patch_size": {smaller}}}\'; docs/across-families.md, "Small images")')
    return notes


def check_optimizer_state(optimizer: torch.optim.Optimizer, source: Path) -> None:
    """Raise a RunDirectoryError unless every per-parameter tensor of the restored optimizer state (Adam's moments,
    SGD's momentum) has its parameter's shape: torch checks the groups' sizes, not the tensors, and a damaged file
    would otherwise fail at the first step, after the run's header."""
    for group in optimizer.param_groups:
        for param in group['params']:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                    raise RunDirectoryError(f'{source}: field "optimizer" holds state {key!r} of shape '
                                            f'{tuple(value.shape)} for a parameter of shape {tuple(param.shape)}; the '
                                            f'file is corrupt or was not written by leanvit')


def teacher_spec(config: TrainConfig) -> tuple[str, dict]:
    """The teacher's model name and kwargs (without ``num_classes``, the data's): as its run built it, where the
    teacher checkpoint is a run's with a sidecar (size, arguments, architecture), under ``teacher_kwargs``; the
    run's ``img_size``, if set, last, since the teacher sees the student's images."""
    if config.teacher_checkpoint:
        name, kwargs = trained_model_spec(config.teacher_checkpoint, config.teacher, config.teacher_kwargs,
                                          name_flag='--teacher')
    else:
        name, kwargs = config.teacher, dict(config.teacher_kwargs)
    kwargs.pop('num_classes', None)
    if config.img_size:
        kwargs['img_size'] = config.img_size
    return name, kwargs


def recorded_threads(output: Path) -> int | None:
    """The compute threads the run in ``output`` used, as its last checkpoint records them; None for a new run."""
    tag = CheckpointManager.latest_in(output)
    sidecar = output / f'{tag}.json'
    threads = read_sidecar(sidecar).get('threads') if tag and sidecar.is_file() else None  # a missing file: later
    return threads if isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1 else None


def check_finite(unchecked: list[tuple[int, torch.Tensor]], epoch: int, last_good: str | None, output: Path) -> None:
    """Raise a TrainingDivergedError naming the first step whose loss was NaN or infinite; then forget the steps.

    ``unchecked`` holds (step, micro-batch losses) of the steps since the last check: one host sync for all of them.
    """
    if not unchecked:
        return
    finite = torch.isfinite(torch.stack([losses for _, losses in unchecked])).all(dim=1)
    if not bool(finite.all()):
        step, losses = unchecked[int((~finite).nonzero()[0])]
        value = losses[~torch.isfinite(losses)][0].item()
        raise TrainingDivergedError(
            f'loss is {value} at epoch {epoch + 1}, step {step}; stopping. The last good checkpoint is '
            f'{last_good or "none (no checkpoint saved yet)"} in {output}')
    unchecked.clear()


def write_summary(output: Path, history: list[dict]) -> None:
    """``summary.csv``: one row per finished epoch, rewritten atomically."""
    def write(tmp):
        with open(tmp, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
    atomic_write(output / 'summary.csv', write)


def plot_curves(output: Path, history: list[dict]) -> None:
    """``loss.png`` and ``accuracy.png`` of the run's epochs."""
    if not history:
        return
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend and figures stay untouched
    from matplotlib.ticker import MaxNLocator

    epochs = [row['epoch'] for row in history]
    for name, series in (('loss', ('train_loss', 'val_loss')), ('accuracy', ('train_top1', 'val_top1'))):
        fig = Figure(figsize=(5, 3.5))
        ax = fig.subplots()
        for key in series:
            ax.plot(epochs, [row[key] for row in history], marker='o', label=key.replace('_', ' '))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel('epoch')
        ax.set_ylabel('top-1 (%)' if name == 'accuracy' else 'loss')
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(output / f'{name}.png', lambda tmp: fig.savefig(tmp, format='png', dpi=120))
