"""``leanvit bench``: eval throughput, latency, size and cost of models in each deployment backend, on this CPU.

For every model x backend (``eager``, ``folded``, ``onnx``, ``onnx-int8``, ``compile``) x batch size it measures
images/s, the p50 / p90 latency of one call, parameters, MACs and the size of the file that deploys it, and the
throughput ratio to a baseline (DeiT-Ti in eager PyTorch unless ``--baseline`` says otherwise).

Shared CPUs drift by tens of percent between minutes (other tenants, frequency scaling), so one model timed after
another compares two different machines. Every runner is therefore built first, in one process, and then timed in
interleaved rounds: each round calls every runner at every batch size, in an order that rotates from round to
round, and the figures are medians over rounds. A ratio to the baseline is the median over rounds of the ratio
within a round, where both ran seconds apart on the same machine; it carries over to another CPU far better than
images/s does, though a gain measured on one CPU is still a hypothesis on the next.

torch, timm, matplotlib and the modules that load them are imported inside the functions: the command line builds its
parser from this module, and ``leanvit --help`` must answer without loading them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import functools
import io
import platform
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import timm
import torch
from timm.utils.model import reparameterize_model
from torch import nn

from leanvit.argtypes import positive_int, positive_ints
from leanvit.deploy.export import export_model
from leanvit.deploy.quantize import quantize_onnx
from leanvit.errors import UsageError
from leanvit.io.exported import onnx_session, require_packages
from leanvit.io.files import atomic_write
from leanvit.io.weights import save_weights
from leanvit.models import create_model
from leanvit.profiler import count_params, profile
from leanvit.threads import choose_threads
from leanvit.train.evaluation import data_config, load_trained_model, run_metadata

BACKENDS = ('eager', 'folded', 'onnx', 'onnx-int8', 'onnx-plain', 'compile')
ONNX_BACKENDS = ('onnx', 'onnx-int8', 'onnx-plain')
DEFAULT_BASELINE = 'deit_tiny_patch16_224'
BASELINE_BACKEND = 'eager'
# Calibration for onnx-int8: bench measures speed and size, not accuracy, so seeded noise stands in for images.
CALIBRATION_BATCHES, CALIBRATION_BATCH_SIZE = 4, 8
# The first pass over the batch sizes compiles (torch.compile) and selects kernels; the second lets a compiled model
# settle after torch.compile re-traces with a dynamic batch on seeing a second batch size.
WARMUP_PASSES = 2
# Compilers torch's inductor looks for when its config names none (the config's default is (None, $CXX or g++)).
FALLBACK_COMPILERS = ('g++', 'clang++')
MARKERS = {'eager': 'o', 'folded': 's', 'onnx': '^', 'onnx-int8': 'v', 'onnx-plain': 'x', 'compile': 'D'}
CSV_COLUMNS = ('model', 'backend', 'batch_size', 'input_size', 'images_per_s', 'ratio_to_baseline', 'latency_p50_ms',
               'latency_p90_ms', 'params', 'macs', 'file_bytes', 'file', 'baseline', 'cpu', 'threads', 'rounds',
               'iters', 'torch', 'timm', 'onnxruntime', 'date')


@dataclasses.dataclass
class BenchModel:
    """One model to bench, in eval mode, with the input it is built for.

    Attributes:
        label: Its name in the results: the model name, and the checkpoint its weights came from.
        model: The model as created (and loaded), in eval mode.
        input_size: (channels, height, width) of one image.
        macs: Multiply-accumulates of one image's forward (`leanvit.profile`).
    """
    label: str
    model: nn.Module
    input_size: tuple[int, int, int]
    macs: int

    @functools.cached_property
    def folded(self):
        """The inference form: ``timm.utils.model.reparameterize_model`` of a copy of the model."""

        return reparameterize_model(self.model).eval()

    @property
    def file_stem(self) -> str:
        return re.sub(r'[^A-Za-z0-9._-]+', '_', self.label).strip('_')


@dataclasses.dataclass
class Runner:
    """One model in one backend: ``run(images)`` computes the logits of a float32 batch (a CPU tensor)."""
    model: BenchModel
    backend: str
    run: Callable
    params: int
    file: Path | None = None

    @property
    def file_bytes(self) -> int | None:
        return self.file.stat().st_size if self.file else None


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``bench`` command to the command line's subparsers; its ``func`` is `cmd_bench`."""
    bench = sub.add_parser(
        'bench', help='eval throughput, latency and size of models in each backend (eager, folded, ONNX, compile)',
        description='Eval throughput (images/s), latency, params, MACs and file size of models in deployment '
                    'backends, timed in interleaved rounds in one process: each figure is a median over rounds and '
                    'each ratio to the baseline the median of ratios within a round, so that a shared CPU\'s drift '
                    'cancels. Writes bench.csv, bench.md and bench.png (params against images/s).',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='examples:\n'
               '  leanvit bench --models sret_t,mini_deit_tiny_patch16_224 --backends eager,folded,onnx\n'
               '  leanvit bench --checkpoint runs/mini/best.safetensors --backends eager,onnx,onnx-int8 '
               '--batch-sizes 1,32')
    bench.add_argument('--models', default=None, metavar='NAMES',
                       help='comma-separated model names (random weights: speed does not depend on them)')
    bench.add_argument('--checkpoint', default=None,
                       help="a leanvit run's checkpoint (RUN/best.safetensors): its model is rebuilt as the run built "
                            "it, with its weights, and every model is benched at the run's input size")
    bench.add_argument('--backends', default='eager,folded,onnx', metavar='NAMES',
                       help=f'comma-separated, of {", ".join(BACKENDS)} (default: eager,folded,onnx)')
    bench.add_argument('--batch-sizes', type=positive_ints, default=[1, 16], metavar='SIZES',
                       help='comma-separated batch sizes (default: 1,16)')
    bench.add_argument('--baseline', default=DEFAULT_BASELINE, metavar='NAME',
                       help=f'model whose {BASELINE_BACKEND} throughput at the same batch size every ratio divides by, '
                            f'added if not in --models (default: {DEFAULT_BASELINE})')
    bench.add_argument('--rounds', type=positive_int, default=10,
                       help='interleaved timing rounds; figures are medians over them (default: 10)')
    bench.add_argument('--iters', type=positive_int, default=2,
                       help='calls of each runner at each batch size per round (default: 2)')
    bench.add_argument('--img-size', type=positive_int, default=None,
                       help="input resolution of every model (default: each model's own)")
    bench.add_argument('--threads', type=positive_int, default=None,
                       help='compute threads, of PyTorch and ONNX Runtime alike (default: OMP_NUM_THREADS if set, else '
                            'the CPUs not busy with other processes, as `leanvit train` chooses)')
    bench.add_argument('--output', default='bench',
                       help='folder for bench.csv, bench.md and bench.png, created if missing (default: bench)')
    bench.add_argument('--keep-files', action='store_true',
                       help='keep the benched files (.safetensors, .onnx) in OUTPUT/files, not in a temporary folder')
    bench.set_defaults(func=cmd_bench)
    return bench


def parse_backends(text: str) -> list[str]:
    """The backends named in ``text`` (comma-separated), each once; an unknown one is a UsageError naming them all."""
    names = list(dict.fromkeys(name.strip() for name in text.split(',') if name.strip()))
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        raise UsageError(f'unknown backend {", ".join(map(repr, unknown)) or "(none given)"}; choose from '
                         f'{", ".join(BACKENDS)}')
    return names


def cmd_bench(args: argparse.Namespace) -> int:

    backends = parse_backends(args.backends)
    names = [name.strip() for name in (args.models or '').split(',') if name.strip()]
    if not names and not args.checkpoint:
        raise UsageError('bench needs --models (comma-separated names) or a run\'s --checkpoint')
    if args.checkpoint and args.img_size:
        raise UsageError("--img-size does not apply with --checkpoint: every model is benched at the run's input size")
    check_backends_available(backends)
    threads, why = choose_threads(args.threads)
    print(f'threads    {threads} ({why})')
    output = Path(args.output)
    if output.exists() and not output.is_dir():  # found now, not after minutes of measuring
        raise UsageError(f'--output {output} is a file; give a folder for bench.csv, bench.md and bench.png')
    with files_folder(output, args.keep_files) as folder:
        rows = benchmark(names, backends, args.batch_sizes, baseline=args.baseline, checkpoint=args.checkpoint,
                         img_size=args.img_size, rounds=args.rounds, iters=args.iters, folder=folder)
        if not args.keep_files:  # the temporary folder goes with this block: naming its files would mislead
            rows = [dict(row, file='') for row in rows]
    facts = machine_facts(threads)
    rows = [dict(row, baseline=args.baseline, rounds=args.rounds, iters=args.iters, **facts) for row in rows]
    table = markdown(rows, facts, args.batch_sizes, args.rounds, args.iters, args.baseline)
    write_results(output, rows, table, facts)
    print('\n' + table)
    print(f'wrote      {output / "bench.csv"}, {output / "bench.md"}, {output / "bench.png"}')
    return 0


def check_backends_available(backends: list[str]) -> None:
    """Refuse, in one line and before any model is built, ONNX backends whose packages are missing."""

    if any(backend in ONNX_BACKENDS for backend in backends):
        require_packages('onnx', 'onnxruntime', 'onnxscript', 'onnx_ir')  # what export_model requires


@contextlib.contextmanager
def files_folder(output: Path, keep: bool):
    """Where the benched files go: ``output/files`` with ``keep``, else a temporary folder removed on exit."""
    if keep:
        folder = output / 'files'
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
    else:
        with tempfile.TemporaryDirectory(prefix='leanvit-bench-') as folder:
            yield Path(folder)


def benchmark(names: list[str], backends: list[str], batch_sizes: list[int], *, folder: Path,
              baseline: str = DEFAULT_BASELINE, checkpoint: str | None = None, img_size: int | None = None,
              rounds: int = 10, iters: int = 2) -> list[dict]:
    """Build every model x backend, time them in interleaved rounds, and return one row per runner x batch size.

    Args:
        names: Models created by name, with random weights.
        backends: Of `BACKENDS`; the baseline's model is also run in ``eager``.
        batch_sizes: Each runner is timed at each.
        folder: Where the benched files are written (safetensors of eager / folded, ONNX files).
        baseline: The model whose eager throughput each ratio divides by (added if not in ``names``).
        checkpoint: A leanvit run's checkpoint, benched as its run built it; every model then takes its input size.
        img_size: Resolution every model is built at (None: each model's own).
        rounds: Timing rounds; figures are medians over rounds.
        iters: Calls of each runner at each batch size per round.

    Returns:
        Rows with the keys of `CSV_COLUMNS` up to ``file``.
    """
    models = load_models(names, baseline, checkpoint, img_size)
    runners = build_runners(runner_jobs(models, backends, baseline, baseline in names), folder)
    inputs = sample_inputs(models, batch_sizes)
    runners = warm_up(runners, inputs, batch_sizes)
    calls = time_rounds(runners, inputs, batch_sizes, rounds, iters)
    reference = next(i for i, r in enumerate(runners) if r.model.label == baseline and r.backend == BASELINE_BACKEND)
    return summarize(runners, calls, batch_sizes, reference)


def load_models(names: list[str], baseline: str, checkpoint: str | None, img_size: int | None) -> list[BenchModel]:
    """The models to bench: the checkpoint's, then ``names`` and the baseline, all built before any is timed (an
    unknown name fails here, in a second, not after minutes of exports)."""

    models = []
    if checkpoint:
        models.append(load_run_model(checkpoint))
        height, width = models[0].input_size[1:]
        img_size = height if height == width else (height, width)
    for name in dict.fromkeys([*names, baseline]):
        model = create_model(name, **({'img_size': img_size} if img_size else {})).eval()
        models.append(bench_model(name, model, data_config(model, img_size)['input_size']))
    return models


def load_run_model(checkpoint: str) -> BenchModel:
    """The model of a leanvit run's checkpoint, rebuilt as the run built it, with its weights."""

    path = Path(checkpoint)
    if 'model' not in run_metadata(path):
        raise UsageError(f'{path} has no {path.with_suffix(".json").name} beside it that names its model: --checkpoint '
                         f'takes a leanvit run\'s checkpoint, such as RUN/best.safetensors')
    model, name, kwargs = load_trained_model(path)
    model.eval()
    return bench_model(f'{name} ({path})', model, data_config(model, kwargs.get('img_size'))['input_size'])


def bench_model(label: str, model: nn.Module, input_size: tuple[int, ...]) -> BenchModel:
    """``model`` with its MACs counted once, for every backend that runs it."""
    return BenchModel(label, model, tuple(input_size), profile(model, input_size).macs)


def runner_jobs(models: list[BenchModel], backends: list[str], baseline: str,
                baseline_requested: bool) -> list[tuple[BenchModel, str]]:
    """(model, backend) of every runner: each model in each backend, and the baseline in eager (only in eager where
    it was not requested). ``compile`` is left out, with one printed line, where no C++ compiler is found."""
    if 'compile' in backends and (missing_compiler := compiler_missing()):
        print(f'compile    skipped: {missing_compiler}')
        backends = [backend for backend in backends if backend != 'compile']
    jobs = []
    for model in models:
        if model.label != baseline:
            jobs += [(model, backend) for backend in backends]
        elif baseline_requested:
            jobs += [(model, backend) for backend in dict.fromkeys([BASELINE_BACKEND, *backends])]
        else:
            jobs.append((model, BASELINE_BACKEND))
    return jobs


def build_runners(jobs: list[tuple[BenchModel, str]], folder: Path) -> list[Runner]:
    """A runner for each (model, backend), its files written to ``folder``; each model is exported to ONNX once."""
    runners, onnx_files = [], {}
    for model, backend in progress(jobs, 'building'):
        if backend in ('onnx', 'onnx-int8') and model.label not in onnx_files:
            onnx_files[model.label] = export_onnx(model, folder)
        runners.append(build_runner(model, backend, folder, onnx_files.get(model.label)))
    return runners


def build_runner(model: BenchModel, backend: str, folder: Path, onnx_file: Path | None = None) -> Runner:
    """``model`` in ``backend``; ``onnx_file`` is its fp32 ONNX export (the ONNX backends)."""

    if backend == 'eager':
        return Runner(model, backend, eager(model.model), count_params(model.model),
                      weights_file(model.model, folder / f'{model.file_stem}.safetensors'))
    if backend == 'folded':
        return Runner(model, backend, eager(model.folded), count_params(model.folded),
                      weights_file(model.folded, folder / f'{model.file_stem}.folded.safetensors'))
    if backend == 'onnx':
        return Runner(model, backend, onnxruntime_session(onnx_file), count_params(model.folded), onnx_file)
    if backend == 'onnx-int8':
        int8_file = quantize(onnx_file, model.input_size, folder / f'{model.file_stem}.int8.onnx')
        return Runner(model, backend, onnxruntime_session(int8_file), count_params(model.folded), int8_file)
    if backend == 'onnx-plain':
        plain_file = export_plain_onnx(model, folder / f'{model.file_stem}.plain.onnx')
        return Runner(model, backend, onnxruntime_session(plain_file), count_params(model.model), plain_file)
    if backend == 'compile':
        # Compiling happens at the first call, in `warm_up`, which drops the runner if it fails.
        return Runner(model, backend, eager(torch.compile(model.model)), count_params(model.model))
    raise UsageError(f'unknown backend {backend!r}; choose from {", ".join(BACKENDS)}')


def eager(model: nn.Module) -> Callable:

    def run(images):
        with torch.inference_mode():
            return model(images)
    return run


def weights_file(model: nn.Module, path: Path) -> Path:
    """The model's state_dict as .safetensors at ``path``: what deploying it in PyTorch ships."""

    save_weights(model, path)
    return path


def export_onnx(model: BenchModel, folder: Path) -> Path:
    """The model re-parameterized and exported to ONNX (verified against PyTorch by `export_model`)."""

    path = folder / f'{model.file_stem}.onnx'
    export_model(model.model, path, 'onnx', model.input_size, batch_size=2, reparam=True)
    return path


def export_plain_onnx(model: BenchModel, path: Path) -> Path:
    """torch's exporter on the model as created, nothing of leanvit's (no fold, no graph clean-up): the reference a
    deployment file must not be slower than."""

    sample = torch.randn(2, *model.input_size)
    torch.onnx.export(model.model, (sample,), str(path), dynamo=True, external_data=False, verbose=False,
                      input_names=['input'], dynamic_shapes=({0: torch.export.Dim('batch')},))
    return path


def quantize(onnx_file: Path, input_size: tuple[int, int, int], path: Path) -> Path:
    """``onnx_file`` quantized to int8 at ``path`` by `quantize_onnx`, calibrated on seeded random
    batches; the method it chose (static or dynamic, the faster here) is printed, since they run other kernels."""

    generator = np.random.default_rng(0)
    calibration = [generator.standard_normal((CALIBRATION_BATCH_SIZE, *input_size), dtype=np.float32)
                   for _ in range(CALIBRATION_BATCHES)]
    method, why = quantize_onnx(onnx_file, path, calibration)
    print(f'onnx-int8  {path.name}: {method} quantization ({why})')
    return path


def onnxruntime_session(path: Path) -> Callable:
    """ONNX Runtime running ``path`` on the CPU, on as many threads as torch (`leanvit.threads` chose them)."""


    session = onnx_session(path, torch.get_num_threads())  # the threads chosen for this command
    input_name = session.get_inputs()[0].name
    return lambda images: session.run(None, {input_name: images.numpy()})


def compiler_missing() -> str | None:
    """Why ``torch.compile`` cannot run here (its CPU backend compiles C++), or None if the compiler is found."""
    import torch._inductor.config

    configured = torch._inductor.config.cpp.cxx
    names = [name for name in (configured if isinstance(configured, (list, tuple)) else (configured,)) if name]
    names = names or list(FALLBACK_COMPILERS)
    if any(shutil.which(name) for name in names):
        return None
    return (f'no C++ compiler found (looked for {", ".join(names)}), which torch.compile needs on the CPU; install '
            f'one or set CXX')


def sample_inputs(models: list[BenchModel], batch_sizes: list[int]) -> dict[str, dict[int, object]]:
    """Seeded random images for each model at each batch size: ``inputs[label][batch_size]``."""

    generator = torch.Generator().manual_seed(0)
    return {m.label: {b: torch.randn(b, *m.input_size, generator=generator) for b in batch_sizes} for m in models}


def warm_up(runners: list[Runner], inputs: dict, batch_sizes: list[int]) -> list[Runner]:
    """Call each runner at each batch size `WARMUP_PASSES` times (allocations, kernel choice, compilation); a
    compiled runner that fails to compile is dropped with one printed line."""
    kept = []
    for runner in progress(runners, 'warming up'):
        try:
            for _ in range(WARMUP_PASSES):
                for b in batch_sizes:
                    runner.run(inputs[runner.model.label][b])
        except Exception as e:
            if runner.backend != 'compile':
                raise
            print(f'compile    skipped for {runner.model.label}: {first_line(e)}')
            continue
        kept.append(runner)
    return kept


def time_rounds(runners: list[Runner], inputs: dict, batch_sizes: list[int], rounds: int,
                iters: int) -> dict[tuple[int, int], list[list[float]]]:
    """``calls[(runner index, batch size)][round]``: the seconds of each of that round's ``iters`` calls.

    Each round calls every runner at every batch size; the order rotates by one each round, so that no runner
    always follows the same one (a predecessor's caches and turbo state are part of a runner's time).
    """
    units = [(i, b) for i in range(len(runners)) for b in batch_sizes]
    calls = {unit: [] for unit in units}
    for round_index in progress(range(rounds), 'timing'):
        shift = round_index % len(units)
        for i, b in units[shift:] + units[:shift]:
            calls[(i, b)].append(timed_calls(runners[i].run, inputs[runners[i].model.label][b], iters))
    return calls


def timed_calls(run: Callable, images, iters: int) -> list[float]:
    seconds = []
    for _ in range(iters):
        start = time.perf_counter()
        run(images)
        seconds.append(time.perf_counter() - start)
    return seconds


def summarize(runners: list[Runner], calls: dict, batch_sizes: list[int], reference: int) -> list[dict]:
    """One row per runner x batch size: medians over rounds, and the ratio to runner ``reference`` within rounds."""
    def rates(i: int, b: int) -> list[float]:
        return [b * len(seconds) / sum(seconds) for seconds in calls[(i, b)]]

    rows = []
    for i, runner in enumerate(runners):
        for b in batch_sizes:
            p50, p90 = np.percentile([s for seconds in calls[(i, b)] for s in seconds], [50, 90]) * 1e3
            rows.append(dict(
                model=runner.model.label, backend=runner.backend, batch_size=b,
                input_size='x'.join(map(str, runner.model.input_size)),
                images_per_s=statistics.median(rates(i, b)),
                ratio_to_baseline=statistics.median(x / y for x, y in zip(rates(i, b), rates(reference, b))),
                latency_p50_ms=float(p50), latency_p90_ms=float(p90), params=runner.params, macs=runner.model.macs,
                file_bytes=runner.file_bytes, file=str(runner.file) if runner.file else ''))
    return rows


def first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f'{type(error).__name__}: {lines[0] if lines else ""}'


def progress(items, desc: str):
    """``items`` with a progress bar on stderr where tqdm is installed and stderr is a terminal."""
    try:
        from tqdm import tqdm
    except ImportError:  # optional: without it the bench runs the same, with no progress bar
        return items
    return tqdm(items, desc=desc, leave=False, disable=None)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform module knows."""
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or 'unknown CPU'


def machine_facts(threads: int) -> dict:
    """What a speed figure depends on besides the model: CPU, threads, library versions, and when."""

    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = 'not installed'
    return dict(cpu=cpu_name(), threads=threads, torch=torch.__version__, timm=timm.__version__,
                onnxruntime=ort_version, date=datetime.datetime.now().astimezone().isoformat(timespec='minutes'))


def threads_text(threads: int) -> str:
    return f'{threads} thread' + ('s' if threads != 1 else '')


def markdown(rows: list[dict], facts: dict, batch_sizes: list[int], rounds: int, iters: int, baseline: str) -> str:
    """The results as a Markdown table, under a line that names the CPU and what the figures depend on."""
    lines = [
        f'Eval throughput on {facts["cpu"]}, {threads_text(facts["threads"])}; batch sizes '
        f'{", ".join(map(str, batch_sizes))}; medians of {rounds} interleaved rounds of {iters} calls; torch '
        f'{facts["torch"]}, timm {facts["timm"]}, onnxruntime {facts["onnxruntime"]}; {facts["date"]}.',
        '',
        f'"x baseline": images/s over {baseline} ({BASELINE_BACKEND}) at the same batch size, the median over rounds '
        f'of the ratio within a round. Latency: one call at that batch size.',
        '',
        '| model | backend | batch | input | images/s | x baseline | p50 ms | p90 ms | params | GMACs | file MB |',
        '|---|---|--:|---|--:|--:|--:|--:|--:|--:|--:|',
    ]
    for row in rows:
        size = f'{row["file_bytes"] / 1e6:.2f}' if row['file_bytes'] is not None else '-'
        lines.append(f'| {row["model"]} | {row["backend"]} | {row["batch_size"]} | {row["input_size"]} | '
                     f'{row["images_per_s"]:.1f} | {row["ratio_to_baseline"]:.3f} | {row["latency_p50_ms"]:.2f} | '
                     f'{row["latency_p90_ms"]:.2f} | {row["params"]:,} | {row["macs"] / 1e9:.3f} | {size} |')
    return '\n'.join(lines)


def write_results(output: Path, rows: list[dict], table: str, facts: dict) -> None:
    """bench.csv, bench.md and bench.png in ``output``, each replaced atomically."""

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, lineterminator='\n')
    writer.writeheader()
    writer.writerows({k: csv_cell(row[k]) for k in CSV_COLUMNS} for row in rows)
    atomic_write(output / 'bench.csv', lambda tmp: Path(tmp).write_text(text.getvalue()))
    atomic_write(output / 'bench.md', lambda tmp: Path(tmp).write_text(table + '\n'))
    plot(rows, output / 'bench.png', facts)


def csv_cell(value) -> str:
    """Six significant digits for a measured figure: more would be noise, in a file people read too."""
    if value is None:
        return ''
    return f'{value:.6g}' if isinstance(value, float) else str(value)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (params, images/s) points no other point beats with as few params and as much throughput, by params."""
    front = []
    for params, rate in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or rate > front[-1][1]:
            front.append((params, rate))
    return front


def plot(rows: list[dict], path: Path, facts: dict) -> None:
    """Parameters (M) against images/s at the largest batch size, a marker per backend, the Pareto front as a line."""
    # A bare Figure on an Agg canvas: pyplot's global backend stays as the caller (a notebook) set it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter


    batch = max(row['batch_size'] for row in rows)
    rows = [row for row in rows if row['batch_size'] == batch]
    fig = Figure(figsize=(8, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for backend in dict.fromkeys(row['backend'] for row in rows):
        chosen = [row for row in rows if row['backend'] == backend]
        ax.scatter([r['params'] / 1e6 for r in chosen], [r['images_per_s'] for r in chosen],
                   marker=MARKERS.get(backend, 'o'), label=backend, zorder=3)
    for row in dict((row['model'], row) for row in rows).values():  # each model named once, at its last backend
        ax.annotate(row['model'], (row['params'] / 1e6, row['images_per_s']), fontsize=7,
                    textcoords='offset points', xytext=(4, 4))
    front = pareto_front([(row['params'] / 1e6, row['images_per_s']) for row in rows])
    ax.plot(*zip(*front), 'k--', linewidth=1, label='Pareto front', zorder=2)
    params = [row['params'] for row in rows]
    if max(params) > 10 * max(min(params), 1):  # an order of magnitude apart: a linear axis crowds the small models
        ax.set_xscale('log')
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f'{value:g}'))
    ax.set_xlabel('parameters (M)')
    ax.set_ylabel(f'images/s at batch {batch}')
    ax.set_title(f'{facts["cpu"]}, {threads_text(facts["threads"])}', fontsize=9)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=120))
