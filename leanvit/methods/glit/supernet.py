"""GLiT's weight-sharing supernet and its single-path sampler (paper Sec. 3.3; the official code never shipped them).

Every block of `GLiTSupernet` holds one module per part at the largest size the search space allows (the global
heads' qkv at the largest qkv ratio, the local module at the largest expansion and kernel, the MLP at the largest
ratio), and an architecture runs as slices of them: ``global_heads`` heads of width ``qkv_ratio * head_dim`` read the
first channels, the local module the last ones through the first ``expansion * channels`` hidden channels and the
central ``kernel_size`` taps of the depthwise kernel, the MLP the first ``mlp_ratio * dim`` hidden units. So every
candidate of the space shares its weights with every other (weight entanglement, as AutoFormer, Chen et al., ICCV
2021, rather than one copy per candidate), `GLiTSupernet.extract` cuts any candidate out as a plain `GLiT`, and the
supernet's size does not grow with the number of choices. Each layer computes its own slice (the block's
`ActivePath` says which), so the forward calls every layer as a module, as in any timm model: hooks fire on them and
a wrapped layer (LoRA, quantization) still computes its slice.

`PathSampling` trains it single-path (SPOS, Guo et al., ECCV 2020): before each training forward it draws one
architecture uniformly (per block: the number of global heads, then each low-level choice of that block type) and
runs it; after the forward the model is back on its default path, which evaluation sees.
"""

import copy
import dataclasses
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from leanvit.errors import UsageError
from leanvit.io.weights import register_converter, unwrap_state_dict
from leanvit.models.glit import BlockArch, GLiT, SearchSpace, _cfg, load_architecture
from leanvit.train.objectives import register_objective

__all__ = ['GLiTSupernet', 'PathSampling', 'SuperBlock', 'glit_supernet', 'sample_architecture']


@dataclasses.dataclass
class ActivePath:
    """The sizes a `SuperBlock`'s architecture takes from each of its layers. One instance per block, shared by the
    block's layers: `SuperBlock.arch` sets it, and each layer reads it when called, so the block's forward calls its
    layers as modules (hooks fire, and a wrapped layer still computes its slice)."""
    global_dim: int = 0  # channels of the global heads (the first ones)
    heads: int = 0  # global heads
    width: int = 0  # width of each global head
    local_dim: int = 0  # channels of the local module (the last ones)
    local_hidden: int = 0  # expansion * local_dim
    kernel_size: int = 1
    mlp_hidden: int = 0


class SlicedLinear(nn.Linear):
    """A linear layer of the supernet: computes with ``sliced()``, the slice of its weights the block's path selects
    (under the parameter names of the candidate's layer)."""

    def sliced(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, **self.sliced())


class SlicedConv1d(nn.Conv1d):
    """A conv of the supernet's local module, computing with ``sliced()`` as `SlicedLinear`."""

    def sliced(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, **self.sliced())


class SlicedQKV(SlicedLinear):
    """qkv of all heads at the largest head width; computes the first ``heads`` heads, the first ``width`` units of
    each, over the first ``global_dim`` channels."""

    def __init__(self, dim: int, num_heads: int, max_head_dim: int, path: ActivePath):
        super().__init__(dim, 3 * num_heads * max_head_dim)
        self.num_heads, self.max_head_dim, self.path = num_heads, max_head_dim, path

    def sliced(self) -> dict[str, torch.Tensor]:
        p = self.path
        weight = self.weight.view(3, self.num_heads, self.max_head_dim, -1)[:, :p.heads, :p.width, :p.global_dim]
        bias = self.bias.view(3, self.num_heads, self.max_head_dim)[:, :p.heads, :p.width]
        return {'weight': weight.reshape(-1, p.global_dim), 'bias': bias.reshape(-1)}


class SlicedHeadProjection(SlicedLinear):
    """The global heads' output projection, from the same heads and units as `SlicedQKV` to ``global_dim``."""

    def __init__(self, dim: int, num_heads: int, max_head_dim: int, path: ActivePath):
        super().__init__(num_heads * max_head_dim, dim)
        self.num_heads, self.max_head_dim, self.path = num_heads, max_head_dim, path

    def sliced(self) -> dict[str, torch.Tensor]:
        p = self.path
        weight = self.weight.view(-1, self.num_heads, self.max_head_dim)[:p.global_dim, :p.heads, :p.width]
        return {'weight': weight.reshape(p.global_dim, -1), 'bias': self.bias[:p.global_dim]}


class SlicedGLUPointwise(SlicedConv1d):
    """The local module's first pointwise conv (values and gates of the GLU): the first ``local_hidden`` of each
    half, from the last ``local_dim`` channels."""

    def __init__(self, dim: int, max_hidden: int, path: ActivePath):
        super().__init__(dim, 2 * max_hidden, 1)
        self.max_hidden, self.path = max_hidden, path

    def sliced(self) -> dict[str, torch.Tensor]:
        p = self.path
        weight = self.weight.view(2, self.max_hidden, self.in_channels, 1)[:, :p.local_hidden, -p.local_dim:]
        bias = self.bias.view(2, self.max_hidden)[:, :p.local_hidden]
        return {'weight': weight.reshape(2 * p.local_hidden, p.local_dim, 1), 'bias': bias.reshape(-1)}


class SlicedDepthwise(SlicedConv1d):
    """The depthwise conv at the largest kernel: the first ``local_hidden`` channels, the central ``kernel_size``
    taps (Once-for-All's elastic kernel, Cai et al., ICLR 2020, without its kernel transformation). Its input comes
    padded for ``kernel_size``, as in `ConvModule`."""

    def __init__(self, max_hidden: int, max_kernel_size: int, path: ActivePath):
        super().__init__(max_hidden, max_hidden, max_kernel_size, groups=max_hidden)
        self.path = path

    def sliced(self) -> dict[str, torch.Tensor]:
        p = self.path
        trim = (self.kernel_size[0] - p.kernel_size) // 2
        return {'weight': self.weight[:p.local_hidden, :, trim:trim + p.kernel_size],
                'bias': self.bias[:p.local_hidden]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, **self.sliced(), groups=self.path.local_hidden)


class SlicedBatchNorm(nn.BatchNorm1d):
    """The depthwise conv's BatchNorm over its first ``local_hidden`` channels. The slices of the running statistics
    are views, so training updates them in place."""

    def __init__(self, max_hidden: int, path: ActivePath):
        super().__init__(max_hidden)
        self.path = path

    def sliced(self) -> dict[str, torch.Tensor]:
        hidden = self.path.local_hidden
        return {name: getattr(self, name)[:hidden] for name in ('weight', 'bias', 'running_mean', 'running_var')}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.sliced()
        momentum = self.momentum
        if self.training and momentum is None:  # a cumulative average (BatchNorm recalibration), as nn.BatchNorm1d
            self.num_batches_tracked.add_(1)
            momentum = 1. / float(self.num_batches_tracked)
        return F.batch_norm(x, w['running_mean'], w['running_var'], w['weight'], w['bias'], self.training,
                            momentum or 0., self.eps)


class SlicedPointwiseOut(SlicedConv1d):
    """The local module's last pointwise conv: from the first ``local_hidden`` channels to the last ``local_dim``."""

    def __init__(self, max_hidden: int, dim: int, path: ActivePath):
        super().__init__(max_hidden, dim, 1)
        self.path = path

    def sliced(self) -> dict[str, torch.Tensor]:
        p = self.path
        return {'weight': self.weight[-p.local_dim:, :p.local_hidden], 'bias': self.bias[-p.local_dim:]}


class SlicedHidden(SlicedLinear):
    """An MLP layer at the largest ratio, computing the first ``mlp_hidden`` hidden units: into them (fc1) or out of
    them (fc2)."""

    def __init__(self, in_features: int, out_features: int, path: ActivePath, into_hidden: bool):
        super().__init__(in_features, out_features)
        self.path, self.into_hidden = path, into_hidden

    def sliced(self) -> dict[str, torch.Tensor]:
        hidden = self.path.mlp_hidden
        if self.into_hidden:
            return {'weight': self.weight[:hidden], 'bias': self.bias[:hidden]}
        return {'weight': self.weight[:, :hidden], 'bias': self.bias}


class SuperGlobalAttention(nn.Module):
    """Global heads of every size (`leanvit.models.glit.GlobalAttention` at all heads and the largest qkv ratio)."""

    def __init__(self, dim: int, num_heads: int, max_head_dim: int, path: ActivePath):
        super().__init__()
        self.path = path
        self.qkv = SlicedQKV(dim, num_heads, max_head_dim, path)
        self.proj = SlicedHeadProjection(dim, num_heads, max_head_dim, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        heads, width = self.path.heads, self.path.width
        q, k, v = self.qkv(x).reshape(B, N, 3, heads, width).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, heads * width))


class SuperConvModule(nn.Module):
    """The local module of every size (`leanvit.models.glit.ConvModule` at the largest expansion and kernel)."""

    def __init__(self, dim: int, max_expansion: int, max_kernel_size: int, path: ActivePath,
                 act_layer: type[nn.Module] = nn.SiLU):
        super().__init__()
        self.path = path
        hidden = max_expansion * dim
        self.pw1 = SlicedGLUPointwise(dim, hidden, path)
        self.dw = SlicedDepthwise(hidden, max_kernel_size, path)
        self.norm = SlicedBatchNorm(hidden, path)
        self.act = act_layer()
        self.pw2 = SlicedPointwiseOut(hidden, dim, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.glu(self.pw1(x.transpose(1, 2)), dim=1)
        x = self.dw(F.pad(x, (self.path.kernel_size // 2,) * 2))
        return self.pw2(self.act(self.norm(x))).transpose(1, 2)


class SuperMlp(nn.Module):
    """The MLP at the largest ratio."""

    def __init__(self, dim: int, max_hidden: int, path: ActivePath, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = SlicedHidden(dim, max_hidden, path, into_hidden=True)
        self.act = act_layer()
        self.fc2 = SlicedHidden(max_hidden, dim, path, into_hidden=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SuperBlock(nn.Module):
    """Every `GLBlock` of the search space in one: ``arch`` (a `BlockArch`, set by `GLiTSupernet.set_arch`) says
    which one the forward runs. The norms are shared by all candidates, as in the official retraining model."""

    def __init__(self, dim: int, num_heads: int, space: SearchSpace, arch: BlockArch, drop_path: float = 0.,
                 norm_layer: type[nn.Module] = nn.LayerNorm, act_layer: type[nn.Module] = nn.GELU,
                 conv_act_layer: type[nn.Module] = nn.SiLU):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        self.path = ActivePath()
        self.norm1 = norm_layer(dim)
        self.attn = SuperGlobalAttention(
            dim, num_heads, int(self.head_dim * max((*space.qkv_ratios, space.mixed_qkv_ratio))), self.path)
        self.local = SuperConvModule(dim, int(max(space.expansions)),
                                     int(max((*space.kernel_sizes, space.mixed_kernel_size))), self.path,
                                     conv_act_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = SuperMlp(dim, int(dim * max((*space.mlp_ratios, space.local_mlp_ratio))), self.path, act_layer)
        self.arch = arch

    @property
    def arch(self) -> BlockArch:
        return self._arch

    @arch.setter
    def arch(self, arch: BlockArch):
        global_dim = self.dim * arch.global_heads // self.num_heads
        local_dim = self.dim - global_dim
        # Updated in place: the layers hold this object.
        vars(self.path).update(dataclasses.asdict(ActivePath(
            global_dim=global_dim, heads=arch.global_heads, width=int(self.head_dim * arch.qkv_ratio),
            local_dim=local_dim, local_hidden=arch.expansion * local_dim, kernel_size=arch.kernel_size,
            mlp_hidden=int(self.dim * arch.mlp_ratio))))
        self._arch = arch

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        global_dim = self.path.global_dim
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
        if self.path.global_dim:
            parts['mixer.attn'] = self.attn
        if self.path.local_dim:
            parts['mixer.local'] = self.local
            state['mixer.local.norm.num_batches_tracked'] = self.local.norm.num_batches_tracked.clone()
        for prefix, part in parts.items():
            state |= {f'{prefix}.{name}.{key}': value for name, layer in part.named_children()
                      if hasattr(layer, 'sliced') for key, value in layer.sliced().items()}
        return state


class GLiTSupernet(GLiT):
    """GLiT's weight-sharing supernet over a `SearchSpace`: a `GLiT` whose blocks are `SuperBlock` s. It is a normal
    timm-contract model that computes the architecture it is set to (`set_arch`; by default every block mixed, one
    third of its heads global, low-level choices in the middle of their ranges, so that the default path uses every
    module). `PathSampling` (objective ``path_sampling``) trains it; `extract` cuts a candidate out as a `GLiT`.

    Args:
        depth: Number of blocks.
        space: The search space (`SearchSpace()`, GLiT's).
        Every other argument: as `GLiT` (``embed_dim=384, num_heads=6`` and ``768, 12`` give DeiT-S / DeiT-B widths).
    """

    def __init__(self, depth: int = 12, space: SearchSpace = SearchSpace(), num_heads: int = 3, **kwargs):
        self.space = space
        arch = [space.default_block(num_heads // 3, num_heads)] * depth
        super().__init__(arch=arch, num_heads=num_heads, search_space=space, **kwargs)

    def _block(self, dim: int, num_heads: int, arch: BlockArch, drop_path: float, proj_drop: float, norm_layer,
               act_layer, conv_act_layer) -> nn.Module:
        if proj_drop:
            raise ValueError('the supernet has no dropout inside its blocks (proj_drop_rate must be 0)')
        return SuperBlock(dim, num_heads, self.space, arch, drop_path, norm_layer, act_layer, conv_act_layer)

    @property
    def num_heads(self) -> int:
        return self.blocks[0].num_heads

    def set_arch(self, arch: Sequence[BlockArch | dict]) -> 'GLiTSupernet':
        """Run ``arch`` from now on (checked against the space: one block per supernet block)."""
        arch = load_architecture(arch)
        if len(arch) != len(self.blocks):
            raise ValueError(f'the supernet has {len(self.blocks)} blocks, the architecture {len(arch)}')
        self.space.check(arch, self.num_heads)
        for block, choice in zip(self.blocks, arch):
            block.arch = choice
        self.arch = arch
        return self

    def extract(self, arch: Sequence[BlockArch | dict]) -> GLiT:
        """The `GLiT` of ``arch`` with this supernet's weights (and BatchNorm statistics): it computes what the
        supernet computes on that path."""
        arch = load_architecture(arch)
        self.space.check(arch, self.num_heads)
        model = GLiT(arch=arch, img_size=self.img_size, patch_size=self.patch_embed.patch_size, in_chans=self.in_chans,
                     num_classes=self.num_classes, global_pool=self.global_pool, embed_dim=self.embed_dim,
                     num_heads=self.num_heads, search_space=self.space, norm_layer=type(self.norm),
                     conv_act_layer=type(self.blocks[0].local.act))
        # The supernet's own norm layers (with their eps), whatever norm_layer built them.
        model.norm = copy.deepcopy(self.norm)
        for block, source in zip(model.blocks, self.blocks):
            block.norm1, block.norm2 = copy.deepcopy(source.norm1), copy.deepcopy(source.norm2)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith('blocks.')}
        current = self.arch
        self.set_arch(arch)
        for i, block in enumerate(self.blocks):
            state |= {f'blocks.{i}.{k}': v for k, v in block.candidate_state().items()}
        self.set_arch(current)
        model.load_state_dict({k: v.detach().clone() for k, v in state.items()})
        return model.train(self.training)


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


class PathSampling:
    """SPOS path sampling as an engine objective (``objectives: {path_sampling: {}}``): before each training forward
    of the supernet, one architecture drawn uniformly (`sample_architecture`); after it, the default path again.

    The draws are a function of ``seed`` and the draw count, which the run's checkpoints keep, so a resumed run draws
    what an uninterrupted one would, and every process of a distributed run draws the same path (so that DDP averages
    gradients of one architecture). The objective adds no loss term.
    """

    def __init__(self, model: GLiTSupernet, seed: int = 0):
        if not isinstance(model, GLiTSupernet):
            raise ValueError(f'path_sampling trains a GLiT supernet (model glit_supernet), not {type(model).__name__}')
        self.model, self.seed, self.draws = model, seed, 0
        self.default = model.arch
        self._hooks = [model.register_forward_pre_hook(self._sample), model.register_forward_hook(self._restore)]

    def _sample(self, model: GLiTSupernet, args):
        if model.training:
            rng = random.Random(f'{self.seed}:{self.draws}')
            self.draws += 1
            model.set_arch(sample_architecture(model.space, len(model.blocks), model.num_heads, rng))

    def _restore(self, model: GLiTSupernet, args, output):
        if model.training:
            model.set_arch(self.default)

    def loss(self) -> torch.Tensor:
        return torch.zeros(())

    def state_dict(self) -> dict:
        return {'draws': self.draws, 'seed': self.seed}

    def load_state_dict(self, state: dict) -> None:
        draws = state.get('draws', 0)
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 0:
            raise ValueError(f'draws must be an integer >= 0, got {draws!r}')
        self.draws = draws

    def remove(self) -> None:
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
def path_sampling(student: nn.Module, teacher: nn.Module | None, *, seed: int = 0) -> PathSampling:
    """The training objective ``path_sampling``: one architecture drawn uniformly per step."""
    try:
        return PathSampling(student, seed)
    except ValueError as e:  # not a supernet
        raise UsageError(f'path_sampling: {e}') from None
