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
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, random_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from leanvit.errors import RunDirectoryError, TrainingDivergedError, UsageError
from leanvit.io.data import AUGMENTATIONS, WithIndex, build_datasets, renormalizer, typical_image_size
from leanvit.io.files import atomic_write, write_json
from leanvit.io.weights import check_state_dict_fits, load_checkpoint
from leanvit.models import create_model
from leanvit.profiler import count_params
from leanvit.threads import choose_threads
from leanvit.train.config import TrainConfig, absolute_data, as_recorded, read_architecture_file
from leanvit.train.distillation import KD_LOSSES, distillation_loss
from leanvit.train.evaluation import data_config, evaluate_model, trained_model_spec
from leanvit.train.initialization import init_from_checkpoint, init_from_teacher
from leanvit.train.objectives import build_objectives, check_objective_names
from leanvit.train.run_directory import CheckpointManager, RunLock, read_sidecar, rng_state, set_rng_state
from leanvit.train.teacher_logits import load_teacher_logits

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
    # The run records where its images are, so that eval, predict and compress find them from any folder.
    config = dataclasses.replace(config, data=absolute_data(config.data))
    # Processes: one, or one per device under torchrun (gloo on CPU, NCCL on CUDA); rank 0 logs and saves.
    device = torch.device(config.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda' and world_size > 1:
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    if config.batch_size % world_size:
        raise UsageError(f'batch_size {config.batch_size} (global) must be divisible by the {world_size} processes')
    is_main = rank == 0
    output = Path(config.output)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    # A resumed run keeps the thread count it started with: other counts sum in other orders, and a resume must give
    # the weights an uninterrupted run gives.
    resumed_threads = recorded_threads(output)
    threads, threads_reason = choose_threads(config.threads or resumed_threads, config.num_workers, world_size)
    if resumed_threads and not config.threads:
        threads_reason = 'as the run started'

    # Model and data: the model's pretrained cfg decides the input pipeline, at the resolution the model is built for.
    model_kwargs = dict(config.model_kwargs, drop_path_rate=config.drop_path)
    if config.arch:  # the architecture itself goes into the checkpoints, so they do not depend on the file
        model_kwargs['arch'] = read_architecture_file(config.arch)
    if config.img_size:
        model_kwargs['img_size'] = config.img_size
    probe = create_model(config.model, **model_kwargs)
    data = build_datasets(config.data, data_config(probe, config.img_size), val_split=config.val_split,
                          augment=config.augment, auto_augment=config.auto_augment, re_prob=config.re_prob,
                          bad_images=config.bad_images, seed=config.seed, holdout=config.holdout)
    mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.smoothing,
                  num_classes=data.num_classes) if config.mixup or config.cutmix else None
    # Mixup's targets are distributions that already carry the label smoothing.
    label_loss = SoftTargetCrossEntropy() if mixup is not None else \
        partial(F.cross_entropy, label_smoothing=config.smoothing)

    # The teacher is built before the training generators are seeded: its presence must not change the student's
    # initialisation or random draws (KD and label-only runs of one seed start identically).
    teacher, teacher_table = None, None
    if config.teacher_logits:
        if config.teacher:
            raise UsageError('give either a teacher model or precomputed teacher_logits, not both')
        if mixup is not None:
            raise UsageError('precomputed teacher logits describe unmixed images; they cannot be used with '
                             'mixup/cutmix')
        teacher_table, _ = load_teacher_logits(config.teacher_logits, len(data.train), data.num_classes)
    if config.teacher:
        teacher_name, teacher_kwargs = teacher_spec(config)
        teacher = create_model(teacher_name, num_classes=data.num_classes, **teacher_kwargs)
        if config.teacher_checkpoint:
            load_checkpoint(teacher, config.teacher_checkpoint, trust=config.trust_teacher_checkpoint)
        teacher.to(device).eval().requires_grad_(False)
    teacher_input = renormalizer(data_config(probe, config.img_size), data_config(teacher, config.img_size)) \
        if teacher is not None else None

    random_seed(config.seed)  # torch, numpy and Python's random (timm's transforms draw from the latter)
    model = create_model(config.model, num_classes=data.num_classes, **model_kwargs).to(device)
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
    random_seed(config.seed + rank)  # ranks draw different augmentations; DDP broadcasts rank 0's weights
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

    ema = ModelEmaV3(model, decay=config.ema_decay) if config.ema_decay else None
    # Built after the EMA copy is made: hooks an objective installs must not be copied into the EMA model.
    objectives = build_objectives(config.objectives, model, teacher)

    # Optimizer and schedule (timm's factories keep 1-D parameters, like the LRC scalars, out of weight decay).
    optimizer = create_optimizer_v2(model, opt=config.opt, lr=config.lr, weight_decay=config.weight_decay)
    # An objective's own trainable parameters (weight distillation's width adapters) are one more group each, added
    # before the scheduler records each group's initial lr. No weight decay: an adapter is part of a loss, not of the
    # model, and shrinking it would only make the hidden-state MSE pull the student's features larger.
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

    # Resume from the last complete checkpoint of this output directory, if any.
    checkpoints = CheckpointManager(output, keep_last=config.keep_last) if is_main else None
    epoch, step, history, epoch_stats = 0, 0, [], dict(seen=0, correct=0, loss_sum=0.)
    if (tag := CheckpointManager.latest_in(output)) is not None:
        weights, meta, state = CheckpointManager.load_from(output, tag)
        changed = config.differences(meta.get('config') or {})
        recorded_arch = (meta.get('model_kwargs') or {}).get('arch')
        if config.arch and recorded_arch is not None and recorded_arch != as_recorded(model_kwargs['arch']):
            # Same file name, other contents: the weights of the run no longer fit, whatever --resume-anyway says.
            raise UsageError(f'arch (--arch) {config.arch} describes another architecture than the one the run in '
                             f'{output} was trained with (recorded in {output / f"{tag}.json"}): restore the file, or '
                             f'train the new architecture in another --output')
        if changed and not resume_anyway:
            raise UsageError(f'run directory {output} holds a run with other settings ({"; ".join(changed)}): run '
                             f'with its settings to resume it, choose another output for a new run, or pass '
                             f'--resume-anyway to resume it with the new ones')
        if is_main:
            print(f'resuming {output} from {tag} (epoch {meta["epoch"]}, step {meta["step"]})'
                  + (f' with changed settings: {"; ".join(changed)}' if changed else ''), flush=True)
        check_state_dict_fits(model, weights, source=str(output / f'{tag}.safetensors'))
        model.load_state_dict(weights)
        try:
            optimizer.load_state_dict(state['optimizer'])
        except ValueError as e:  # torch's check of the parameter groups and their sizes
            raise UsageError(f'{output / f"{tag}.resume.pt"} holds optimizer state for other trainable parameters '
                             f'than this run\'s model and objectives ({e}): resume it with the objectives it was '
                             f'saved with') from None
        except (KeyError, TypeError, AttributeError, IndexError) as e:
            raise RunDirectoryError(f'{output / f"{tag}.resume.pt"}: field "optimizer" cannot be restored '
                                    f'({type(e).__name__}: {e}); the file is corrupt or was not written by leanvit')
        check_optimizer_state(optimizer, output / f'{tag}.resume.pt')
        resume_file = output / f'{tag}.resume.pt'
        saved_objectives = state.get('objectives', {})
        if not isinstance(saved_objectives, dict):
            raise RunDirectoryError(f'{resume_file}: field "objectives" must be a dict of objective states, got '
                                    f'{type(saved_objectives).__name__}')
        parts = [('scheduler', lambda: scheduler.load_state_dict(state['scheduler'])),
                 ('scaler', lambda: scaler.load_state_dict(state['scaler']))]
        parts += [('ema', lambda: ema.load_state_dict(state['ema']))] if ema is not None else []
        parts += [(f'objectives.{name}', partial(objective.load_state_dict, saved_objectives.get(name, {})))
                  for name, objective in objectives.items()]
        parts += [('rng', lambda: set_rng_state(state['rng']))] if is_main else []
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
        if not is_main:
            # Only rank 0's generators are saved; the others restart from (seed, rank, position).
            random_seed(config.seed + rank + 7919 * (meta['epoch'] * steps_per_epoch + meta['step']))
        epoch, step, history, epoch_stats = meta['epoch'], meta['step'], meta['history'], meta['epoch_stats']

    if is_main:  # only now: a run directory that failed validation above is left exactly as it was
        atomic_write(output / 'config.yaml',
                     lambda tmp: Path(tmp).write_text(yaml.safe_dump(config.applicable())))
        teacher_line = (f'{config.teacher} ({config.kd}, alpha {config.kd_alpha}, tau {config.kd_tau})' if teacher
                        else f'stored logits {config.teacher_logits}' if teacher_table is not None else 'none (labels)')
        if teacher_input is not None:
            teacher_line += "; its inputs renormalised to its own mean and std"
        if teacher is not None and config.augment == 'none' and mixup is None and not objectives:
            # The teacher's forward is most of a distillation step; here its inputs repeat every epoch.
            teacher_line += ('; it sees the same images every epoch: `leanvit teacher-logits` stores its logits '
                             'once, and --teacher-logits trains without running it')
        print('\n'.join([
            f'model      {config.model}: {count_params(model):,} parameters, input '
            f'{"x".join(map(str, data_config(model, config.img_size)["input_size"]))}',
            f'data       {data.description}',
            f'augment    {config.augment}: {AUGMENTATIONS[config.augment].use}'
            + (f', auto-augment {config.auto_augment}' if config.auto_augment else '')
            + (f', mixup {config.mixup} / cutmix {config.cutmix}' if mixup is not None else ''),
            f'teacher    {teacher_line}' + (f'; objectives {", ".join(objectives)}' if objectives else ''),
            f'device     {device}, {threads} compute threads ({threads_reason}), {config.num_workers} data-loader '
            f'workers, {world_size} process(es)',
            f'output     {output} ({f"resuming from {tag}" if tag else "new run"})',
            *(f'note       {note}' for note in input_size_notes(model, data_config(model, config.img_size),
                                                                typical_image_size(data.train), config.img_size)),
        ]), flush=True)

    forward_model = model
    if world_size > 1:
        # Mixed-depth or other input-dependent paths may leave parameters unused in a step.
        forward_model = DistributedDataParallel(model, find_unused_parameters=True)
        for param in objective_params:  # outside DDP, and drawn with each rank's seed: start from rank 0's, as DDP
            dist.broadcast(param.detach(), 0)
    if config.compile:
        forward_model = torch.compile(forward_model)

    autocast = partial(torch.autocast, device.type, dtype=AMP_DTYPES[config.amp], enabled=config.amp != 'none')

    def micro_batch_loss(images: torch.Tensor, targets: torch.Tensor,
                         indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and loss of one micro-batch: labels, or distillation, plus every auxiliary objective's term."""
        with autocast():
            logits = forward_model(images).float()
            if teacher is None and teacher_table is None:
                loss = label_loss(logits, targets)
            else:
                if teacher_table is not None:
                    teacher_logits = teacher_table[indices].to(device)
                else:
                    with torch.no_grad():
                        teacher_logits = teacher(teacher_input(images) if teacher_input else images).float()
                loss = distillation_loss(logits, targets, teacher_logits, config.kd, config.kd_alpha, config.kd_tau)
            for objective in objectives.values():
                loss = loss + objective.loss()
        return logits, loss

    def train_step(batches) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step over ``accum_steps`` micro-batches.

        Returns the images seen, the correct predictions and the summed loss, as tensors on the device (no host
        sync), and each micro-batch's loss for the finiteness check.
        """
        seen, correct, loss_sum, losses = 0, 0, 0, []
        for micro_step in range(config.accum_steps):
            images, targets, indices = next(batches)
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = targets
            if mixup is not None:
                images, targets = mixup(images, targets)
            # Gradients are averaged across processes only on the last micro-step of an accumulation.
            sync = micro_step == config.accum_steps - 1 or world_size == 1
            with contextlib.nullcontext() if sync else forward_model.no_sync():
                logits, loss = micro_batch_loss(images, targets, indices)
                scaler.scale(loss / config.accum_steps).backward()
            seen += labels.numel()
            correct = correct + (logits.argmax(-1) == labels).sum()
            loss_sum = loss_sum + loss.detach().double() * labels.numel()
            losses.append(loss.detach())
        if world_size > 1:  # DDP averages the model's gradients only
            for param in (p for p in objective_params if p.grad is not None):
                dist.all_reduce(param.grad)
                param.grad /= world_size
        if config.clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([*model.parameters(), *objective_params], config.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return seen, correct, loss_sum, torch.stack(losses)

    def save(tag_epoch: int, tag_step: int, stats: dict, metrics: dict | None = None) -> str:
        tag = f'step-{tag_epoch * steps_per_epoch + tag_step:07d}'
        if is_main:
            meta = dict(model=config.model, model_kwargs=dict(model_kwargs, num_classes=data.num_classes),
                        threads=threads, epoch=tag_epoch, step=tag_step, metrics=metrics, history=history,
                        epoch_stats=stats, config=dataclasses.asdict(config))
            state = dict(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         scaler=scaler.state_dict(), rng=rng_state(),
                         ema=ema.state_dict() if ema is not None else None,
                         objectives={name: objective.state_dict() for name, objective in objectives.items()})
            checkpoints.save(tag, model, meta, state, metric=metrics['top1'] if metrics else None,
                             evaluated_model=ema.module if ema is not None else model)
        return tag

    # The loop. Running metrics stay on the device; the host reads them (one sync) only to log or save.
    last_good = CheckpointManager.latest_in(output)
    if epoch >= config.epochs and is_main:
        print(f'{output} already finished its {config.epochs} epochs; nothing to train', flush=True)
    while epoch < config.epochs:
        model.train()
        sampler.set_position(epoch, step * config.batch_size * config.accum_steps)
        batches = iter(train_loader)
        bar = tqdm(total=steps_per_epoch, initial=step, desc=f'epoch {epoch + 1}/{config.epochs}',
                   # None: no bar when the output is not a terminal (a log file gets the epoch lines only)
                   disable=None if config.progress and is_main else True, leave=False)
        # Running training metrics of this epoch (restored on resume, so the summary matches an uninterrupted run).
        seen = epoch_stats['seen']
        correct = torch.tensor(epoch_stats['correct'], device=device)
        loss_sum = torch.tensor(epoch_stats['loss_sum'], dtype=torch.float64, device=device)
        unchecked, start, start_seen = [], time.perf_counter(), seen
        while step < steps_per_epoch:
            step_seen, step_correct, step_loss_sum, losses = train_step(batches)
            seen, correct, loss_sum = seen + step_seen, correct + step_correct, loss_sum + step_loss_sum
            step += 1
            unchecked.append((step, losses))
            scheduler.step_update(epoch * steps_per_epoch + step)
            if ema is not None:
                ema.update(model, step=epoch * steps_per_epoch + step)
            bar.update()
            to_save = config.save_every_steps and step % config.save_every_steps == 0 and step < steps_per_epoch
            if to_save or step % LOG_EVERY_STEPS == 0 or step == steps_per_epoch:
                check_finite(unchecked, epoch, last_good, output)
                bar.set_postfix(loss=f'{loss_sum.item() / seen:.4f}', acc=f'{100 * correct.item() / seen:.1f}',
                                img_s=f'{world_size * (seen - start_seen) / (time.perf_counter() - start):.0f}')
            if to_save:
                last_good = save(epoch, step, dict(seen=seen, correct=correct.item(), loss_sum=loss_sum.item()))
        bar.close()
        train_speed = (seen - start_seen) / (time.perf_counter() - start)  # this process, training steps only

        totals = torch.stack([torch.tensor(seen, dtype=torch.float64, device=device), correct.double(), loss_sum])
        if world_size > 1:  # the epoch's training metrics over every process's share
            dist.all_reduce(totals)
        seen, correct, loss_sum = int(totals[0]), int(totals[1]), float(totals[2])
        metrics = evaluate_model(ema.module if ema is not None else model, val_loader, device).metrics()
        history.append(dict(epoch=epoch + 1, train_loss=loss_sum / max(seen, 1),
                            train_top1=100 * correct / max(seen, 1), val_loss=metrics['loss'],
                            val_top1=metrics['top1'], val_top5=metrics['top5'],
                            lr=optimizer.param_groups[0]['lr'], train_images_per_s=round(train_speed, 1)))
        epoch, step, epoch_stats = epoch + 1, 0, dict(seen=0, correct=0, loss_sum=0.)
        last_good = save(epoch, 0, epoch_stats, metrics)
        if is_main:
            write_summary(output, history)
            print(f'epoch {epoch}/{config.epochs}: train loss {history[-1]["train_loss"]:.4f}, train top-1 '
                  f'{history[-1]["train_top1"]:.2f}%, val top-1 {metrics["top1"]:.2f}%, val loss '
                  f'{metrics["loss"]:.4f}, {history[-1]["train_images_per_s"]:.0f} train images/s', flush=True)

    for objective in objectives.values():
        objective.remove()
    final = history[-1] if history else {}
    if is_main:
        plot_curves(output, history)
        write_json(output / 'final.json', final)
    if world_size > 1:
        dist.barrier()
    return final


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
