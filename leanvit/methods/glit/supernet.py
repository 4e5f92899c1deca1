"""GLiT's weight-sharing supernet and its single-path sampler (paper Sec. 3.3; the official code never shipped them).

Every block of `GLiTSupernet` holds one module per part at the largest size the search space allows (the global
heads' qkv at the largest qkv ratio, the local module at the largest expansion and kernel, the MLP at the largest
ratio), and an architecture runs as slices of them: ``global_heads`` heads of width ``qkv_ratio * head_dim`` read the
first channels, the local module the last ones through the first ``expansion * channels`` hidden channels and the
central ``kernel_size`` taps of the depthwise kernel, the MLP the first ``mlp_ratio * dim`` hidden units. So every
candidate of the space shares its weights with every other (weight entanglement, as AutoFormer, Chen et al., ICCV
2021, rather than one copy per candidate), `GLiTSupernet.extract` cuts any candidate out as a plain `GLiT`, and the
supernet's size does not grow with the number of choices.

The architecture a forward computes is explicit: ``with supernet.path(arch): supernet(x)`` runs ``arch``, and on
leaving the ``with`` block, by an exception too, the supernet is back on the architecture it ran before (outside any
``path``, the default one it was built with). Each layer computes its own slice, from the sizes (`ActivePath`) its
block hands it when a path is entered or left, so the forward calls every layer as a module, as in any timm model:
hooks fire on them, and a layer wrapped in a module that calls it still computes its slice. The sliced layers are
not ``nn.Linear`` / ``nn.Conv1d`` / ``nn.BatchNorm1d``: their sizes (``in_features``, ...) are those of the active
path, while their parameters are the largest layer's.

`PathSampling` trains it single-path (SPOS, Guo et al., ECCV 2020): each training forward runs inside the path of one
architecture drawn uniformly (per block: the number of global heads, then each low-level choice of that block type);
evaluation sees the default path. With ``sandwich: n`` it trains by the sandwich rule with in-place distillation
instead (BigNAS, Yu et al., ECCV 2020): per step the largest path on the labels, and the smallest path and ``n`` drawn
ones on the largest path's predictions (`extreme_architectures` says which paths are the largest and smallest).
"""

import contextlib
import copy
import math
import random
from collections.abc import Iterator, Sequence
from functools import cache, partial
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from torch import nn

from leanvit.errors import UsageError
from leanvit.io.weights import register_converter, unwrap_state_dict
from leanvit.models.glit import BlockArch, GLBlock, GLiT, SearchSpace, _cfg, load_architecture
from leanvit.train.objectives import register_objective

__all__ = ['ActivePath', 'GLiTSupernet', 'PathModule', 'PathSampling', 'SlicedBatchNorm', 'SlicedConv1d',
           'SlicedLinear', 'SuperBlock', 'extreme_architectures', 'glit_supernet', 'sample_architecture']


class ActivePath(NamedTuple):
    """The sizes one block's architecture takes from each of the block's layers. Immutable: a block hands a new one
    to its layers whenever it runs another architecture."""
    global_dim: int = 0  # channels of the global heads (the first ones)
    heads: int = 0  # global heads
    width: int = 0  # width of each global head
    local_dim: int = 0  # channels of the local module (the last ones)
    local_hidden: int = 0  # expansion * local_dim
    kernel_size: int = 1
    mlp_hidden: int = 0

    @classmethod
    def of(cls, arch: BlockArch, dim: int, num_heads: int) -> 'ActivePath':
        """The sizes of ``arch`` in a block of ``dim`` channels and ``num_heads`` heads."""
        global_dim = dim * arch.global_heads // num_heads
        local_dim = dim - global_dim
        return cls(global_dim=global_dim, heads=arch.global_heads, width=int(dim // num_heads * arch.qkv_ratio),
                   local_dim=local_dim, local_hidden=arch.expansion * local_dim, kernel_size=arch.kernel_size,
                   mlp_hidden=int(dim * arch.mlp_ratio))


class PathModule(nn.Module):
    """A part of a `SuperBlock` whose forward computes a slice of itself: ``active``, the sizes of the architecture
    the block runs, is handed to it by the block (`SuperBlock.path`) and is never changed in place."""

    active: ActivePath | None = None


def _init_like_torch(weight: torch.Tensor, bias: torch.Tensor) -> None:
    # PyTorch's default init of nn.Linear and nn.Conv1d (the same draws, in the same order), so that a sliced layer
    # starts as the candidate GLiT's layer does and draws as many numbers from the generator.
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    bound = 1 / math.sqrt(weight[0].numel())
    nn.init.uniform_(bias, -bound, bound)


class SlicedLinear(PathModule):
    """A linear layer of the supernet, computing ``sliced()``: the part of its weights the active architecture
    selects, under the parameter names of the candidate's ``nn.Linear``.

    Not an ``nn.Linear``: ``weight`` and ``bias`` hold the layer at its largest size (the names and shapes the
    supernet's checkpoints keep), while ``in_features`` and ``out_features`` are the sizes the forward reads and
    returns on the active path. Initialised as an ``nn.Linear``: PyTorch's default on construction, then, in a
    `GLiT`, GLiT's linear init (truncated normal, std 0.02, zero bias), which ``init_as_linear`` asks for.
    """

    # Read by GLiT's `_init_weights`, which initialises nn.Linear by type: so the supernet's linear init is GLiT's own,
    # applied in GLiT's module order, and a seed gives the weights an nn.Linear-based supernet had.
    init_as_linear = True

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init of ``nn.Linear``: its random draws keep the generator where an ``nn.Linear`` of this
        size leaves it, so the layers built after this one start from the same weights whatever the layer's class."""
        _init_like_torch(self.weight, self.bias)

    def sliced(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def in_features(self) -> int:
        return self.sliced()['weight'].shape[1]

    @property
    def out_features(self) -> int:
        return self.sliced()['weight'].shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, **self.sliced())

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f'in_features<={in_features}, out_features<={out_features}'


class SlicedConv1d(PathModule):
    """A conv of the supernet's local module, computing ``sliced()`` as `SlicedLinear` (and, like it, not an
    ``nn.Conv1d``: ``in_channels``, ``out_channels``, ``kernel_size`` and ``groups`` are those of the active path).
    Initialised as PyTorch initialises ``nn.Conv1d``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, groups: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        _init_like_torch(self.weight, self.bias)
        self._largest = f'in_channels<={in_channels}, out_channels<={out_channels}, kernel_size<={kernel_size}'

    def sliced(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def groups(self) -> int:
        return 1

    @property
    def in_channels(self) -> int:
        return self.sliced()['weight'].shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.sliced()['weight'].shape[0]

    @property
    def kernel_size(self) -> tuple[int]:
        return (self.sliced()['weight'].shape[2],)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, **self.sliced(), groups=self.groups)

    def extra_repr(self) -> str:
        return self._largest


class SlicedQKV(SlicedLinear):
    """qkv of all heads at the largest head width; computes the first ``heads`` heads, the first ``width`` units of
    each, over the first ``global_dim`` channels."""

    def __init__(self, dim: int, num_heads: int, max_head_dim: int):
        super().__init__(dim, 3 * num_heads * max_head_dim)
        self.num_heads, self.max_head_dim = num_heads, max_head_dim

    def sliced(self) -> dict[str, torch.Tensor]:
        p = self.active
        weight = self.weight.view(3, self.num_heads, self.max_head_dim, -1)[:, :p.heads, :p.width, :p.global_dim]
        bias = self.bias.view(3, self.num_heads, self.max_head_dim)[:, :p.heads, :p.width]
        return {'weight': weight.reshape(-1, p.global_dim), 'bias': bias.reshape(-1)}


class SlicedHeadProjection(SlicedLinear):
    """The global heads' output projection, from the same heads and units as `SlicedQKV` to ``global_dim``."""

    def __init__(self, dim: int, num_heads: int, max_head_dim: int):
        super().__init__(num_heads * max_head_dim, dim)
        self.num_heads, self.max_head_dim = num_heads, max_head_dim

    def sliced(self) -> dict[str, torch.Tensor]:
        p = self.active
        weight = self.weight.view(-1, self.num_heads, self.max_head_dim)[:p.global_dim, :p.heads, :p.width]
        return {'weight': weight.reshape(p.global_dim, -1), 'bias': self.bias[:p.global_dim]}


class SlicedGLUPointwise(SlicedConv1d):
    """The local module's first pointwise conv (values and gates of the GLU): the first ``local_hidden`` of each
    half, from the last ``local_dim`` channels."""

    def __init__(self, dim: int, max_hidden: int):
        super().__init__(dim, 2 * max_hidden, 1)
        self.max_hidden = max_hidden

    def sliced(self) -> dict[str, torch.Tensor]:
        p = self.active
        weight = self.weight.view(2, self.max_hidden, -1, 1)[:, :p.local_hidden, -p.local_dim:]
        bias = self.bias.view(2, self.max_hidden)[:, :p.local_hidden]
        return {'weight': weight.reshape(2 * p.local_hidden, p.local_dim, 1), 'bias': bias.reshape(-1)}


class SlicedDepthwise(SlicedConv1d):
    """The depthwise conv at the largest kernel: the first ``local_hidden`` channels, the central ``kernel_size``
    taps (Once-for-All's elastic kernel, Cai et al., ICLR 2020, without its kernel transformation). Its input comes
    padded for ``kernel_size``, as in `ConvModule`."""

    def __init__(self, max_hidden: int, max_kernel_size: int):
        super().__init__(max_hidden, max_hidden, max_kernel_size, groups=max_hidden)

    @property
    def groups(self) -> int:
        return self.active.local_hidden

    def sliced(self) -> dict[str, torch.Tensor]:
        p = self.active
        trim = (self.weight.shape[2] - p.kernel_size) // 2
        return {'weight': self.weight[:p.local_hidden, :, trim:trim + p.kernel_size],
                'bias': self.bias[:p.local_hidden]}


class SlicedPointwiseOut(SlicedConv1d):
    """The local module's last pointwise conv: from the first ``local_hidden`` channels to the last ``local_dim``."""

    def __init__(self, max_hidden: int, dim: int):
        super().__init__(max_hidden, dim, 1)

    def sliced(self) -> dict[str, torch.Tensor]:
        p = self.active
        return {'weight': self.weight[-p.local_dim:, :p.local_hidden], 'bias': self.bias[-p.local_dim:]}


class SlicedBatchNorm(PathModule):
    """The depthwise conv's BatchNorm over its first ``local_hidden`` channels (``num_features`` on the active path).
    Its parameters and statistics, at the largest size, have ``nn.BatchNorm1d``'s names; the slices of the running
    statistics are views, so training updates them in place. ``momentum=None`` makes the statistics a cumulative
    average (BatchNorm recalibration), as in ``nn.BatchNorm1d``; ``reset_running_stats`` starts them again."""

    def __init__(self, max_hidden: int, eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(max_hidden))
        self.bias = nn.Parameter(torch.zeros(max_hidden))
        self.register_buffer('running_mean', torch.zeros(max_hidden))
        self.register_buffer('running_var', torch.ones(max_hidden))
        self.register_buffer('num_batches_tracked', torch.tensor(0, dtype=torch.long))

    @property
    def num_features(self) -> int:
        return self.active.local_hidden

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def sliced(self) -> dict[str, torch.Tensor]:
        hidden = self.active.local_hidden
        return {name: getattr(self, name)[:hidden] for name in ('weight', 'bias', 'running_mean', 'running_var')}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.sliced()
        momentum = self.momentum
        if self.training and momentum is None:
            self.num_batches_tracked.add_(1)
            momentum = 1. / float(self.num_batches_tracked)
        return F.batch_norm(x, w['running_mean'], w['running_var'], w['weight'], w['bias'], self.training,
                            momentum or 0., self.eps)

    def extra_repr(self) -> str:
        return f'num_features<={self.weight.shape[0]}, eps={self.eps}, momentum={self.momentum}'


class SlicedHidden(SlicedLinear):
    """An MLP layer at the largest ratio, computing the first ``mlp_hidden`` hidden units: into them (fc1) or out of
    them (fc2)."""

    def __init__(self, in_features: int, out_features: int, into_hidden: bool):
        super().__init__(in_features, out_features)
        self.into_hidden = into_hidden

    def sliced(self) -> dict[str, torch.Tensor]:
        hidden = self.active.mlp_hidden
        if self.into_hidden:
            return {'weight': self.weight[:hidden], 'bias': self.bias[:hidden]}
        return {'weight': self.weight[:, :hidden], 'bias': self.bias}


class SuperGlobalAttention(PathModule):
    """Global heads of every size (`leanvit.models.glit.GlobalAttention` at all heads and the largest qkv ratio)."""

    def __init__(self, dim: int, num_heads: int, max_head_dim: int):
        super().__init__()
        self.qkv = SlicedQKV(dim, num_heads, max_head_dim)
        self.proj = SlicedHeadProjection(dim, num_heads, max_head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        heads, width = self.active.heads, self.active.width
        q, k, v = self.qkv(x).reshape(B, N, 3, heads, width).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, heads * width))


class SuperConvModule(PathModule):
    """The local module of every size (`leanvit.models.glit.ConvModule` at the largest expansion and kernel)."""

    def __init__(self, dim: int, max_expansion: int, max_kernel_size: int, act_layer: type[nn.Module] = nn.SiLU):
        super().__init__()
        hidden = max_expansion * dim
        self.pw1 = SlicedGLUPointwise(dim, hidden)
        self.dw = SlicedDepthwise(hidden, max_kernel_size)
        self.norm = SlicedBatchNorm(hidden)
        self.act = act_layer()
        self.pw2 = SlicedPointwiseOut(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.glu(self.pw1(x.transpose(1, 2)), dim=1)
        x = self.dw(F.pad(x, (self.active.kernel_size // 2,) * 2))
        return self.pw2(self.act(self.norm(x))).transpose(1, 2)


class SuperMlp(nn.Module):
    """The MLP at the largest ratio."""

    def __init__(self, dim: int, max_hidden: int, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = SlicedHidden(dim, max_hidden, into_hidden=True)
        self.act = act_layer()
        self.fc2 = SlicedHidden(max_hidden, dim, into_hidden=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SuperBlock(nn.Module):
    """Every `GLBlock` of a search space in one. ``arch`` (a `BlockArch`) is the candidate the forward runs: the
    block's ``arch`` argument outside any `path` context. The norms are shared by all candidates, as in the official
    retraining model. The arguments before ``space`` are `GLBlock`'s, so that `GLiT` builds it as a ``block_fn``.

    Args:
        dim: Channels.
        num_heads: Heads.
        arch: The candidate the block runs by default.
        drop_path: Stochastic depth rate of both residual branches.
        proj_drop: Must be 0: the supernet has no dropout inside its blocks.
        norm_layer, act_layer, conv_act_layer: As `GLBlock`.
        space: The search space whose every block this one computes.
    """

    def __init__(self, dim: int, num_heads: int, arch: BlockArch, drop_path: float = 0., proj_drop: float = 0.,
                 norm_layer: type[nn.Module] = nn.LayerNorm, act_layer: type[nn.Module] = nn.GELU,
                 conv_act_layer: type[nn.Module] = nn.SiLU, *, space: SearchSpace = SearchSpace()):
        if proj_drop:
            raise ValueError('the supernet has no dropout inside its blocks (proj_drop_rate must be 0)')
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        head_dim = dim // num_heads
        self.norm1 = norm_layer(dim)
        self.attn = SuperGlobalAttention(dim, num_heads,
                                         int(head_dim * max((*space.qkv_ratios, space.mixed_qkv_ratio))))
        self.local = SuperConvModule(dim, int(max(space.expansions)),
                                     int(max((*space.kernel_sizes, space.mixed_kernel_size))), conv_act_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = SuperMlp(dim, int(dim * max((*space.mlp_ratios, space.local_mlp_ratio))), act_layer)
        self._run(arch)

    @property
    def arch(self) -> BlockArch:
        return self._arch

    @property
    def active(self) -> ActivePath:
        return self._active

    def _run(self, arch: BlockArch) -> None:
        # The parts are looked up on every call rather than kept, so that one wrapped or replaced after construction
        # gets the sizes too.
        active = ActivePath.of(arch, self.dim, self.num_heads)
        for module in self.modules():
            if isinstance(module, PathModule):
                module.active = active
        self._arch, self._active = arch, active

    @contextlib.contextmanager
    def path(self, arch: BlockArch) -> Iterator[BlockArch]:
        """Within the context the forward computes ``arch``; on exit, an exception's included, the block runs what
        it ran before. `GLiTSupernet.path` checks ``arch`` against the space; this does not."""
        previous = self._arch
        self._run(arch)
        try:
            yield arch
        finally:
            self._run(previous)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        global_dim = self.active.global_dim
        if global_dim == self.dim:
            return self.attn(x)
        if global_dim == 0:
            return self.local(x)
        return torch.cat([self.attn(x[..., :global_dim]), self.local(x[..., global_dim:])], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mix(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def candidate_state(self) -> dict[str, torch.Tensor]:
        """The state of the `GLBlock` of the current ``arch`` (its parameter and buffer names), sliced from this
        block."""
        state = {f'norm{i}.{name}': value for i in (1, 2)
                 for name, value in getattr(self, f'norm{i}').state_dict().items()}
        parts = {'mlp': self.mlp}
        if self.active.global_dim:
            parts['mixer.attn'] = self.attn
        if self.active.local_dim:
            parts['mixer.local'] = self.local
            state['mixer.local.norm.num_batches_tracked'] = self.local.norm.num_batches_tracked.clone()
        for prefix, part in parts.items():
            state |= {f'{prefix}.{name}.{key}': value for name, layer in part.named_children()
                      if hasattr(layer, 'sliced') for key, value in layer.sliced().items()}
        return state


class GLiTSupernet(GLiT):
    """GLiT's weight-sharing supernet over a `SearchSpace`: a `GLiT` whose blocks are `SuperBlock` s. It is a normal
    timm-contract model; ``with supernet.path(arch):`` makes it compute ``arch`` inside the ``with`` block, and outside
    any it computes its default architecture ``arch`` (every block mixed, one third of its heads global, low-level
    choices in the middle of their ranges, so that the default path uses every module). `PathSampling` (objective
    ``path_sampling``) trains it; `extract` cuts a candidate out as a `GLiT`.

    Args:
        depth: Number of blocks.
        space: The search space (`SearchSpace()`, GLiT's).
        Every other argument: as `GLiT` (``embed_dim=384, num_heads=6`` and ``768, 12`` give DeiT-S / DeiT-B widths).
    """

    def __init__(self, depth: int = 12, space: SearchSpace = SearchSpace(), num_heads: int = 3, **kwargs):
        default = [space.default_block(num_heads // 3, num_heads)] * depth
        super().__init__(arch=default, num_heads=num_heads, search_space=space,
                         block_fn=partial(SuperBlock, space=space), **kwargs)
        self.space = space

    @property
    def num_heads(self) -> int:
        return self.blocks[0].num_heads

    def path(self, arch: Sequence[BlockArch | dict]) -> contextlib.AbstractContextManager[tuple[BlockArch, ...]]:
        """A context within which the forward computes ``arch`` (and ``self.arch`` is ``arch``); on exit, an
        exception's included, the supernet computes what it computed before, so contexts nest.

        Raises:
            ValueError: ``arch`` has not one block per supernet block, or a choice outside the space (raised here,
                before the context is entered).
        """
        arch = load_architecture(arch)
        if len(arch) != len(self.blocks):
            raise ValueError(f'the supernet has {len(self.blocks)} blocks, the architecture {len(arch)}')
        self.space.check(arch, self.num_heads)
        return self._running(arch)

    @contextlib.contextmanager
    def _running(self, arch: tuple[BlockArch, ...]) -> Iterator[tuple[BlockArch, ...]]:
        previous = self.arch
        with contextlib.ExitStack() as blocks:
            for block, choice in zip(self.blocks, arch):
                blocks.enter_context(block.path(choice))
            self.arch = arch
            try:
                yield arch
            finally:
                self.arch = previous

    def _forward_layer(self, block: SuperBlock, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            # Backward recomputes the block after the forward, when the path it ran may have been left (PathSampling
            # leaves it in a forward hook): the recomputation enters the architecture the forward ran, taken now.
            return checkpoint(partial(_forward_on_path, block, block.arch), x)
        return block(x)

    def extract(self, arch: Sequence[BlockArch | dict]) -> GLiT:
        """The `GLiT` of ``arch`` with this supernet's weights (and BatchNorm statistics): it computes what the
        supernet computes on that path."""
        on_path = self.path(arch)
        arch = load_architecture(arch)
        model = GLiT(arch=arch, img_size=self.img_size, patch_size=self.patch_embed.patch_size, in_chans=self.in_chans,
                     num_classes=self.num_classes, global_pool=self.global_pool, embed_dim=self.embed_dim,
                     num_heads=self.num_heads, search_space=self.space, norm_layer=type(self.norm),
                     conv_act_layer=type(self.blocks[0].local.act))
        # The supernet's own norm layers (with their eps), whatever norm_layer built them.
        model.norm = copy.deepcopy(self.norm)
        for block, source in zip(model.blocks, self.blocks):
            block.norm1, block.norm2 = copy.deepcopy(source.norm1), copy.deepcopy(source.norm2)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith('blocks.')}
        with on_path:
            for i, block in enumerate(self.blocks):
                state |= {f'blocks.{i}.{k}': v for k, v in block.candidate_state().items()}
        model.load_state_dict({k: v.detach().clone() for k, v in state.items()})
        return model.train(self.training)


def _forward_on_path(block: SuperBlock, arch: BlockArch, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` on ``arch``: what a checkpointed block computes, in its forward and in its recomputation."""
    with block.path(arch):
        return block(x)


@register_converter(GLiTSupernet)
def supernet_filter_fn(state_dict: dict, model: GLiTSupernet) -> dict:
    """A supernet checkpoint is leanvit's own (no official one exists): unwrapped from a training checkpoint only."""
    return unwrap_state_dict(state_dict)


def sample_architecture(space: SearchSpace, depth: int, num_heads: int, rng: random.Random,
                        global_heads: Sequence[int] | None = None) -> tuple[BlockArch, ...]:
    """An architecture drawn uniformly block by block: the global heads (unless ``global_heads`` fixes them), then
    each low-level choice the block type allows."""
    heads = global_heads or [rng.choice(space.global_head_choices(num_heads)) for _ in range(depth)]
    return tuple(space.sample_block(g, num_heads, rng) for g in heads)


@cache
def extreme_architectures(space: SearchSpace, depth: int, embed_dim: int,
                          num_heads: int) -> tuple[tuple[BlockArch, ...], tuple[BlockArch, ...]]:
    """``(smallest, largest)``: the architectures of ``depth`` blocks that repeat the block of ``space`` with the
    fewest / the most parameters, in a block ``embed_dim`` wide with ``num_heads`` heads.

    The parameters are counted exactly, on the `GLBlock` of each choice built on the meta device (so nothing is
    allocated and no random number drawn). A block's count depends on its own choices only, so these are also the
    architectures of the space with the fewest and the most parameters. Among choices of equal count the first in
    ``space.all_blocks(num_heads)`` wins: fewer global heads first, then the space's order of low-level choices.
    """
    blocks = space.all_blocks(num_heads)
    with torch.device('meta'):
        counts = [sum(p.numel() for p in GLBlock(embed_dim, num_heads, block).parameters()) for block in blocks]
    # list.index finds the first of equal counts: the documented tie-break.
    smallest, largest = blocks[counts.index(min(counts))], blocks[counts.index(max(counts))]
    return (smallest,) * depth, (largest,) * depth


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class PathSampling:
    """SPOS path sampling as an engine objective (``objectives: {path_sampling: {}}``): each training forward of the
    supernet runs inside the `GLiTSupernet.path` of one architecture drawn uniformly (`sample_architecture`), entered
    by a forward pre-hook and left by a forward hook that runs even when the forward raises, so the supernet is back
    on its default path after every forward, failed ones included.

    The draws are a function of ``seed`` and the draw count, which the run's checkpoints keep, so a resumed run draws
    what an uninterrupted one would, and every process of a distributed run draws the same path (so that DDP averages
    gradients of one architecture). Without ``sandwich`` the objective adds no loss term.

    ``sandwich=n > 0`` trains by the sandwich rule with in-place distillation (BigNAS, Yu et al., ECCV 2020; the
    rule is from slimmable networks, Yu & Huang, ICCV 2019): each step trains the largest architecture, the smallest
    and ``n`` drawn uniformly (BigNAS draws 2), as `extreme_architectures` defines the first two. The engine's forward
    runs the largest path, so the label loss trains it: it is the one path that can fit the labels best, and its
    predictions then teach the others, which is what distillation needs of a teacher. The forward hook keeps that
    forward's input and its detached logits; `loss` runs the smallest and the ``n`` drawn paths on the same input and
    returns the sum of their cross-entropies to the softmax of the largest path's logits (temperature 1), so the
    step's one backward trains all ``n + 2`` paths. Draws count one per drawn path, so the ``n`` paths of a step are
    the next ``n`` paths plain sampling would draw, and resuming draws the same ones. The option is not in the state:
    a run resumes only with the objectives it was started with. Single process only: `loss`'s forwards are not DDP's,
    so DDP would not average their gradients across processes.
    """

    leaves_parameters_unused = True  # the paths not drawn get no gradient in a step: DDP must search for them

    def __init__(self, model: GLiTSupernet, seed: int = 0, sandwich: int = 0):
        if not isinstance(model, GLiTSupernet):
            raise ValueError(f'path_sampling trains a GLiT supernet (model glit_supernet), not {type(model).__name__}')
        if not _is_count(sandwich):
            raise ValueError(f'sandwich must be an integer >= 0 (drawn paths per step besides the largest and the '
                             f'smallest; 0: one drawn path per step), got {sandwich!r}')
        if sandwich and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(f'sandwich={sandwich} trains on one process only: the smallest and drawn paths run in '
                             f'the objective\'s loss, outside the DistributedDataParallel forward, so their gradients '
                             f'would not be averaged across the {dist.get_world_size()} processes; use sandwich=0 or '
                             f'one process')
        self.model, self.seed, self.sandwich, self.draws = model, seed, sandwich, 0
        self.smallest = self.largest = None
        if sandwich:
            self.smallest, self.largest = extreme_architectures(model.space, len(model.blocks), model.embed_dim,
                                                                model.num_heads)
        self._open: contextlib.AbstractContextManager | None = None
        # loss() runs forwards of its own, on paths it enters itself: the hooks must neither draw nor keep for them.
        self._distilling = False
        self._keep = False  # the running forward is a sandwich step's forward of the largest path
        self._kept: tuple[tuple, torch.Tensor] | None = None  # its input and detached logits, until loss()
        self._hooks = [model.register_forward_pre_hook(self._sample),
                       model.register_forward_hook(self._restore, always_call=True)]

    def _draw(self) -> tuple[BlockArch, ...]:
        rng = random.Random(f'{self.seed}:{self.draws}')
        self.draws += 1
        return sample_architecture(self.model.space, len(self.model.blocks), self.model.num_heads, rng)

    def _sample(self, model: GLiTSupernet, args):
        if self._distilling:
            return
        # The forward hook does not run when a forward is interrupted by a BaseException (KeyboardInterrupt) or
        # fails under torch.compile: the next forward leaves that path first.
        self._leave()
        # Whatever an earlier forward left is not this forward's: loss() after an evaluation forward gives zero.
        self._kept, self._keep = None, False
        if model.training:
            self._keep = bool(self.sandwich)
            on_path = model.path(self.largest if self.sandwich else self._draw())
            on_path.__enter__()
            self._open = on_path

    def _restore(self, model: GLiTSupernet, args, output):
        if self._distilling:
            return
        self._leave()
        if self._keep and isinstance(output, torch.Tensor):  # None when the forward raised
            self._kept = (args, output.detach())
        self._keep = False

    def _leave(self) -> None:
        if self._open is not None:
            on_path, self._open = self._open, None
            on_path.__exit__(None, None, None)

    def loss(self) -> torch.Tensor:
        # Taken, not read: the kept tensors are freed after this, and a second call has nothing to distil.
        kept, self._kept = self._kept, None
        if kept is None:
            return torch.zeros(())
        args, largest_logits = kept
        soft_targets = largest_logits.float().softmax(-1)
        paths = [self.smallest, *(self._draw() for _ in range(self.sandwich))]
        losses = []
        self._distilling = True
        try:
            for arch in paths:
                with self.model.path(arch):
                    logits = self.model(*args)
                losses.append(F.cross_entropy(logits.float(), soft_targets))
        finally:
            self._distilling = False
        return torch.stack(losses).sum()

    def state_dict(self) -> dict:
        return {'draws': self.draws, 'seed': self.seed}

    def load_state_dict(self, state: dict) -> None:
        draws = state.get('draws', 0)
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 0:
            raise ValueError(f'draws must be an integer >= 0, got {draws!r}')
        self.draws = draws

    def remove(self) -> None:
        self._leave()
        self._kept, self._keep = None, False
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


default_cfgs = generate_default_cfgs({'glit_supernet': _cfg()})


@register_model
def glit_supernet(pretrained: bool = False, **kwargs) -> GLiTSupernet:
    """GLiT's supernet at DeiT-Tiny widths (12 blocks, 192 wide, 3 heads); ``embed_dim=384, num_heads=6`` or
    ``768, 12`` for the DeiT-S / DeiT-B spaces (GLiT-Small / Base were never published)."""
    out_indices = kwargs.pop('out_indices', None)
    return build_model_with_cfg(GLiTSupernet, 'glit_supernet', pretrained, pretrained_filter_fn=supernet_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls='getter'), **kwargs)


@register_objective('path_sampling')
def path_sampling(student: nn.Module, teacher: nn.Module | None, *, seed: int = 0,
                  sandwich: int = 0) -> PathSampling:
    """The training objective ``path_sampling``: one architecture drawn uniformly per step, or with ``sandwich: n``
    the largest, the smallest and ``n`` drawn ones (`PathSampling`)."""
    if not _is_count(sandwich):
        raise UsageError(f'path_sampling.sandwich must be an integer >= 0 (drawn paths per step besides the largest '
                         f'and the smallest; 0: one drawn path per step), got {sandwich!r}')
    try:
        return PathSampling(student, seed, sandwich)
    except ValueError as e:  # not a supernet, or sandwich under several processes
        raise UsageError(f'path_sampling: {e}') from None
