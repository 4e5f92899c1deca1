"""Exporting a model for deployment (ONNX, TorchScript), and proving that the exported file computes what it does.

``export_model`` writes the file to a temporary path beside ``path``, runs it (ONNX Runtime, or ``torch.jit.load``)
and the PyTorch model on the same seeded random batches, and moves it into place only if the largest difference is
within the tolerance: a file at ``path`` is always one that passed. With ``reparam=True`` the model is first
re-parameterized by ``timm.utils.model.reparameterize_model`` (each module's ``fuse()`` / ``reparameterize()``:
RepVGG / MobileOne branches, RIFormer's affine token mixer folded into its norm), which is checked the same way
against the original.

ONNX goes through torch's ``torch.export``-based exporter (``dynamo=True``, which needs ``onnxscript``): the
TorchScript-based one is deprecated and warns that it will be removed, and it traces Python control flow on the
sample's shapes, where ``torch.export`` either proves the batch axis dynamic or refuses to export.

torch is imported inside the functions: the command line reads ``FORMATS`` and ``DEFAULT_ATOL`` for its help, which
must answer without loading torch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from leanvit.errors import CheckpointError, ExportVerificationError, LeanvitError, UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMATS = ('onnx', 'torchscript')
METADATA_KEY = 'leanvit'   # the exported file's own record: model, input pipeline, the run's data
# Logits of one fp32 model differ by ~1e-6..1e-5 between PyTorch and ONNX Runtime (other kernels, other summation
# orders), more in deep models; an export or fold that is wrong is off by orders of magnitude more.
DEFAULT_ATOL = 1e-3


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What ``export_model`` wrote and how closely it matches the PyTorch model.

    Attributes:
        path: The exported file (an ONNX model loads with ``onnxruntime.InferenceSession(str(path))``).
        format: ``'onnx'`` or ``'torchscript'``.
        input_shape: The sample input's shape, batch first; with ``dynamic_batch`` any batch size runs.
        dynamic_batch: Whether the file takes any batch size (verified at two).
        batch_sizes: Batch sizes the file was verified at.
        max_diff: Largest absolute difference between the file's and the exported model's outputs.
        atol: The tolerance both differences were held to.
        opset: ONNX opset of the file (None for TorchScript).
        reparam_modules: Modules re-parameterized (None: not asked to).
        reparam_max_diff: Largest absolute difference between the re-parameterized and the original model's outputs.
    """
    path: Path
    format: str
    input_shape: tuple[int, ...]
    dynamic_batch: bool
    batch_sizes: tuple[int, ...]
    max_diff: float
    atol: float
    opset: int | None = None
    reparam_modules: int | None = None
    reparam_max_diff: float | None = None


def export_model(model: nn.Module, path: str | os.PathLike, format: str = 'onnx',
                 input_size: tuple[int, int, int] = (3, 224, 224), *, batch_size: int = 2, dynamic_batch: bool = True,
                 opset: int | None = None, atol: float = DEFAULT_ATOL, reparam: bool = False, samples: int = 2,
                 seed: int = 0, metadata: dict | None = None) -> ExportReport:
    """Export ``model`` (set to eval mode) to ``path`` and verify the file against it; replace ``path`` on success.

    Args:
        model: A model with one tensor output.
        path: Output file; on any failure it is left as it was.
        format: ``'onnx'`` or ``'torchscript'`` (``torch.jit.trace``: leanvit's models do not script).
        input_size: (channels, height, width) of the sample input.
        batch_size: Batch size of the sample input the model is exported and verified with.
        dynamic_batch: Export a batch axis of any size, and verify at a second batch size too.
        opset: ONNX opset (None: the exporter's default).
        atol: Largest absolute difference in any output allowed between file and model (and folded and original).
        reparam: Re-parameterize a copy of ``model`` for inference and export that; ``model`` is unchanged.
        samples: Seeded random batches of ``batch_size`` to compare on (plus one at the second batch size).
        seed: Seed of the sample batches.
        metadata: JSON-serializable facts stored in the file (ONNX ``metadata_props``, a TorchScript extra file)
            under ``leanvit``: ``leanvit eval`` reads the model, its input pipeline and the run's data from them.

    Returns:
        An ``ExportReport``.

    Raises:
        ExportVerificationError: A difference exceeds ``atol``; the message names it and the tolerance.
        UsageError: An unknown format or a negative tolerance.
        TypeError: The model's output is not one tensor.
        LeanvitError: The packages the format needs are not installed.
    """
    import torch
    from timm.utils.model import reparameterize_model

    from leanvit.checkpoint import atomic_write

    if format not in FORMATS:
        raise UsageError(f'unknown export format {format!r}; choose one of {", ".join(FORMATS)}')
    if not atol >= 0:  # also refuses NaN
        raise UsageError(f'atol must be a number >= 0, got {atol}')
    if format == 'onnx':
        _require('onnx', 'onnxruntime', 'onnxscript', 'onnx_ir')
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    generator = torch.Generator().manual_seed(seed)
    batch_sizes = [batch_size] * samples + ([1 if batch_size > 1 else 2] if dynamic_batch else [])
    inputs = [torch.randn(b, *input_size, generator=generator).to(device) for b in batch_sizes]
    verified_at = ', '.join(map(str, dict.fromkeys(batch_sizes)))
    expected = _outputs(model, inputs)

    reparam_modules = reparam_max_diff = None
    if reparam:
        # The hooks reparameterize_model calls on every sub-module (not on the model itself).
        reparam_modules = sum(any(hasattr(m, hook) for hook in ('fuse', 'reparameterize', 'switch_to_deploy'))
                              for m in model.modules() if m is not model)
        original = expected
        model = reparameterize_model(model).eval()
        expected = _outputs(model, inputs)
        reparam_max_diff = _max_diff(expected, original)
        if not reparam_max_diff <= atol:
            raise ExportVerificationError(
                f're-parameterization changed the outputs: max abs diff {reparam_max_diff:.3g} between the folded and '
                f'the original model exceeds the tolerance {atol:g} ({reparam_modules} modules folded); nothing '
                f'was exported')

    report = {}

    def write_and_verify(tmp: str) -> None:
        if format == 'onnx':
            actual = _export_onnx(model, tmp, inputs, dynamic_batch, opset, metadata or {})
            report['opset'] = _onnx_opset(tmp)
        else:
            actual = _export_torchscript(model, tmp, inputs, device, metadata or {})
        report['max_diff'] = max_diff = _max_diff(actual, expected)
        if not max_diff <= atol:
            raise ExportVerificationError(
                f'the exported {format} file disagrees with the PyTorch model: max abs diff {max_diff:.3g} exceeds '
                f'the tolerance {atol:g} (batch sizes {verified_at}); nothing was written to {path}')

    atomic_write(path, write_and_verify)
    return ExportReport(path=Path(path), format=format, input_shape=tuple(inputs[0].shape),
                        dynamic_batch=dynamic_batch, batch_sizes=tuple(dict.fromkeys(batch_sizes)), atol=atol,
                        reparam_modules=reparam_modules, reparam_max_diff=reparam_max_diff, **report)


def _export_onnx(model: nn.Module, path: str, inputs: list[torch.Tensor], dynamic_batch: bool,
                 opset: int | None, metadata: dict) -> list[np.ndarray]:
    """Write ``model`` as ONNX to ``path``, traced on ``inputs[0]``; return ONNX Runtime's outputs for ``inputs``."""
    import onnx_ir
    import torch

    # The exporter's optimizer logs a warning for each constant it cannot fold: noise, the file is verified anyway.
    logging.getLogger('onnxscript').setLevel(logging.ERROR)
    dynamic_shapes = ({0: torch.export.Dim('batch')},) if dynamic_batch else None
    # One self-contained file (no external-data sidecar): leanvit's models are far below protobuf's 2 GB limit.
    program = torch.onnx.export(model, (inputs[0],), dynamo=True, external_data=False, verbose=False,
                                input_names=['input'], output_names=['output'], opset_version=opset,
                                dynamic_shapes=dynamic_shapes)
    exported = program.model
    clean_graph(exported)
    exported.metadata_props[METADATA_KEY] = json.dumps(metadata, allow_nan=False)
    onnx_ir.save(exported, path)
    session = onnx_session(path)
    return [session.run(None, {'input': x.cpu().numpy()})[0] for x in inputs]


def clean_graph(model) -> None:
    """Give every weight to the node that uses it in the layout it uses, store each distinct tensor once, and drop
    the exporter's per-node debugging records.

    The exporter writes ``x @ W.T`` as a Transpose of the stored ``W`` before the MatMul: ONNX Runtime's INT8
    quantizer then finds no constant weight to quantize. Folding every constant subexpression (the transposes, a
    scale times a table) makes the weights MatMul's own initializers. A weight shared by several layers (SReT's
    recursion, MiniViT's multiplexing), or a buffer each layer holds a copy of, then appears once per use:
    deduplicating identical initializers stores it once again, so the file keeps what sharing saved. The exporter
    also records each node's PyTorch module path and source line (about 10 % of SReT-T's file), which a deployed
    file does not need. ``model`` is an ``onnx_ir.Model``, changed in place.
    """
    import onnxscript.optimizer
    from onnx_ir.passes.common import ClearMetadataAndDocStringPass, DeduplicateInitializersPass, RemoveUnusedNodesPass

    unlimited = 1 << 40  # fold and deduplicate tensors of any size: the file's weights are the point
    onnxscript.optimizer.optimize(model, input_size_limit=unlimited, output_size_limit=unlimited)
    DeduplicateInitializersPass(size_limit=unlimited)(model)
    RemoveUnusedNodesPass()(model)
    ClearMetadataAndDocStringPass()(model)


def _export_torchscript(model: nn.Module, path: str, inputs: list[torch.Tensor], device: torch.device,
                        metadata: dict) -> list[np.ndarray]:
    """Write ``model`` traced on ``inputs[0]`` to ``path``; return what the reloaded file computes from ``inputs``."""
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns that shape checks become constants, and its re-trace check compares graph text, which
        # differs spuriously for SReT (mangled module names, in-place ops without grad). Running the saved file on
        # fresh inputs, at a second batch size too, is the check that matters.
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        traced = torch.jit.trace(model, inputs[0], check_trace=False)
    torch.jit.save(traced, path, _extra_files={f'{METADATA_KEY}.json': json.dumps(metadata, allow_nan=False)})
    loaded = torch.jit.load(path, map_location=device)
    return _outputs(loaded, inputs)


def _outputs(model: nn.Module, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    import torch

    outputs = []
    for x in inputs:
        with torch.no_grad():
            y = model(x)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f'export needs a model with one tensor output; {type(model).__name__} returned a '
                            f'{type(y).__name__}')
        outputs.append(y.float().cpu().numpy())
    return outputs


def _max_diff(actual: list[np.ndarray], expected: list[np.ndarray]) -> float:
    """Largest absolute difference over all outputs (inf where shapes differ, NaN where either has a NaN)."""
    return float(np.max([np.abs(a.astype(np.float64) - e).max() if a.shape == e.shape else np.inf
                         for a, e in zip(actual, expected)]))


def _onnx_opset(path: str) -> int:
    import onnx

    model = onnx.load(path, load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ('', 'ai.onnx'))


def _require(*modules: str) -> None:
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
    import torch

    path = Path(path)
    kind = exported_format(path)
    try:
        if kind == 'onnx':
            _require('onnx', 'onnxruntime')
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
        import torch

        outputs = []
        for part in images.float().cpu().split(self.fixed_batch or len(images) or 1):
            # A fixed-batch file gets the last part padded with copies of its last image, and the copies' outputs
            # are dropped.
            padded = torch.cat([part, part[-1:].expand(self.fixed_batch - len(part), *part.shape[1:])]) \
                if self.fixed_batch and len(part) < self.fixed_batch else part
            outputs.append(torch.from_numpy(self.session.run(None, {'input': padded.numpy()})[0])[:len(part)])
        return torch.cat(outputs)

