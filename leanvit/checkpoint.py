"""Loading and saving weights safely: no code in a checkpoint is ever executed, no saved file is ever half-written."""

import os
import pickle
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds Python objects other than tensors and plain containers, so it was not loaded."""


def unwrap_state_dict(checkpoint: dict) -> dict:
    """The tensor dict inside a training checkpoint: under 'model' or 'state_dict', without a DDP 'module.' prefix."""
    for key in ('model', 'state_dict'):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if checkpoint and all(k.startswith('module.') for k in checkpoint):
        checkpoint = {k[len('module.'):]: v for k, v in checkpoint.items()}
    return dict(checkpoint)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a .safetensors file or a PyTorch pickle with weights-only unpickling (code objects are refused)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    if path.suffix == '.safetensors':
        return load_file(path)
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f'refused to load {path}: it contains Python objects other than tensors, so unpickling it could run '
            f'code. leanvit only loads weights-only pickles and .safetensors files. Details: {str(e).splitlines()[0]}'
        ) from None


def family_function(model: nn.Module, name: str):
    """A module-level function of the file that defines ``model``'s class (e.g. its ``checkpoint_filter_fn``)."""
    return getattr(sys.modules[type(model).__module__], name, None)


def load_checkpoint(model: nn.Module, path: str | os.PathLike, filter_fn=None) -> nn.Module:
    """Load weights from ``path`` into ``model`` (in place) and return it.

    ``filter_fn(state_dict, model)`` converts another layout first; by default the model's own family converter
    (the ``checkpoint_filter_fn`` of the model's module) is used, so official checkpoints load directly.
    """
    state_dict = unwrap_state_dict(read_checkpoint(path))
    if filter_fn is None:
        filter_fn = family_function(model, 'checkpoint_filter_fn')
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    check_state_dict_fits(model, state_dict, source=str(path))
    model.load_state_dict(state_dict, strict=True)
    return model


def check_state_dict_fits(model: nn.Module, state_dict: dict, source: str = 'state_dict'):
    """Raise a ValueError that names missing, unexpected and mis-shaped entries if ``state_dict`` does not fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}'
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if not (missing or unexpected or mismatched):
        return
    name = getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
    problems = []
    for label, items in (('shapes differ', mismatched), ('missing', missing), ('unexpected', unexpected)):
        if items:
            problems.append(f'{len(items)} {label} (e.g. {"; ".join(items[:3])})')
    raise ValueError(f'{source} does not fit model {name}: ' + ', '.join(problems)
                     + '. Is it a checkpoint of another architecture or configuration?')


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` and rename the result over ``path``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None):
    """Write the model's state_dict as .safetensors atomically: the file at ``path`` is either old or complete."""
    state_dict = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state_dict, tmp, metadata=metadata))
