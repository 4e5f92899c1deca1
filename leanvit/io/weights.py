"""Loading and saving weights safely: no code in a checkpoint is ever executed, no saved file is ever half-written.

A file's format is told by its first bytes, not by its name, and every way a file can be unreadable (missing, a
folder, empty, truncated, corrupt, another format, holding something other than tensors) is reported as one line
that names the file: ``FileNotFoundError`` for a missing path, `CheckpointError` for everything else.
"""

import argparse
import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from leanvit.errors import CheckpointError, UnsafeCheckpointError
from leanvit.io.exported import exported_format
from leanvit.io.files import atomic_write
from leanvit.io.model_folder import weights_of

FORMATS = {
    'safetensors': 'a .safetensors file',
    'zip': 'a PyTorch zip checkpoint (torch.save)',
    'pickle': 'a Python pickle (legacy torch.save or pickle.dump)',
}


def unwrap_state_dict(checkpoint: dict) -> dict:
    """The tensor dict inside a training checkpoint: under 'model' or 'state_dict', without a DDP 'module.' prefix."""
    for key in ('model', 'state_dict'):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if checkpoint and all(isinstance(k, str) and k.startswith('module.') for k in checkpoint):
        checkpoint = {k[len('module.'):]: v for k, v in checkpoint.items()}
    return dict(checkpoint)


def checkpoint_format(path: str | os.PathLike) -> str:
    """The format of the file at ``path`` from its first bytes: a key of `FORMATS`.

    A .safetensors file starts with its header's length (8 bytes, little-endian) and the header's opening '{', a
    torch.save zip with b'PK\\x03\\x04', a pickle of protocol 2 or later with b'\\x80'. Content that matches none of
    these is taken as .safetensors only when the file is named so, which lets the safetensors reader say what is
    wrong with it.

    Raises:
        FileNotFoundError: nothing exists at ``path``.
        CheckpointError: ``path`` is a folder or another non-file, is empty, or its content matches no format.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f'{path} is a folder, not a checkpoint file')
    if not path.exists():
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    if not path.is_file():
        raise CheckpointError(f'{path} is not a regular file, so it cannot be a checkpoint')
    if exported := exported_format(path):
        raise CheckpointError(f'{path} is an exported {exported} model, not a checkpoint: `leanvit eval` runs it as '
                              f'it is; loading weights needs the checkpoint it was exported from (.safetensors)')
    with open(path, 'rb') as f:
        head = f.read(9)
    if not head:
        raise CheckpointError(f'{path} is empty (0 bytes): truncated, or never written')
    if head[:4] == b'PK\x03\x04':
        return 'zip'
    # Tested before the pickle's b'\x80', which also starts a .safetensors file whose header is 128 + 256k bytes long.
    if head[8:9] == b'{' or path.suffix == '.safetensors':
        return 'safetensors'
    if head[:1] == b'\x80':
        return 'pickle'
    raise CheckpointError(f'{path} is not a checkpoint (corrupt, or another format): it starts with {head[:8]!r}, '
                          'which is not a .safetensors header, a PyTorch zip or a pickle')


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of the .safetensors file at ``path``, whatever its name.

    Raises:
        FileNotFoundError: nothing exists at ``path``.
        CheckpointError: ``path`` is not a file, is of another format, or is a corrupt or truncated .safetensors.
    """
    path = Path(path)
    kind = checkpoint_format(path)
    if kind != 'safetensors':
        raise CheckpointError(f'{path} is {FORMATS[kind]}, not a .safetensors file')
    try:
        with safe_open(path, framework='pt') as f:
            return {name: f.get_tensor(name) for name in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        reason = _first_sentence(e).removeprefix('Error while deserializing header: ')
        raise CheckpointError(f'{path} is not a valid .safetensors file (corrupt or truncated): {reason}') from e


def plain_data_globals() -> list:
    """Classes beside tensors that released checkpoints carry and that weights-only unpickling may build.

    DeiT-based training scripts save their ``argparse.Namespace`` and numpy scalars (``best_acc``) next to the
    weights. Unpickling these builds plain data (a namespace of attributes, a number, a dtype, an array of numbers)
    and calls nothing else; whatever they hold still has to pass the weights-only unpickler.
    """
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray
    return [argparse.Namespace, np.dtype, np.ndarray, multiarray.scalar, multiarray._reconstruct,
            *{type(np.dtype(code)) for code in '?bhilqBHILQefdgFDG'}]


def read_checkpoint(path: str | os.PathLike, trust: bool = False) -> dict:
    """The dict in a .safetensors file or a PyTorch pickle, unpickled weights-only (code objects are refused).

    Weights-only unpickling also builds the plain-data classes of `plain_data_globals`. ``trust=True`` unpickles
    a pickle fully, with a warning: only for a file whose origin you trust, since that can run code it carries.

    Raises:
        FileNotFoundError: nothing exists at ``path``.
        UnsafeCheckpointError: the pickle holds Python objects the weights-only unpickler refuses.
        CheckpointError: ``path`` is not a file, is empty, corrupt or truncated, or holds something else than a dict.
    """
    path = Path(path)
    kind = checkpoint_format(path)
    if kind == 'safetensors':
        return read_safetensors(path)[0]
    if path.suffix == '.safetensors':
        # Whoever named it .safetensors (or a scanner that trusts the name) believes it holds no pickle.
        raise CheckpointError(f'{path} is named .safetensors but is {FORMATS[kind]}; leanvit does not unpickle a file '
                              'named .safetensors (rename it to .pth to load it weights-only)')
    if trust:
        warnings.warn(f'unpickling {path} fully (trusted): any code it carries runs now', stacklevel=2)
    try:
        with torch.serialization.safe_globals(plain_data_globals()):
            checkpoint = torch.load(path, map_location='cpu', weights_only=not trust)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and _holds_intact_pickle(path, kind):
            raise UnsafeCheckpointError(
                f'refused to load {path}: it contains Python objects other than tensors, so unpickling it could run '
                'code. leanvit only loads weights-only pickles and .safetensors files; if you trust where the file '
                f'comes from, pass --trust-checkpoint (trust=True). Details: {_weights_only_reason(e)}') from None
        reason = _weights_only_reason(e) if isinstance(e, pickle.UnpicklingError) else _first_sentence(e)
        raise CheckpointError(f'{path} is not a valid PyTorch checkpoint (corrupt, truncated or not written by '
                              f'torch.save): {reason}') from e
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'{path} holds {_describe(checkpoint)}, not a dict of tensors (a state dict, or a '
                              "training checkpoint with one under 'model' or 'state_dict')")
    return checkpoint


def _holds_intact_pickle(path: Path, kind: str) -> bool:
    """Whether the pickle that torch's weights-only unpickler refused is intact, so the refusal is about what it holds.

    Random or damaged bytes fail that unpickler the same way as a pickle that holds code, so the pickle's structure
    is checked opcode by opcode (nothing is run): a zip's data.pkl, or the pickles a legacy torch.save writes first
    (magic number, protocol, system info, the object; a pickle.dump writes one and ends).
    """
    try:
        with open(path, 'rb') as f:
            if kind == 'zip':
                with zipfile.ZipFile(f) as archive:
                    names = [n for n in archive.namelist() if n.endswith('/data.pkl')]
                    stream = io.BytesIO(archive.read(names[0]))  # read() checks the member's CRC
            else:
                stream = f
            for _ in range(4):
                for _ in pickletools.genops(stream):
                    pass
                if not stream.read(1):
                    break
                stream.seek(-1, os.SEEK_CUR)
    except (ValueError, IndexError, EOFError, zipfile.BadZipFile):
        return False
    return True


def _first_sentence(error: Exception, limit: int = 160) -> str:
    """The first sentence of ``error``'s message, at most ``limit`` characters, or its type for an empty message.

    Libraries add advice after the first sentence, and torch starts its C++ errors with the source line
    ('[enforce fail at inline_container.cc:180] . '), which is dropped.
    """
    text = re.sub(r'^\[enforce fail at [^\]]*\][\s.]*', '', str(error).strip())
    sentence = text.splitlines()[0].split('. ')[0] if text else type(error).__name__
    return sentence if len(sentence) <= limit else sentence[:limit - 3] + '...'


def _weights_only_reason(error: Exception) -> str:
    """The line of torch's weights-only refusal that names what was refused, without its general advice."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if not line.startswith('Check the documentation')]
    return causes[-1].removeprefix('WeightsUnpickler error: ') if causes else type(error).__name__


def _describe(value) -> str:
    """What ``value`` is, in a few words for a message: 'a tensor of shape (3,)', 'a list of 2 items', 'an int'."""
    if isinstance(value, torch.Tensor):
        return f'a tensor of shape {tuple(value.shape)}'
    name = type(value).__name__
    article = 'an' if name[0].lower() in 'aeiou' else 'a'
    if isinstance(value, (list, tuple, dict, set)):
        return f'{article} {name} of {len(value)} item{"" if len(value) == 1 else "s"}'
    return f'{article} {name}'


def _require_tensors(state_dict: dict, source: str) -> None:
    """Raise a `CheckpointError` naming ``source`` and the first entries that are not str -> tensor."""
    wrong = [f'{k!r}: {_describe(v)}' for k, v in state_dict.items()
             if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if wrong:
        raise CheckpointError(f'{source} is not a state dict of tensors: {len(wrong)} of its {len(state_dict)} entries '
                              f'are not (e.g. {"; ".join(wrong[:3])})')


def load_checkpoint(model: nn.Module, path: str | os.PathLike, filter_fn=None, trust: bool = False) -> nn.Module:
    """Load weights from ``path`` (a file, or a model folder: `leanvit.io.model_folder`) into ``model`` (in place)
    and return it.

    ``filter_fn(state_dict, model)`` converts another layout first; by default the converter its family registered
    for the model's class (`register_converter`) is used, so official checkpoints load directly.
    ``trust`` is `read_checkpoint`'s.

    Raises:
        FileNotFoundError: nothing exists at ``path``.
        CheckpointError: ``path`` cannot be read (see `read_checkpoint`), holds other values than tensors, or does
            not fit ``model``.
    """
    path = weights_of(path)  # a model folder's model.safetensors
    state_dict = unwrap_state_dict(read_checkpoint(path, trust=trust))
    # Before the converter, which takes every value for a tensor.
    _require_tensors(state_dict, str(path))
    if filter_fn is None:
        filter_fn = converter_for(model)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except (ValueError, KeyError) as e:  # a converter that meets a file of another layout or model
            raise CheckpointError(f'{path} cannot be converted for {type(model).__name__}: '
                                  f'{e if isinstance(e, ValueError) else f"no entry {e}"}') from e
    check_state_dict_fits(model, state_dict, source=str(path))
    model.load_state_dict(state_dict, strict=True)
    return model


def check_state_dict_fits(model: nn.Module, state_dict: dict, source: str = 'state_dict'):
    """Raise a `CheckpointError` that names missing, unexpected and mis-shaped entries if ``state_dict`` does not fit.

    Values that are not tensors are named first, since no shape can be compared for them.
    """
    _require_tensors(state_dict, source)
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
    raise CheckpointError(f'{source} does not fit model {name}: ' + ', '.join(problems)
                          + '. Is it a checkpoint of another architecture or configuration?')


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None):
    """Write the model's state_dict as .safetensors atomically: the file at ``path`` is either old or complete."""
    state_dict = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state_dict, tmp, metadata=metadata))


Converter = Callable[[dict, nn.Module], dict]
_converters: dict[type, Converter] = {}
_renamers: dict[type, Converter] = {}


def register_converter(*model_classes: type, names_only: bool = False) -> Callable[[Converter], Converter]:
    """Decorator: ``fn(state_dict, model) -> state_dict`` converts checkpoints of other layouts for ``model_classes``
    (and their subclasses); `leanvit.load_checkpoint` finds it through `converter_for`.

    With ``names_only``, ``fn`` only maps another layout's names onto the family's, without the checks (and value
    conversions) that loading needs: teacher-weight initialisation copies what matches through it, e.g. a PoolFormer
    teacher's weights into a RIFormer student, which the full converter refuses for its other token mixer.

    Raises:
        ValueError: another function already converts for one of ``model_classes``.
    """
    registry = _renamers if names_only else _converters

    def register(fn: Converter) -> Converter:
        for cls in model_classes:
            known = registry.get(cls)
            if known is not None and known.__qualname__ != fn.__qualname__:  # a module reload re-registers itself
                raise ValueError(f'{cls.__name__} already has a checkpoint converter: {known.__qualname__}')
            registry[cls] = fn
        return fn
    return register


def converter_for(model: nn.Module, names_only: bool = False) -> Converter | None:
    """The checkpoint converter registered for ``model``'s class, or the nearest base class along its MRO.

    With ``names_only``, the names-only converter if the family registered one, else its full converter.
    """
    registries = (_renamers, _converters) if names_only else (_converters,)
    for registry in registries:
        found = next((registry[cls] for cls in type(model).__mro__ if cls in registry), None)
        if found is not None:
            return found
    return None
