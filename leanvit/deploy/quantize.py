"""INT8 deployment files: an exported ONNX model quantized by ONNX Runtime, and checked on the run's own images.

`quantize_onnx` quantizes with ONNX Runtime's quantizers, two ways:
- static (QDQ): 8-bit weights, and 8-bit activations whose ranges come from calibration batches (images the model was
  trained on, through its evaluation transform); ONNX Runtime fuses the quantize / dequantize pairs around MatMul,
  Conv, Add and the like into integer kernels;
- dynamic: 8-bit MatMul weights, activations quantized per batch as they come; no calibration, convolutions in float.
Which is faster depends on the model and the CPU: static wins where convolutions dominate (RIFormer), dynamic where
many small token-wise operations would each pay for a quantize / dequantize pair (SReT). So by default both are made
and timed on this CPU, and the faster is kept; where static cannot apply (no calibration data, or the quantizer fails
on the graph) dynamic is used, and the report says why.

`quantize_export` is what ``leanvit export --quantize int8`` runs: quantize, then evaluate the float and the INT8 file
on the run's validation split, and write the INT8 file only if its top-1 falls by at most ``max_drop`` points.
Shared weights stay shared: `leanvit.deploy.export.clean_graph` stores each once before quantization, and the quantizer
writes one INT8 tensor per float initializer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from leanvit.errors import LeanvitError
from leanvit.io.exported import onnx_module, onnx_session
from leanvit.io.files import atomic_write
from leanvit.train.evaluation import evaluate_model

METHODS = ('static', 'dynamic')


class QuantizationDropError(LeanvitError, RuntimeError):
    """The INT8 file's top-1 falls further below the float file's than allowed; nothing was written."""


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
    """What `quantize_export` measured and wrote.

    Attributes:
        path: The INT8 file.
        method: ``'static'`` (calibrated activations) or ``'dynamic'`` (activations quantized per batch).
        why: Why that method, in words (its measured speed against the other's, or why static did not apply).
        calibration_images: Images the activation ranges were calibrated on (0 for dynamic).
        images: Validation images both files were evaluated on.
        float_top1, int8_top1: Top-1 (%) of the float and the INT8 file on them.
        agreement: Share (%) of those images on which both files predict the same class.
        float_bytes, int8_bytes: File sizes.
    """
    path: Path
    method: str
    why: str
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
                  calibration: Sequence[np.ndarray] | None = None, method: str = 'auto') -> tuple[str, str]:
    """Quantize the ONNX file ``source`` to INT8 at ``target`` (written directly; callers wanting an atomic file
    give a temporary path). The file's metadata (``leanvit.deploy.export.METADATA_KEY``) is kept.

    Args:
        calibration: Float32 input batches (N, C, H, W): the activation ranges of static quantization, and the
            batch ``'auto'`` times the two files on. None: dynamic quantization.
        method: ``'static'``, ``'dynamic'`` or ``'auto'``: both where calibration batches are given, timed in ONNX
            Runtime on this CPU on the first batch, the faster kept. Static quantization that fails falls back to
            dynamic.

    Returns:
        The method used (``'static'`` or ``'dynamic'``) and why, in words.
    """
    import onnx  # onnx and onnxruntime are the optional [export] packages
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in ('auto', *METHODS):
        raise ValueError(f'method must be auto, static or dynamic, got {method!r}')
    # ONNX Runtime's quantizer logs every tensor it leaves in float: noise here, the report gives the outcome.
    logging.getLogger('onnxruntime').setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as scratch:
        prepared = os.path.join(scratch, 'prepared.onnx')
        # Shapes inferred and the graph optimized first, as ONNX Runtime's quantization guide recommends: the
        # quantizer needs tensor shapes, and folds into the kernels ORT will run.
        quant_pre_process(str(source), prepared, skip_symbolic_shape=True)
        _unshare_elementwise_constants(prepared)
        files, why = {}, 'asked for'
        if calibration and method != 'dynamic':
            try:
                files['static'] = _quantize_static(prepared, os.path.join(scratch, 'static.onnx'), calibration)
            except Exception as e:  # the quantizer's errors have no common type; the fallback says what failed
                why = f'static quantization failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}'
        elif method != 'dynamic':
            why = 'no calibration images'
        if method != 'static' or 'static' not in files:
            files['dynamic'] = _quantize_dynamic(prepared, os.path.join(scratch, 'dynamic.onnx'))
        if len(files) == 2:
            speed = {name: _batches_per_second(path, calibration[0]) for name, path in files.items()}
            chosen = max(speed, key=speed.get)
            why = f'{speed[chosen] / min(speed.values()):.2f}x the {min(speed, key=speed.get)} file\'s speed here'
        else:
            chosen = next(iter(files))
        os.replace(files[chosen], target)
        _copy_metadata(onnx.load(str(source), load_external_data=False), str(target))
    return chosen, why


def _quantize_static(prepared: str, target: str, calibration: Sequence[np.ndarray]) -> str:
    """8-bit weights, and 8-bit activations whose ranges come from ``calibration``: Q/DQ pairs ORT fuses into integer
    kernels for every operator it has one for (MatMul, Conv, Add, ...)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {'input': np.ascontiguousarray(batch, dtype=np.float32)}

    # Unsigned activations and signed weights: ONNX Runtime's choice for x86 CPUs (VNNI or not).
    quantize_static(prepared, target, Batches(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return target


def _quantize_dynamic(prepared: str, target: str) -> str:
    """8-bit MatMul and Gemm weights; activations quantized per batch as they come. Convolutions stay in float:
    ONNX Runtime's dynamic integer convolution is slower than its float one."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(prepared, target, weight_type=QuantType.QInt8, op_types_to_quantize=['MatMul', 'Gemm'])
    return target


def _batches_per_second(path: str, batch: np.ndarray, rounds: int = 3) -> float:
    """ONNX Runtime's speed on ``batch`` for the file at ``path``: the best of ``rounds`` runs after a warm-up."""


    session = onnx_session(path, torch.get_num_threads())  # the threads chosen for this command
    feed = {'input': np.ascontiguousarray(batch, dtype=np.float32)}
    session.run(None, feed)
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        session.run(None, feed)
        best = min(best, time.perf_counter() - start)
    return 1 / best


def _unshare_elementwise_constants(path: str) -> None:
    """Give each elementwise node (Mul, Add, ...) its own copy of a constant it shares with other nodes.

    `clean_graph` stores equal tensors once, which also merges equal norm weights or layer scales of
    different layers (all at their init in an untrained model). ONNX Runtime's static quantizer refuses an
    initializer feeding several nodes it quantizes separately ("shared mode is not supported for weight"), except as
    the weight of MatMul, Gemm and Conv, which keep sharing theirs: those copies are the small per-channel tensors.
    """
    import onnx

    model = onnx.load(path)
    initializers = {init.name: init for init in model.graph.initializer}
    seen = set()
    for node in model.graph.node:
        if node.op_type in ('MatMul', 'Gemm', 'Conv'):
            continue
        for i, name in enumerate(node.input):
            if name not in initializers:
                continue
            if name in seen:
                copy = onnx.TensorProto()
                copy.CopyFrom(initializers[name])
                copy.name = f'{name}__{node.name or len(model.graph.initializer)}_{i}'
                model.graph.initializer.append(copy)
                node.input[i] = copy.name
            seen.add(name)
    onnx.save(model, path)


def _copy_metadata(source, target: str) -> None:
    import onnx

    quantized = onnx.load(target)
    kept = {p.key for p in quantized.metadata_props}
    missing = [p for p in source.metadata_props if p.key not in kept]
    if missing:
        quantized.metadata_props.extend(missing)
        onnx.save(quantized, target)


def quantize_export(float_path: str | os.PathLike, int8_path: str | os.PathLike, calibration_loader,
                    validation_loader, calib_batches: int, max_drop: float, method: str = 'auto') -> QuantizationReport:
    """Quantize the exported float file ``float_path`` to ``int8_path``, calibrated on the first ``calib_batches``
    batches of ``calibration_loader``; evaluate both files on ``validation_loader``; replace ``int8_path`` only if
    the INT8 top-1 is at most ``max_drop`` points below the float one.

    Raises:
        QuantizationDropError: The drop exceeds ``max_drop``; ``int8_path`` is left as it was.
    """

    calibration = []
    for images, _ in calibration_loader:
        if len(calibration) == calib_batches:
            break
        calibration.append(images.numpy())
    float_eval = evaluate_model(onnx_module(float_path), validation_loader)
    measured = {}

    def write_and_check(tmp: str) -> None:
        measured['method'], measured['why'] = quantize_onnx(float_path, tmp, calibration or None, method)
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
        path=Path(int8_path), method=measured['method'], why=measured['why'],
        calibration_images=sum(len(b) for b in calibration) if measured['method'] == 'static' else 0,
        images=float_eval.images, float_top1=float_eval.top1, int8_top1=measured['int8_top1'],
        agreement=measured['agreement'], float_bytes=os.path.getsize(float_path),
        int8_bytes=os.path.getsize(int8_path))
