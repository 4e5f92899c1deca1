"""Latency of GLiT architectures on this machine, in the runtime they will be deployed with.

A MAC budget is a proxy; what a user deploying on a CPU has is a latency budget on that CPU, in that runtime
(ONNX Runtime, its INT8 kernels, or eager PyTorch). Lookup tables (Once-for-All, Cai et al., ICLR 2020) make latency
cheap enough to test for every candidate of a search: a GLiT is a fixed part (patch embedding, class token and
position embedding, final norm and head) and a sequence of blocks that all see the same token count and width, so
its latency is the fixed part's plus each block's. `LatencyTable` measures those parts here, once per search folder,
and predicts any architecture from them; `measure_architectures` builds whole models and times them, which is how the
search checks the prediction on the candidates it reports.

Every part is timed as `leanvit bench` times models (built first, then interleaved rounds; here the fastest round's
median call, the figure that reproduces on a shared CPU), in the same runtime: ONNX files exported and folded as
`leanvit export` writes them, quantized by one method for every part (the method ONNX Runtime runs fastest for the
whole default architecture), or the PyTorch modules as created. A
block is timed where it runs, inside a model: the fixed part is the model without blocks, and a block choice's share
is what a model of `BLOCK_COPIES` copies of it takes beyond the fixed part, divided by the copies. (A block timed
alone, as a graph of its own, came out 14 % below its share of whole models in ONNX Runtime on the CPU this was
written on: the call's own cost and a model's memory traffic are not a lone block's.)

A table holds only on the machine and runtime it was measured with: it records the CPU, the threads and the library
versions, and `load_or_measure` refuses a table measured elsewhere, naming what differs.
"""

import contextlib
import dataclasses
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from leanvit.deploy.bench import (
    BenchModel,
    Runner,
    eager,
    export_onnx,
    machine_facts,
    onnxruntime_session,
    progress,
    time_rounds,
    warm_up,
)
from leanvit.deploy.quantize import quantize_onnx
from leanvit.errors import RunDirectoryError, UsageError
from leanvit.io.exported import require_packages
from leanvit.io.files import write_json
from leanvit.models.glit import BlockArch, GLiT, SearchSpace
from leanvit.threads import busy_cpus
from leanvit.train.run_directory import read_sidecar

__all__ = ['BACKENDS', 'LatencyTable', 'load_or_measure', 'measure_architectures', 'prediction_errors']

BACKENDS = ('onnx', 'onnx-int8', 'eager')
# What a table's figures depend on besides the model: a table measured with other values is refused.
MACHINE_FIELDS = ('cpu', 'threads', 'torch', 'onnxruntime')
ROUNDS, ITERS = 30, 10
# Each block choice is timed inside a model of this many copies of it: inside a model, as it will run, and few enough
# that the 37 models of a table fit in memory for the widest space (GLiT-Base's 768 channels).
BLOCK_COPIES = 4
# Seeded noise calibrates the INT8 activation ranges: the latency of a quantized graph does not depend on them.
CALIBRATION_BATCHES = 2


@dataclasses.dataclass(frozen=True)
class LatencyTable:
    """Milliseconds of each part of a GLiT on one machine, in one runtime, at one batch size.

    Attributes:
        backend: ``'onnx'``, ``'onnx-int8'`` or ``'eager'``.
        batch_size: Images per call.
        geometry: The model the parts belong to: ``GLiT``'s keyword arguments (width, heads, image and patch size,
            channels, classes).
        machine: CPU, threads, torch and onnxruntime versions it was measured with.
        int8_method: The quantization of every part (``'static'`` or ``'dynamic'``; None unless onnx-int8).
        depth: Blocks of the architectures it predicts.
        fixed_ms: The model without blocks, its runtime call included.
        blocks: Each block choice's milliseconds inside a model.
    """
    backend: str
    batch_size: int
    geometry: dict
    depth: int
    machine: dict
    int8_method: str | None
    fixed_ms: float
    blocks: dict[BlockArch, float]

    def predict(self, arch: Sequence[BlockArch]) -> float:
        """Predicted milliseconds of one call of the GLiT of ``arch``."""
        return self.fixed_ms + sum(self.blocks[block] for block in arch)

    def range(self, depth: int) -> tuple[float, float]:
        """Fewest and most milliseconds over every architecture of ``depth`` blocks."""
        return (self.fixed_ms + depth * min(self.blocks.values()), self.fixed_ms + depth * max(self.blocks.values()))

    def describe(self) -> str:
        return (f'{self.backend}, batch {self.batch_size}, {self.machine["threads"]} thread(s), '
                f'{self.machine["cpu"]}')

    def to_json(self) -> dict:
        return dict(backend=self.backend, batch_size=self.batch_size, geometry=self.geometry, depth=self.depth,
                    machine=self.machine, int8_method=self.int8_method, fixed_ms=self.fixed_ms,
                    blocks=[dict(dataclasses.asdict(block), ms=ms) for block, ms in self.blocks.items()])

    @classmethod
    def from_json(cls, record: dict, where: str) -> 'LatencyTable':
        """The table of a record `to_json` wrote; a RunDirectoryError names ``where`` and the field otherwise."""
        def refuse(field: str, expected: str):
            raise RunDirectoryError(f'{where}: field "{field}" must be {expected}, got {record.get(field)!r:.60}; '
                                    f'the file is corrupt or was not written by leanvit (delete it to measure again)')

        fields = {f.name for f in dataclasses.fields(cls)}
        if set(record) != fields:
            raise RunDirectoryError(f'{where} must hold the fields {sorted(fields)}, got {sorted(record)}; the file '
                                    f'is corrupt or was not written by leanvit (delete it to measure again)')
        if record['backend'] not in BACKENDS:
            refuse('backend', f'one of {list(BACKENDS)}')
        for name in ('batch_size', 'depth'):
            if not _count(record[name]):
                refuse(name, 'an integer >= 1')
        for name in ('geometry', 'machine'):
            if not isinstance(record[name], dict):
                refuse(name, 'an object')
        if record['int8_method'] not in (None, 'static', 'dynamic'):
            refuse('int8_method', 'null, "static" or "dynamic"')
        if not _milliseconds(record['fixed_ms']):
            refuse('fixed_ms', 'a number of milliseconds >= 0')
        if not isinstance(record['blocks'], list) or not record['blocks']:
            refuse('blocks', 'a non-empty list of block choices with their "ms"')
        blocks = {}
        for i, entry in enumerate(record['blocks']):
            if not isinstance(entry, dict) or not _milliseconds(entry.get('ms')):
                raise RunDirectoryError(f'{where}: blocks[{i}] must be a block choice with a number "ms" >= 0; the '
                                        f'file is corrupt or was not written by leanvit (delete it to measure again)')
            try:
                block = BlockArch.from_dict({k: v for k, v in entry.items() if k != 'ms'}, f'{where}: blocks[{i}]')
            except ValueError as e:
                raise RunDirectoryError(f'{e}; the file is corrupt or was not written by leanvit') from None
            blocks[block] = float(entry['ms'])
        return cls(**dict(record, blocks=blocks, fixed_ms=float(record['fixed_ms'])))


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _milliseconds(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e9


def this_machine(backend: str, threads: int) -> dict:
    """The facts of `MACHINE_FIELDS` here, for ``threads`` compute threads."""
    facts = machine_facts(threads)
    if backend == 'eager':
        facts['onnxruntime'] = 'not used'
    return {field: facts[field] for field in MACHINE_FIELDS}


def load_or_measure(path: Path, space: SearchSpace, geometry: dict, depth: int, backend: str,
                    batch_size: int, threads: int) -> LatencyTable:
    """The table at ``path`` if it was measured for this model, runtime and machine; measured (and written there)
    if there is none.

    Raises:
        UsageError: the table at ``path`` was measured on another machine, in another runtime or for another model.
        RunDirectoryError: the file is not a table leanvit wrote.
    """
    if backend not in BACKENDS:
        raise UsageError(f'latency backend (--backend) must be one of {", ".join(BACKENDS)}, got {backend!r}')
    if backend != 'eager':
        require_packages('onnx', 'onnxruntime', 'onnxscript', 'onnx_ir')
    machine = this_machine(backend, threads)
    if path.exists():
        table = LatencyTable.from_json(read_sidecar(path), str(path))
        missing = set(space.all_blocks(geometry['num_heads'])) - set(table.blocks)
        if missing:
            raise RunDirectoryError(f'{path} lacks {len(missing)} block choice(s) of the space, such as '
                                    f'{next(iter(missing))}; the file is corrupt or was not written by leanvit (delete '
                                    f'it to measure again)')
        asked = dict(backend=backend, batch_size=batch_size, geometry=geometry, depth=depth)
        recorded = table.to_json()
        differs = [f'{name} {recorded[name]!r} (here: {value!r})' for name, value in asked.items()
                   if recorded[name] != value]
        differs += [f'{name} {table.machine.get(name)!r} (here: {value!r})' for name, value in machine.items()
                    if table.machine.get(name) != value]
        if differs:
            raise UsageError(f'latency table {path} was measured with {"; ".join(differs)}: a latency holds only on '
                             f'the machine, runtime and model it was measured with; search in another --output (or '
                             f'delete the table to measure it here)')
        print(f'latency    table read from {path} ({table.describe()})', flush=True)
        return table
    print(f'latency    measuring {len(space.all_blocks(geometry["num_heads"]))} block choices and the fixed part in '
          f'{backend} at batch {batch_size} on {threads} thread(s) ({machine["cpu"]})', flush=True)
    busy = busy_cpus()
    if busy >= 0.5:
        print(f'latency    warning: {busy:.1f} CPU(s) busy with other processes: what is measured now is slower than '
              f'this machine is when quiet, and every prediction from this table will be', flush=True)
    table = measure_table(space, geometry, depth, backend, batch_size, threads)
    table.machine['busy_cpus'] = round(busy, 2)  # a record of the conditions, not compared when the table is reused
    write_json(path, table.to_json())
    print(f'latency    fixed part {table.fixed_ms:.3f} ms, blocks {min(table.blocks.values()):.3f}-'
          f'{max(table.blocks.values()):.3f} ms each -> {path}', flush=True)
    return table


def measure_table(space: SearchSpace, geometry: dict, depth: int, backend: str, batch_size: int,
                  threads: int) -> LatencyTable:
    """Time the fixed part and, for every block choice of ``space``, the GLiT of `BLOCK_COPIES` copies of it (at most
    ``depth``; see the module docstring)."""
    copies = min(depth, BLOCK_COPIES)
    num_heads = geometry['num_heads']
    choices = space.all_blocks(num_heads)
    int8_method = _int8_method(space, geometry, batch_size) if backend == 'onnx-int8' else None
    fixed = GLiT(arch=(choices[0],), search_space=None, **geometry).eval()
    fixed.blocks = nn.Sequential()  # the stem and the head: what every architecture has
    parts = [('fixed', fixed)]
    parts += [(f'block{i}', GLiT(arch=(block,) * copies, search_space=None, **geometry).eval())
              for i, block in enumerate(choices)]
    ms = _time_parts(parts, backend, batch_size, int8_method, threads)
    return LatencyTable(backend=backend, batch_size=batch_size, geometry=geometry, depth=depth,
                        machine=this_machine(backend, threads), int8_method=int8_method, fixed_ms=ms['fixed'],
                        # A block can time below nothing by noise where it costs little; no block is free.
                        blocks={block: max((ms[f'block{i}'] - ms['fixed']) / copies, 0.)
                                for i, block in enumerate(choices)})


def measure_architectures(archs: Sequence[Sequence[BlockArch]], table: LatencyTable) -> list[float]:
    """Milliseconds of one call of the whole GLiT of each of ``archs``, built with random weights and timed as the
    table's parts were (same runtime, batch size and quantization), in interleaved rounds."""
    parts = [(f'arch{i}', GLiT(arch=tuple(arch), search_space=None, **table.geometry).eval())
             for i, arch in enumerate(archs)]
    ms = _time_parts(parts, table.backend, table.batch_size, table.int8_method, table.machine['threads'])
    return [ms[f'arch{i}'] for i in range(len(archs))]


def prediction_errors(predicted: Sequence[float], measured: Sequence[float]) -> dict:
    """Median and worst relative error (percent) of ``predicted`` against ``measured``, signed worst included."""
    errors = [100. * (p - m) / m for p, m in zip(predicted, measured)]
    worst = max(errors, key=abs)
    return dict(count=len(errors), median_abs_percent=statistics.median(abs(e) for e in errors),
                worst_percent=worst)


def _int8_method(space: SearchSpace, geometry: dict, batch_size: int) -> str:
    """The quantization ONNX Runtime runs fastest here for the default architecture, used for every part: timing
    each part by its own fastest method would predict a model that no single quantized file is."""
    default = (space.default_block(geometry['num_heads'] // 3 or 1, geometry['num_heads']),) * 2
    model = GLiT(arch=default, search_space=None, **geometry).eval()
    image = (model.in_chans, *model.img_size)
    with tempfile.TemporaryDirectory(prefix='leanvit-latency-') as folder:
        onnx_file = export_onnx(BenchModel('default', model, image, 0), Path(folder))
        method, why = quantize_onnx(onnx_file, Path(folder) / 'int8.onnx', _calibration(image, batch_size))
    print(f'latency    onnx-int8: {method} quantization for every part ({why})', flush=True)
    return method


def _calibration(input_size: tuple[int, ...], batch_size: int) -> list:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch_size, *input_size, generator=generator).numpy() for _ in range(CALIBRATION_BATCHES)]


def _time_parts(parts: list[tuple[str, GLiT]], backend: str, batch_size: int, int8_method: str | None,
                threads: int) -> dict[str, float]:
    """Median milliseconds per call of each (label, model) in ``backend`` on ``threads`` threads, all built first
    and then timed in interleaved rounds (`leanvit.deploy.bench`)."""
    parts = [BenchModel(label, model, (model.in_chans, *model.img_size), 0) for label, model in parts]
    # The threads the table holds for, whatever a training run in this process chose since (sessions take torch's).
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix='leanvit-latency-') as folder, _restore_threads(before):
        runners = [_runner(part, backend, Path(folder), batch_size, int8_method)
                   for part in progress(parts, f'building ({backend})')]
        generator = torch.Generator().manual_seed(0)
        inputs = {part.label: {batch_size: torch.randn(batch_size, *part.input_size, generator=generator)}
                  for part in parts}
        runners = warm_up(runners, inputs, [batch_size])
        calls = time_rounds(runners, inputs, [batch_size], ROUNDS, ITERS)
    # Each round's median call, then the fastest round: other tenants and frequency changes only ever add time, and
    # on a shared CPU they come and go within seconds; the fastest round is what the machine does, reproducibly.
    return {runner.model.label: 1e3 * min(statistics.median(r) for r in calls[(i, batch_size)])
            for i, runner in enumerate(runners)}


@contextlib.contextmanager
def _restore_threads(threads: int):
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _runner(part: BenchModel, backend: str, folder: Path, batch_size: int, int8_method: str | None) -> Runner:
    if backend == 'eager':
        return Runner(part, backend, eager(part.model), 0)
    onnx_file = export_onnx(part, folder)
    if backend == 'onnx-int8':
        int8_file = folder / f'{part.file_stem}.int8.onnx'
        quantize_onnx(onnx_file, int8_file, _calibration(part.input_size, batch_size), method=int8_method)
        onnx_file = int8_file
    session = onnxruntime_session(onnx_file)
    # The session holds the graph: the files go now, so that a table's dozens of them never fill the disk together,
    # and a kill leaves one behind at most.
    for path in folder.glob(f'{part.file_stem}.*'):
        path.unlink()
    return Runner(part, backend, session, 0)
