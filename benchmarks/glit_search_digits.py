"""GLiT's search under a latency budget on this machine, on the bundled digits (8 x 8 images upscaled to 32 x 32).

One supernet (GLiT's space at width 48, 3 heads, 6 blocks, patch 4) is trained single-path on the training split
minus a held-out fifth; the hierarchical search then scores candidates on the held-out images under a latency budget:
what the GLiT-Tiny-shaped architecture (`glit_tiny_shaped`) is predicted to take in ONNX Runtime at batch 1 here. The
searched architecture, the random architectures of the same budget the search times beside it and the GLiT-Tiny-shaped
one are retrained from scratch with one recipe for each seed and scored on the validation split, which the search
never sees. The latency tables of the three runtimes are then checked against whole models timed here.

    python benchmarks/glit_search_digits.py [--seeds 0 1 2] [--epochs 10] [--output runs/glit_ranking/search]

The default --output is where benchmarks/glit_ranking_digits.py trains the same supernet (not trained again).
"""

import argparse
import json
import statistics
from pathlib import Path

from leanvit.methods.glit.evolution import Budget, EvolutionSettings
from leanvit.methods.glit.latency import load_or_measure, measure_architectures, prediction_errors
from leanvit.methods.glit.search import glit_tiny_shaped, search
from leanvit.models.glit import BlockArch, SearchSpace
from leanvit.threads import usable_cpus
from leanvit.train import TrainConfig, train

WIDTH = dict(patch_size=4, embed_dim=48, num_heads=3)
DEPTH = 6
GEOMETRY = dict(WIDTH, img_size=32, num_classes=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=10, help='epochs of each retraining')
    parser.add_argument('--supernet-epochs', type=int, default=30)
    parser.add_argument('--population', type=int, default=16)
    parser.add_argument('--generations', type=int, default=6)
    parser.add_argument('--output', default='runs/glit_ranking/search')
    args = parser.parse_args()
    output = Path(args.output)
    threads = usable_cpus()

    shaped = glit_tiny_shaped(DEPTH)
    tables = {backend: load_or_measure(output / 'latency' / f'{backend}-batch1.json', SearchSpace(), GEOMETRY, DEPTH,
                                       backend, 1, threads) for backend in ('onnx', 'onnx-int8', 'eager')}
    budget = Budget(latency_ms=tables['onnx'].predict(shaped))
    config = TrainConfig(data='digits', img_size=32, output=str(output), epochs=args.supernet_epochs, batch_size=64,
                         lr=2e-3, progress=False, model_kwargs=dict(WIDTH, depth=DEPTH))
    settings = EvolutionSettings(population=args.population, parents=max(args.population // 4, 2),
                                 generations=args.generations)
    summary = search(config, budget=budget, settings=settings, calib_batches=10, backend='onnx', random_baselines=5)
    measured = summary['latency']['measured']

    # Every runtime's prediction against whole models timed in it, on the architectures the search timed.
    archs = [tuple(BlockArch(**b) for b in r['arch']) for r in measured]
    errors = {}
    for backend, table in tables.items():
        timed = measure_architectures(archs, table)
        errors[backend] = prediction_errors([table.predict(a) for a in archs], timed)

    chosen = {'searched': measured[0]}
    chosen |= {f'random {i}': r for i, r in enumerate(r for r in measured if r['role'] == 'random')}
    chosen['GLiT-Tiny-shaped'] = next(r for r in measured if r['role'] == 'glit-tiny-shaped')
    results = {}
    for name, record in chosen.items():
        top1 = []
        for seed in args.seeds:
            folder = output.parent / 'retrain' / name.replace(' ', '_') / f'seed{seed}'
            final = train(TrainConfig(model='glit_custom', img_size=32, output=str(folder), epochs=args.epochs,
                                      batch_size=64, lr=2e-3, seed=seed, progress=False,
                                      model_kwargs=dict(WIDTH, arch=record['arch'])))
            top1.append(final['val_top1'])
        results[name] = dict(record, top1=top1)
        print(f'{name}: {top1}', flush=True)

    machine = tables['onnx'].machine
    lines = [f'GLiT search on the digits under a latency budget of {budget.latency_ms:.3f} ms per image (ONNX Runtime, '
             f'batch 1, {machine["threads"]} threads, {machine["cpu"]}; the GLiT-Tiny-shaped architecture\'s predicted '
             f'latency); supernet {args.supernet_epochs} epochs, {summary["candidates"]} candidates scored; each '
             f'architecture retrained {args.epochs} epochs for seeds {", ".join(map(str, args.seeds))}.', '',
             '| architecture | val top-1 (mean ± sd) | per seed | supernet held-out top-1 | predicted ms | measured ms '
             '| params |', '|---|---|---|---|---|---|---|']
    for name, r in results.items():
        spread = statistics.stdev(r['top1']) if len(r['top1']) > 1 else 0.
        lines.append(f'| {name} | {statistics.mean(r["top1"]):.1f} ± {spread:.1f} | '
                     f'{" / ".join(f"{t:.1f}" for t in r["top1"])} | {r["held_out_top1"]:.1f} | '
                     f'{r["predicted_ms"]:.3f} | {r["measured_ms"]:.3f} | {r["params"]:,} |')
    random_means = [statistics.mean(results[n]['top1']) for n in results if n.startswith('random')]
    lines += ['', f'Random architectures: mean {statistics.mean(random_means):.1f}, best {max(random_means):.1f}.', '',
              f'Latency prediction over the {len(archs)} architectures the search timed (same machine):', '',
              '| runtime | median error | worst error |', '|---|---|---|']
    lines += [f'| {backend} | {e["median_abs_percent"]:.1f} % | {e["worst_percent"]:+.1f} % |'
              for backend, e in errors.items()]
    table = '\n'.join(lines)
    print('\n' + table)
    (output.parent / 'search_results.md').write_text(table + '\n')
    (output.parent / 'search_results.json').write_text(json.dumps(dict(results=results, errors=errors,
                                                                       budget_ms=budget.latency_ms), indent=2) + '\n')


if __name__ == '__main__':
    main()
