"""What leanvit adds to timm's registry: published figures on every pretrained cfg, and a list of its own models."""

import fnmatch
from dataclasses import dataclass

import timm
from timm.models import PretrainedCfg, is_model, model_entrypoint


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
