"""INT8 deployment files: an exported ONNX model quantized by ONNX Runtime, and checked on the run's own images.

`quantize_onnx` quantizes with ONNX Runtime's static QDQ quantizer: 8-bit weights, and 8-bit activations whose ranges
come from calibration batches (images the model was trained on, through its evaluation transform). ONNX Runtime fuses
the quantize / dequantize pairs around MatMul, Conv, Add and the like into integer kernels. Where static
quantization cannot apply (no calibration data, or the quantizer fails on the graph) the weights alone are quantized
(dynamic quantization: activations quantized on the fly, per batch), and the report says so.

`quantize_export` is what ``leanvit export --quantize int8`` runs: quantize, then evaluate the float and the INT8 file
on the run's validation split, and write the INT8 file only if its top-1 falls by at most ``max_drop`` points.
Shared weights stay shared: `leanvit.export.clean_graph` stores each once before quantization, and the quantizer
writes one INT8 tensor per float initializer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from leanvit.errors import LeanvitError

METHODS = ('static', 'dynamic')


class QuantizationDropError(LeanvitError, RuntimeError):
    """The INT8 file's top-1 falls further below the float file's than allowed; nothing was written."""


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
    """What `quantize_export` measured and wrote.

    Attributes:
        path: The INT8 file.
        method: ``'static'`` (calibrated activations) or ``'dynamic'`` (weights only).
        why_dynamic: Why static quantization did not apply (None when it did).
        calibration_images: Images the activation ranges were calibrated on (0 for dynamic).
        images: Validation images both files were evaluated on.
        float_top1, int8_top1: Top-1 (%) of the float and the INT8 file on them.
        agreement: Share (%) of those images on which both files predict the same class.
        float_bytes, int8_bytes: File sizes.
    """
    path: Path
    method: str
    why_dynamic: str | None
    calibration_images: int
    images: int
    float_top1: float
    int8_top1: float
    agreement: float
    float_bytes: int
    int8_bytes: int

    @property
    def drop(self) -> float:
        return self.float_top1 - self.int8_top1


def quantize_onnx(source: str | os.PathLike, target: str | os.PathLike,
                  calibration: Iterable[np.ndarray] | None = None) -> tuple[str, str | None]:
    """Quantize the ONNX file ``source`` to INT8 at ``target`` (written directly; callers wanting an atomic file
    give a temporary path). The file's metadata (``leanvit.export.METADATA_KEY``) is kept.

    Args:
        calibration: Float32 input batches (N, C, H, W) for static quantization; None: dynamic quantization.

    Returns:
        The method used (``'static'`` or ``'dynamic'``) and, for dynamic, why static did not apply.
    """
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self, batches):
            self.batches = iter(batches)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {'input': np.ascontiguousarray(batch, dtype=np.float32)}

    # ONNX Runtime's quantizer logs every tensor it leaves in float: noise here, the report gives the outcome.
    logging.getLogger('onnxruntime').setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as scratch:
        prepared = os.path.join(scratch, 'prepared.onnx')
        # Shapes inferred and the graph optimized first, as ONNX Runtime's quantization guide recommends: the
        # quantizer needs tensor shapes, and folds into the kernels ORT will run.
        quant_pre_process(str(source), prepared, skip_symbolic_shape=True)
        why_dynamic = None if calibration is not None else 'no calibration images'
        if why_dynamic is None:
            try:
                # Unsigned activations and signed weights: ONNX Runtime's choice for x86 CPUs (VNNI or not).
                quantize_static(prepared, str(target), Batches(calibration), quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            except Exception as e:  # the quantizer's own errors have no common type; the fallback says what failed
                why_dynamic = f'static quantization failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}'
        if why_dynamic is not None:
            quantize_dynamic(prepared, str(target), weight_type=QuantType.QInt8)
        _copy_metadata(onnx.load(str(source), load_external_data=False), str(target))
    return ('static' if why_dynamic is None else 'dynamic'), why_dynamic


def _copy_metadata(source, target: str) -> None:
    import onnx

    quantized = onnx.load(target)
    kept = {p.key for p in quantized.metadata_props}
    missing = [p for p in source.metadata_props if p.key not in kept]
    if missing:
        quantized.metadata_props.extend(missing)
        onnx.save(quantized, target)


def quantize_export(float_path: str | os.PathLike, int8_path: str | os.PathLike, calibration_loader,
                    validation_loader, calib_batches: int, max_drop: float) -> QuantizationReport:
    """Quantize the exported float file ``float_path`` to ``int8_path``, calibrated on the first ``calib_batches``
    batches of ``calibration_loader``; evaluate both files on ``validation_loader``; replace ``int8_path`` only if
    the INT8 top-1 is at most ``max_drop`` points below the float one.

    Raises:
        QuantizationDropError: The drop exceeds ``max_drop``; ``int8_path`` is left as it was.
    """
    from leanvit.checkpoint import atomic_write
    from leanvit.export import onnx_module
    from leanvit.train.evaluation import evaluate_model

    calibration = []
    for images, _ in calibration_loader:
        if len(calibration) == calib_batches:
            break
        calibration.append(images.numpy())
    float_eval = evaluate_model(onnx_module(float_path), validation_loader)
    measured = {}

    def write_and_check(tmp: str) -> None:
        measured['method'], measured['why_dynamic'] = quantize_onnx(float_path, tmp, calibration or None)
        int8_eval = evaluate_model(onnx_module(tmp), validation_loader)
        measured['int8_top1'] = int8_eval.top1
        measured['agreement'] = 100 * (int8_eval.predictions == float_eval.predictions).double().mean().item()
        drop = float_eval.top1 - int8_eval.top1
        if drop > max_drop:
            raise QuantizationDropError(
                f'INT8 top-1 {int8_eval.top1:.2f}% is {drop:.2f} points below the float file\'s '
                f'{float_eval.top1:.2f}% on {float_eval.images} validation images, more than --max-drop '
                f'{max_drop:g} ({measured["method"]} quantization); {int8_path} was not written')

    atomic_write(int8_path, write_and_check)
    return QuantizationReport(
        path=Path(int8_path), method=measured['method'], why_dynamic=measured['why_dynamic'],
        calibration_images=sum(len(b) for b in calibration) if measured['method'] == 'static' else 0,
        images=float_eval.images, float_top1=float_eval.top1, int8_top1=measured['int8_top1'],
        agreement=measured['agreement'], float_bytes=os.path.getsize(float_path),
        int8_bytes=os.path.getsize(int8_path))
