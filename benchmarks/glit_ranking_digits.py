"""Does GLiT's supernet rank architectures as training them alone does? Measured on the bundled digits.

Architectures drawn as the supernet draws its paths (uniformly) are retrained alone with one recipe and scored on the
held-out images the supernet scores candidates on (`leanvit.methods.glit.ranking.rank_check`). Each supernet variant
then scores the same architectures, with each BatchNorm recalibration size, and the table gives Kendall's tau and
Spearman's rho between its scores and the retrained top-1:

- SPOS: one uniformly drawn path per step (``path_sampling``), the search's default, for 30 and for 60 epochs;
- the sandwich rule with in-place distillation (BigNAS): the largest path on the labels, the smallest and random paths
  distilled from it, each step (``path_sampling: {sandwich: N}``).

The SPOS supernet of 30 epochs is trained in ``OUTPUT/search/supernet`` exactly as ``leanvit search`` trains it, so
`glit_search_digits.py --output OUTPUT/search` searches it without training it again.

    python benchmarks/glit_ranking_digits.py [--archs 30] [--epochs 8] [--supernet-seeds 0 1 2]
                                             [--output runs/glit_ranking]
"""

import argparse
import json
import random
import statistics
from pathlib import Path

import torch

import leanvit
from leanvit.io.data import build_datasets
from leanvit.methods.glit.ranking import rank_check, rank_correlation
from leanvit.methods.glit.search import SupernetScorer
from leanvit.methods.glit.supernet import sample_architecture
from leanvit.models.glit import SearchSpace
from leanvit.train import TrainConfig, train
from leanvit.train.evaluation import data_config
from leanvit.train.run_directory import CheckpointManager

WIDTH = dict(patch_size=4, embed_dim=48, num_heads=3)
DEPTH = 6
RECIPE = dict(data='digits', img_size=32, batch_size=64, lr=2e-3, progress=False, holdout=0.2, seed=0)
CALIBRATION = (0, 5, 20)


def supernet_run(output: Path, name: str, epochs: int, sandwich: int, seed: int) -> Path:
    """The supernet variant's run for ``seed`` (its weights, data order and path draws; the data split stays
    seed 0's, the split the retrained architectures are scored on)."""
    options = {'seed': seed} | ({'sandwich': sandwich} if sandwich else {})
    folder = output / (name if seed == 0 else f'{name}_seed{seed}')
    recipe = dict(RECIPE, seed=seed)
    train(TrainConfig(model='glit_supernet', model_kwargs=dict(WIDTH, depth=DEPTH), epochs=epochs, output=str(folder),
                      objectives={'path_sampling': options}, **recipe))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--archs', type=int, default=30, help='architectures retrained alone')
    parser.add_argument('--epochs', type=int, default=8, help='epochs of each retraining')
    parser.add_argument('--sandwich', type=int, default=1, help='random paths per sandwich step')
    parser.add_argument('--supernet-seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--output', default='runs/glit_ranking')
    args = parser.parse_args()
    output = Path(args.output)

    variants = {'SPOS, 30 epochs': ('search/supernet', 30, 0),
                f'sandwich ({args.sandwich} random) + in-place distillation, 30 epochs': ('sandwich30', 30,
                                                                                         args.sandwich),
                'SPOS, 60 epochs': ('spos60', 60, 0)}
    runs = {(name, seed): supernet_run(output, *variant, seed) for name, variant in variants.items()
            for seed in args.supernet_seeds}
    rng = random.Random('rank-check:0')
    archs = [sample_architecture(SearchSpace(), DEPTH, WIDTH['num_heads'], rng) for _ in range(args.archs)]

    def scorer(run: Path, calib: int) -> SupernetScorer:
        supernet = leanvit.create_model('glit_supernet', num_classes=10, img_size=32, depth=DEPTH, **WIDTH)
        leanvit.load_checkpoint(supernet, run / f'{CheckpointManager.latest_in(run)}.safetensors')
        data = build_datasets('digits', data_config(supernet, 32), augment='none', holdout=0.2, seed=0)
        return SupernetScorer(supernet, data.held_out, data.train, calib, 64, torch.device('cpu')), data

    first, data = scorer(runs[('SPOS, 30 epochs', args.supernet_seeds[0])], 10)
    check = rank_check(TrainConfig(epochs=args.epochs, **RECIPE), archs, first, data.held_out, output / 'rank_check',
                       dict(WIDTH, num_classes=10, img_size=32), torch.device('cpu'))
    truth = [row['retrained_top1'] for row in check['rows']]
    lines = [f'Supernet ranking on the digits: {args.archs} architectures drawn uniformly, retrained alone for '
             f'{args.epochs} epochs (retrained held-out top-1 {min(truth):.1f}-{max(truth):.1f} %).', '',
             f'Each supernet is trained for seeds {", ".join(map(str, args.supernet_seeds))}: Kendall tau and '
             f'Spearman rho as mean ± sd over them, then per seed with its p-value.', '',
             '| supernet | BN recalibration batches | Kendall tau | per seed (p) | Spearman rho | per seed (p) |',
             '|---|---|---|---|---|---|']
    results = []
    for name in variants:
        for calib in CALIBRATION:
            per_seed = []
            for seed in args.supernet_seeds:
                score, _ = scorer(runs[(name, seed)], calib)
                proxy = [score(arch) for arch in archs]
                per_seed.append(rank_correlation(proxy, truth))
                results.append(dict(supernet=name, seed=seed, calib_batches=calib, proxy=proxy, **per_seed[-1]))
            cells = []
            for key in ('kendall_tau', 'spearman_rho'):
                values = [c[key] for c in per_seed]
                spread = statistics.stdev(values) if len(values) > 1 else 0.
                p = key.split('_')[0] + '_p'
                cells += [f'{statistics.mean(values):.2f} ± {spread:.2f}',
                          ' / '.join(f'{c[key]:.2f} ({c[p]:.2f})' for c in per_seed)]
            lines.append(f'| {name} | {calib} | {" | ".join(cells)} |')
            print(lines[-1], flush=True)
    table = '\n'.join(lines)
    print('\n' + table)
    (output / 'ranking.md').write_text(table + '\n')
    (output / 'ranking.json').write_text(json.dumps(dict(truth=truth, results=results), indent=2) + '\n')


if __name__ == '__main__':
    main()
