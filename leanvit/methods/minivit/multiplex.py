"""Compress a pre-trained DeiT/ViT or Swin into a weight-multiplexed MiniViT student (`multiplex`).

The official MiniViT code trains its students from random initialisation (Zhang et al., "MiniViT", CVPR 2022,
Sec. 4.1). leanvit starts them from the teacher they compress instead: each shared block takes the weights of the
teacher layers it replaces (the first of them, their mean, or a chosen one), every student layer keeps its own
teacher layer's LayerNorms, and the weight transformations start where they change nothing (head mixing at the
identity, iRPE tables at zero). With ``share=1`` the student computes exactly the teacher's function; with sharing,
`agreement` says how far the untrained student is from the teacher, before weight distillation closes the gap
(`leanvit.methods.minivit.weight_distillation`, through the training engine).

Not identity-equivalent, hence off by default here: Mini-Swin's MLP transformation (``local_conv``), whose
LayerNorm replaces the residual stream (docs/minivit.md, "leanvit choices").
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import DataLoader

from leanvit.errors import RunDirectoryError, UsageError
from leanvit.io.data import build_datasets
from leanvit.io.files import write_json
from leanvit.io.weights import load_checkpoint, save_weights
from leanvit.models import create_model
from leanvit.models.minivit import HeadMixing
from leanvit.train import train
from leanvit.train.config import as_recorded
from leanvit.train.engine import teacher_spec
from leanvit.train.evaluation import data_config, run_metadata, trained_model_spec
from leanvit.train.run_directory import RunLock, read_sidecar

STRATEGIES = ('first', 'mean')


@dataclass
class MultiplexReport:
    """What `multiplex` built and copied: the student is ``timm.create_model(model, **model_kwargs)`` (so a run can
    rebuild it), ``groups`` maps each shared block to the teacher layers it stands for."""
    model: str
    model_kwargs: dict
    teacher_params: int
    student_params: int = 0
    groups: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        ratio = self.teacher_params / self.student_params
        lines = [f'student {self.student_params:,} parameters, teacher {self.teacher_params:,} ({ratio:.2f}x fewer)']
        lines += [f'{block} <- {", ".join(layers)}' for block, layers in self.groups.items()]
        return '\n'.join(lines + self.notes)


def _layer_source(strategy: str | int, share: int) -> str | int:
    if strategy in STRATEGIES:
        return strategy
    if isinstance(strategy, int) and not isinstance(strategy, bool) and 0 <= strategy < share:
        return strategy
    raise UsageError(f"init (--shared-init) must be one of {', '.join(STRATEGIES)} or the index of a layer within "
                     f"each group of {share} (0..{share - 1}), got {strategy!r}")


@torch.no_grad()
def _init_shared(target: nn.Module, sources: list[nn.Module], strategy: str | int):
    """Copy into ``target`` the parameters of ``sources`` (teacher blocks): one of them, or their mean."""
    params = dict(target.named_parameters())
    for name, value in params.items():
        values = [_fit(dict(source.named_parameters())[name], value, name) for source in sources]
        value.copy_(torch.stack(values).mean(0) if strategy == 'mean' else values[0 if strategy == 'first'
                                                                                 else strategy])


def _fit(source: torch.Tensor, target: torch.Tensor, name: str) -> torch.Tensor:
    """``source`` shaped as ``target``. A Swin stage whose map is smaller than the window has a smaller relative
    position bias table in timm (sized for the shrunk window); here the table is sized for the configured window and
    the shrunk window uses its central offsets, so the teacher's table goes there."""
    if source.shape == target.shape or not name.endswith('relative_position_bias_table'):
        return source
    small, big = round(source.shape[0] ** 0.5), round(target.shape[0] ** 0.5)
    start = (big - small) // 2
    table = torch.zeros(big, big, target.shape[1], dtype=source.dtype)
    table[start:start + small, start:start + small] = source.view(small, small, -1)
    return table.view_as(target)


def _shared_block_view(block: nn.Module) -> nn.Module:
    """The shared part of a block, teacher's or student's: attn and mlp (the norms are per layer)."""
    view = nn.Module()
    view.attn, view.mlp = block.attn, block.mlp
    return view


@torch.no_grad()
def _fill_stage(stage, teacher_blocks: list[nn.Module], teacher_names: list[str], strategy, report, prefix: str):
    repeats = stage.repeats
    for index, block in enumerate(stage.blocks):
        group = teacher_blocks[index * repeats:(index + 1) * repeats]
        _init_shared(_shared_block_view(block), [_shared_block_view(b) for b in group], strategy)
        report.groups[f'{prefix}.blocks.{index}'] = teacher_names[index * repeats:(index + 1) * repeats]
        for repeat, teacher_block in enumerate(group):
            layer = stage.layers[index * repeats + repeat]
            layer.norm1.load_state_dict(teacher_block.norm1.state_dict())
            layer.norm2.load_state_dict(teacher_block.norm2.state_dict())
            for module in (layer.mix_logits, layer.mix_probs):
                if isinstance(module, HeadMixing):
                    module.identity_()
            if layer.rpe is not None:
                nn.init.zeros_(layer.rpe.lookup_table_weight)


def _check_plain_blocks(blocks: list[nn.Module], kind: str):
    for i, block in enumerate(blocks):
        extras = [name for name in ('ls1', 'ls2') if not isinstance(getattr(block, name, nn.Identity()), nn.Identity)]
        if extras or not isinstance(getattr(block.attn, 'q_norm', nn.Identity()), nn.Identity):
            raise UsageError(f'{kind} block {i} has layer scale or q/k norms, which MiniViT students do not have; '
                             f'expected a DeiT/ViT or Swin of the original form')


def multiplex(teacher: nn.Module, share: int = 2, init: str | int = 'first', attn_transform: bool = True,
              local_conv: bool = False, rpe: bool = False) -> tuple[nn.Module, MultiplexReport]:
    """A MiniViT student of ``teacher`` (a timm ``VisionTransformer`` (DeiT/ViT) or ``SwinTransformer``), sharing
    each block across ``share`` consecutive layers, initialised from the teacher (module docstring).

    Args:
        teacher: The pre-trained model; left unchanged.
        share: Consecutive layers per shared block; must divide every stage's depth. 1 shares nothing.
        init: Which teacher weights a shared block takes: 'first' (of the layers it replaces), 'mean', or the index
            of a layer within each group.
        attn_transform, local_conv, rpe: The student's weight transformations (`MiniDeiT` / `MiniSwin`); ``rpe``
            for DeiT students only.

    Returns:
        The student (same input size, classes and widths as the teacher) and a report of what was copied.

    Raises:
        UsageError: an unsupported teacher, a ``share`` that does not divide a depth, an unknown ``init``.
    """

    if not isinstance(share, int) or share < 1:
        raise UsageError(f'share must be a positive number of layers per shared block, got {share!r}')
    strategy = _layer_source(init, share)
    if isinstance(teacher, VisionTransformer):
        student, report = _multiplex_vit(teacher, share, strategy, attn_transform, local_conv, rpe)
    elif isinstance(teacher, SwinTransformer):
        if rpe:
            raise UsageError('rpe (iRPE) is a Mini-DeiT transformation; a Swin student has none')
        student, report = _multiplex_swin(teacher, share, strategy, attn_transform, local_conv)
    else:
        raise UsageError(f'cannot multiplex a {type(teacher).__name__}; expected a timm VisionTransformer '
                         f'(DeiT/ViT) or SwinTransformer')
    report.student_params = sum(p.numel() for p in student.parameters())
    return student.train(teacher.training), report


def _build(model: str, kwargs: dict, teacher: nn.Module, norm: nn.Module, default_eps: float):
    if not isinstance(norm, nn.LayerNorm) or norm.eps != default_eps:
        raise UsageError(f"the teacher's norms ({norm}) are not the student's LayerNorm(eps={default_eps})")
    # The student sees images as its teacher was trained to see them (timm's ViTs normalise with 0.5, not ImageNet's
    # statistics), so that its start is the teacher's function and distillation compares like with like.
    cfg = teacher.pretrained_cfg
    kwargs['pretrained_cfg_overlay'] = {key: list(cfg[key]) if isinstance(cfg[key], tuple) else cfg[key]
                                        for key in ('mean', 'std', 'interpolation', 'crop_pct') if key in cfg}
    teacher_params = sum(p.numel() for p in teacher.parameters())
    return timm.create_model(model, **kwargs), MultiplexReport(model, kwargs, teacher_params)


def _square(size) -> int:
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if size[0] != size[1]:
        raise UsageError(f'the teacher has a non-square patch or image size {size}; a student needs square ones')
    return size[0]


@torch.no_grad()
def _multiplex_vit(teacher, share, strategy, attn_transform, local_conv, rpe):
    blocks = list(teacher.blocks)
    depth = len(blocks)
    if depth % share:
        raise UsageError(f'share={share} does not divide the teacher\'s {depth} layers; expected a divisor of {depth}')
    _check_plain_blocks(blocks, 'ViT')
    embed = teacher.patch_embed
    dim = teacher.embed_dim
    kwargs = dict(img_size=_square(embed.img_size), patch_size=_square(embed.patch_size),
                  in_chans=embed.proj.in_channels, num_classes=teacher.num_classes, embed_dim=dim, depth=depth,
                  num_heads=blocks[0].attn.num_heads, mlp_ratio=blocks[0].mlp.fc1.out_features / dim, share=share,
                  attn_transform=attn_transform, local_conv=local_conv, rpe=rpe)
    student, report = _build('mini_deit_tiny_patch16_224', kwargs, teacher, blocks[0].norm1, 1e-6)
    student.patch_embed.load_state_dict(embed.state_dict())
    prefix = 0 if teacher.no_embed_class else teacher.num_prefix_tokens
    student.pos_embed.copy_(teacher.pos_embed[:, prefix:])
    if teacher.num_prefix_tokens:
        report.notes.append(f'the teacher\'s {teacher.num_prefix_tokens} class/register token(s) have no place in '
                            'the student, which classifies the average of its tokens (Mini-DeiT)')
    _fill_stage(student.stages[0], blocks, [f'blocks.{i}' for i in range(depth)], strategy, report, 'stages.0')
    final_norm = teacher.norm if isinstance(teacher.fc_norm, nn.Identity) else teacher.fc_norm
    student.norm.load_state_dict(final_norm.state_dict())
    if not isinstance(teacher.fc_norm, nn.Identity):
        report.notes.append("the teacher normalises after pooling (fc_norm); the student's norm, taken from it, "
                            "acts before pooling")
    if teacher.num_classes:
        student.head.load_state_dict(teacher.head.state_dict())
    return student, report


@torch.no_grad()
def _multiplex_swin(teacher, share, strategy, attn_transform, local_conv):
    depths = [len(stage.blocks) for stage in teacher.layers]
    if any(depth % share for depth in depths):
        raise UsageError(f'share={share} does not divide every stage depth of the teacher {depths}')
    all_blocks = [block for stage in teacher.layers for block in stage.blocks]
    _check_plain_blocks(all_blocks, 'Swin')
    first = teacher.layers[0].blocks[0]
    embed = teacher.patch_embed
    window = first.window_size[0] if isinstance(first.window_size, tuple) else first.window_size
    kwargs = dict(img_size=_square(embed.img_size), patch_size=_square(embed.patch_size),
                  in_chans=embed.proj.in_channels, num_classes=teacher.num_classes, embed_dim=teacher.embed_dim,
                  depths=depths, num_heads=[stage.blocks[0].attn.num_heads for stage in teacher.layers],
                  window_size=window, mlp_ratio=first.mlp.fc1.out_features / teacher.embed_dim,
                  distinct_blocks=[depth // share for depth in depths], attn_transform=attn_transform,
                  local_conv=local_conv, official_mask=False)
    student, report = _build('mini_swin_tiny_patch4_window7_224', kwargs, teacher, first.norm1, 1e-5)
    student.patch_embed.load_state_dict(embed.state_dict())
    for s, (stage, teacher_stage) in enumerate(zip(student.stages, teacher.layers)):
        if not isinstance(teacher_stage.downsample, nn.Identity):
            stage.downsample.load_state_dict(teacher_stage.downsample.state_dict())
        names = [f'layers.{s}.blocks.{b}' for b in range(len(teacher_stage.blocks))]
        _fill_stage(stage, list(teacher_stage.blocks), names, strategy, report, f'stages.{s}')
    student.norm.load_state_dict(teacher.norm.state_dict())
    if teacher.num_classes:
        student.head.fc.load_state_dict(teacher.head.fc.state_dict())
    return student, report


@dataclass
class Agreement:
    """How close two models' outputs are on the same images."""
    images: int
    top1_agreement: float   # fraction of images on which both predict the same class
    logit_rmse: float       # root mean squared difference of the logits
    max_logit_error: float


@torch.no_grad()
def agreement(student: nn.Module, teacher: nn.Module, batches, max_images: int | None = None) -> Agreement:
    """Compare ``student`` with ``teacher`` in eval mode on ``batches`` of images (or (images, labels) pairs)."""
    modes = student.training, teacher.training
    student.eval(), teacher.eval()
    images = same = 0
    squared = worst = 0.
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if max_images is not None:
                x = x[:max_images - images]
            student_logits, teacher_logits = student(x).float(), teacher(x).float()
            difference = student_logits - teacher_logits
            same += int((student_logits.argmax(-1) == teacher_logits.argmax(-1)).sum())
            squared += float(difference.square().sum()) / difference.shape[-1]
            worst = max(worst, float(difference.abs().max()))
            images += x.shape[0]
            if max_images is not None and images >= max_images:
                break
    finally:
        student.train(modes[0]), teacher.train(modes[1])
    if not images:
        raise UsageError('agreement needs at least one image')
    return Agreement(images, same / images, (squared / images) ** 0.5, worst)


MULTIPLEXED = 'multiplexed.safetensors'
RECORD = 'compress.json'


def compress(config, share: int = 2, init: str | int = 'first', attn_transform: bool = True, local_conv: bool = False,
             rpe: bool = False, from_scratch: bool = False, resume_anyway: bool = False) -> dict:
    """`leanvit compress`: multiplex ``config.teacher`` (with its checkpoint) into a MiniViT student, report how
    close the untrained student is on the validation split, then train it through the engine with the teacher.

    ``from_scratch`` trains the same student architecture from random weights on the labels alone, without the
    teacher: the baseline that shows what starting from the teacher and distilling from it are worth.

    ``config`` is the run's `leanvit.train.TrainConfig`; its ``model``, ``model_kwargs`` and ``init_checkpoint`` are
    the student's, set here. The first call writes ``multiplexed.safetensors`` and ``compress.json`` (the student and
    the settings that made it) to the run directory; calling again with the same settings resumes the run from its
    last checkpoint, as `leanvit train` does, and other settings are refused unless ``resume_anyway``.
    """

    if not (config.teacher or config.teacher_checkpoint):
        raise UsageError('compress needs a teacher: --teacher-checkpoint FILE (a run\'s checkpoint names its model), '
                         'or --teacher NAME for a checkpoint of another origin or a new model')
    if not config.teacher:  # the teacher run's sidecar names it
        config = dataclasses.replace(config, teacher=trained_model_spec(config.teacher_checkpoint,
                                                                        name_flag='--teacher')[0])
    recorded = (run_metadata(Path(config.teacher_checkpoint)).get('config') or {}) if config.teacher_checkpoint else {}
    if config.data is None and recorded.get('data') is not None:
        # The student learns the teacher's task: without --data, the teacher run's data and split.
        config = dataclasses.replace(config, data=recorded['data'],
                                     val_split=config.val_split if config.val_split is not None
                                     else recorded.get('val_split'))
        print(f'data       the teacher run\'s: {config.data}' + (f', val_split {config.val_split}'
                                                                  if config.val_split is not None else ''), flush=True)
    if config.model_kwargs or config.init_checkpoint:
        raise UsageError('compress builds the student from the teacher: give no model_kwargs or init_checkpoint')
    output = Path(config.output)
    settings = dict(teacher=config.teacher, teacher_checkpoint=config.teacher_checkpoint,
                    teacher_kwargs=config.teacher_kwargs, img_size=config.img_size, share=share, init=init,
                    attn_transform=attn_transform, local_conv=local_conv, rpe=rpe, from_scratch=from_scratch)
    # One process at a time makes (or checks) the student; the engine then takes the folder for the training.
    with RunLock(output):
        if (output / RECORD).exists() and (from_scratch or (output / MULTIPLEXED).exists()):
            report = _recorded_student(output / RECORD, settings, resume_anyway)
        else:
            report = _multiplexed_student(config, output, settings, share, init, attn_transform, local_conv, rpe,
                                          from_scratch)
    # The engine gives the model the data's classes. `pretrained` would only load weights that the multiplexed start
    # (or the random one of a baseline) replaces.
    kwargs = {k: v for k, v in report['model_kwargs'].items()
              if k not in ('num_classes', 'pretrained', 'checkpoint_path')}
    if from_scratch:
        student_config = dataclasses.replace(config, model=report['model'], model_kwargs=kwargs, teacher=None,
                                             teacher_checkpoint=None, teacher_kwargs={}, objectives={})
    else:  # weight distillation is the default objective (paper Sec. 3.3)
        student_config = dataclasses.replace(config, model=report['model'], model_kwargs=kwargs,
                                             init_checkpoint=str(output / MULTIPLEXED),
                                             objectives=config.objectives or {'weight_distillation': {}})
    return train(student_config, resume_anyway=resume_anyway)


def _multiplexed_student(config, output: Path, settings: dict, share, init, attn_transform, local_conv, rpe,
                         from_scratch: bool) -> dict:
    """Build the teacher, multiplex it, say how close the untrained student is, and write both files (only the
    record for a baseline ``from_scratch``, which needs the student's architecture and nothing of its weights)."""


    teacher_name, teacher_kwargs = teacher_spec(config)
    probe = create_model(teacher_name, **teacher_kwargs)
    data = build_datasets(config.data, data_config(probe, config.img_size), val_split=config.val_split,
                          augment='none', bad_images=config.bad_images, seed=config.seed)
    teacher = create_model(teacher_name, num_classes=data.num_classes, **teacher_kwargs).eval()
    if config.teacher_checkpoint:
        load_checkpoint(teacher, config.teacher_checkpoint, trust=config.trust_teacher_checkpoint)
    student, report = multiplex(teacher, share, init, attn_transform, local_conv, rpe)
    if from_scratch:
        print(f'{report.summary().splitlines()[0]}; trained from scratch on the labels, as a baseline', flush=True)
        report = dataclasses.asdict(report)
        write_json(output / RECORD, dict(report=report, settings=settings))
        return report
    close = agreement(student, teacher, DataLoader(data.val, config.batch_size), max_images=1000)
    print(f'{report.summary()}\nuntrained student vs teacher on {close.images} validation images: top-1 '
          f'agreement {close.top1_agreement:.1%}, logit RMSE {close.logit_rmse:.3g}', flush=True)
    save_weights(student, output / MULTIPLEXED)
    report = dataclasses.asdict(report)
    # Written last: a kill before this leaves no record, and the next call multiplexes again.
    write_json(output / RECORD, dict(report=report, untrained_agreement=dataclasses.asdict(close), settings=settings))
    return report


def _recorded_student(record: Path, settings: dict, resume_anyway: bool) -> dict:
    """The student ``compress.json`` records (its fields checked), if it was made with ``settings``; a run made with
    others is refused, naming them, unless ``resume_anyway`` (which then resumes the recorded student)."""

    meta = read_sidecar(record)
    report, recorded = meta.get('report'), meta.get('settings')
    if not (isinstance(report, dict) and isinstance(report.get('model'), str)
            and isinstance(report.get('model_kwargs'), dict)):
        raise RunDirectoryError(f'{record}: field "report" must hold the student\'s "model" (a name) and '
                                f'"model_kwargs" (a JSON object), got {report!r}')
    if not isinstance(recorded, dict):
        raise RunDirectoryError(f'{record}: field "settings" must be a JSON object of the compress settings, got '
                                f'{recorded!r}; it is corrupt, or was written by an older leanvit: move the folder '
                                f'aside to start over')
    changed = [f'{name}: {recorded.get(name)!r} -> {value!r}' for name, value in settings.items()
               if recorded.get(name) != as_recorded(value)]
    if changed and not resume_anyway:
        raise UsageError(f'{record.parent} holds a compressed student made with other settings ({"; ".join(changed)}): '
                         f'run with its settings to resume it, choose another --output for a new student, or pass '
                         f'--resume-anyway to resume the recorded one')
    if changed:
        print(f'{record.parent}: resuming the recorded student, not one made with the new settings '
              f'({"; ".join(changed)})', flush=True)
    return report
