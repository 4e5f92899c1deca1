"""RIFormer's ablation ladder (docs/riformer.md, "Training") at small scale on the bundled digits, over several seeds.

Per seed: train the PoolFormer teacher (recipes/digits_poolformer_teacher.yaml), then the token-mixer-free student
(recipes/digits_riformer.yaml) four times, adding one part of the method each time:
  1. supervised: labels only (with the teacher recipe's label smoothing), no teacher;
  2. + soft KD: soft labels from the teacher, no ground truth;
  3. + module imitation: block-output, mixer-output and relation terms;
  4. + teacher weights: the student starts from the teacher's non-mixer weights (the full recipe).
Every student is evaluated after re-parameterization (no token mixer); the deploy model's accuracy is checked to
equal the training form's. Prints mean +- std of the final val top-1 and writes a markdown table.

    python benchmarks/riformer_ladder.py [--seeds 0 1 2] [--markdown benchmarks/riformer_ladder.md]
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import leanvit
from leanvit.io.data import build_datasets
from leanvit.train import TrainConfig, train
from leanvit.train.evaluation import data_config, evaluate_model

RECIPES = Path(__file__).parent.parent / 'recipes'
RUNGS = {
    'supervised': dict(teacher=None, teacher_checkpoint=None, teacher_kwargs={}, kd_alpha=0., smoothing=0.1,
                       objectives={}, init_from_teacher=False),
    '+ soft KD': dict(objectives={}, init_from_teacher=False),
    '+ module imitation': dict(init_from_teacher=False),
    '+ teacher weights': {},
}


def deploy_top1(run: Path, config: TrainConfig) -> tuple[float, float]:
    """Val top-1 of the run's final weights in training form and after reparameterize()."""
    tag = json.loads((run / 'latest.json').read_text())['tag']
    model = leanvit.create_model(config.model, num_classes=10, **config.model_kwargs)
    leanvit.load_checkpoint(model, run / f'{tag}.safetensors')
    data = build_datasets(None, data_config(model, config.img_size), augment='none', seed=config.seed)
    loader = DataLoader(data.val, 128)
    device = torch.device('cpu')
    trained = evaluate_model(model, loader, device).metrics()['top1']
    deployed = evaluate_model(model.reparameterize(), loader, device).metrics()['top1']
    return trained, deployed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, help="override the recipes' epochs (for a quick look)")
    parser.add_argument('--markdown', help='write the results table to this file')
    args = parser.parse_args()
    epochs = {'epochs': args.epochs} if args.epochs else {}
    results = {'PoolFormer teacher': [], **{name: [] for name in RUNGS}}
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            teacher_run = Path(scratch) / f'teacher-{seed}'
            teacher_config = TrainConfig.from_yaml(str(RECIPES / 'digits_poolformer_teacher.yaml'), seed=seed,
                                                   output=str(teacher_run), progress=False, **epochs)
            results['PoolFormer teacher'].append(train(teacher_config)['val_top1'])
            for name, overrides in RUNGS.items():
                run = Path(scratch) / f'{name}-{seed}'
                config = TrainConfig.from_yaml(
                    str(RECIPES / 'digits_riformer.yaml'), seed=seed, output=str(run), progress=False,
                    **{'teacher_checkpoint': str(teacher_run / 'best.safetensors'), **epochs, **overrides})
                final = train(config)['val_top1']
                trained, deployed = deploy_top1(run, config)
                if abs(trained - final) > 1e-9 or abs(deployed - trained) > 100 / 360 / 2:
                    raise AssertionError(f'{name}, seed {seed}: the deploy model scores {deployed:.2f}% against '
                                         f'{trained:.2f}% in training form ({final:.2f}% in the run)')
                results[name].append(deployed)
            print(f'seed {seed}: ' + ', '.join(f'{k} {v[-1]:.2f}%' for k, v in results.items()), flush=True)
    setting = f'digits, 64 px, {args.epochs or teacher_config.epochs} epochs, seeds {", ".join(map(str, args.seeds))}'
    lines = [f'| model ({setting}) | val top-1 (%) | runs |',
             '|---|---|---|']
    for name, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.
        runs = ', '.join(f'{v:.2f}' for v in values)
        lines.append(f'| {name} | {statistics.mean(values):.2f} ± {spread:.2f} | {runs} |')
    table = '\n'.join(lines)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + '\n')


if __name__ == '__main__':
    main()
