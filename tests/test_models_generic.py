"""timm's generic model checks: the behaviour on one tiny configuration per architecture kind, the published figures
and metadata on every registered configuration.

The behavioural checks follow timm's own tests/test_models.py (forward, backward, default cfg, features,
intermediates, FX), plus what leanvit promises on top: deterministic evaluation, safetensors checkpoints without
aliased weights, an ordinary forward (every layer is called as a module: hooks fire, wrapped layers take effect,
nothing a hook saw is overwritten later), before and after ``timm.utils.model.reparameterize_model``, which folds
exactly (same outputs, a state_dict that loads into a freshly folded model).
They run over `TINY`: the registered ``test_*`` models (a few blocks, 32-64 px, a forward in milliseconds), one per
architecture kind, and the GLiT supernet at a tiny size. A full-size configuration differs from its family's tiny one
in sizes (widths, depths, grids, slices), which these checks do not depend on, and in its drop-path rate, which the
checks in training vary; `test_every_architecture_kind_has_a_tiny_model` fails when an architecture registers without
a tiny configuration, so that a new family cannot escape the battery.
What only the published configurations show (parameter and MAC counts equal to the paper's, pretrained cfgs, names
and tags) runs over every registered model and tag, built on the meta device: shapes without weights or compute.
"""

import copy
import functools
import math
from collections import defaultdict

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg
from timm.utils.model import reparameterize_model
from torch import nn

import leanvit
from leanvit.models.sret import FoldedResidual

BATCH_SIZE = 2
NUM_CLASSES = 42
REQUIRED_CFG_KEYS = ('input_size', 'num_classes', 'first_conv', 'classifier', 'mean', 'std', 'crop_pct',
                     'interpolation')

MODEL_NAMES = leanvit.list_models()
# The behavioural battery's models, name -> constructor arguments: every registered test_ model, and the GLiT supernet,
# which is registered at full size only (leanvit.methods.glit), at the size tests/test_glit_search.py trains it at.
TINY = {name: {} for name in leanvit.list_models('test_*')} | {
    'glit_supernet': dict(depth=2, embed_dim=48, patch_size=8, img_size=32)}

over_models = pytest.mark.parametrize('name', MODEL_NAMES)
over_tiny = pytest.mark.parametrize('name', sorted(TINY))
# Every pretrained tag (``arch.tag``): weights of a registered architecture, checked for their cfg only.
TAGGED_NAMES = [tagged for name in MODEL_NAMES for tagged in get_arch_pretrained_cfgs(name) if '.' in tagged]
# The tiny models have no drop path; the published configurations that train with it (GFNet-S / B / H) need its
# random masks to repeat wherever a forward is recomputed or retraced (grad checkpointing, FX), and its modules to be
# called (hooks): the checks in training run at both rates.
with_drop_path = pytest.mark.parametrize('drop_path_rate', [0., 0.1], ids=['no_drop_path', 'drop_path'])


def tiny_input_size(name: str) -> tuple[int, int, int]:
    """(C, H, W) the battery runs ``name`` at: its cfg's input_size, or the ``img_size`` `TINY` builds it at."""
    chans, height, width = get_pretrained_cfg(name).input_size
    size = TINY[name].get('img_size')
    return (chans, height, width) if size is None else (chans, size, size)


def create_tiny(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """``name`` built with its `TINY` arguments (and ``kwargs``), weights drawn after seeding with ``seed``."""
    torch.manual_seed(seed)
    return timm.create_model(name, **(TINY[name] | kwargs))


def create_meta(name: str, **kwargs) -> nn.Module:
    """``name`` (an architecture or ``arch.tag``) at full size on the meta device: shapes without weights or compute."""
    with torch.device('meta'):
        return leanvit.create_model(name, **kwargs)


@functools.cache
def meta_model(name: str) -> nn.Module:
    """`create_meta` built once per process: the checks over every configuration only read it (cfg, shapes, types),
    and six of them look at each name."""
    return create_meta(name)


def feature_grid(x: torch.Tensor, reduction: int) -> tuple[int, int]:
    """Spatial size of a feature map at ``reduction`` for input ``x``: strided convs round up."""
    return math.ceil(x.shape[-2] / reduction), math.ceil(x.shape[-1] / reduction)


def parameter_grads(model: nn.Module, x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Gradients of ``model(x).sum()``, seeded so that random draws in training (token permutations) repeat."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(x).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def as_nchw(features: torch.Tensor, model: nn.Module, shape: torch.Size) -> torch.Tensor:
    """``forward_features`` output in the model's ``output_fmt`` (NCHW, NHWC, or NLC tokens, class tokens first) as
    an NCHW map of ``shape``."""
    fmt = getattr(model, 'output_fmt', 'NCHW')
    if fmt == 'NHWC':
        return features.permute(0, 3, 1, 2)
    if fmt == 'NLC':
        return features[:, getattr(model, 'num_prefix_tokens', 0):].transpose(1, 2).reshape(shape)
    return features


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture
def model(name: str) -> nn.Module:
    return create_tiny(name).eval()


@pytest.fixture
def x(name: str) -> torch.Tensor:
    return torch.randn(BATCH_SIZE, *tiny_input_size(name), generator=torch.Generator().manual_seed(0))


@over_tiny
def test_forward_is_finite_and_unchanged_by_grad_checkpointing(name, model, x):
    out = model(x)
    assert out.shape == (BATCH_SIZE, get_pretrained_cfg(name).num_classes)
    assert torch.isfinite(out).all(), 'eval output has NaN or inf'
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), out)


@over_tiny
@with_drop_path
def test_backward_reaches_every_parameter(name, x, drop_path_rate):
    model = create_tiny(name, num_classes=NUM_CLASSES, drop_path_rate=drop_path_rate).train()
    torch.manual_seed(0)
    out = model(x)
    assert out.shape == (BATCH_SIZE, NUM_CLASSES)
    out.sum().backward()
    without_grad = [n for n, p in model.named_parameters() if p.grad is None]
    non_finite = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not without_grad, f'parameters without gradient: {without_grad}'
    assert not non_finite, f'parameters with NaN or inf gradient: {non_finite}'


@over_tiny
@with_drop_path
def test_grad_checkpointing_gives_same_gradients(name, x, drop_path_rate):
    model = create_tiny(name, drop_path_rate=drop_path_rate).train()
    reference = parameter_grads(model, x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(parameter_grads(model, x), reference)


@over_models
def test_default_cfg_matches_model(name):
    model = meta_model(name)
    cfg = model.pretrained_cfg
    missing = [k for k in REQUIRED_CFG_KEYS if cfg.get(k) is None]
    assert not missing, f'pretrained_cfg lacks {missing}'
    assert len(cfg['mean']) == len(cfg['std']) == cfg['input_size'][0]
    assert model.num_classes == cfg['num_classes']
    state_dict = model.state_dict()
    first_conv, classifier = cfg['first_conv'] + '.weight', cfg['classifier'] + '.weight'
    assert first_conv in state_dict and classifier in state_dict
    assert state_dict[first_conv].shape[1] == cfg['input_size'][0], 'first_conv does not take the input channels'
    assert state_dict[classifier].shape[0] == cfg['num_classes'], 'classifier does not give num_classes outputs'
    assert model.get_classifier() is model.get_submodule(cfg['classifier'])


@pytest.mark.parametrize('tagged', TAGGED_NAMES)
def test_every_pretrained_tag_has_a_complete_cfg_of_its_architecture(tagged):
    cfg = get_pretrained_cfg(tagged)
    missing = [k for k in REQUIRED_CFG_KEYS if getattr(cfg, k) is None]
    assert not missing, f'pretrained_cfg lacks {missing}'
    model = meta_model(tagged)
    assert model.pretrained_cfg['tag'] == tagged.split('.', 1)[1]
    if cfg.pool_size:
        reduction = model.feature_info[-1]['reduction']
        assert tuple(cfg.pool_size) == feature_grid(torch.empty(cfg.input_size, device='meta'), reduction)


@pytest.mark.parametrize('name', [name for name in MODEL_NAMES if get_pretrained_cfg(name).pool_size])
def test_cfg_pool_size_matches_feature_reduction(name):
    cfg = get_pretrained_cfg(name)
    reduction = meta_model(name).feature_info[-1]['reduction']
    assert tuple(cfg.pool_size) == feature_grid(torch.empty(cfg.input_size, device='meta'), reduction)


@pytest.mark.parametrize('tagged', [tagged for tagged in TAGGED_NAMES
                                    if getattr(get_pretrained_cfg(tagged), 'paper_params', None)])
def test_published_params_and_macs(tagged):
    """Every configuration that publishes figures has the paper's exact parameter count, in training form and (for
    re-parameterizable models) deployed, and its MACs at the cfg's input size. Each family's tests hold the MACs to
    the precision its paper prints; here every family within the widest of those tolerances (GFNet-H-Ti, 3.5 %)."""
    model = meta_model(tagged)
    cfg = model.pretrained_cfg
    measured = leanvit.profile(model, cfg['input_size'])
    assert measured.params == cfg['paper_params']
    if cfg.get('paper_deploy_params') is not None:
        assert leanvit.count_params(reparameterize_model(model)) == cfg['paper_deploy_params']
    if cfg.get('paper_gmacs') is not None:
        assert measured.gmacs == pytest.approx(cfg['paper_gmacs'], rel=0.035)


def test_every_architecture_kind_has_a_tiny_model():
    """The battery covers an architecture through a tiny model of its class: a family registering a new class needs
    a ``test_`` entrypoint (or a `TINY` entry) before its models are tested for behaviour at all."""
    tiny = {type(create_meta(name, **kwargs)) for name, kwargs in TINY.items()}
    untested = sorted(name for name in MODEL_NAMES if type(meta_model(name)) not in tiny)
    assert not untested, f'architectures without a tiny model in TINY: {untested}'


@over_tiny
def test_feature_and_head_sizes(model, x):
    fmt = getattr(model, 'output_fmt', 'NCHW')
    features = model.forward_features(x)
    assert features.shape[get_channel_dim(fmt)] == model.num_features
    if features.ndim == 4:
        spatial = tuple(features.shape[d] for d in get_spatial_dim(fmt))
        assert spatial == feature_grid(x, model.feature_info[-1]['reduction'])
    pre_logits = model.forward_head(features, pre_logits=True)
    assert pre_logits.shape == (BATCH_SIZE, model.head_hidden_size)


@over_tiny
def test_reset_classifier_to_features(model, x):
    pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
    model.reset_classifier(0)
    assert model.num_classes == 0
    # timm's contract: without a classifier the model returns its pre-logits (head_hidden_size wide; equal to
    # num_features unless the head has a hidden layer).
    out = model(x)
    assert out.shape == (BATCH_SIZE, model.head_hidden_size)
    torch.testing.assert_close(out, pre_logits)


@over_tiny
def test_reset_classifier_without_pooling(model, x):
    features = model.forward_features(x)
    try:
        model.reset_classifier(0, '')
    except (AssertionError, ValueError, NotImplementedError) as e:
        pytest.skip(f"no unpooled head (global_pool=''): {e}")
    unpooled = model.forward_head(features)
    assert unpooled.shape == features.shape
    torch.testing.assert_close(model(x), unpooled)


@over_tiny
def test_features_only(name, model, x):
    features_model = create_tiny(name, features_only=True).eval()
    info = features_model.feature_info
    expected_channels = [model.feature_info[i]['num_chs'] for i in info.out_indices]
    expected_reductions = [model.feature_info[i]['reduction'] for i in info.out_indices]
    assert info.channels() == expected_channels
    assert info.reduction() == expected_reductions
    outputs = features_model(x)
    assert isinstance(outputs, list) and len(outputs) == len(info)
    for out, channels, reduction in zip(outputs, expected_channels, expected_reductions):
        assert out.shape == (BATCH_SIZE, channels, *feature_grid(x, reduction))


@over_tiny
def test_forward_intermediates_match_features(name, model, x):
    final, intermediates = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    intermediates_only = model.forward_intermediates(x, intermediates_only=True)
    assert len(intermediates_only) == len(model.feature_info)
    torch.testing.assert_close(intermediates_only, intermediates)
    features_model = create_tiny(name, features_only=True).eval()
    expected = [intermediates[i] for i in features_model.feature_info.out_indices]
    torch.testing.assert_close(features_model(x), expected)


@over_tiny
def test_forward_intermediates_stopping_early_returns_the_first_layer(model, x):
    """Stopping after the first layer leaves its intermediate unchanged, and the final features are that layer's
    output: normalised where the final norm fits it (isotropic models), as is where it does not (a narrower stage)."""
    reference = model.forward_intermediates(x, intermediates_only=True)
    final, intermediates = model.forward_intermediates(x, indices=[0], stop_early=True)
    torch.testing.assert_close(intermediates, reference[:1])
    assert final.shape[get_channel_dim(getattr(model, 'output_fmt', 'NCHW'))] == model.feature_info[0]['num_chs']


@over_tiny
def test_prune_intermediate_layers_keeps_intermediates(model, x):
    reference = model.forward_intermediates(x, intermediates_only=True)
    keep = list(range(max(len(reference) - 1, 1)))
    pruned = copy.deepcopy(model)
    assert pruned.prune_intermediate_layers(indices=keep) == keep
    assert num_params(pruned) < num_params(model), 'pruning removed nothing'
    final, intermediates = pruned.forward_intermediates(x, indices=keep)
    torch.testing.assert_close(intermediates, reference[:len(keep)])
    torch.testing.assert_close(as_nchw(final, model, reference[keep[-1]].shape),
                               reference[keep[-1]])


@over_tiny
def test_fx_trace_forward_matches_eager(model, x):
    traced = torch.fx.symbolic_trace(model)
    assert isinstance(traced, torch.fx.GraphModule)
    torch.testing.assert_close(traced(x), model(x))


@over_tiny
@with_drop_path
def test_fx_trace_backward_matches_eager(name, x, drop_path_rate):
    model = create_tiny(name, drop_path_rate=drop_path_rate).train()
    traced = torch.fx.symbolic_trace(model)
    # The traced module shares the model's parameters; parameter_grads clears them before each backward.
    eager = parameter_grads(model, x)
    torch.testing.assert_close(parameter_grads(traced, x), eager)


@over_tiny
@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:FutureWarning')
def test_torchscript_is_not_supported(name, model):
    """leanvit targets FX and torch.compile, not TorchScript (deprecated in PyTorch), so no jit.script check runs.

    This test documents that choice: it fails once a model does script, so that the check can be added.
    """
    try:
        torch.jit.script(model)
    except (RuntimeError, torch.jit.frontend.FrontendError):
        return
    pytest.fail(f'{name} now compiles with torch.jit.script: add a TorchScript forward check to this module')


@over_tiny
@torch.no_grad()
def test_safetensors_round_trip(name, model, x, tmp_path):
    path = tmp_path / 'w.safetensors'
    leanvit.save_weights(model, path)
    fresh = create_tiny(name, seed=1).eval()
    assert not torch.equal(fresh(x), model(x)), 'seeds 0 and 1 give the same model: the load is not tested'
    leanvit.load_checkpoint(fresh, path)
    assert torch.equal(fresh(x), model(x))


@over_tiny
def test_state_dict_stores_shared_weights_once(model):
    state_dict = model.state_dict()
    keys_by_storage = defaultdict(list)
    for key, tensor in state_dict.items():
        if tensor.numel():
            keys_by_storage[tensor.untyped_storage().data_ptr()].append(key)
    aliased = [keys for keys in keys_by_storage.values() if len(keys) > 1]
    assert not aliased, f'state_dict entries sharing storage: {aliased}'
    buffers = {n for n, _ in model.named_buffers(remove_duplicate=False)}
    parameter_entries = sum(t.numel() for k, t in state_dict.items() if k not in buffers)
    assert parameter_entries == num_params(model)


@over_tiny
@torch.no_grad()
def test_eval_is_deterministic(model, x):
    assert torch.equal(model(x), model(x))


@over_models
def test_registered_in_timm(name):
    assert name in timm.list_models()


@over_models
def test_leanvit_create_model_builds_timm_architecture(name):
    with torch.device('meta'):
        from_timm = timm.create_model(name)
    from_leanvit = meta_model(name)
    assert type(from_leanvit) is type(from_timm)
    shapes = {k: v.shape for k, v in from_timm.state_dict().items()}
    assert {k: v.shape for k, v in from_leanvit.state_dict().items()} == shapes


def leaf_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if not next(module.children(), None)}


@over_tiny
@with_drop_path
@pytest.mark.parametrize('mode', ['eval', 'train', 'folded'])
def test_forward_hook_fires_on_every_leaf_module(name, x, mode, drop_path_rate):
    """Every leaf module is called by the forward, in both modes and folded for inference: drop paths (identities at
    rate 0) and dropouts of rate 0 included, so a hook on any of them sees the tensors it names."""
    model = create_tiny(name, drop_path_rate=drop_path_rate).eval()
    model = reparameterize_model(model) if mode == 'folded' else model.train(mode == 'train')
    leaves = leaf_modules(model)
    fired = set()
    for leaf, module in leaves.items():
        module.register_forward_hook(lambda module, args, output, leaf=leaf: fired.add(leaf))
    torch.manual_seed(0)
    model(x)
    assert not leaves.keys() - fired, f'forward hooks that never fired in {mode} mode: {sorted(leaves.keys() - fired)}'


class AddDelta(nn.Module):
    """``layer(x) + scale * noise``: a stand-in for what replaces a layer in practice (LoRA adapter, quantized layer).

    ``scale`` is 0, so the output is unchanged until it is set, and its gradient says whether the layer's output
    reaches the model's output; the noise is drawn from the wrapper's own generator, the same on every forward.
    """

    def __init__(self, layer: nn.Module, seed: int):
        super().__init__()
        self.layer = layer
        self.scale = nn.Parameter(torch.zeros(()))
        self.seed = seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x)
        return out + self.scale * torch.randn(out.shape, generator=torch.Generator().manual_seed(self.seed))


@over_tiny
def test_every_linear_and_conv_output_reaches_the_model_output(model, x):
    """Each nn.Linear and nn.Conv2d is called as a module: a wrapper around any one of them changes the output (to
    first order, through the gradient of each wrapper's scale), and wrapping all of them changes it."""
    layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    wrappers = {}
    for i, name in enumerate(layers):
        parent, _, child = name.rpartition('.')
        wrappers[name] = AddDelta(model.get_submodule(name), seed=i)
        setattr(model.get_submodule(parent), child, wrappers[name])
    reference = model(x)
    projection = torch.randn(reference.shape, generator=torch.Generator().manual_seed(0))
    (reference * projection).sum().backward()
    unused = [name for name, w in wrappers.items() if w.scale.grad is None or w.scale.grad == 0]
    assert not unused, f'layers whose output does not reach the model output: {unused}'
    with torch.no_grad():
        for wrapper in wrappers.values():
            wrapper.scale.fill_(1e-2)
        assert not torch.allclose(model(x), reference), 'wrapping every Linear and Conv2d changed nothing'


@over_tiny
@pytest.mark.parametrize('form, context', [('training', torch.no_grad), ('training', torch.inference_mode),
                                           ('folded', torch.inference_mode)])  # inference: where a fold would act
def test_tensors_seen_by_hooks_are_not_overwritten(model, x, context, form):
    """A hook that keeps an input or output (feature taps, imitation losses) needs no clone: nothing the model
    computes later writes into a tensor a module received or returned, before or after folding."""
    seen = {}

    if form == 'folded':
        model = reparameterize_model(model)
    def keep(module, args, output, name):
        for value in (*args, output):
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen[id(value)] = (name, value, value.clone())

    for name, module in model.named_modules():
        module.register_forward_hook(lambda module, args, output, name=name: keep(module, args, output, name))
    with context():
        model(x)
    assert seen
    overwritten = sorted({name for name, value, copy in seen.values() if not torch.equal(value, copy)})
    assert not overwritten, f'tensors seen by hooks on these modules were overwritten later: {overwritten}'


def randomise_folded_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move what re-parameterization folds (BatchNorm statistics and affine, RIFormer's affine mixer, SReT's residual
    scales) off its init, so that a wrong fold cannot pass by accident."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(generator=generator)
                module.running_var.uniform_(0.5, 2., generator=generator)
                module.weight.normal_(generator=generator)
                module.bias.normal_(generator=generator)
        for name, param in model.named_parameters():
            if '.affine.' in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
            elif name.endswith('_scale'):
                param.mul_(1 + 0.3 * torch.randn(param.shape, generator=generator))
    return model


@over_tiny
def test_reparameterize_model_keeps_outputs(name, model, x):
    randomise_folded_statistics(model)
    with torch.no_grad():
        expected = model(x)
    original_types = [type(m) for m in model.modules()]
    fast = reparameterize_model(model)
    assert [type(m) for m in model.modules()] == original_types, 'reparameterize_model changed the original'
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(torch.fx.symbolic_trace(fast)(x), expected, rtol=1e-4, atol=1e-5)
    # The folded model is made of the layers a model is built from: nothing installed only for inference.
    training_types = {type(m) for m in create_tiny(name).modules()} | {nn.Sequential, nn.Identity}
    assert {type(m) for m in fast.modules()} <= training_types | {FoldedResidual}


@over_tiny
@torch.no_grad()
def test_folded_state_dict_loads_into_a_freshly_folded_model(name, model, x):
    """The folded architecture depends on the architecture only: its state_dict loads, key for key and shape for
    shape, into another model of the same name folded the same way, which then computes the same outputs."""
    folded = reparameterize_model(randomise_folded_statistics(model))
    fresh = reparameterize_model(create_tiny(name, seed=1).eval())
    fresh.load_state_dict(folded.state_dict())  # strict: same keys, same shapes
    torch.testing.assert_close(fresh(x), folded(x), rtol=0, atol=0)


@over_models
def test_family_registers_a_checkpoint_converter(name):
    model = meta_model(name)
    convert = leanvit.io.weights.converter_for(model)
    assert convert is not None and convert.__module__ == type(model).__module__
    subclass = type('Subclass', (type(model),), {})
    assert leanvit.io.weights.converter_for(subclass.__new__(subclass)) is convert  # found along the MRO
    # Teacher-weight initialisation renames through the names-only converter, else the full one.
    rename = leanvit.io.weights.converter_for(model, names_only=True)
    assert rename is not None and rename.__module__ == type(model).__module__


def test_a_class_has_one_converter():
    class Family(nn.Module):
        pass

    def convert(state_dict, model):
        return state_dict

    def other(state_dict, model):
        return {}

    leanvit.io.weights.register_converter(Family)(convert)
    leanvit.io.weights.register_converter(Family, names_only=True)(other)
    assert leanvit.io.weights.converter_for(Family()) is convert
    assert leanvit.io.weights.converter_for(Family(), names_only=True) is other
    with pytest.raises(ValueError, match='Family already has a checkpoint converter: .*convert'):
        leanvit.io.weights.register_converter(Family)(other)


@over_tiny
def test_norm_and_act_layers_are_injectable(name, x):
    # timm's convention: the blocks' norm and activation are constructor arguments. A norm factory that returns the
    # identity fits every layout (tokens or maps), so one check serves every family.
    widths = []

    def no_norm(dim: int, **factory_kwargs) -> nn.Module:  # timm's layers pass device and dtype
        widths.append(dim)
        return nn.Identity()

    default = create_tiny(name).eval()
    injected = create_tiny(name, norm_layer=no_norm, act_layer=nn.Hardswish).eval()
    assert widths, f'{name} did not call norm_layer'
    assert not any(isinstance(m, nn.GELU) for m in injected.modules())
    assert sum(isinstance(m, nn.Hardswish) for m in injected.modules()) == \
        sum(isinstance(m, nn.GELU) for m in default.modules())
    assert num_params(injected) < num_params(default)
    with torch.no_grad():
        assert injected(x).shape == default(x).shape
