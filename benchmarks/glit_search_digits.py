"""GLiT's search on the bundled digits (8 x 8 images upscaled to 32 x 32), small enough for a CPU.

One supernet (GLiT's space at width 48, 3 heads, 6 blocks, patch 4) is trained single-path on the training split
minus a held-out fifth; then a hierarchical and a flat search score the same number of candidates on the held-out
images under the MAC budget of the DeiT-shaped baseline (every block all-global, qkv ratio 1, MLP ratio 4). The two
searched architectures, random architectures of the same budget and the baseline are retrained from scratch with
one recipe for each seed and scored on the validation split, which the search never sees. The supernet's ranking
quality is Kendall's tau between its held-out scores and the retrained accuracy of those architectures.

    python benchmarks/glit_search_digits.py [--seeds 0 1 2] [--random 5] [--epochs 15] [--output runs/glit_search]
"""

import argparse
import json
import statistics
from pathlib import Path

import torch
from scipy.stats import kendalltau

import leanvit
from leanvit.methods.glit.evolution import Budget, EvolutionSettings
from leanvit.methods.glit.search import CostModel, SupernetScorer, random_architectures, search
from leanvit.models.glit import BlockArch
from leanvit.train import TrainConfig, train

WIDTH = dict(patch_size=4, embed_dim=48, num_heads=3)
DEPTH = 6
BASELINE = (BlockArch(3, mlp_ratio=4., qkv_ratio=1.),) * DEPTH


def arch_json(arch) -> list[dict]:
    return [dict(b.__dict__) for b in arch]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--random', type=int, default=5, help='random architectures of the same budget')
    parser.add_argument('--epochs', type=int, default=15, help='epochs of each retraining')
    parser.add_argument('--supernet-epochs', type=int, default=30)
    parser.add_argument('--population', type=int, default=16)
    parser.add_argument('--generations', type=int, default=6)
    parser.add_argument('--output', default='runs/glit_search')
    args = parser.parse_args()
    output = Path(args.output)

    cost = CostModel(img_size=32, num_classes=10, **WIDTH)
    budget = Budget(macs=cost(BASELINE)[0])
    supernet_config = TrainConfig(img_size=32, output=str(output / 'search'), epochs=args.supernet_epochs,
                                  batch_size=64, lr=2e-3, progress=False, model_kwargs=dict(WIDTH, depth=DEPTH))
    settings = EvolutionSettings(population=args.population, parents=max(args.population // 4, 2),
                                 generations=args.generations)
    searched = {}
    for strategy in ('hierarchical', 'flat'):
        summary = search(supernet_config, strategy=strategy, budget=budget, settings=settings, calib_batches=5)
        searched[f'searched ({strategy})'] = tuple(BlockArch(**b) for b in summary['best']['arch'])

    archs = dict(searched)
    archs['DeiT-shaped baseline'] = BASELINE
    for i, arch in enumerate(random_architectures(leanvit.models.glit.SearchSpace(), DEPTH, 3, cost, budget,
                                                  args.random, seed=0)):
        archs[f'random {i}'] = arch

    # The supernet's held-out score of every retrained architecture (the ranking it would have given them).
    from leanvit.io.data import build_datasets
    from leanvit.train.evaluation import data_config
    supernet = leanvit.create_model('glit_supernet', num_classes=10, img_size=32, depth=DEPTH, **WIDTH)
    run = output / 'search' / 'supernet'
    leanvit.load_checkpoint(supernet, run / (json.loads((run / 'latest.json').read_text())['tag'] + '.safetensors'))
    data = build_datasets('digits', data_config(supernet, 32), augment='none', holdout=0.2)
    scorer = SupernetScorer(supernet, data.held_out, data.train, 5, 64, torch.device('cpu'))
    supernet_scores = {name: scorer(arch) for name, arch in archs.items()}

    results = {}
    for name, arch in archs.items():
        macs, params = cost(arch)
        top1 = []
        for seed in args.seeds:
            folder = output / 'retrain' / name.replace(' ', '_').replace('(', '').replace(')', '') / f'seed{seed}'
            final = train(TrainConfig(model='glit_custom', img_size=32, output=str(folder), epochs=args.epochs,
                                      batch_size=64, lr=2e-3, seed=seed, progress=False,
                                      model_kwargs=dict(WIDTH, arch=arch_json(arch))))
            top1.append(final['val_top1'])
        results[name] = dict(top1=top1, macs=macs, params=params, supernet_score=supernet_scores[name],
                             arch=arch_json(arch))
        print(f'{name}: {top1}', flush=True)

    names = list(results)
    glits = [n for n in names if n != 'DeiT-shaped baseline']

    def tau(among):
        return kendalltau([results[n]['supernet_score'] for n in among],
                          [statistics.mean(results[n]['top1']) for n in among])
    hier = [json.loads(line) for line in (output / 'search' / 'hierarchical' / 'candidates.jsonl').open()]
    flat = [json.loads(line) for line in (output / 'search' / 'flat' / 'candidates.jsonl').open()]
    lines = [f'GLiT search on the digits ({", ".join(map(str, args.seeds))} seeds, {args.epochs} epochs each, budget '
             f'{budget}; supernet {args.supernet_epochs} epochs; {len(hier)} hierarchical vs {len(flat)} flat '
             f'candidates scored).', '',
             '| architecture | val top-1 (mean ± sd) | per seed | supernet held-out top-1 | MMACs | params |',
             '|---|---|---|---|---|---|']
    for name in names:
        r = results[name]
        spread = statistics.stdev(r['top1']) if len(r['top1']) > 1 else 0.
        lines.append(f'| {name} | {statistics.mean(r["top1"]):.1f} ± {spread:.1f} | '
                     f'{" / ".join(f"{t:.1f}" for t in r["top1"])} | {r["supernet_score"]:.1f} | '
                     f'{r["macs"] / 1e6:.2f} | {r["params"]:,} |')
    random_means = [statistics.mean(results[n]['top1']) for n in names if n.startswith('random')]
    lines += ['', f'Random architectures: mean {statistics.mean(random_means):.1f}, best {max(random_means):.1f}.',
              f'Best held-out score found: hierarchical {max(c["score"] for c in hier):.1f}, '
              f'flat {max(c["score"] for c in flat):.1f}.',
              f'Supernet ranking quality: Kendall tau {tau(names).statistic:.2f} (p = {tau(names).pvalue:.2f}) between '
              f'supernet held-out top-1 and mean retrained val top-1 over the {len(names)} architectures, '
              f'{tau(glits).statistic:.2f} (p = {tau(glits).pvalue:.2f}) without the baseline.']
    table = '\n'.join(lines)
    print('\n' + table)
    (output / 'results.md').write_text(table + '\n')
    (output / 'results.json').write_text(json.dumps(results, indent=2) + '\n')


if __name__ == '__main__':
    main()
