"""What leanvit adds to timm's registry: published figures on every pretrained cfg, and a list of its own models."""

import difflib
import fnmatch
from dataclasses import dataclass

import timm
from timm.models import PretrainedCfg, is_model, model_entrypoint
from torch import nn

from leanvit.errors import UsageError


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
    """``timm.create_model`` for any timm or leanvit model, with errors that name the problem.

    An unknown name, or arguments the model's constructor refuses (an unknown keyword, a value of the wrong type or
    range), are a ``UsageError`` naming the model and the arguments, since they come from the user's input.
    """
    if not isinstance(model_name, str) or not is_model(model_name):
        close = difflib.get_close_matches(str(model_name), timm.list_models(), n=3)
        raise UsageError(f'unknown model {model_name!r}' + (f' (did you mean {", ".join(close)}?)' if close else '')
                         + "; `leanvit models --all` lists leanvit's models, timm.list_models() every model")
    try:
        return timm.create_model(model_name, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:  # timm's constructors check arguments with asserts too
        raise UsageError(f'cannot build model {model_name} with arguments {kwargs}: {e}') from e


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
