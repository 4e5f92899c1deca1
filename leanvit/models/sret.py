"""SReT: Sliced Recursive Transformer.

Paper: Zhiqiang Shen, Zechun Liu, Eric Xing, "Sliced Recursive Transformer", ECCV 2022, https://arxiv.org/abs/2111.05297
Official code (model definitions, checkpoints on Google Drive): https://github.com/szq0214/SReT

The idea in one screen (paper Sec. 3):
- Recursion: each unique ("shared") transformer block is applied several times in a row, adding depth but no
  parameters. `RecursiveStage` holds every shared block once and loops over it.
- NLL: after every application a small un-shared MLP (`NonLinearProjection`) breaks the symmetry between the
  applications of the same weights.
- LRC: every residual connection scales its shortcut and its branch by learnable scalars (`LearnableResidual`).
- Sliced group self-attention: the first application attends inside ``groups`` contiguous slices of tokens; the
  recursive applications permute the tokens first (and restore their order after), attending inside
  ``recursive_groups`` slices, so tokens still meet tokens from the whole image (`GroupAttention`).
- A conv stem (three stride-2 3x3 convs, from DSOD) instead of patchify, no class token, PiT-style depthwise
  stride-2 convs between the three stages, average pooling then LayerNorm then the classifier.

Where leanvit departs from the official code, on purpose:
- Evaluation is deterministic: the official model draws a fresh random token permutation even in eval mode, so two
  evaluations of one image differ (about 1e-3 in logits). leanvit uses one fixed permutation per stage in eval mode
  (``eval_permutation='fixed'``, seeded by the stage's token count) and random ones in training, as the paper trains.
  ``eval_permutation='random'`` reproduces the official behaviour, draw for draw: permutations come from the CPU
  generator, one per recursive application, in the official order.
- Recursion counts other than two are allowed (``recursion``). Every application after a block's first counts as
  recursive (sliced with ``recursive_groups``, permuted); for two applications per block this is the official rule.
"""

from collections.abc import Callable
from functools import partial

import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import (
    ConvNormAct,
    DropPath,
    LayerNorm2d,
    LayerType,
    NormMlpClassifierHead,
    get_act_layer,
    get_norm_layer,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from leanvit.io.weights import register_converter, unwrap_state_dict
from leanvit.layers.conv import fold_conv_norm_act
from leanvit.layers.input_checks import check_input_size
from leanvit.layers.mlp import Mlp
from leanvit.layers.pos_embed import resample_pos_embed
from leanvit.layers.shared import SharedWeightStage
from leanvit.models._registry import PaperCfg
from leanvit.models._staged import StagedClassifier

__all__ = ['GroupAttention', 'SReT']

STEM_STRIDE = 8
# FX symbolic tracing keeps the input check as one call in the graph instead of failing on its branches.
torch.fx.wrap('check_input_size')
LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class GroupAttention(nn.Module):
    """Sliced group self-attention (paper Sec. 3.3): multi-head self-attention computed independently inside
    contiguous groups of tokens.

    The token sequence (B, N, C) is cut into ``groups`` contiguous slices of N / groups tokens each (raster order,
    not 2-D windows) and attention runs inside each slice: the attention cost drops by the group count. An optional
    token permutation is applied before slicing and undone before the output projection, so that a second pass of
    the same weights groups different tokens together and information still mixes across the whole image.

    How it differs from timm's ``Attention``: only by the slicing and the permutation. With ``groups=1`` and no
    permutation it computes ``timm.layers.Attention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop,
    proj_drop=proj_drop)`` exactly, with the same state_dict keys (``qkv.*``, ``proj.*``).

    Attention dropout is a rate (``attn_drop_rate``) given to the fused kernel, not a module: a dropout module the
    fused kernel bypasses would be a leaf that the forward never calls, and leanvit calls every leaf module.

    Args:
        dim: Token channels C.
        num_heads: Attention heads; ``dim`` must be divisible by it.
        qkv_bias: Bias on the fused query/key/value projection.
        attn_drop: Dropout rate on the attention weights (in training).
        proj_drop: Dropout after the output projection.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'attention dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop_rate = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, groups: int = 1, permutation: torch.Tensor | None = None) -> torch.Tensor:
        """Attend within ``groups`` slices of ``x`` (B, N, C), after gathering tokens by ``permutation`` if given."""
        B, N, C = x.shape
        if permutation is not None:
            x = x.index_select(1, permutation)  # several times faster than x[:, permutation] on CPU
        # 'b (g n) (three h d) -> three (b g) h n d': the slice index g joins the batch, so one fused
        # attention call covers every group.
        qkv = self.qkv(x).reshape(B * groups, N // groups, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop_rate if self.training else 0.)
        # '(b g) h n d -> b (g n) (h d)'
        x = x.transpose(1, 2).reshape(B, N, C)
        if permutation is not None:
            # The projection acts per token, so restoring the order before it changes nothing numerically
            # and keeps the module's output aligned with its input.
            x = x.index_select(1, torch.argsort(permutation))
        return self.proj_drop(self.proj(x))


class LearnableResidual(nn.Module):
    """LRC (paper Sec. 3.2): ``shortcut_scale * x + branch_scale * branch``, two scalars initialised to 1."""

    def __init__(self):
        super().__init__()
        self.shortcut_scale = nn.Parameter(torch.ones(1))
        self.branch_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(branch * self.branch_scale, x, self.shortcut_scale)


class FoldedResidual(nn.Module):
    """`LearnableResidual` for inference: ``shortcut_scale * x + branch``, its branch scale folded into the layer that
    computes the branch (`fold_residual`)."""

    def __init__(self, shortcut_scale: nn.Parameter):
        super().__init__()
        self.shortcut_scale = shortcut_scale

    def forward(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(branch, x, self.shortcut_scale)


@torch.no_grad()
def fold_residual(residual: nn.Module, branch_layer: nn.Linear) -> nn.Module:
    """`FoldedResidual` for ``residual``, its branch scale multiplied into ``branch_layer`` (in place), the last layer
    of the branch: dropout and drop-path between them are linear too, so the fold is exact."""
    if type(residual) is not LearnableResidual:
        return residual
    branch_layer.weight.mul_(residual.branch_scale)
    branch_layer.bias.mul_(residual.branch_scale)
    return FoldedResidual(residual.shortcut_scale)


class SharedBlock(nn.Module):
    """Pre-norm transformer block whose weights are applied several times per forward, with LRC residuals."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Callable[[int], nn.Module] = LayerNorm,
            act_layer: Callable[[], nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = GroupAttention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop_rate, proj_drop=drop_rate)
        self.attn_residual = LearnableResidual()
        self.norm2 = norm_layer(dim)
        # int() truncates as the official code does: SReT-T's ratio 3.6 gives hidden sizes 230 / 460 / 921.
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop_rate)
        self.mlp_residual = LearnableResidual()
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, groups: int, permutation: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_residual(x, self.drop_path(self.attn(self.norm1(x), groups, permutation)))
        return self.mlp_residual(x, self.drop_path(self.mlp(self.norm2(x))))

    def reparameterize(self):
        """Inference form, in place: the branch scales folded into ``attn.proj`` and ``mlp.fc2`` (`FoldedResidual`)."""
        self.attn_residual = fold_residual(self.attn_residual, self.attn.proj)
        self.mlp_residual = fold_residual(self.mlp_residual, self.mlp.fc2)


class NonLinearProjection(nn.Module):
    """NLL (paper Sec. 3.2): an un-shared residual MLP after each application of a shared block."""

    def __init__(self, dim: int, mlp_ratio: float, drop_rate: float = 0.,
                 norm_layer: Callable[[int], nn.Module] = LayerNorm, act_layer: Callable[[], nn.Module] = nn.GELU):
        super().__init__()
        self.norm = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop_rate)
        self.residual = LearnableResidual()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x, self.mlp(self.norm(x)))

    def reparameterize(self):
        """Inference form, in place: the branch scale folded into ``mlp.fc2`` (`FoldedResidual`)."""
        self.residual = fold_residual(self.residual, self.mlp.fc2)


class RecursiveStage(SharedWeightStage):
    """One resolution stage: ``num_blocks`` shared blocks, each applied ``recursion`` times, each application
    followed by its own NLL (``projections``). The first stage of SReT-T runs B0, N0, B0, N1, B1, N2, B1, N3.
    `SharedWeightStage` holds the blocks, the NLLs and the schedule; this class adds the sliced attention's groups
    and token permutation, and mixed depth.

    Args:
        in_dim: Channels coming in; a depthwise stride-2 conv maps them to ``dim`` when ``downsample`` is set.
        dim: Token channels in this stage.
        grid_size: (H, W) token grid of this stage, fixed by the model's ``img_size``.
        num_blocks: Unique (shared) blocks.
        recursion: Applications per shared block.
        groups: Attention slices on the first application of a block.
        recursive_groups: Attention slices on the recursive applications, which also permute the tokens.
        eval_permutation: 'fixed' (deterministic) or 'random' (official) token permutation in eval mode.
        mixed_depth: In training, apply each shared block a random 1..recursion times per forward.
        drop_path_rates: Stochastic depth rate of each shared block.
    """

    def __init__(
            self,
            in_dim: int,
            dim: int,
            grid_size: tuple[int, int],
            num_heads: int,
            num_blocks: int,
            recursion: int,
            groups: int,
            recursive_groups: int,
            mlp_ratio: float,
            nll_ratio: float,
            downsample: bool,
            eval_permutation: str = 'fixed',
            mixed_depth: bool = False,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rates: tuple[float, ...] | None = None,
            norm_layer: Callable[[int], nn.Module] = LayerNorm,
            act_layer: Callable[[], nn.Module] = nn.GELU,
    ):
        num_tokens = grid_size[0] * grid_size[1]
        for name, count in (('groups', groups), ('recursive_groups', recursive_groups)):
            if count < 1 or num_tokens % count:
                raise ValueError(
                    f'{name}={count} does not divide the {num_tokens} tokens ({grid_size[0]}x{grid_size[1]} grid) '
                    f'of this stage; expected a divisor of {num_tokens}')
        if eval_permutation not in ('fixed', 'random'):
            raise ValueError(f"eval_permutation must be 'fixed' or 'random', got {eval_permutation!r}")
        # PiT's pooling: depthwise 3x3 stride-2 conv doubling the channels, no norm, no activation.
        if downsample and dim % in_dim:
            raise ValueError(f'a stage of width {dim} cannot follow one of width {in_dim}: the depthwise '
                             f'downsampling conv between them needs a multiple of {in_dim}')
        drop_path_rates = drop_path_rates or (0.,) * num_blocks
        super().__init__(
            [SharedBlock(dim, num_heads, mlp_ratio, drop_rate, attn_drop_rate, drop_path_rates[i], norm_layer,
                         act_layer) for i in range(num_blocks)],
            repeats=recursion,
            per_application=lambda index, repeat: NonLinearProjection(dim, nll_ratio, drop_rate, norm_layer,
                                                                      act_layer),
            per_application_name='projections',
            downsample=nn.Conv2d(in_dim, dim, 3, stride=2, padding=1, groups=in_dim) if downsample else None,
        )
        self.groups = groups
        self.recursive_groups = recursive_groups
        self.random_eval_permutation = eval_permutation == 'random'
        self.mixed_depth = mixed_depth
        # Seeded by the token count so the eval permutation depends on nothing but the stage's shape.
        fixed = torch.randperm(num_tokens, generator=torch.Generator().manual_seed(num_tokens))
        self.register_buffer('fixed_permutation', fixed if recursive_groups > 1 else None, persistent=False)

    def permutation(self, x: torch.Tensor) -> torch.Tensor | None:
        """Token order for a recursive application, or None when it is not sliced."""
        if self.recursive_groups == 1:
            return None
        if self.training or self.random_eval_permutation:
            # The CPU generator, as the official code draws: a seeded run reproduces its permutations exactly.
            return torch.randperm(x.shape[1]).to(x.device)
        return self.fixed_permutation

    @property
    def recursion(self) -> int:
        """Applications per shared block (the paper's recursion count)."""
        return self.repeats

    def forward_application(self, x: torch.Tensor, index: int, repeat: int) -> torch.Tensor:
        """Shared block ``index``, sliced (and permuted on a recursive application), then its NLL."""
        if repeat == 0:
            x = self.blocks[index](x, self.groups, None)
        else:
            x = self.blocks[index](x, self.recursive_groups, self.permutation(x))
        return self.projections[index * self.recursion + repeat](x)

    def applications(self) -> int:
        """How many times to apply a shared block in this forward (mixed-depth training samples it)."""
        if self.mixed_depth and self.training:
            return int(torch.randint(1, self.recursion + 1, ()))
        return self.recursion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        B, C, H, W = x.shape
        x = self.forward_applications(x.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).reshape(B, C, H, W)


class ConvStem(nn.Sequential):
    """DSOD-style stem: three 3x3 stride-2 conv + BN + ReLU, channels in_chans -> dim/2 -> dim -> dim.

    ``reparameterize()`` folds each norm into its conv (`fold_conv_norm_act`).
    """

    def __init__(self, in_chans: int, dim: int):
        # The ReLU is not in place (timm's default is), so that no tensor a forward hook has seen is overwritten.
        layer = partial(ConvNormAct, kernel_size=3, stride=2, padding=1, bias=True, act_kwargs=dict(inplace=False))
        super().__init__(layer(in_chans, dim // 2), layer(dim // 2, dim), layer(dim, dim))

    @torch.no_grad()
    def reparameterize(self):
        for i, layer in enumerate(self):
            if isinstance(layer, ConvNormAct):
                self[i] = fold_conv_norm_act(layer)


class SReT(StagedClassifier):
    """Sliced Recursive Transformer.

    Intermediates are the stages' NCHW maps; ``norm`` in ``forward_intermediates`` has no effect, as SReT has no
    per-location final norm (it normalises the pooled vector in the head).

    Args:
        img_size: Input resolution; fixes the position embedding and the token count of every stage.
        in_chans: Input image channels.
        num_classes: Classifier outputs; 0 gives a model that returns pooled features.
        global_pool: 'avg' or '' (no pooling, per-location logits).
        head_dim: Channels per attention head in each stage; stage width = head_dim * num_heads.
        num_heads: Attention heads per stage.
        num_blocks: Unique shared blocks per stage.
        recursion: Applications per shared block (int or per stage). Depth = num_blocks * recursion.
        groups: Attention slices on the first application of each block, per stage.
        recursive_groups: Attention slices on recursive applications, per stage (1 everywhere = un-sliced).
        mlp_ratio: Hidden / width ratio of the shared blocks' MLP (truncated to int per stage).
        nll_ratio: Hidden / width ratio of the NLL MLPs.
        eval_permutation: 'fixed' (deterministic eval, default) or 'random' (the official behaviour).
        mixed_depth: Mixed-depth training (the paper shows it in a figure only; our reading): each training forward
            applies every shared block a random 1..recursion times, so the shallower sub-networks that share the
            weights train too; meant to make very deep recursive models trainable. Evaluation uses the full depth.
        drop_rate: Dropout in MLPs, projections and before the classifier.
        pos_drop_rate: Dropout after adding the position embedding.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth; shared block i of a stage gets the official rate
            drop_path_rate * (applications in earlier stages + i) / total applications.
        norm_layer: Norm of the blocks and NLLs (a class, or a name timm's ``get_norm_layer`` knows; default
            LayerNorm with eps 1e-6). The conv stem keeps BatchNorm, the head LayerNorm.
        act_layer: Activation of the MLPs (a class, or a name timm's ``get_act_layer`` knows; default GELU).
    """

    has_final_norm = False  # the paper normalises after pooling, in the head

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            head_dim: tuple[int, ...] = (32, 32, 32),
            num_heads: tuple[int, ...] = (2, 4, 8),
            num_blocks: tuple[int, ...] = (2, 5, 3),
            recursion: int | tuple[int, ...] = 2,
            groups: tuple[int, ...] = (8, 4, 1),
            recursive_groups: tuple[int, ...] = (2, 1, 1),
            mlp_ratio: float = 3.6,
            nll_ratio: float = 1.,
            eval_permutation: str = 'fixed',
            mixed_depth: bool = False,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: LayerType | None = None,
            act_layer: LayerType | None = None,
    ):
        super().__init__()
        norm_layer = get_norm_layer(norm_layer) or LayerNorm
        act_layer = get_act_layer(act_layer) or nn.GELU
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_size[0] % STEM_STRIDE or img_size[1] % STEM_STRIDE:
            raise ValueError(f'img_size {img_size} must be divisible by the conv stem stride {STEM_STRIDE}')
        num_stages = len(num_heads)
        recursion = (recursion,) * num_stages if isinstance(recursion, int) else tuple(recursion)
        for name, values in (('head_dim', head_dim), ('num_blocks', num_blocks), ('recursion', recursion),
                             ('groups', groups), ('recursive_groups', recursive_groups)):
            if len(values) != num_stages:
                raise ValueError(f'{name} has {len(values)} entries; expected one per stage ({num_stages})')
        dims = [d * h for d, h in zip(head_dim, num_heads)]
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = dims[-1]

        self.stem = ConvStem(in_chans, dims[0])
        grid = (img_size[0] // STEM_STRIDE, img_size[1] // STEM_STRIDE)
        self.pos_embed = nn.Parameter(torch.zeros(1, dims[0], *grid))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        depths = [n * r for n, r in zip(num_blocks, recursion)]
        stages, self.feature_info = [], []
        for i in range(num_stages):
            if i > 0:
                grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)  # k3 s2 p1 conv: ceil(size / 2)
            # The official rule, not timm's calculate_drop_path_rates: it divides by the total application count (not
            # one less) and indexes shared blocks from the stage's first application, one step per block.
            first_application = sum(depths[:i])
            rates = tuple(drop_path_rate * (first_application + b) / sum(depths) for b in range(num_blocks[i]))
            stages.append(RecursiveStage(
                dims[max(i - 1, 0)], dims[i], grid, num_heads[i], num_blocks[i], recursion[i], groups[i],
                recursive_groups[i], mlp_ratio, nll_ratio, downsample=i > 0, eval_permutation=eval_permutation,
                mixed_depth=mixed_depth, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rates=rates,
                norm_layer=norm_layer, act_layer=act_layer))
            self.feature_info.append(dict(num_chs=dims[i], reduction=STEM_STRIDE * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        # The paper normalises after pooling, so the final norm lives in the head, not in forward_features.
        self.head = NormMlpClassifierHead(
            dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate, norm_layer=LayerNorm2d)

        trunc_normal_(self.pos_embed, std=.02)
        self.apply(_init_weights)

    @property
    def leaves_parameters_unused(self) -> bool:
        """Mixed-depth training skips the projections of the applications it does not draw: DDP must search for them."""
        return any(stage.mixed_depth and stage.recursion > 1 for stage in self.stages)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {'pos_embed'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r'^pos_embed|^stem', blocks=r'^stages\.(\d+)' if coarse else [
            (r'^stages\.(\d+)\.downsample', (0,)),
            (r'^stages\.(\d+)\.(?:blocks|projections)\.(\d+)', None),
            (r'^head\.norm', (99999,)),
        ])

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_drop(self.stem(check_input_size(x, self.in_chans, self.img_size)) + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features (B, C, H/32, W/32) of the last stage; the final norm is applied after pooling."""
        return self.stages(self._forward_stem(x))


def _init_weights(module: nn.Module):
    # The official code initialises only LayerNorms (weight 1, bias 0) and the position embedding; Linear and Conv
    # layers keep PyTorch's defaults. We do the same so that training from scratch matches the paper's runs.
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@register_converter(SReT)
def checkpoint_filter_fn(state_dict: dict, model: SReT) -> dict:
    """Convert an official SReT state_dict (github.com/szq0214/SReT) to leanvit's layout.

    The official file stores each shared block once per application (``transformers.{s}.blocks.{j}``, even j =
    block applications, odd j = NLLs); leanvit keeps one copy and checks that the others are equal. A leanvit state_dict
    passes through. In both cases a position embedding of another resolution is resized bicubically
    (`resample_pos_embed`, the official fine-tuning's interpolation).
    """
    state_dict = unwrap_state_dict(state_dict)
    if 'patch_embed.conv1.weight' in state_dict:
        state_dict = _convert_official(state_dict, model)
    pos_embed = state_dict.get('pos_embed')
    if pos_embed is not None and pos_embed.ndim != 4:
        raise ValueError(f'pos_embed of shape {tuple(pos_embed.shape)} is not a (1, C, H, W) map as SReT keeps it: '
                         'a checkpoint of another architecture')
    if pos_embed is not None and pos_embed.shape[-2:] != model.pos_embed.shape[-2:]:
        # (1, C, H, W) here, (1, H * W, C) tokens for the resize
        grid = model.pos_embed.shape[-2:]
        tokens = resample_pos_embed(pos_embed.flatten(2).transpose(1, 2), grid, pos_embed.shape[-2:])
        state_dict['pos_embed'] = tokens.transpose(1, 2).reshape(1, -1, *grid)
    return state_dict


_OFFICIAL_BLOCK_NAMES = {
    'coefficient1.bias': 'attn_residual.shortcut_scale',
    'coefficient2.bias': 'attn_residual.branch_scale',
    'coefficient3.bias': 'mlp_residual.shortcut_scale',
    'coefficient4.bias': 'mlp_residual.branch_scale',
}
_OFFICIAL_NLL_NAMES = {
    'norm1.': 'norm.',
    'coefficient1.bias': 'residual.shortcut_scale',
    'coefficient2.bias': 'residual.branch_scale',
}


def _convert_official(state_dict: dict, model: SReT) -> dict:
    out = {}
    for key, value in state_dict.items():
        if key.startswith('patch_embed.'):
            # patch_embed.conv{i} / bn{i} -> stem.{i-1}.conv / bn
            layer, rest = key[len('patch_embed.'):].split('.', 1)
            out[f'stem.{int(layer[-1]) - 1}.{layer[:-1]}.{rest}'] = value
        elif key.startswith('transformers.'):
            _, stage, _, j, rest = key.split('.', 4)
            recursion = model.stages[int(stage)].recursion if int(stage) < len(model.stages) else 2
            application, is_nll = divmod(int(j), 2)
            prefix = f'stages.{stage}.'
            if is_nll:
                for old, new in _OFFICIAL_NLL_NAMES.items():
                    rest = rest.replace(old, new)
                out[prefix + f'projections.{application}.{rest}'] = value
                continue
            block, repeat = divmod(application, recursion)
            new_key = prefix + f'blocks.{block}.{_OFFICIAL_BLOCK_NAMES.get(rest, rest)}'
            if repeat == 0:
                out[new_key] = value
            elif new_key in out and not torch.equal(out[new_key], value):
                raise ValueError(
                    f'official checkpoint entry {key} should repeat shared block {block} of stage {stage} '
                    f'({new_key}) but holds different values')
        elif key.startswith('pools.'):
            # pools.{s}.conv.{param}: the down-sampling conv after stage s opens stage s + 1 here
            _, stage, _, param = key.split('.')
            out[f'stages.{int(stage) + 1}.downsample.{param}'] = value
        elif key.startswith('norm.'):
            out['head.' + key] = value
        elif key.startswith('head.'):
            out['head.fc.' + key[len('head.'):]] = value
        else:
            out[key] = value
    return out


def _create_sret(variant: str, pretrained: bool = False, **kwargs) -> SReT:
    out_indices = kwargs.pop('out_indices', (0, 1, 2))
    return build_model_with_cfg(
        SReT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


_DRIVE = 'https://drive.google.com/file/d/{}/view'


def _cfg(drive_id: str = '', **kwargs) -> PaperCfg:
    return PaperCfg(**{
        'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.875, 'interpolation': 'bicubic',
        'first_conv': 'stem.0.conv', 'classifier': 'head.fc', 'num_classes': 1000, 'license': 'mit',
        'origin_url': _DRIVE.format(drive_id) if drive_id else 'https://github.com/szq0214/SReT',
        'paper_ids': 'arXiv:2111.05297', 'paper_name': 'Sliced Recursive Transformer', **kwargs})


# Official weights live on Google Drive, which timm cannot fetch; download them and pass
# pretrained_cfg_overlay=dict(file=...) or use leanvit.load_checkpoint. Figures: official README and paper.
# The distilled weights are pretrained tags of the same architectures (timm's convention), not other names.
default_cfgs = generate_default_cfgs({
    'sret_t.in1k': _cfg('1FDTpva6y-I_bKmyVmLFDn_3BlDq3dwni', paper_params=4_755_979, paper_gmacs=1.112,
                        paper_top1=76.0),
    'sret_t.distill_in1k': _cfg('1xzG4VQyQyxWJfQTcGCE-fuMuK3BwPCjK', paper_params=4_755_979, paper_gmacs=1.112,
                                paper_top1=77.6),
    'sret_lt.in1k': _cfg('1uSWvoVLHmOH6rNYiXSxD_rlN5dSBvEm3', paper_params=4_988_024, paper_gmacs=1.164,
                         paper_top1=76.7),
    'sret_lt.distill_in1k': _cfg('1l6u0q4kwli5czEyo4TeJANtqsulh-J5G', paper_params=4_988_024, paper_gmacs=1.164,
                                 paper_top1=77.7),
    'sret_s.in1k': _cfg('1y6F_bCgS1sagm7pxjAtuSPUB5HoNb8Ed', paper_params=20_899_692, paper_gmacs=4.173,
                        paper_top1=81.9),
    'sret_t_unsliced.in1k': _cfg('1wHM7NRSkz-WykCSES17xFV56h_m5RMXj', paper_params=4_755_979, paper_gmacs=1.366,
                                 paper_top1=76.1),
    'sret_t_unsliced.distill_in1k': _cfg('1P1qK-j1Cac5le8-DNUFBbjmIpRThuiVp', paper_params=4_755_979,
                                         paper_gmacs=1.366, paper_top1=77.7),
    'sret_lt_unsliced.in1k': _cfg('1EXwfiMMa1UVQ_tmY6YQJ-Se0b3bW5NpC', paper_params=4_988_024, paper_gmacs=1.418,
                                  paper_top1=76.8),
    'sret_lt_unsliced.distill_in1k': _cfg('1FDqkfkw5nZEuTcBmiBKg3lvPJOPQWS6i', paper_params=4_988_024,
                                          paper_gmacs=1.418, paper_top1=77.9),
    'sret_s_unsliced.in1k': _cfg('1vlsxJieKhfnw-F6xFiwczvXBuk7ugXxm', paper_params=20_899_692, paper_gmacs=4.671,
                                 paper_top1=82.0),
    # Distilled, then fine-tuned at higher resolution: a larger position embedding, so other architectures with their
    # own names (as timm's ViT *_384), the distillation a tag. The README rounds the parameter counts (4.9 M, 21.0 M,
    # 21.3 M), the exact figures here are the 224 counts plus the larger position embedding.
    'sret_t_unsliced_384.distill_in1k': _cfg('11mWAktu6LrNa0Qt61WJGA0eTWoKYD1Be', input_size=(3, 384, 384),
                                             pool_size=(12, 12), crop_pct=1.0, paper_params=4_853_259,
                                             paper_gmacs=6.4, paper_top1=79.7),
    'sret_s_unsliced_384.distill_in1k': _cfg('1z5whJpXbbtFdjLpS1pCPvKcJhVnYCeo-', input_size=(3, 384, 384),
                                             pool_size=(12, 12), crop_pct=1.0, paper_params=21_091_212,
                                             paper_gmacs=18.5, paper_top1=83.8),
    'sret_s_unsliced_512.distill_in1k': _cfg('1AZXIGMiGboI-nkoKuPnHnhDlBwZumuiB', input_size=(3, 512, 512),
                                             pool_size=(16, 16), crop_pct=1.0, paper_params=21_317_004,
                                             paper_gmacs=42.8, paper_top1=84.3),
    'test_sret': PaperCfg(input_size=(3, 64, 64), pool_size=(2, 2), first_conv='stem.0.conv', classifier='head.fc'),
})

_T = dict(head_dim=(32, 32, 32), num_heads=(2, 4, 8), num_blocks=(2, 5, 3), mlp_ratio=3.6, nll_ratio=1.)
_LT = dict(_T, mlp_ratio=4.0)
_S = dict(head_dim=(42, 42, 42), num_heads=(3, 6, 12), num_blocks=(2, 5, 3), mlp_ratio=3.0, nll_ratio=2.)
SLICED = dict(groups=(8, 4, 1), recursive_groups=(2, 1, 1))
UNSLICED = dict(groups=(1, 1, 1), recursive_groups=(1, 1, 1))


@register_model
def sret_t(pretrained: bool = False, **kwargs) -> SReT:
    """SReT-T: 4.76 M params, 1.11 GMACs, sliced groups 8-4-1 / 2-1-1."""
    return _create_sret('sret_t', pretrained, **(_T | SLICED | kwargs))


@register_model
def sret_lt(pretrained: bool = False, **kwargs) -> SReT:
    """SReT-LT ("large tiny"): SReT-T with MLP ratio 4."""
    return _create_sret('sret_lt', pretrained, **(_LT | SLICED | kwargs))


@register_model
def sret_s(pretrained: bool = False, **kwargs) -> SReT:
    """SReT-S: 20.9 M params, 4.17 GMACs."""
    return _create_sret('sret_s', pretrained, **(_S | SLICED | kwargs))


@register_model
def sret_t_unsliced(pretrained: bool = False, **kwargs) -> SReT:
    """SReT-T without slicing (global attention everywhere); same weights layout as sret_t."""
    return _create_sret('sret_t_unsliced', pretrained, **(_T | UNSLICED | kwargs))


@register_model
def sret_lt_unsliced(pretrained: bool = False, **kwargs) -> SReT:
    return _create_sret('sret_lt_unsliced', pretrained, **(_LT | UNSLICED | kwargs))


@register_model
def sret_s_unsliced(pretrained: bool = False, **kwargs) -> SReT:
    return _create_sret('sret_s_unsliced', pretrained, **(_S | UNSLICED | kwargs))


@register_model
def sret_t_unsliced_384(pretrained: bool = False, **kwargs) -> SReT:
    """Un-sliced SReT-T at 384 x 384 (position embedding 48 x 48); weights: the distilled fine-tune (distill_in1k)."""
    return _create_sret('sret_t_unsliced_384', pretrained, **(_T | UNSLICED | dict(img_size=384) | kwargs))


@register_model
def sret_s_unsliced_384(pretrained: bool = False, **kwargs) -> SReT:
    return _create_sret('sret_s_unsliced_384', pretrained, **(_S | UNSLICED | dict(img_size=384) | kwargs))


@register_model
def sret_s_unsliced_512(pretrained: bool = False, **kwargs) -> SReT:
    return _create_sret('sret_s_unsliced_512', pretrained, **(_S | UNSLICED | dict(img_size=512) | kwargs))


@register_model
def test_sret(pretrained: bool = False, **kwargs) -> SReT:
    """Tiny sliced SReT for fast tests: 64 x 64 input, token grids 8 x 8 / 4 x 4 / 2 x 2."""
    args = dict(img_size=64, head_dim=(8, 8, 8), num_heads=(1, 2, 4), num_blocks=(2, 2, 1), mlp_ratio=3.6,
                nll_ratio=1., groups=(8, 4, 1), recursive_groups=(2, 2, 1))
    return _create_sret('test_sret', pretrained, **(args | kwargs))
