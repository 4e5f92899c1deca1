"""Mixed-depth training of a very deep recursive SReT on the embedded digits, against plain training.

Both runs train the same 100-application model (shared blocks applied 20 times each, every application followed by
its NLL: 200 layers) with the same recipe and seed; the mixed-depth run samples each block's application count per
step (``mixed_depth=True``). Writes ``mixed_depth.png`` (validation top-1 and training loss per epoch) and prints
both curves.

    python benchmarks/mixed_depth.py [--epochs 6] [--lr 1e-3] [--output runs/mixed_depth]
"""

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from leanvit.train import TrainConfig, train  # noqa: E402

DEEP = dict(head_dim=(16, 16, 16), num_heads=(1, 2, 4), num_blocks=(2, 2, 1), recursion=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--epochs', type=int, default=6)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--output', default='runs/mixed_depth')
    args = parser.parse_args()
    output = Path(args.output)
    curves = {}
    for name, mixed in (('plain', False), ('mixed depth', True)):
        config = TrainConfig(model='sret_t', model_kwargs=dict(DEEP, mixed_depth=mixed), img_size=32,
                             epochs=args.epochs, batch_size=64, lr=args.lr, warmup_epochs=1, progress=False,
                             output=str(output / name.replace(' ', '_')))
        train(config)
        with open(Path(config.output) / 'summary.csv') as f:
            curves[name] = list(csv.DictReader(f))
        print(name, [round(float(r['val_top1']), 1) for r in curves[name]], flush=True)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, rows in curves.items():
        epochs = [int(r['epoch']) for r in rows]
        axes[0].plot(epochs, [float(r['val_top1']) for r in rows], marker='o', label=name)
        axes[1].plot(epochs, [float(r['train_loss']) for r in rows], marker='o', label=name)
    axes[0].set_ylabel('val top-1 (%)')
    axes[1].set_ylabel('train loss')
    for ax in axes:
        ax.set_xlabel('epoch')
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle('SReT, 100 shared-block applications (200 layers), digits 32 px')
    fig.tight_layout()
    fig.savefig(output / 'mixed_depth.png', dpi=120)
    print(f'wrote {output / "mixed_depth.png"}')


if __name__ == '__main__':
    main()
