"""How well GLiT's latency tables predict whole models on this machine, in each runtime the search offers.

For the space of benchmarks/glit_search_digits.py (width 48, 3 heads, 6 blocks, patch 4, 32 x 32 images, batch 1), each
runtime's table is measured afresh, then whole models of the same architectures are built and timed in it: the ones
the digits search timed (its best, Pareto front, random and GLiT-Tiny-shaped baselines, if its results are found) and
architectures drawn uniformly from the space. Run it on a quiet machine: a table or a model timed while other
processes compete for the CPU is slower by however much they take.

    python benchmarks/glit_latency_digits.py [--random 10] [--output runs/glit_latency]
"""

import argparse
import json
import random
from pathlib import Path

from leanvit.methods.glit.latency import BACKENDS, load_or_measure, measure_architectures, prediction_errors
from leanvit.methods.glit.supernet import sample_architecture
from leanvit.models.glit import BlockArch, SearchSpace
from leanvit.threads import usable_cpus

GEOMETRY = dict(patch_size=4, embed_dim=48, num_heads=3, img_size=32, num_classes=10)
DEPTH = 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--random', type=int, default=10, help='architectures drawn uniformly from the space')
    parser.add_argument('--searched', default='runs/glit_ranking/search_results.json',
                        help='results of benchmarks/glit_search_digits.py, whose architectures are timed too')
    parser.add_argument('--output', default='runs/glit_latency')
    args = parser.parse_args()
    output = Path(args.output)
    archs = []
    if Path(args.searched).exists():
        results = json.loads(Path(args.searched).read_text())['results']
        archs += [tuple(BlockArch(**b) for b in r['arch']) for r in results.values()]
    rng = random.Random('latency:0')
    archs += [sample_architecture(SearchSpace(), DEPTH, GEOMETRY['num_heads'], rng) for _ in range(args.random)]

    lines = [f'Latency prediction of {len(archs)} GLiT architectures (6 blocks, width 48, 32 x 32, batch 1).', '',
             '| runtime | median error | worst error | measured ms (fewest-most) | CPU, threads |',
             '|---|---|---|---|---|']
    records = {}
    for backend in BACKENDS:
        table = load_or_measure(output / f'{backend}-batch1.json', SearchSpace(), GEOMETRY, DEPTH, backend, 1,
                                usable_cpus())
        measured = measure_architectures(archs, table)
        predicted = [table.predict(arch) for arch in archs]
        errors = prediction_errors(predicted, measured)
        records[backend] = dict(errors, predicted=predicted, measured=measured, machine=table.machine)
        lines.append(f'| {backend} | {errors["median_abs_percent"]:.1f} % | {errors["worst_percent"]:+.1f} % | '
                     f'{min(measured):.3f}-{max(measured):.3f} | {table.machine["cpu"]}, {table.machine["threads"]} |')
        print(lines[-1], flush=True)
    table_text = '\n'.join(lines)
    print('\n' + table_text)
    (output / 'latency.md').write_text(table_text + '\n')
    (output / 'latency.json').write_text(json.dumps(records, indent=2) + '\n')


if __name__ == '__main__':
    main()
