"""Student accuracy on the embedded digits with and without knowledge distillation, over several seeds.

Trains the student recipe (recipes/digits_sret_t_kd.yaml) once per seed with its KD settings and once on labels
only, from the same teacher checkpoint, and prints mean and standard deviation of the best validation top-1.

    python benchmarks/kd_seeds.py --teacher-checkpoint runs/demo/teacher/best.safetensors [--seeds 0 1 2]
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from leanvit.train import TrainConfig, train

RECIPE = Path(__file__).parent.parent / 'recipes' / 'digits_sret_t_kd.yaml'


def best_top1(config: TrainConfig) -> float:
    with tempfile.TemporaryDirectory() as output:
        train(TrainConfig(**{**vars(config), 'output': output}))
        return json.loads((Path(output) / 'best.json').read_text())['metric']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--teacher-checkpoint', required=True)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    args = parser.parse_args()
    results = {'labels only': [], 'soft KD': []}
    for seed in args.seeds:
        kd = TrainConfig.from_yaml(str(RECIPE), seed=seed, progress=False, teacher_checkpoint=args.teacher_checkpoint)
        plain = TrainConfig.from_yaml(str(RECIPE), seed=seed, progress=False, teacher=None, teacher_checkpoint=None)
        results['soft KD'].append(best_top1(kd))
        results['labels only'].append(best_top1(plain))
        print(f'seed {seed}: labels only {results["labels only"][-1]:.2f}%, soft KD {results["soft KD"][-1]:.2f}%',
              flush=True)
    for name, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.
        print(f'{name}: {statistics.mean(values):.2f} +- {spread:.2f} % best val top-1 over seeds {args.seeds}')


if __name__ == '__main__':
    main()
