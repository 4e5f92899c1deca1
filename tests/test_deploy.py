"""The deployment path: an exported ONNX file stores every shared weight once and hands each weight to its MatMul
directly; ``export --quantize int8`` writes an INT8 file only when it keeps its top-1, and eval runs it."""

import json
import re

import numpy as np
import onnx
import pytest
import torch
from test_eval_cli import save_run_checkpoint
from timm.utils.model import reparameterize_model

import leanvit
from leanvit.cli import main
from leanvit.deploy.export import export_model
from leanvit.deploy.quantize import QuantizationDropError, quantize_export
from leanvit.io.exported import METADATA_KEY

# Small members of the families whose point is sharing: SReT's recursion, MiniViT's multiplexing.
SHARING_MODELS = {
    'test_sret': dict(img_size=32),
    'mini_deit_tiny_patch16_224': dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=2),
    'mini_swin_tiny_patch4_window7_224': dict(img_size=32, patch_size=2, embed_dim=24, depths=(2, 2),
                                              num_heads=(2, 4), distinct_blocks=(1, 1), window_size=4),
}


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct tensors a model holds: parameters and buffers, each shared one once."""
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def initializer_bytes(path) -> int:
    return sum(onnx.numpy_helper.to_array(init).nbytes for init in onnx.load(str(path)).graph.initializer)


@pytest.mark.parametrize('name', SHARING_MODELS)
def test_exported_file_stores_each_shared_weight_once(name, tmp_path):
    torch.manual_seed(0)
    model = leanvit.create_model(name, num_classes=7, **SHARING_MODELS[name]).eval()
    with torch.no_grad():  # distinct values everywhere, so that no two tensors are equal by their init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / 'model.onnx'
    export_model(model, path, input_size=(3, 32, 32), reparam=True)
    folded = reparameterize_model(model)
    # Every weight is stored once, however many layers use it.
    assert initializer_bytes(path) <= 1.02 * state_bytes(folded)
    graph = onnx.load(str(path)).graph
    initializers = {init.name for init in graph.initializer}
    products = [name for n in graph.node if n.op_type in ('MatMul', 'Gemm') for name in n.input if name in initializers]
    assert len(products) > len(set(products)), 'no weight serves two layers: the test would prove nothing'
    # Each weight feeds its MatMul directly (ONNX Runtime's INT8 quantizer skips a weight behind a Transpose).
    assert not [n.name for n in graph.node if n.op_type == 'Transpose' and n.input[0] in initializers]
    # No per-node debugging records of the exporter in a deployment file.
    assert not any(n.metadata_props or n.doc_string for n in graph.node)


def test_export_folds_exactly_what_timm_folds_and_is_no_larger_than_a_plain_export(tmp_path):
    torch.manual_seed(0)
    model = leanvit.create_model('test_sret', img_size=32, num_classes=5).eval()
    ours = export_model(model, tmp_path / 'ours.onnx', input_size=(3, 32, 32), reparam=True).path
    torch.onnx.export(model, (torch.randn(2, 3, 32, 32),), str(tmp_path / 'plain.onnx'), dynamo=True,
                      external_data=False, verbose=False)
    assert ours.stat().st_size < (tmp_path / 'plain.onnx').stat().st_size
    assert initializer_bytes(ours) <= initializer_bytes(tmp_path / 'plain.onnx')


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
    """A test_sret run on the digits (10 classes), its weights noised so that its predictions vary."""
    folder = tmp_path_factory.mktemp('run')
    save_run_checkpoint(folder, dict(img_size=32, num_classes=10))
    return folder / 'best.safetensors'


def test_quantize_int8_writes_a_smaller_file_that_eval_runs(digits_run, tmp_path, capsys):
    out = tmp_path / 'model.onnx'
    code = main(['export', '--checkpoint', str(digits_run), '--output', str(out), '--quantize', 'int8',
                 '--calib-batches', '2', '--max-drop', '100'])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    int8 = tmp_path / 'model.int8.onnx'
    # Both methods made and timed on this CPU, the faster kept and named with its measured margin.
    assert re.search(r"int8       (static QDQ, calibrated on 64 training images|dynamic \(MatMul weights; activations "
                     r"quantized per batch\)): \d+\.\d\dx the (static|dynamic) file's speed here", stdout), stdout
    assert f'wrote      {int8}' in stdout and 'same prediction on' in stdout and 'of 360 images' in stdout
    # Weights in 8 bits, each once: a quarter of the float bytes, more where dynamic quantization keeps this tiny
    # model's stem convs in float (a tiny model's graph outweighs its weights, so file sizes compare only for real
    # models; `leanvit bench` measures those).
    assert initializer_bytes(int8) < 0.5 * initializer_bytes(out)
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {'QuantizeLinear', 'DequantizeLinear'} <= ops or {'DynamicQuantizeLinear', 'MatMulInteger'} <= ops
    props = {p.key: p.value for p in onnx.load(str(int8)).metadata_props}
    assert json.loads(props[METADATA_KEY])['model'] == 'test_sret'
    assert main(['eval', '--checkpoint', str(int8), '--output', str(tmp_path)]) == 0
    report = json.loads((tmp_path / 'eval_model.int8.onnx.json').read_text())
    top1 = float(stdout.split('int8 ')[2].split('%')[0])
    assert report['images'] == 360 and report['top1'] == pytest.approx(top1, abs=0.005)  # printed to 2 places


def test_quantize_refuses_a_drop_beyond_the_limit_and_writes_nothing(digits_run, tmp_path):
    from torch.utils.data import DataLoader

    from leanvit.io.data import build_datasets
    from leanvit.train.evaluation import data_config

    model = leanvit.create_model('test_sret', img_size=32, num_classes=10)
    float_path = tmp_path / 'model.onnx'
    export_model(model, float_path, input_size=(3, 32, 32), reparam=True, metadata={'model': 'test_sret'})
    bundle = build_datasets(None, data_config(model, 32), augment='none')
    int8_path = tmp_path / 'model.int8.onnx'
    int8_path.write_bytes(b'kept')
    # A drop is never below -100 points, so this limit refuses whatever the quantizer does.
    with pytest.raises(QuantizationDropError, match=r'points below the float file.* more than --max-drop -100 '
                                                    r'\(static quantization\); .*model.int8.onnx was not written'):
        quantize_export(float_path, int8_path, DataLoader(bundle.train, 16), DataLoader(bundle.val, 64), 1, -100,
                        method='static')
    assert int8_path.read_bytes() == b'kept'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.int8.onnx', 'model.onnx']  # no temporary left


def test_quantize_without_calibration_images_is_dynamic_and_says_why(tmp_path):
    from leanvit.deploy.quantize import quantize_onnx

    model = leanvit.create_model('test_sret', img_size=32, num_classes=5)
    export_model(model, tmp_path / 'model.onnx', input_size=(3, 32, 32), reparam=True, metadata={'model': 'x'})
    method, why = quantize_onnx(tmp_path / 'model.onnx', tmp_path / 'model.int8.onnx')
    assert (method, why) == ('dynamic', 'no calibration images')
    ops = {n.op_type for n in onnx.load(str(tmp_path / 'model.int8.onnx')).graph.node}
    assert 'DynamicQuantizeLinear' in ops or 'MatMulInteger' in ops
    import onnxruntime
    session = onnxruntime.InferenceSession(str(tmp_path / 'model.int8.onnx'), providers=['CPUExecutionProvider'])
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert session.run(None, {'input': x})[0].shape == (2, 5)


def test_quantize_needs_an_onnx_output(digits_run, tmp_path, capsys):
    code = main(['export', '--checkpoint', str(digits_run), '--output', str(tmp_path / 'model.pt'),
                 '--quantize', 'int8'])
    assert code == 2
    assert capsys.readouterr().err.strip().endswith('--quantize int8 quantizes an ONNX file: name --output .onnx')
    assert not (tmp_path / 'model.pt').exists()


@pytest.mark.parametrize('name', ['test_sret', 'test_riformer'])
def test_static_quantization_applies_where_equal_weights_were_stored_once(name, tmp_path):
    """An untrained RIFormer's norm weights and layer scales are all equal, so the export stores each value once and
    many elementwise nodes share it: static quantization must still apply (the quantizer refuses shared weights)."""
    from leanvit.deploy.quantize import quantize_onnx

    model = leanvit.create_model(name, num_classes=5, img_size=32)
    size = (3, 32, 32)
    export_model(model, tmp_path / 'model.onnx', input_size=size, reparam=True, metadata={'model': name})
    calibration = [np.random.default_rng(0).standard_normal((4, *size)).astype(np.float32)]
    assert quantize_onnx(tmp_path / 'model.onnx', tmp_path / 'model.int8.onnx', calibration, 'static') == \
        ('static', 'asked for')
    ops = {n.op_type for n in onnx.load(str(tmp_path / 'model.int8.onnx')).graph.node}
    assert {'QuantizeLinear', 'DequantizeLinear'} <= ops


def test_quantize_finds_its_images_before_exporting(digits_run, tmp_path, capsys):
    out = tmp_path / 'model.onnx'
    code = main(['export', '--checkpoint', str(digits_run), '--output', str(out), '--quantize', 'int8',
                 '--data', str(tmp_path / 'no such folder')])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and 'no such folder' in err
    assert not out.exists() and not (tmp_path / 'model.int8.onnx').exists()
