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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from timm.utils.model import reparameterize_model
from torch import nn

from leanvit.errors import ExportVerificationError, UsageError
from leanvit.io.exported import METADATA_KEY, onnx_session, require_packages
from leanvit.io.files import atomic_write

FORMATS = ('onnx', 'torchscript')
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


    if format not in FORMATS:
        raise UsageError(f'unknown export format {format!r}; choose one of {", ".join(FORMATS)}')
    if not atol >= 0:  # also refuses NaN
        raise UsageError(f'atol must be a number >= 0, got {atol}')
    if format == 'onnx':
        require_packages('onnx', 'onnxruntime', 'onnxscript', 'onnx_ir')
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


