"""GLiT's claims on Fashion-MNIST, over seeds: the searched architecture against random ones and the all-attention
baseline at the same budget, the hierarchical search against the flat one at the same number of evaluations, and
how well the supernet ranks architectures (Chen et al., "GLiT: Neural Architecture Search for Global and Local Image
Transformer", ICCV 2021; docs/glit.md).

One supernet of GLiT's space (width 48, 3 heads, 6 blocks, 4 x 4 patches, 32 x 32 inputs) is trained single-path on
a stratified 3,000 training images, with 1,500 other training images held out for scoring. The budget is the MACs of
the all-attention baseline (every head global, MLP ratio 4: a DeiT at this size). Both searches score the same number
of candidates on the held-out images (`leanvit search`, population 16, 6 generations). Then, with one recipe (the
supernet's: 3,000 images, 4 epochs of AdamW, lr 2e-3, batch 64) and for each seed, the hierarchical winner, the flat
winner, 5 random architectures within the budget and the all-attention baseline are retrained from scratch and scored
on the 10,000 test images, which the search never sees. The rank check retrains 8 further random architectures and
correlates their held-out top-1 with the supernet's scores (Kendall's tau), as `leanvit search --rank-check 8` does.

About 30 minutes on 2 cores; a killed script resumes, skipping finished runs and the finished search stages.

    python -m leanvit.io.fashion_mnist          # once: the data
    python benchmarks/claims/glit.py [--seeds 0 1 2] [--output runs/claims/glit]
"""

import dataclasses
import statistics
from pathlib import Path

from leanvit.methods.glit.evolution import Budget, EvolutionSettings
from leanvit.methods.glit.search import CostModel, random_architectures, search
from leanvit.models.glit import BlockArch, SearchSpace
from leanvit.threads import usable_cpus
from leanvit.train import TrainConfig
from leanvit.train.comparison import arms_table, claim_parser, publish, train_once

IMG, TRAIN_IMAGES, EPOCHS, SUPERNET_EPOCHS, DEPTH = 32, 3_000, 4, 10, 6
WIDTH = dict(patch_size=4, embed_dim=48, num_heads=3)
# 1,500 of the 60,000 training images, held out before the 3,000 are drawn from the rest.
HOLDOUT = 0.025
RECIPE = dict(img_size=IMG, train_images=TRAIN_IMAGES, batch_size=64, lr=2e-3, warmup_epochs=1, holdout=HOLDOUT)
ALL_ATTENTION = tuple(BlockArch(global_heads=WIDTH['num_heads'], mlp_ratio=4., qkv_ratio=1.) for _ in range(DEPTH))
RANDOM, RANK_CHECK = 5, 8


def main() -> None:
    parser = claim_parser(__doc__, 'glit', EPOCHS, TRAIN_IMAGES)
    parser.add_argument('--supernet-epochs', type=int, default=SUPERNET_EPOCHS)
    args = parser.parse_args()
    root = Path(args.output)
    recipe = dict(RECIPE, data=args.data, train_images=args.train_images)

    cost = CostModel(img_size=IMG, num_classes=10, **WIDTH)
    budget = Budget(macs=cost(ALL_ATTENTION)[0])
    config = TrainConfig(**recipe, epochs=args.supernet_epochs, output=str(root / 'search'), progress=False,
                         model_kwargs=dict(WIDTH, depth=DEPTH), threads=usable_cpus())
    settings = EvolutionSettings(population=16, parents=4, generations=6)
    found = {strategy: search(config, budget=budget, strategy=strategy, settings=settings, calib_batches=10,
                              rank_check=RANK_CHECK if strategy == 'hierarchical' else 0,
                              rank_check_epochs=args.epochs)
             for strategy in ('hierarchical', 'flat')}
    rank = found['hierarchical']['rank_check']

    randoms = random_architectures(SearchSpace(), DEPTH, WIDTH['num_heads'], cost, budget, RANDOM, seed='claims')
    arms = {'searched, hierarchical': found['hierarchical']['best']['arch'],
            'searched, flat': found['flat']['best']['arch'],
            **{f'random {i}': [dataclasses.asdict(b) for b in arch] for i, arch in enumerate(randoms)},
            'all-attention (DeiT-like)': [dataclasses.asdict(b) for b in ALL_ATTENTION]}
    results = {name: [] for name in arms}
    for seed in args.seeds:
        for name, arch in arms.items():
            folder = root / 'retrain' / name.replace(',', '').replace(' ', '_').replace('(', '').replace(')', '')
            results[name].append(train_once(folder / f'seed{seed}', **recipe, epochs=args.epochs, seed=seed,
                                            model='glit_custom', model_kwargs=dict(WIDTH, arch=arch)))
            print(f'seed {seed}, {name}: {results[name][-1]["val_top1"]:.2f} %', flush=True)

    macs = {name: cost(tuple(BlockArch(**b) for b in arch))[0] for name, arch in arms.items()}
    random_names = [name for name in arms if name.startswith('random')]
    random_mean = [statistics.fmean(results[n][i]['val_top1'] for n in random_names) for i in range(len(args.seeds))]
    results['random, mean of 5'] = [dict(val_top1=v) for v in random_mean]
    extra = {name: {'MMACs': f'{m / 1e6:.2f}', 'kinds of blocks': _kinds(arms[name])} for name, m in macs.items()}
    pairs = [('searched, hierarchical', 'random, mean of 5'), ('searched, hierarchical', 'all-attention (DeiT-like)'),
             ('searched, hierarchical', 'searched, flat')]
    # Does the supernet's score order the retrained architectures? Over the arms above (mean over seeds), beside
    # the rank check's own retrained architectures (scored on the held-out images).
    scores = {'searched, hierarchical': found['hierarchical']['best']['score'],
              'searched, flat': found['flat']['best']['score']}
    lines = [
        '## GLiT',
        '',
        f'Fashion-MNIST, {IMG} x {IMG} px; supernet of GLiT\'s space at width {WIDTH["embed_dim"]}, '
        f'{WIDTH["num_heads"]} heads, {DEPTH} blocks, trained {args.supernet_epochs} epochs on a stratified '
        f'{args.train_images:,} training images, {found["hierarchical"]["candidates"]} candidates scored per search on '
        f'1,500 held-out training images; budget {budget} (the all-attention baseline\'s). Every architecture '
        f'retrained {args.epochs} epochs on the same {args.train_images:,} images for seeds '
        f'{", ".join(map(str, args.seeds))}, scored on the 10,000 test images. Generated by '
        f'`python benchmarks/claims/glit.py`.',
        '',
        arms_table(results, args.seeds, pairs, extra=extra),
        '',
        f'Supernet ranking (`leanvit search --rank-check {RANK_CHECK}`): {RANK_CHECK} random architectures within the '
        f'budget retrained {args.epochs} epochs, held-out top-1 against the supernet\'s score: Kendall\'s tau '
        f'{rank["kendall_tau"]:.2f} (p = {rank["kendall_p"]:.3f}), Spearman\'s rho {rank["spearman_rho"]:.2f} '
        f'(p = {rank["spearman_p"]:.3f}). Supernet held-out top-1 of the searched winners: '
        + ', '.join(f'{k} {v:.1f} %' for k, v in scores.items()) + '.',
    ]
    publish(args.page, 'glit', f'GLiT on Fashion-MNIST, {IMG} px', lines, results)


def _kinds(arch: list[dict]) -> str:
    """Blocks by kind, e.g. '2 global, 3 mixed, 1 local'."""
    heads = WIDTH['num_heads']
    kinds = ['global' if b['global_heads'] == heads else 'local' if b['global_heads'] == 0 else 'mixed' for b in arch]
    return ', '.join(f'{kinds.count(k)} {k}' for k in ('global', 'mixed', 'local') if k in kinds)


if __name__ == '__main__':
    main()
