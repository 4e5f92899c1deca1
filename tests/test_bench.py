"""`leanvit bench`: one row per model x backend x batch size, ratios within rounds, file sizes, skips and errors."""

import argparse
import contextlib
import csv
import importlib.util
import io
import os
import shutil

import onnxruntime
import pytest
import timm
import torch
from test_eval_cli import save_run_checkpoint

import leanvit
from leanvit.deploy import bench
from leanvit.errors import LeanvitError, UsageError

MODELS = ('test_sret', 'test_riformer')
BASELINE = 'test_riformer'
BATCH_SIZES = (1, 2)
BACKENDS = ('eager', 'folded', 'onnx')


def parse(*argv: str) -> argparse.Namespace:
    """The bench command's arguments, parsed as the command line parses them."""
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    return parser.parse_args(['bench', *argv])


def run_bench(output, *argv: str) -> tuple[str, list[dict]]:
    """What `leanvit bench` prints, and the rows of the bench.csv it writes."""
    args = parse('--output', str(output), '--batch-sizes', ','.join(map(str, BATCH_SIZES)), '--rounds', '2',
                 '--iters', '1', '--threads', '1', *argv)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert args.func(args) == 0
    with open(output / 'bench.csv', newline='') as f:
        return printed.getvalue(), list(csv.DictReader(f))


@pytest.fixture(scope='module')
def result(tmp_path_factory):
    output = tmp_path_factory.mktemp('bench')
    printed, rows = run_bench(output, '--models', ','.join(MODELS), '--backends', ','.join(BACKENDS),
                              '--baseline', BASELINE, '--img-size', '64', '--keep-files')
    return output, printed, rows


def test_one_row_per_model_backend_and_batch_size(result):
    _, _, rows = result
    assert [(r['model'], r['backend'], int(r['batch_size'])) for r in rows] == \
        [(m, b, s) for m in MODELS for b in BACKENDS for s in BATCH_SIZES]
    assert all(float(r['images_per_s']) > 0 for r in rows)
    assert all(r['input_size'] == '3x64x64' for r in rows)


def test_baseline_ratio_to_itself_is_exactly_one(result):
    _, _, rows = result
    baseline = [r for r in rows if r['model'] == BASELINE and r['backend'] == 'eager']
    assert len(baseline) == len(BATCH_SIZES)
    assert all(float(r['ratio_to_baseline']) == 1.0 for r in baseline)
    assert all(float(r['ratio_to_baseline']) > 0 for r in rows)


def test_file_sizes_are_those_of_the_benched_files(result):
    _, _, rows = result
    suffixes = {'eager': '.safetensors', 'folded': '.folded.safetensors', 'onnx': '.onnx'}
    for row in rows:
        assert row['file'].endswith(suffixes[row['backend']])
        assert int(row['file_bytes']) == os.path.getsize(row['file'])


def test_latencies_params_and_macs(result):
    _, _, rows = result
    for row in rows:
        assert 0 < float(row['latency_p50_ms']) <= float(row['latency_p90_ms'])
        assert int(row['params']) > 0 and int(row['macs']) > 0
    eager = {r['model']: int(r['params']) for r in rows if r['backend'] == 'eager'}
    assert eager['test_sret'] == leanvit.count_params(leanvit.create_model('test_sret'))


def test_outputs_name_the_cpu_and_versions(result):
    output, printed, rows = result
    assert (output / 'bench.png').stat().st_size > 0
    table = (output / 'bench.md').read_text()
    cpu = bench.cpu_name()
    assert cpu in table.splitlines()[0]
    for version in (torch.__version__, timm.__version__, onnxruntime.__version__):
        assert version in table
    assert table.strip() in printed  # the table printed is the table written
    assert all(r['cpu'] == cpu and r['threads'] == '1' and r['torch'] == torch.__version__ for r in rows)


def test_onnx_int8_runs_the_quantized_file(tmp_path):
    pytest.importorskip('leanvit.deploy.quantize')
    _, rows = run_bench(tmp_path, '--models', BASELINE, '--backends', 'onnx,onnx-int8', '--baseline', BASELINE,
                        '--keep-files')
    int8 = [r for r in rows if r['backend'] == 'onnx-int8']
    assert len(int8) == len(BATCH_SIZES) and all(float(r['images_per_s']) > 0 for r in int8)
    assert all(r['file'].endswith('.int8.onnx') and int(r['file_bytes']) == os.path.getsize(r['file']) for r in int8)


def test_onnx_int8_quantizes_the_fp32_export_on_seeded_batches(tmp_path, monkeypatch):
    pytest.importorskip('leanvit.deploy.quantize')
    calls = []

    def quantize_onnx(fp32_path, int8_path, calibration):  # stands in for the real one: copies the file
        calls.append((fp32_path, int8_path, calibration))
        shutil.copyfile(fp32_path, int8_path)
        return 'dynamic', 'static quantization failed: a stand-in'
    monkeypatch.setattr(bench, 'quantize_onnx', quantize_onnx)
    printed, rows = run_bench(tmp_path, '--models', BASELINE, '--backends', 'onnx-int8', '--baseline', BASELINE,
                              '--img-size', '32', '--keep-files')
    (fp32_path, int8_path, calibration), = calls
    assert str(fp32_path).endswith('test_riformer.onnx') and str(int8_path).endswith('test_riformer.int8.onnx')
    assert len(calibration) == bench.CALIBRATION_BATCHES
    assert all(batch.shape == (8, 3, 32, 32) and batch.dtype == 'float32' for batch in calibration)
    assert [r['backend'] for r in rows] == ['eager', 'eager', 'onnx-int8', 'onnx-int8']
    assert 'onnx-int8  test_riformer.int8.onnx: dynamic quantization (static quantization failed' in printed


def test_onnx_without_its_packages_is_one_line(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *args: None if name == 'onnxscript' else
                        find_spec(name, *args))
    with pytest.raises(LeanvitError, match='onnxscript'):
        bench.cmd_bench(parse('--models', BASELINE, '--backends', 'eager,onnx'))


def test_unknown_backend_names_the_choices():
    with pytest.raises(UsageError) as error:
        bench.cmd_bench(parse('--models', 'test_sret', '--backends', 'eager,tensorrt'))
    assert 'tensorrt' in str(error.value)
    assert all(backend in str(error.value) for backend in bench.BACKENDS)


def test_unknown_model_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match='unknown model'):
        run_bench(tmp_path, '--models', 'no_such_model', '--backends', 'eager', '--baseline', BASELINE)


def test_compile_is_skipped_with_a_reason_without_a_compiler(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, 'which', lambda name, *args, **kwargs: None)
    printed, rows = run_bench(tmp_path, '--models', BASELINE, '--backends', 'eager,compile', '--baseline', BASELINE)
    skips = [line for line in printed.splitlines() if line.startswith('compile')]
    assert len(skips) == 1 and 'compiler' in skips[0]
    assert {r['backend'] for r in rows} == {'eager'}


def test_a_failed_compile_skips_its_runner_in_one_line(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError('C++ compile error\nlong compiler output')
    monkeypatch.setattr(shutil, 'which', lambda name, *args, **kwargs: f'/usr/bin/{name}')
    monkeypatch.setattr(torch, 'compile', lambda model, **kwargs: broken)
    printed, rows = run_bench(tmp_path, '--models', BASELINE, '--backends', 'eager,compile', '--baseline', BASELINE)
    assert 'compile    skipped for test_riformer: RuntimeError: C++ compile error' in printed
    assert 'long compiler output' not in printed and 'Traceback' not in printed
    assert {r['backend'] for r in rows} == {'eager'}


def test_checkpoint_is_benched_as_its_run_built_it(tmp_path):
    _, checkpoint = save_run_checkpoint(tmp_path / 'run', dict(num_classes=10, img_size=32))
    printed, rows = run_bench(tmp_path / 'out', '--checkpoint', str(checkpoint), '--backends', 'eager',
                              '--baseline', BASELINE)
    assert [r['model'] for r in rows] == [f'test_sret ({checkpoint})'] * 2 + [BASELINE] * 2
    assert all(r['input_size'] == '3x32x32' for r in rows)  # the baseline too: at the run's input size
    with pytest.raises(UsageError, match='--img-size'):
        run_bench(tmp_path / 'out', '--checkpoint', str(checkpoint), '--img-size', '64')


def test_baseline_is_added_in_eager_when_not_requested(tmp_path):
    _, rows = run_bench(tmp_path, '--models', 'test_sret', '--backends', 'folded', '--baseline', BASELINE)
    assert [(r['model'], r['backend']) for r in rows] == [('test_sret', 'folded')] * 2 + [(BASELINE, 'eager')] * 2


def test_pareto_front_keeps_what_no_smaller_model_beats():
    points = [(1., 100.), (2., 90.), (2., 150.), (3., 120.), (4., 200.), (0.5, 50.)]
    assert bench.pareto_front(points) == [(0.5, 50.), (1., 100.), (2., 150.), (4., 200.)]


def test_batch_sizes_must_be_positive():
    with pytest.raises(SystemExit):
        parse('--batch-sizes', '1,0')



def test_the_command_line_runs_bench_and_refuses_a_file_as_output_before_measuring(tmp_path, capsys):
    from leanvit.cli import main

    target = tmp_path / 'taken'
    target.write_text('mine')
    assert main(['bench', '--models', 'test_sret', '--backends', 'eager', '--output', str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f'leanvit bench: error: --output {target} is a file; give a folder for bench.csv, bench.md and '
                   f'bench.png')
    assert target.read_text() == 'mine'
