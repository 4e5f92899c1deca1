"""Reading the files ``leanvit export`` writes (ONNX, TorchScript): which kind a file is, a module that runs it, and
the metadata stored in it (model, input pipeline, the run's data), each field checked before a command uses it.

onnx and onnxruntime are optional (``pip install "leanvit[export]"``): they are imported where a file needs them.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import zipfile
from pathlib import Path

import torch
from torch import nn

from leanvit.errors import CheckpointError, LeanvitError

METADATA_KEY = 'leanvit'   # the exported file's own record: model, input pipeline, the run's data


def require_packages(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise LeanvitError(f'ONNX export needs {", ".join(missing)}: pip install "leanvit[export]"')


def exported_format(path: str | os.PathLike) -> str | None:
    """``'onnx'`` or ``'torchscript'`` for a file ``export_model`` writes, None for anything else (a checkpoint)."""
    path = Path(path)
    if path.suffix.lower() == '.onnx':
        return 'onnx'
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:  # torch.jit.save writes code/ beside the pickled constants
            if any('/code/' in name for name in archive.namelist()):
                return 'torchscript'
    return None


def load_exported(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """A module that runs the exported file at ``path`` (ONNX Runtime, or the TorchScript interpreter) on CPU
    tensors, and the metadata ``export_model`` stored in it.

    Raises:
        LeanvitError: The file is not an export of leanvit's, or lacks its metadata.
    """

    path = Path(path)
    kind = exported_format(path)
    try:
        if kind == 'onnx':
            require_packages('onnx', 'onnxruntime')
            import onnx

            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            runner = onnx_module(path)
            stored = props.get(METADATA_KEY)
        elif kind == 'torchscript':
            files = {f'{METADATA_KEY}.json': ''}
            runner = torch.jit.load(str(path), map_location='cpu', _extra_files=files)
            stored = files[f'{METADATA_KEY}.json'] or None
        else:
            raise LeanvitError(f'{path} is not an ONNX or TorchScript file written by leanvit export')
    except LeanvitError:
        raise
    except Exception as e:  # the runtimes' own errors for a file they cannot read
        raise LeanvitError(f'{path} cannot be loaded as {kind}: {" ".join(str(e).split())[:200]}') from None
    if not stored:
        raise LeanvitError(f'{path} has no leanvit metadata (model, input pipeline): it was not written by '
                           f'leanvit export; evaluate its checkpoint instead')
    return runner, _checked_metadata(path, stored)


def _checked_metadata(path: Path, stored: str) -> dict:
    """The metadata ``export_model`` stored in the file at ``path``, each field a command reads checked."""
    def refuse(field, expected, value):
        raise CheckpointError(f'{path}: metadata field "{field}" must be {expected}, got {value!r}; the file was '
                              f'altered or not written by leanvit export')

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    try:
        meta = json.loads(stored, parse_constant=lambda name: refuse('(any)', 'finite numbers only', name))
    except json.JSONDecodeError as e:
        raise CheckpointError(f'{path}: its leanvit metadata is not valid JSON ({e})') from None
    if not isinstance(meta, dict):
        refuse('(the whole)', 'a JSON object', meta)
    for field, kind, expected in (('model', str, 'a model name'), ('model_kwargs', dict, 'a JSON object'),
                                  ('config', dict, 'a JSON object'), ('data_config', dict, 'a JSON object')):
        if not isinstance(meta.get(field), kind):
            refuse(field, expected, meta.get(field))
    classes = meta.get('num_classes')
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        refuse('num_classes', 'an integer >= 1', classes)
    cfg = meta['data_config']
    size = cfg.get('input_size')
    if not (isinstance(size, list) and len(size) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)):
        refuse('data_config.input_size', 'three integers >= 1 (channels, height, width)', size)
    for field in ('mean', 'std'):
        value = cfg.get(field)
        if not (isinstance(value, list) and value and all(map(number, value))
                and (field == 'mean' or all(v > 0 for v in value))):
            refuse(f'data_config.{field}', 'a list of finite numbers' + (' > 0' if field == 'std' else ''), value)
    if not (number(cfg.get('crop_pct')) and 0 < cfg['crop_pct'] <= 1):
        refuse('data_config.crop_pct', 'a number in (0, 1]', cfg.get('crop_pct'))
    if not isinstance(cfg.get('interpolation'), str):
        refuse('data_config.interpolation', 'a string such as "bicubic"', cfg.get('interpolation'))
    return meta


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session of the file at ``path`` (any name) on ``threads`` threads (None: ORT's default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])


def onnx_module(path: str | os.PathLike) -> _OnnxModule:
    """The ONNX file at ``path`` (any name) in an ONNX Runtime CPU session, called like a module."""
    return _OnnxModule(onnx_session(path))


class _OnnxModule:
    """An ONNX Runtime session called like a module: float32 CPU tensor in, logits tensor out."""

    def __init__(self, session):
        self.session = session
        size = session.get_inputs()[0].shape[0]
        # A file exported with --static-batch takes that batch size only (a dynamic axis has a name, not a size).
        self.fixed_batch = size if isinstance(size, int) else None

    def eval(self):
        return self

    def __call__(self, images):

        outputs = []
        for part in images.float().cpu().split(self.fixed_batch or len(images) or 1):
            # A fixed-batch file gets the last part padded with copies of its last image, and the copies' outputs
            # are dropped.
            padded = torch.cat([part, part[-1:].expand(self.fixed_batch - len(part), *part.shape[1:])]) \
                if self.fixed_batch and len(part) < self.fixed_batch else part
            outputs.append(torch.from_numpy(self.session.run(None, {'input': padded.numpy()})[0])[:len(part)])
        return torch.cat(outputs)

