"""What leanvit adds to timm's registry: published figures on every pretrained cfg, a list of its own models, and
each family's checkpoint converter."""

import difflib
import fnmatch
import pickle
from dataclasses import dataclass

import timm
from timm.models import PretrainedCfg, get_arch_pretrained_cfgs, is_model, model_entrypoint
from torch import nn

from leanvit.errors import UnsafeCheckpointError, UsageError


@dataclass
class PaperCfg(PretrainedCfg):
    """timm's pretrained cfg plus the figures the paper reports for this configuration.

    ``paper_params`` is the exact count of the official implementation (``paper_deploy_params`` after
    ``reparameterize()``, for models with a re-parameterizable training form), ``paper_gmacs`` the multiply-accumulates
    (attention matmuls included) at ``input_size``, ``paper_top1`` the ImageNet-1k top-1 (%) of the official weights.
    """
    paper_params: int | None = None
    paper_deploy_params: int | None = None
    paper_gmacs: float | None = None
    paper_top1: float | None = None


def create_model(model_name: str, **kwargs) -> nn.Module:
    """``timm.create_model`` for any timm or leanvit model, ``arch`` or ``arch.tag``, with errors naming the problem.

    An unknown name or pretrained tag, or arguments the model's constructor refuses (an unknown keyword, a value of
    the wrong type or range), are a ``UsageError`` naming the model and the arguments, since they come from the
    user's input.
    """
    if not isinstance(model_name, str) or not is_model(model_name):
        close = difflib.get_close_matches(str(model_name), timm.list_models() + timm.list_pretrained(), n=3)
        raise UsageError(f'unknown model {model_name!r}' + (f' (did you mean {", ".join(close)}?)' if close else '')
                         + "; `leanvit models --all` lists leanvit's models, timm.list_models() every model")
    tags = get_arch_pretrained_cfgs(model_name)
    if '.' in model_name and model_name not in tags:  # timm would warn and build with default metadata
        raise UsageError(f'unknown pretrained tag in {model_name!r}; known: {", ".join(tags) or "none"}')
    try:
        return timm.create_model(model_name, **kwargs)
    except (TypeError, ValueError, AssertionError, IndexError, OverflowError) as e:  # timm checks with asserts too
        raise UsageError(f'cannot build model {model_name} with arguments {kwargs}: {_first_line(e)}') from e
    except RuntimeError as e:
        if not isinstance(e.__cause__, pickle.UnpicklingError):
            # torch refusing a tensor the arguments ask for (a negative or astronomical size)
            raise UsageError(f'cannot build model {model_name} with arguments {kwargs}: {_first_line(e)}') from e
        # timm's weights-only load of pretrained=True weights refused the file (nothing ran): name it, and the way
        # to load a file one trusts, instead of timm's traceback.
        overlay = kwargs.get('pretrained_cfg_overlay') or {}
        source = kwargs.get('checkpoint_path') or (overlay.get('file') if isinstance(overlay, dict) else None)
        asked = 'checkpoint_path' if kwargs.get('checkpoint_path') else 'pretrained=True'
        raise UnsafeCheckpointError(
            f'refused to load the weights of {model_name} ({source or "its pretrained file"}, asked for by '
            f'{asked}): the file holds Python objects other than tensors, so unpickling it could run code. '
            f'Remove {asked.split("=")[0]} from the model arguments; to start from a file you trust, convert it once '
            f'(leanvit.load_checkpoint(model, FILE, trust=True), then leanvit.save_weights) and train from the '
            f'.safetensors with --init-checkpoint') from None


def _first_line(error: Exception) -> str:
    """The first line of ``error``'s message: torch appends C++ stack frames to the reason."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def list_models(filter: str = '', include_test: bool = True) -> list[str]:
    """Names of the models leanvit registers in timm, sorted, optionally filtered by a shell-style pattern."""
    names = []
    for name in timm.list_models():
        if not is_model(name) or not model_entrypoint(name).__module__.startswith('leanvit.'):
            continue
        if filter and not fnmatch.fnmatch(name, filter):
            continue
        if not include_test and name.startswith('test_'):
            continue
        names.append(name)
    return sorted(names)
