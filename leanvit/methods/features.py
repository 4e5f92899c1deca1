"""The features of a model's blocks, as the methods that distil or analyse them read them: where a model's blocks and
their attention projections are (`blocks_by_stage`, `qkv_projection`), taps that record any module's input and output
by its name without editing model code, the layouts a block output comes in, and the feature losses on them."""

import difflib
import re

import torch
import torch.nn.functional as F
from torch import nn

# What a stage keeps its blocks in. Only these exact types: a subclass is a module of its own (SReT's ConvStem is an
# nn.Sequential subclass), not a list of blocks.
_CONTAINERS = (nn.ModuleList, nn.Sequential)


def blocks_by_stage(model: nn.Module, pattern: str | None = None) -> list[list[str]]:
    r"""The module names of ``model``'s transformer or MetaFormer blocks, grouped by stage, in forward order.

    A model may say where its blocks are with a method ``block_names() -> list[list[str]]``, this function's result.
    Otherwise they are read from the structure that timm's models and leanvit's share. Each module that
    ``feature_info`` names, in forward order, is:

    - a stage, when it keeps its blocks in a ``blocks`` child that is an ``nn.ModuleList`` or ``nn.Sequential``
      (SReT, RIFormer, Mini-Swin, timm's Swin and PoolFormer) or is such a container itself (GFNet-H's
      ``blocks.S``): the container's children are the stage's blocks;
    - else a block (timm's ViT / DeiT, GLiT, GFNet, Mini-DeiT), and consecutive blocks of one parent module are one
      stage. An entry without parameters (a stem's activation) is no block.

    A model without ``feature_info`` has one stage per outermost ``blocks`` container, its children the blocks. A
    block whose weights are shared (SReT, MiniViT) is one module however often it runs, so it is listed once, under
    its first name; hooks on it fire once per application.

    Args:
        model: The model.
        pattern: Instead of the above, a regular expression that the blocks' names match whole (``re.fullmatch``):
            the outermost matching modules, in model order. Its first group, where it has one, names the stage
            (``blocks\.(\d+)\.\d+``: GFNet-H's stages); without a group all blocks are one stage.

    Raises:
        ValueError: ``pattern`` is not a regular expression or matches no module, or no blocks were found.
    """
    if pattern is not None:
        return _blocks_matching(model, pattern)
    stages = model.block_names() if callable(getattr(model, 'block_names', None)) else _structural_stages(model)
    seen, found = set(), []
    for stage in stages:
        blocks = []
        for name in stage:
            block = model.get_submodule(name)
            if id(block) not in seen:
                seen.add(id(block))
                blocks.append(name)
        if blocks:  # a stage of depth 0 pairs with nothing
            found.append(blocks)
    if not found:
        raise ValueError(f'found no blocks in {type(model).__name__}: its feature_info names no stage or block, it '
                         f'has no blocks container and no block_names() method; name them with a block pattern')
    return found


def _structural_stages(model: nn.Module) -> list[list[str]]:
    modules = dict(model.named_modules())
    info = getattr(model, 'feature_info', None)
    entries = getattr(info, 'info', info) or []  # timm's FeatureInfo of a features_only model, or its list of dicts
    names = [entry['module'] for entry in entries if isinstance(entry, dict) and entry.get('module') in modules]
    if not names:
        for name, module in modules.items():
            if name.rpartition('.')[2] == 'blocks' and type(module) in _CONTAINERS \
                    and not any(name.startswith(outer + '.') for outer in names):
                names.append(name)
    stages, parent = [], None
    for name in names:
        module = modules[name]
        container = module.blocks if type(getattr(module, 'blocks', None)) in _CONTAINERS else module
        if type(container) in _CONTAINERS:
            prefix = name if container is module else f'{name}.blocks'
            stages.append([f'{prefix}.{child}' for child, _ in container.named_children()])
            parent = None
        elif next(module.parameters(), None) is not None:
            if name.rpartition('.')[0] != parent:
                parent = name.rpartition('.')[0]
                stages.append([])
            stages[-1].append(name)
    return stages


def _blocks_matching(model: nn.Module, pattern: str) -> list[list[str]]:
    try:
        block = re.compile(pattern)
    except re.error as e:
        raise ValueError(f'block pattern {pattern!r} is not a regular expression: {e}') from None
    stages: dict[str | None, list[str]] = {}
    matched = []
    for name, _ in model.named_modules():
        if (match := block.fullmatch(name)) and not any(name.startswith(outer + '.') for outer in matched):
            matched.append(name)
            stages.setdefault(match.group(1) if block.groups else None, []).append(name)
    if not stages:
        raise ValueError(f'no module of {type(model).__name__} matches the block pattern {pattern!r}; its top-level '
                         f'modules are {", ".join(name for name, _ in model.named_children())}')
    return list(stages.values())


def qkv_projection(block: nn.Module) -> str | None:
    """The name, inside ``block``, of its fused q, k, v projection, or None where it has none (a pooling, filter or
    convolution block).

    It is the first module registered as ``qkv`` (the ``nn.Linear`` of timm's Attention and WindowAttention and of
    leanvit's attention modules, GLiT's under its mixer, the GLiT supernet's sliced one), else the first ``nn.Linear``
    with three times as many outputs as inputs inside a module registered as ``attn``. Its output holds the raw q, k
    and v side by side on the last axis.
    """
    for name, _ in block.named_modules():
        if name.rpartition('.')[2] == 'qkv':
            return name
    for name, module in block.named_modules():
        if 'attn' in name.split('.')[:-1] and isinstance(module, nn.Linear) \
                and module.out_features == 3 * module.in_features:
            return name
    return None


class FeatureTaps:
    """Forward hooks that keep the latest output (and optionally first input) of the named modules of ``model``.

    ``taps.outputs[name]`` / ``taps.inputs[name]`` hold the tensors of the last forward, with their autograd graph,
    so a loss on them trains the model. Use as a context manager, or call `remove` when done. A name that is not a
    module of ``model`` is an error that lists the closest names.
    """

    def __init__(self, model: nn.Module, names: list[str], inputs: bool = False):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            hints = {n: difflib.get_close_matches(n, modules, n=3) for n in missing}
            raise KeyError(f'{type(model).__name__} has no module named {missing}; closest names: {hints}')
        self.outputs: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n, inputs)) for n in names]

    def _hook(self, name: str, keep_input: bool):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor):
            self.outputs[name] = output
            if keep_input and args:  # a module called with keyword arguments only has no positional input to keep
                self.inputs[name] = args[0]
        return hook

    def clear(self):
        self.outputs.clear()
        self.inputs.clear()

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> 'FeatureTaps':
        return self

    def __exit__(self, *exc):
        self.remove()


LAYOUTS = ('NCHW', 'NHWC', 'NLC')


def as_tokens(x: torch.Tensor, layout: str = 'NCHW') -> torch.Tensor:
    """(B, N, C) tokens of a feature in ``layout``: NCHW maps (RIFormer, PoolFormer), NHWC (GFNet) or NLC tokens."""
    if layout not in LAYOUTS:
        raise ValueError(f'feature layout must be one of {LAYOUTS}, got {layout!r}')
    expected_ndim = 3 if layout == 'NLC' else 4
    if x.ndim != expected_ndim:
        raise ValueError(f'a {layout} feature has {expected_ndim} dimensions, got shape {tuple(x.shape)}')
    if layout == 'NCHW':
        return x.flatten(2).transpose(1, 2)
    return x.flatten(1, 2) if layout == 'NHWC' else x


def feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between two features of one shape (L'_in on block outputs, L_out on mixer outputs)."""
    if student.shape != teacher.shape:
        raise ValueError(f'student feature {tuple(student.shape)} and teacher feature {tuple(teacher.shape)} differ; '
                         'feature matching needs equal shapes (use the relation term for teachers of other widths)')
    return F.mse_loss(student.float(), teacher.float())


def relation_matrix(x: torch.Tensor, layout: str = 'NCHW') -> torch.Tensor:
    """(B, N, N) cosine similarities between the tokens of each image."""
    tokens = F.normalize(as_tokens(x, layout).float(), dim=-1)
    return tokens @ tokens.transpose(1, 2)


def relation_mse(student: torch.Tensor, teacher: torch.Tensor, student_layout: str = 'NCHW',
                 teacher_layout: str = 'NCHW') -> torch.Tensor:
    """L_rel: mean squared error between the token relation matrices of two features of one resolution."""
    s, t = relation_matrix(student, student_layout), relation_matrix(teacher, teacher_layout)
    if s.shape != t.shape:
        raise ValueError(f'relation matrices {tuple(s.shape)} and {tuple(t.shape)} differ: the paired features need '
                         'the same number of tokens')
    return F.mse_loss(s, t)
