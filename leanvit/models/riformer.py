"""RIFormer: a MetaFormer with no token mixer at inference.

Paper: Jiahao Wang, Songyang Zhang, Yong Liu, Taiqiang Wu, Yujiu Yang, Xihui Liu, Kai Chen, Ping Luo, Dahua Lin,
"RIFormer: Keep Your Vision Backbone Effective But Removing Token Mixer", CVPR 2023, https://arxiv.org/abs/2304.05659
Official code (backbone and re-parameterization only): github.com/open-mmlab/mmpretrain. Macro design from PoolFormer
(Yu et al., "MetaFormer Is Actually What You Need for Vision", CVPR 2022, github.com/sail-sg/poolformer).

The idea in one screen (paper Sec. 3):
- The PoolFormer macro design: a 7 x 7 stride-4 conv stem, four stages of blocks with 3 x 3 stride-2 convs between
  them, GroupNorm(1) everywhere, a GroupNorm on the final map, average pooling and a linear classifier.
- Training block: ``x + ls1 * (Affine(GN1(x)) - GN1(x))`` then ``x + ls2 * MLP(GN2(x))``. The token mixer is a
  per-channel affine (`AffineTokenMixer`); it sees one position at a time, so no token talks to another.
- Structural re-parameterization (Sec. 3.3): an affine of a normalised input is a normalisation with other weights, so
  `RIFormer.reparameterize` folds the mixer into GN1 exactly (`fold_affine_into_norm`) and the deploy block is
  ``x + ls1 * GN1'(x)``: no token mixer at all. Optionally the layer scale folds in as well.
- The accuracy comes from the training method, not from this file: soft-label distillation from a teacher with a
  token mixer, module imitation and teacher-weight initialisation (`leanvit.methods.riformer.imitation`).

The same class builds the teacher: ``token_mixer='pooling'`` is PoolFormer exactly as its authors release it (norm on
the map before pooling, unlike timm's ``poolformer_*``, which pools first), so official PoolFormer checkpoints load
into ``riformer_s12(token_mixer='pooling')`` and a PoolFormer teacher shares every module name with its student.
"""

import enum
from collections.abc import Callable
from functools import partial

import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import (
    ClassifierHead,
    DropPath,
    GroupNorm1,
    LayerType,
    calculate_drop_path_rates,
    get_act_layer,
    get_norm_layer,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from torch import nn

from leanvit.io.weights import register_converter, unwrap_state_dict
from leanvit.layers.input_checks import check_input_size
from leanvit.layers.mlp import Mlp
from leanvit.models._registry import PaperCfg
from leanvit.models._staged import StagedClassifier

__all__ = ['AffineTokenMixer', 'ChannelAffine', 'Layout', 'PoolingTokenMixer', 'RIFormer', 'RIFormerBlock',
           'detect_layout', 'fold_affine_into_norm']

torch.fx.wrap('check_input_size')
# The MetaFormer MLP over the channels of a (B, C, H, W) map: timm's ``Mlp`` with 1 x 1 convs ``fc1`` and ``fc2``
# (``fc1`` -> activation -> dropout -> ``fc2`` -> dropout). Not timm's ``ConvMlp``: that one normalises before its
# activation, has a single dropout (none after ``fc2``) and defaults to ReLU.
ConvMlp = partial(Mlp, use_conv=True)


# The token mixers (MetaFormer's): each returns ``mix(x) - x``, since the block adds the input back through its
# residual and a mixer that returned ``x`` would count it twice (PoolFormer, Sec. 3.1).
class PoolingTokenMixer(nn.Module):
    """PoolFormer's mixer: 3 x 3 average pooling (padding excluded from the mean) minus the identity."""

    def __init__(self, dim: int | None = None, pool_size: int = 3):
        super().__init__()
        self.pool_size = pool_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.pool_size, 1, self.pool_size // 2, count_include_pad=False) - x


class ChannelAffine(nn.Module):
    """Per-channel ``weight * x + bias`` on a (B, C, H, W) map, with the parameters of a depthwise 1 x 1 convolution
    (``weight`` [C, 1, 1, 1], ``bias`` [C]): what ``nn.Conv2d(C, C, 1, groups=C)`` computes, as one elementwise
    multiply-add (not a convolution, so it is not counted as MACs either). Starts as the identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, 1, 1, 1))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


class AffineTokenMixer(nn.Module):
    """RIFormer's training-time mixer (Sec. 3.3): a per-channel affine ``s * x + t`` minus the identity.

    ``affine.weight`` [C, 1, 1, 1] is s and ``affine.bias`` is t: the official mmpretrain layout, a depthwise 1 x 1
    convolution (`ChannelAffine`). The mixer exists in training only: the deploy form folds it into the preceding
    norm (`fold_affine_into_norm`).

    The official code leaves the initial values to a config whose truncated-normal init makes s almost 0 (the mixer
    starts as -x). leanvit starts at s = 1, t = 0: the mixer adds nothing, so training starts from the
    token-mixer-free network the paper is about and the affine learns only what helps.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.affine = ChannelAffine(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.affine(x) - x


def fold_affine_into_norm(
        norm_weight: torch.Tensor,
        norm_bias: torch.Tensor,
        affine_weight: torch.Tensor,
        affine_bias: torch.Tensor,
        layer_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one norm equal to ``AffineTokenMixer(norm(x))`` (times ``layer_scale`` if given).

    With the norm's per-channel weight g and bias b, ``s * (g * n + b) + t - (g * n + b)`` for the normalised n is
    ``g (s - 1) * n + b (s - 1) + t``: the same normalisation with weight g (s - 1) and bias b (s - 1) + t. A layer
    scale l multiplies both. Exact up to float rounding, for any input.
    """
    scale_minus_one = affine_weight.reshape(-1) - 1
    weight, bias = norm_weight * scale_minus_one, norm_bias * scale_minus_one + affine_bias.reshape(-1)
    if layer_scale is not None:
        weight, bias = weight * layer_scale.reshape(-1), bias * layer_scale.reshape(-1)
    return weight, bias


TOKEN_MIXERS = {'affine': AffineTokenMixer, 'pooling': PoolingTokenMixer, 'none': None}


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch on a (B, C, H, W) map, ``scale`` [C], as timm's MetaFormer names it.

    timm's ``LayerScale2d`` computes the same but names its parameter ``gamma``; ``layer_scale{1,2}.scale`` is the key
    leanvit's RIFormer checkpoints and the official layouts' conversion use, so it stays.
    """

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1)


class RIFormerBlock(nn.Module):
    """One MetaFormer block: ``x + ls1 * mixer(norm1(x))`` then ``x + ls2 * mlp(norm2(x))``.

    ``token_mixer='none'`` is the deploy form: ``norm1`` then carries the folded affine (and, after
    ``reparameterize(fold_layer_scale=True)``, the layer scale too, and ``layer_scale1`` is gone).
    """

    def __init__(
            self,
            dim: int,
            token_mixer: str | Callable[[int], nn.Module] = 'affine',
            mlp_ratio: float = 4.,
            layer_scale_init: float = 1e-5,
            drop_path: float = 0.,
            proj_drop: float = 0.,
            fold_layer_scale: bool = False,
            norm_layer: Callable[[int], nn.Module] = GroupNorm1,
            act_layer: Callable[[], nn.Module] = nn.GELU,
    ):
        super().__init__()
        if isinstance(token_mixer, str) and token_mixer not in TOKEN_MIXERS:
            raise ValueError(f'token_mixer must be one of {sorted(TOKEN_MIXERS)} or a module class, '
                             f'got {token_mixer!r}')
        if fold_layer_scale and token_mixer != 'none':
            raise ValueError('fold_layer_scale applies to the deploy form only (token_mixer none / deploy=True)')
        self.norm1 = norm_layer(dim)
        mixer = TOKEN_MIXERS[token_mixer] if isinstance(token_mixer, str) else token_mixer
        self.token_mixer = mixer(dim) if mixer else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.layer_scale1 = nn.Identity() if fold_layer_scale else LayerScale(dim, layer_scale_init)
        self.norm2 = norm_layer(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.layer_scale2 = LayerScale(dim, layer_scale_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.layer_scale1(self.token_mixer(self.norm1(x))))
        return x + self.drop_path2(self.layer_scale2(self.mlp(self.norm2(x))))

    @torch.no_grad()
    def reparameterize(self, fold_layer_scale: bool = False):
        """Fold the affine token mixer into ``norm1`` (and ``layer_scale1`` if asked).

        A no-op once folded, and for PoolFormer blocks, whose pooling has no inference form to fold into (so that
        ``timm.utils.model.reparameterize_model`` works on every model of the family).
        """
        if isinstance(self.token_mixer, AffineTokenMixer):
            weight, bias = fold_affine_into_norm(
                self.norm1.weight, self.norm1.bias, self.token_mixer.affine.weight, self.token_mixer.affine.bias)
            self.norm1.weight.copy_(weight)
            self.norm1.bias.copy_(bias)
            self.token_mixer = nn.Identity()
        if fold_layer_scale and isinstance(self.token_mixer, nn.Identity) and isinstance(self.layer_scale1, LayerScale):
            self.norm1.weight.mul_(self.layer_scale1.scale)
            self.norm1.bias.mul_(self.layer_scale1.scale)
            self.layer_scale1 = nn.Identity()


class ConvDownsample(nn.Module):
    """The stem (7 x 7 stride 4) or a stage transition (3 x 3 stride 2): one conv, no norm."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class RIFormerStage(nn.Module):
    def __init__(self, in_chs: int, dim: int, drop_path: list[float], downsample: bool, **block_kwargs):
        super().__init__()
        self.downsample = ConvDownsample(in_chs, dim, 3, 2, 1) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[RIFormerBlock(dim, drop_path=dp, **block_kwargs) for dp in drop_path])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class RIFormer(StagedClassifier):
    """RIFormer (``token_mixer='affine'``), its deploy form (``deploy=True``) or PoolFormer (``'pooling'``).

    Args:
        depths: blocks per stage.
        dims: channels per stage.
        mlp_ratio: MLP hidden width over the block width.
        layer_scale_init: initial value of both layer scales (1e-5 for S12/S24, 1e-6 for the deeper models).
        token_mixer: 'affine' (RIFormer training form), 'pooling' (PoolFormer), 'none' (same as deploy=True), or a
            module class called with the block width, as timm's MetaFormer takes one (returning ``mix(x) - x``, as
            `PoolingTokenMixer` and `AffineTokenMixer` do; only the affine mixer folds away in ``reparameterize()``).
        deploy: build the re-parameterized form directly, to load deploy checkpoints (a training-form checkpoint is
            folded on load).
        fold_layer_scale: in the deploy form, the first layer scale is folded into the norm as well.
        norm_layer: Norm of the blocks and the final map (a class or a name timm's ``get_norm_layer`` knows; default
            GroupNorm with one group). Only a norm with per-channel ``weight`` and ``bias`` can take the folded mixer.
        act_layer: Activation of the MLPs (a class or a name timm's ``get_act_layer`` knows; default GELU).
        in_chans, num_classes, global_pool, drop_rate, proj_drop_rate, drop_path_rate: as in timm.
        img_size: accepted for timm's interface and unused: the model is fully convolutional.
    """

    def __init__(
            self,
            depths: tuple[int, ...] = (2, 2, 6, 2),
            dims: tuple[int, ...] = (64, 128, 320, 512),
            mlp_ratio: float = 4.,
            layer_scale_init: float = 1e-5,
            token_mixer: str | Callable[[int], nn.Module] = 'affine',
            deploy: bool = False,
            fold_layer_scale: bool = False,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            img_size: int | tuple[int, int] | None = None,
            norm_layer: LayerType | None = None,
            act_layer: LayerType | None = None,
    ):
        super().__init__()
        norm_layer = get_norm_layer(norm_layer) or GroupNorm1
        act_layer = get_act_layer(act_layer) or nn.GELU
        if len(depths) != len(dims):
            raise ValueError(f'depths and dims need one entry per stage, got {len(depths)} and {len(dims)}')
        if deploy:
            if token_mixer not in ('affine', 'none'):
                raise ValueError(f"deploy=True is the folded affine mixer; token_mixer {token_mixer!r} has no deploy "
                                 "form")
            token_mixer = 'none'
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = dims[-1]
        self.stem = ConvDownsample(in_chans, dims[0], 7, 4, 2)
        # Stochastic depth grows linearly over all blocks (PoolFormer).
        rates = calculate_drop_path_rates(drop_path_rate, sum(depths))
        stages, self.feature_info, in_chs = [], [], dims[0]
        for i, dim in enumerate(dims):
            stages.append(RIFormerStage(
                in_chs, dim, rates[sum(depths[:i]):sum(depths[:i + 1])], downsample=i > 0, token_mixer=token_mixer,
                mlp_ratio=mlp_ratio, layer_scale_init=layer_scale_init, proj_drop=proj_drop_rate,
                fold_layer_scale=fold_layer_scale, norm_layer=norm_layer, act_layer=act_layer))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f'stages.{i}'))
            in_chs = dim
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(dims[-1])
        self.head = ClassifierHead(dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(_init_weights)

    @property
    def deploy(self) -> bool:
        """True once no block has a token mixer left to fold (always False for PoolFormer)."""
        return all(isinstance(block.token_mixer, nn.Identity) for stage in self.stages for block in stage.blocks)

    def reparameterize(self, fold_layer_scale: bool = False) -> 'RIFormer':
        """Fold every affine token mixer into its norm, in place; outputs are unchanged up to float rounding.

        ``fold_layer_scale`` folds ``ls1`` too (one multiply less per block; the state_dict then lacks
        ``layer_scale1``, so the deploy parameter count drops). PoolFormer (``token_mixer='pooling'``) has nothing to
        fold and is returned unchanged. The result is the paper's deploy model, with the deploy state_dict layout.
        ``timm.utils.model.reparameterize_model`` folds the same way, on a copy, ``ls1`` kept.
        """
        for stage in self.stages:
            for block in stage.blocks:
                block.reparameterize(fold_layer_scale)
        return self

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # timm's optimizer factory (PoolFormer's train.py uses it) already spares 1-D parameters: norms, layer scales,
        # biases. The affine scale is stored [C, 1, 1, 1] for the official layout; decay would pull it towards 0, a
        # mixer of -x, so it is spared like the other per-channel parameters.
        return {name for name, _ in self.named_parameters() if name.endswith('token_mixer.affine.weight')}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)' if coarse else [
            (r'^stages\.(\d+)\.downsample', (0,)),
            (r'^stages\.(\d+)\.blocks\.(\d+)', None),
            (r'^norm', (99999,)),
        ])

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(check_input_size(x, self.in_chans, None))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised final map (B, C, H/32, W/32)."""
        return self.norm(self.stages(self._forward_stem(x)))


def _init_weights(module: nn.Module):
    # PoolFormer's init: truncated normal (std 0.02) and zero biases for the MLP convs and the classifier; the stem
    # and the stage transitions keep PyTorch's default conv init, norms start at weight 1, bias 0, and the affine
    # mixer keeps its own identity-start init (AffineTokenMixer).
    layers = (module.fc1, module.fc2) if isinstance(module, Mlp) else (module,) if isinstance(module, nn.Linear) else ()
    for layer in layers:
        trunc_normal_(layer.weight, std=.02)
        nn.init.zeros_(layer.bias)


# Official block parameter names (mmpretrain and sail-sg/poolformer alike) -> leanvit's.
_OFFICIAL_BLOCK_NAMES = {'norm_reparam.': 'norm1.', 'layer_scale_1': 'layer_scale1.scale',
                         'layer_scale_2': 'layer_scale2.scale'}


class Layout(enum.Enum):
    """The checkpoint layouts the RIFormer family reads; each value names its layout in messages.

    An official PoolFormer file (no mixer weights) and a deploy RIFormer look alike once renamed, so the official
    layouts are told apart by their own names. leanvit's files carry no such mark: a deploy RIFormer and a
    ``token_mixer='pooling'`` PoolFormer have the same keys, and both are `LEANVIT_DEPLOY`.
    """
    MMPRETRAIN_TRAINING = 'an mmpretrain RIFormer training-form'
    MMPRETRAIN_DEPLOY = 'an mmpretrain RIFormer deploy'
    POOLFORMER_OFFICIAL = 'an official PoolFormer'
    LEANVIT_TRAINING = 'a leanvit RIFormer training-form'
    LEANVIT_DEPLOY = 'a leanvit deploy RIFormer (or PoolFormer)'

    @property
    def official(self) -> bool:
        return self in (Layout.MMPRETRAIN_TRAINING, Layout.MMPRETRAIN_DEPLOY, Layout.POOLFORMER_OFFICIAL)


def detect_layout(state_dict: dict) -> Layout:
    """The `Layout` of an unwrapped state dict.

    Raises:
        ValueError: the keys match no layout of the family (another family's checkpoint, say).
    """
    if any(k.startswith('backbone.') for k in state_dict):
        deploy = any('.norm_reparam.' in k for k in state_dict)
        return Layout.MMPRETRAIN_DEPLOY if deploy else Layout.MMPRETRAIN_TRAINING
    if 'patch_embed.proj.weight' in state_dict:
        return Layout.POOLFORMER_OFFICIAL
    if 'stem.conv.weight' in state_dict:
        training = any('.token_mixer.affine.' in k for k in state_dict)
        return Layout.LEANVIT_TRAINING if training else Layout.LEANVIT_DEPLOY
    example = f' (e.g. {next(iter(state_dict))!r})' if state_dict else ' (it is empty)'
    raise ValueError(f'not a RIFormer/PoolFormer checkpoint: its keys match no known layout{example}')


@register_converter(RIFormer)
def checkpoint_filter_fn(state_dict: dict, model: RIFormer) -> dict:
    """Convert a RIFormer or PoolFormer checkpoint to ``model``'s layout (see `convert_layout`), refusing a mixer
    the model does not have.

    A training-form checkpoint loaded into a deploy model is folded on the way in (and its first layer scale too if
    the model was built with ``fold_layer_scale``); a deploy checkpoint cannot be unfolded into a training model.
    A state dict of no known `Layout` is refused.
    """
    state_dict = unwrap_state_dict(state_dict)
    layout = detect_layout(state_dict)
    pooling = any(isinstance(m, PoolingTokenMixer) for m in model.modules())
    if layout is Layout.POOLFORMER_OFFICIAL and not pooling:
        raise ValueError(f'{layout.value} checkpoint has a pooling token mixer; load it into a model created with '
                         "token_mixer='pooling', or start a RIFormer from it with "
                         'leanvit.train.initialization.init_from_teacher')
    if layout in (Layout.MMPRETRAIN_TRAINING, Layout.MMPRETRAIN_DEPLOY, Layout.LEANVIT_TRAINING) and pooling:
        raise ValueError(f"{layout.value} checkpoint has no pooling token mixer; create the model with "
                         "token_mixer='affine' (training form) or deploy=True")
    return _fold_for(convert_layout(state_dict, model), model, layout)


@register_converter(RIFormer, names_only=True)
def convert_layout(state_dict: dict, model: RIFormer) -> dict:
    """Rename an official checkpoint's entries to leanvit's; values are unchanged.

    Accepted: mmpretrain RIFormer classifiers, training or deploy form (``backbone.network.*``, ``head.fc.*``); the
    official PoolFormer layout (``network.*``, ``norm.*``, ``head.*``); anything else (leanvit's own) is returned
    as is. The official layouts number blocks and stage transitions together (``network.{0,2,4,6}`` are stages,
    ``network.{1,3,5}`` the convs between).
    """
    state_dict = unwrap_state_dict(state_dict)
    try:
        layout = detect_layout(state_dict)
    except ValueError:  # only names are mapped here; checkpoint_filter_fn refuses unknown layouts
        return state_dict
    if not layout.official:
        return state_dict
    mmpretrain = layout in (Layout.MMPRETRAIN_TRAINING, Layout.MMPRETRAIN_DEPLOY)
    return _convert_official(state_dict, f'backbone.norm{2 * len(model.stages) - 2}.' if mmpretrain else 'norm.')


def _convert_official(state_dict: dict, norm_prefix: str) -> dict:
    out = {}
    for key, value in state_dict.items():
        if key.startswith(norm_prefix):
            out['norm.' + key[len(norm_prefix):]] = value
            continue
        key = key.removeprefix('backbone.')
        if key.startswith('patch_embed.proj.'):
            out['stem.conv.' + key[len('patch_embed.proj.'):]] = value
        elif key.startswith('network.'):
            _, index, rest = key.split('.', 2)
            stage, is_transition = divmod(int(index), 2)
            if is_transition:  # network.{2s+1}.proj.* opens stage s + 1
                out[f'stages.{stage + 1}.downsample.conv.' + rest.removeprefix('proj.')] = value
            else:
                block, rest = rest.split('.', 1)
                for old, new in _OFFICIAL_BLOCK_NAMES.items():
                    rest = rest.replace(old, new)
                out[f'stages.{stage}.blocks.{block}.{rest}'] = value
        elif key.startswith('head.') and not key.startswith('head.fc.'):
            out['head.fc.' + key[len('head.'):]] = value
        elif key.startswith('norm') and key.split('.')[0] != 'norm':
            continue  # norms of other out_indices of an mmpretrain backbone: unused by the classifier
        else:
            out[key] = value
    return out


def _fold_for(state_dict: dict, model: RIFormer, layout: Layout) -> dict:
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage.blocks):
            prefix = f'stages.{s}.blocks.{b}.'
            has_affine = prefix + 'token_mixer.affine.weight' in state_dict
            if isinstance(block.token_mixer, AffineTokenMixer) and not has_affine and \
                    prefix + 'norm1.weight' in state_dict:
                raise ValueError(f'{layout.value} checkpoint has no affine token mixer ({prefix}token_mixer.affine '
                                 'is missing): a deploy (re-parameterized) RIFormer cannot be unfolded, create the '
                                 "model with deploy=True; a PoolFormer belongs in token_mixer='pooling'")
            if not isinstance(block.token_mixer, nn.Identity):
                continue
            scale = state_dict.pop(prefix + 'layer_scale1.scale') \
                if isinstance(block.layer_scale1, nn.Identity) and prefix + 'layer_scale1.scale' in state_dict else None
            weight, bias = state_dict[prefix + 'norm1.weight'], state_dict[prefix + 'norm1.bias']
            if has_affine:
                weight, bias = fold_affine_into_norm(weight, bias, state_dict.pop(prefix + 'token_mixer.affine.weight'),
                                                     state_dict.pop(prefix + 'token_mixer.affine.bias'), scale)
            elif scale is not None:
                weight, bias = weight * scale, bias * scale
            state_dict[prefix + 'norm1.weight'], state_dict[prefix + 'norm1.bias'] = weight, bias
    return state_dict


def _create_riformer(variant: str, pretrained: bool = False, **kwargs) -> RIFormer:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_cfg(
        RIFormer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


_MMPRETRAIN = 'https://download.openmmlab.com/mmclassification/v1/riformer/'


def _cfg(file: str = '', **kwargs) -> PaperCfg:
    return PaperCfg(**{
        'url': _MMPRETRAIN + file if file else '', 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.9, 'interpolation': 'bicubic', 'first_conv': 'stem.conv', 'classifier': 'head.fc',
        'num_classes': 1000, 'license': 'apache-2.0', 'origin_url': 'https://github.com/open-mmlab/mmpretrain',
        'paper_ids': 'arXiv:2304.05659', 'paper_name': 'RIFormer: Keep Your Vision Backbone Effective But Removing '
                                                      'Token Mixer', **kwargs})


def _cfg_384(file: str = '', **kwargs) -> PaperCfg:
    return _cfg(file, input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, **kwargs)


# Figures: paper Table 2 and the mmpretrain metafile (docs/riformer.md, "Variants and figures"). paper_params is the
# training form (what the constructor builds); paper_deploy_params is after reparameterize(). Checkpoint file names:
# mmpretrain metafile.
# The network has no position embedding, so the 384 x 384 fine-tunes are pretrained tags (timm's convformer_s18's
# sail_in1k_384), not other architectures.
default_cfgs = generate_default_cfgs({
    'riformer_s12.in1k': _cfg('riformer-s12_32xb128_in1k_20230406-6741ce71.pth', paper_params=11_921_832,
                              paper_deploy_params=11_915_176, paper_gmacs=1.822, paper_top1=76.90),
    'riformer_s24.in1k': _cfg('riformer-s24_32xb128_in1k_20230406-fdab072a.pth', paper_params=21_402_280,
                              paper_deploy_params=21_388_968, paper_gmacs=3.412, paper_top1=80.28),
    'riformer_s36.in1k': _cfg('riformer-s36_32xb128_in1k_20230406-fdfcd3b0.pth', paper_params=30_882_728,
                              paper_deploy_params=30_862_760, paper_gmacs=5.003, paper_top1=81.29),
    'riformer_m36.in1k': _cfg('riformer-m36_32xb128_in1k_20230406-2fcb9d9b.pth', crop_pct=0.95,
                              paper_params=56_199_016, paper_deploy_params=56_172_520, paper_gmacs=8.801,
                              paper_top1=82.57),
    'riformer_m48.in1k': _cfg('riformer-m48_32xb128_in1k_20230406-2b9d1abf.pth', crop_pct=0.95,
                              paper_params=73_508_776, paper_deploy_params=73_473_448, paper_gmacs=11.59,
                              paper_top1=82.75),
    'riformer_s12.in1k_384': _cfg_384(
        'riformer-s12_32xb128_in1k-384px_20230406-145eda4c.pth', paper_params=11_921_832,
        paper_deploy_params=11_915_176, paper_gmacs=5.355, paper_top1=78.29),
    'riformer_s24.in1k_384': _cfg_384(
        'riformer-s24_32xb128_in1k-384px_20230406-bafae7ab.pth', paper_params=21_402_280,
        paper_deploy_params=21_388_968, paper_gmacs=10.028, paper_top1=81.36),
    'riformer_s36.in1k_384': _cfg_384(
        'riformer-s36_32xb128_in1k-384px_20230406-017ed3c4.pth', paper_params=30_882_728,
        paper_deploy_params=30_862_760, paper_gmacs=14.702, paper_top1=82.22),
    'riformer_m36.in1k_384': _cfg_384(
        'riformer-m36_32xb128_in1k-384px_20230406-66a6f764.pth', paper_params=56_199_016,
        paper_deploy_params=56_172_520, paper_gmacs=25.865, paper_top1=83.39),
    'riformer_m48.in1k_384': _cfg_384(
        'riformer-m48_32xb128_in1k-384px_20230406-2e874826.pth', paper_params=73_508_776,
        paper_deploy_params=73_473_448, paper_gmacs=34.06, paper_top1=83.70),
    'test_riformer': PaperCfg(input_size=(3, 64, 64), pool_size=(2, 2), first_conv='stem.conv',
                              classifier='head.fc', interpolation='bicubic', crop_pct=0.9),
})

_S12 = dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512), layer_scale_init=1e-5)
_S24 = dict(depths=(4, 4, 12, 4), dims=(64, 128, 320, 512), layer_scale_init=1e-5)
_S36 = dict(depths=(6, 6, 18, 6), dims=(64, 128, 320, 512), layer_scale_init=1e-6)
_M36 = dict(depths=(6, 6, 18, 6), dims=(96, 192, 384, 768), layer_scale_init=1e-6)
_M48 = dict(depths=(8, 8, 24, 8), dims=(96, 192, 384, 768), layer_scale_init=1e-6)


@register_model
def riformer_s12(pretrained: bool = False, **kwargs) -> RIFormer:
    """RIFormer-S12: 11,921,832 params in training form, 11,915,176 deployed, 1.82 GMACs, 76.9 % top-1."""
    return _create_riformer('riformer_s12', pretrained, **(_S12 | kwargs))


@register_model
def riformer_s24(pretrained: bool = False, **kwargs) -> RIFormer:
    return _create_riformer('riformer_s24', pretrained, **(_S24 | kwargs))


@register_model
def riformer_s36(pretrained: bool = False, **kwargs) -> RIFormer:
    return _create_riformer('riformer_s36', pretrained, **(_S36 | kwargs))


@register_model
def riformer_m36(pretrained: bool = False, **kwargs) -> RIFormer:
    return _create_riformer('riformer_m36', pretrained, **(_M36 | kwargs))


@register_model
def riformer_m48(pretrained: bool = False, **kwargs) -> RIFormer:
    return _create_riformer('riformer_m48', pretrained, **(_M48 | kwargs))


@register_model
def test_riformer(pretrained: bool = False, **kwargs) -> RIFormer:
    """Tiny RIFormer for tests and the digits experiments: 64 x 64 input, maps 16 / 8 / 4 / 2."""
    args = dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 48), layer_scale_init=1e-5)
    return _create_riformer('test_riformer', pretrained, **(args | kwargs))
