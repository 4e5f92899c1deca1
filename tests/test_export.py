"""``leanvit export``: the written file reproduces the model at any batch size, folds are exact, and a file that
disagrees with its model is never left at the output path."""

import json

import numpy as np
import onnxruntime
import pytest
import timm
import torch
from test_eval_cli import save_run_checkpoint
from torch import nn

import leanvit
from leanvit.cli import main
from leanvit.deploy.export import ExportVerificationError, export_model
from leanvit.errors import LeanvitError

KWARGS = {'img_size': 32, 'num_classes': 5}


def run_export(capsys, *argv) -> tuple[int, str, str]:
    code = main(['export', *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def leftovers(folder) -> list[str]:
    """Temporary files of an unfinished atomic write."""
    return [p.name for p in folder.iterdir() if p.name.endswith('.tmp')]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    return save_run_checkpoint(tmp_path_factory.mktemp('run'), KWARGS)


class TinyNet(nn.Sequential):
    """Conv - BN - ReLU - pool - linear: exports in a second."""

    def __init__(self):
        super().__init__(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 5))


class Shifted(nn.Module):
    """A stand-in for a wrongly exported model: the real one's output plus 0.5."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) + 0.5


def test_onnx_export_of_a_run_checkpoint_runs_in_onnxruntime_at_any_batch_size(run, tmp_path, capsys):
    model, checkpoint = run
    out = tmp_path / 'sret.onnx'
    code, stdout, err = run_export(capsys, '--checkpoint', checkpoint, '--output', out)
    assert code == 0, err
    assert f'model      test_sret (3x32x32) from {checkpoint}' in stdout
    assert 'format     onnx, opset ' in stdout and 'any batch size' in stdout
    assert 'verified   max abs diff vs PyTorch ' in stdout and 'batch sizes 2, 1' in stdout
    assert leftovers(tmp_path) == []

    session = onnxruntime.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    (image_input,) = session.get_inputs()
    assert isinstance(image_input.shape[0], str) and image_input.shape[1:] == [3, 32, 32]
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(images).numpy()
    np.testing.assert_allclose(session.run(None, {image_input.name: images.numpy()})[0], expected, atol=1e-4)


def test_torchscript_export_is_a_trace_that_reloads_and_matches(run, tmp_path, capsys):
    model, checkpoint = run
    out = tmp_path / 'sret.pt'
    code, stdout, err = run_export(capsys, '--checkpoint', checkpoint, '--format', 'torchscript', '--output', out)
    assert code == 0, err
    assert 'format     torchscript, any batch size' in stdout
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(out)(images), model.eval()(images))


def test_reparam_folds_repvgg_branches_exactly_and_exports_the_folded_model(tmp_path, capsys):
    model = timm.create_model('repvgg_a0', num_classes=5)
    # An official-style checkpoint, no sidecar: name and kwargs on the command line.
    checkpoint = tmp_path / 'repvgg.pth'
    torch.save({'state_dict': model.state_dict()}, checkpoint)
    out = tmp_path / 'repvgg.pt'
    code, stdout, err = run_export(capsys, '--checkpoint', checkpoint, '--model', 'repvgg_a0', '--model-kwargs',
                                   json.dumps({'num_classes': 5}), '--img-size', 32, '--reparam',
                                   '--format', 'torchscript', '--output', out)
    assert code == 0, err
    assert 'model      repvgg_a0 (3x32x32)' in stdout
    folded_line = next(line for line in stdout.splitlines() if line.startswith('reparam'))
    assert float(folded_line.rsplit(' ', 1)[1]) < 1e-5, folded_line

    exported = torch.jit.load(out)
    branch_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in exported.parameters()) < branch_params, 'the 1x1 and identity branches are folded'
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(images), model.eval()(images), atol=1e-5, rtol=1e-4)


def test_a_file_that_disagrees_with_its_model_is_an_error_and_never_replaces_the_output(run, tmp_path, capsys,
                                                                                          monkeypatch):
    _, checkpoint = run
    out = tmp_path / 'sret.pt'
    out.write_bytes(b'the previous export')
    load = torch.jit.load
    monkeypatch.setattr(torch.jit, 'load', lambda *args, **kwargs: Shifted(load(*args, **kwargs)))
    code, stdout, err = run_export(capsys, '--checkpoint', checkpoint, '--format', 'torchscript', '--output', out)
    assert code == 1
    assert ('leanvit export: error: the exported torchscript file disagrees with the PyTorch model: '
            'max abs diff 0.5 exceeds the tolerance 0.001') in err
    assert 'wrote' not in stdout
    assert out.read_bytes() == b'the previous export'
    assert leftovers(tmp_path) == []


def test_tolerance_is_the_users_to_set(run, tmp_path, capsys, monkeypatch):
    _, checkpoint = run
    load = torch.jit.load
    monkeypatch.setattr(torch.jit, 'load', lambda *args, **kwargs: Shifted(load(*args, **kwargs)))
    out = tmp_path / 'sret.pt'
    code, stdout, err = run_export(capsys, '--checkpoint', checkpoint, '--format', 'torchscript', '--output', out,
                                   '--atol', 0.6)
    assert code == 0, err
    assert 'max abs diff vs PyTorch 0.5 (tolerance 0.6' in stdout and out.exists()


def test_a_wrong_resolution_is_a_clear_error(run, tmp_path, capsys):
    _, checkpoint = run
    code, _, err = run_export(capsys, '--checkpoint', checkpoint, '--img-size', 64, '--output', tmp_path / 'x.onnx')
    assert code == 2 and err.startswith('leanvit export: error: ') and '32x32' in err and '64x64' in err
    assert list(tmp_path.iterdir()) == []


def test_export_model_reports_what_it_wrote_and_checked(tmp_path):
    model = TinyNet()
    static = export_model(model, tmp_path / 'static.onnx', 'onnx', (3, 16, 16), batch_size=4, dynamic_batch=False,
                          opset=18)
    assert static.path == tmp_path / 'static.onnx' and static.format == 'onnx' and static.opset == 18
    assert not static.dynamic_batch and static.batch_sizes == (4,) and static.input_shape == (4, 3, 16, 16)
    session = onnxruntime.InferenceSession(str(static.path), providers=['CPUExecutionProvider'])
    assert session.get_inputs()[0].shape == [4, 3, 16, 16]

    dynamic = export_model(model, tmp_path / 'dynamic.pt', 'torchscript', (3, 16, 16), batch_size=4)
    assert dynamic.dynamic_batch and dynamic.batch_sizes == (4, 1) and dynamic.opset is None
    for report in (static, dynamic):
        assert report.reparam_modules is None and report.reparam_max_diff is None
        assert 0 <= report.max_diff <= report.atol
    assert not model.training


def test_export_model_leaves_the_callers_model_unfolded(tmp_path):
    model = leanvit.create_model('repvgg_a0', num_classes=5)
    report = export_model(model, tmp_path / 'repvgg.pt', 'torchscript', (3, 32, 32), reparam=True)
    assert report.reparam_modules > 0 and report.reparam_max_diff < 1e-5
    blocks = [m for m in model.modules() if type(m).__name__ == 'RepVggBlock']
    assert blocks and all(b.reparam_conv is None and hasattr(b, 'conv_1x1') for b in blocks)


class BadFold(TinyNet):
    """A model whose reparameterize() is not exact."""

    def reparameterize(self):
        with torch.no_grad():
            self[-1].bias.add_(0.1)


def test_an_inexact_fold_is_an_error_before_anything_is_written(tmp_path):
    model = nn.Sequential(BadFold())
    bias = model[0][-1].bias.clone()
    with pytest.raises(ExportVerificationError, match=r're-parameterization changed the outputs: max abs diff '
                                                      r'0\.1 between the folded and the original model exceeds the '
                                                      r'tolerance 0\.001 \(1 modules folded\)'):
        export_model(model, tmp_path / 'bad.pt', 'torchscript', (3, 8, 8), reparam=True)
    assert list(tmp_path.iterdir()) == []
    assert torch.equal(model[0][-1].bias, bias), 'the fold applies to a copy'


def test_export_model_rejects_unknown_formats_and_names_missing_packages(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown export format 'tflite'; choose one of onnx, torchscript"):
        export_model(TinyNet(), tmp_path / 'x', 'tflite')
    real_find_spec = leanvit.io.exported.importlib.util.find_spec
    monkeypatch.setattr(leanvit.io.exported.importlib.util, 'find_spec',
                        lambda name: None if name == 'onnxscript' else real_find_spec(name))
    with pytest.raises(LeanvitError, match=r'ONNX export needs onnxscript: pip install "leanvit\[export\]"'):
        export_model(TinyNet(), tmp_path / 'x.onnx')


def test_riformer_exports_reparameterized_to_onnx_without_a_token_mixer(tmp_path, capsys):
    torch.manual_seed(0)
    model = leanvit.create_model('test_riformer', num_classes=5)
    with torch.no_grad():  # move norms, affines and layer scales off their init, so that the fold does something
        for name, p in model.named_parameters():
            if 'norm' in name or 'affine' in name or 'layer_scale' in name:
                p.add_(torch.randn_like(p) * 0.3)
    checkpoint = tmp_path / 'riformer.safetensors'
    leanvit.save_weights(model, checkpoint)
    out = tmp_path / 'riformer.onnx'
    code, stdout, err = run_export(capsys, '--model', 'test_riformer', '--model-kwargs', json.dumps({'num_classes': 5}),
                                   '--checkpoint', checkpoint, '--reparam', '--format', 'onnx', '--output', out)
    assert code == 0, err
    blocks = sum(len(stage.blocks) for stage in model.stages)
    assert f'reparam    {blocks} modules folded' in stdout  # each block's mixer
    import onnx
    training_form = export_model(model, tmp_path / 'training.onnx', input_size=(3, 64, 64))
    nodes = len(onnx.load(str(out)).graph.node)
    # Each of the 5 blocks loses its token mixer (a multiply-add and a subtraction, or one fused op).
    assert nodes <= len(onnx.load(str(training_form.path)).graph.node) - 5
    session = onnxruntime.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = model.eval()(images).numpy()
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0], expected,
                               atol=1e-4, rtol=1e-4)


def test_export_reparameterizes_by_default_and_can_be_told_not_to(run, tmp_path, capsys):
    _, checkpoint = run
    code, stdout, err = run_export(capsys, '--checkpoint', checkpoint, '--format', 'torchscript',
                                   '--output', tmp_path / 'a.pt')
    assert code == 0, err
    assert any(line.startswith('reparam ') for line in stdout.splitlines())
    code, stdout, err = run_export(capsys, '--checkpoint', checkpoint, '--format', 'torchscript', '--no-reparam',
                                   '--output', tmp_path / 'b.pt')
    assert code == 0, err
    assert not any(line.startswith('reparam ') for line in stdout.splitlines())


@pytest.mark.parametrize('fmt, suffix, options', [('onnx', '.onnx', []), ('torchscript', '.pt', []),
                                                   ('onnx', '.onnx', ['--static-batch', '--batch-size', 7])],
                         ids=['onnx', 'torchscript', 'onnx-fixed-batch'])
def test_eval_runs_an_exported_file_in_its_runtime_as_it_evaluates_the_checkpoint(tmp_path, capsys, fmt, suffix,
                                                                                   options):
    _, checkpoint = save_run_checkpoint(tmp_path / 'run', dict(img_size=32, num_classes=10))  # the digits' classes
    out = tmp_path / f'model{suffix}'
    code, _, err = run_export(capsys, '--checkpoint', checkpoint, '--format', fmt, '--output', out, *options)
    assert code == 0, err
    # Both evaluated into one folder: each keeps its own report, named after what it evaluated. A fixed-batch file
    # takes eval's batches of 64 (and the last, of 40) in parts of its own 7.
    assert main(['eval', '--checkpoint', str(checkpoint), '--output', str(tmp_path / 'eval')]) == 0
    assert main(['eval', '--checkpoint', str(out), '--output', str(tmp_path / 'eval')]) == 0
    capsys.readouterr()
    expected, got = (json.loads((tmp_path / 'eval' / f'eval_{name}.json').read_text())
                     for name in (checkpoint.name, out.name))
    assert got['model'] == expected['model'] and got['data'] == expected['data'] and got['images'] == 360
    assert got['confusion_matrix'] == expected['confusion_matrix']
    assert got['loss'] == pytest.approx(expected['loss'], abs=1e-4)


def test_an_exported_file_passed_as_a_checkpoint_is_named_as_such(run, tmp_path):
    _, checkpoint = run
    main(['export', '--checkpoint', str(checkpoint), '--format', 'onnx', '--output', str(tmp_path / 'm.onnx')])
    with pytest.raises(LeanvitError, match=r'm\.onnx is an exported onnx model, not a checkpoint'):
        leanvit.load_checkpoint(leanvit.create_model('test_sret', img_size=32, num_classes=10), tmp_path / 'm.onnx')


@pytest.mark.parametrize('change, message', [
    (lambda m: m.pop('num_classes'), 'metadata field "num_classes" must be an integer >= 1, got None'),
    (lambda m: m.update(model=['test_sret']), 'metadata field "model" must be a model name'),
    (lambda m: m['data_config'].update(input_size=[3, 32]), 'metadata field "data_config.input_size" must be three'),
    (lambda m: m['data_config'].update(std=[0, 1, 1]), 'metadata field "data_config.std" must be a list of finite'),
    (lambda m: m['data_config'].update(crop_pct='NaN'), 'metadata field "data_config.crop_pct" must be a number'),
])
def test_altered_export_metadata_is_named_by_field(run, tmp_path, capsys, change, message):
    _, checkpoint = run
    code, _, _ = run_export(capsys, '--checkpoint', checkpoint, '--format', 'torchscript',
                            '--output', tmp_path / 'm.pt')
    assert code == 0
    files = {'leanvit.json': ''}
    module = torch.jit.load(str(tmp_path / 'm.pt'), _extra_files=files)
    meta = json.loads(files['leanvit.json'])
    change(meta)
    torch.jit.save(module, str(tmp_path / 'm.pt'), _extra_files={'leanvit.json': json.dumps(meta)})
    code = main(['eval', '--checkpoint', str(tmp_path / 'm.pt'), '--output', str(tmp_path / 'e')])
    err = capsys.readouterr().err
    assert code == 1 and 'Traceback' not in err and err.count('\n') == 1
    assert f'{tmp_path / "m.pt"}: {message}' in err



@pytest.mark.parametrize('argv, message', [
    (['--output', 'm.pt', '--format', 'onnx'], '--output {tmp}/m.pt does not fit --format onnx'),
    (['--output', 'm.onnx', '--format', 'torchscript'], '--output {tmp}/m.onnx does not fit --format torchscript'),
    (['--output', 'model'], '--output {tmp}/model: name the file .onnx (ONNX) or .pt (TorchScript), or pass --format'),
])
def test_the_output_name_and_the_format_agree(run, tmp_path, capsys, argv, message):
    _, checkpoint = run
    argv = [str(tmp_path / a) if a.startswith(('m.', 'model')) else a for a in argv]
    code, _, err = run_export(capsys, '--checkpoint', checkpoint, *argv)
    assert code == 2 and message.format(tmp=tmp_path) in err and err.count('\n') == 1
    assert not any(tmp_path.iterdir())


def test_the_format_follows_the_output_name(run, tmp_path, capsys):
    _, checkpoint = run
    code, out, err = run_export(capsys, '--checkpoint', checkpoint, '--output', tmp_path / 'm.pt')
    assert code == 0, err
    assert 'format     torchscript' in out
    code, _, err = run_export(capsys, '--checkpoint', tmp_path / 'm.pt', '--output', tmp_path / 'x.onnx')
    assert code == 1 and 'is an exported torchscript model, not a checkpoint' in err
    code = main(['profile', '--checkpoint', str(tmp_path / 'm.pt')])
    assert code == 2 and 'is an exported file: profile measures a PyTorch model' in capsys.readouterr().err
