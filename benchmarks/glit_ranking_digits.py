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

    python benchmarks/glit_ranking_digits.py [--archs 10] [--epochs 8] [--output runs/glit_ranking]
"""

import argparse
import json
import random
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


def supernet_run(output: Path, name: str, epochs: int, sandwich: int) -> Path:
    options = {'seed': 0} | ({'sandwich': sandwich} if sandwich else {})
    folder = output / name
    train(TrainConfig(model='glit_supernet', model_kwargs=dict(WIDTH, depth=DEPTH), epochs=epochs, output=str(folder),
                      objectives={'path_sampling': options}, **RECIPE))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--archs', type=int, default=10, help='architectures retrained alone')
    parser.add_argument('--epochs', type=int, default=8, help='epochs of each retraining')
    parser.add_argument('--sandwich', type=int, default=1, help='random paths per sandwich step')
    parser.add_argument('--output', default='runs/glit_ranking')
    args = parser.parse_args()
    output = Path(args.output)

    variants = {'SPOS, 30 epochs': supernet_run(output, 'search/supernet', 30, 0),
                f'sandwich ({args.sandwich} random) + in-place distillation, 30 epochs':
                    supernet_run(output, 'sandwich30', 30, args.sandwich),
                'SPOS, 60 epochs': supernet_run(output, 'spos60', 60, 0)}
    rng = random.Random('rank-check:0')
    archs = [sample_architecture(SearchSpace(), DEPTH, WIDTH['num_heads'], rng) for _ in range(args.archs)]

    def scorer(run: Path, calib: int) -> SupernetScorer:
        supernet = leanvit.create_model('glit_supernet', num_classes=10, img_size=32, depth=DEPTH, **WIDTH)
        leanvit.load_checkpoint(supernet, run / f'{CheckpointManager.latest_in(run)}.safetensors')
        data = build_datasets('digits', data_config(supernet, 32), augment='none', holdout=0.2, seed=0)
        return SupernetScorer(supernet, data.held_out, data.train, calib, 64, torch.device('cpu')), data

    first, data = scorer(variants['SPOS, 30 epochs'], 10)
    check = rank_check(TrainConfig(epochs=args.epochs, **RECIPE), archs, first, data.held_out, output / 'rank_check',
                       dict(WIDTH, num_classes=10, img_size=32), torch.device('cpu'))
    truth = [row['retrained_top1'] for row in check['rows']]
    lines = [f'Supernet ranking on the digits: {args.archs} architectures drawn uniformly, retrained alone for '
             f'{args.epochs} epochs (retrained held-out top-1 {min(truth):.1f}-{max(truth):.1f} %).', '',
             '| supernet | BN recalibration batches | Kendall tau (p) | Spearman rho (p) |', '|---|---|---|---|']
    results = []
    for name, run in variants.items():
        for calib in CALIBRATION:
            score, _ = scorer(run, calib)
            proxy = [score(arch) for arch in archs]
            corr = rank_correlation(proxy, truth)
            results.append(dict(supernet=name, calib_batches=calib, proxy=proxy, **corr))
            lines.append(f'| {name} | {calib} | {corr["kendall_tau"]:.2f} ({corr["kendall_p"]:.2f}) | '
                         f'{corr["spearman_rho"]:.2f} ({corr["spearman_p"]:.2f}) |')
            print(lines[-1], flush=True)
    table = '\n'.join(lines)
    print('\n' + table)
    (output / 'ranking.md').write_text(table + '\n')
    (output / 'ranking.json').write_text(json.dumps(dict(truth=truth, results=results), indent=2) + '\n')


if __name__ == '__main__':
    main()
