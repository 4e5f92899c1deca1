"""Training throughput of ``leanvit train`` against a bare PyTorch loop on the same model, data and batch.

The bare loop does forward, loss, backward and optimizer step, nothing else; the engine adds its schedule,
metrics, progress bar and checkpoints. Both read the same kind of DataLoader over the embedded digits and train two
epochs, of which the second (warm) is timed. Runs alternate (bare, engine, bare, engine, ...) and the ratio is the
median of per-pair ratios, so machine drift cancels.

    python benchmarks/engine_overhead.py [--model sret_t] [--img-size 32] [--batch-size 64] [--pairs 5]
"""

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader

import leanvit
from leanvit.io.data import build_datasets
from leanvit.train import TrainConfig, train
from leanvit.train.evaluation import data_config


def bare_loop_images_per_s(config: TrainConfig) -> float:
    torch.manual_seed(config.seed)
    model = leanvit.create_model(config.model, num_classes=10, img_size=config.img_size)
    data = build_datasets(None, data_config(model, config.img_size))
    loader = DataLoader(data.train, config.batch_size, shuffle=True, drop_last=True)
    optimizer = create_optimizer_v2(model, opt=config.opt, lr=config.lr, weight_decay=config.weight_decay)
    model.train()
    for _ in range(config.epochs):  # the last epoch is timed, as the engine reports its last epoch
        seen, start = 0, time.perf_counter()
        for images, targets in loader:
            loss = F.cross_entropy(model(images), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seen += targets.numel()
    return seen / (time.perf_counter() - start)


def engine_images_per_s(config: TrainConfig) -> float:
    with tempfile.TemporaryDirectory() as output:
        return train(dataclasses.replace(config, output=output))['train_images_per_s']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='sret_t')
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--pairs', type=int, default=5)
    args = parser.parse_args()
    config = TrainConfig(model=args.model, img_size=args.img_size, batch_size=args.batch_size, epochs=2,
                         progress=False, warmup_epochs=0)

    ratios = []
    for pair in range(args.pairs):
        bare = bare_loop_images_per_s(config)
        engine = engine_images_per_s(config)
        ratios.append(engine / bare)
        print(f'pair {pair + 1}/{args.pairs}: bare loop {bare:.1f} images/s, leanvit train {engine:.1f} images/s, '
              f'ratio {engine / bare:.3f}', flush=True)
    ratio = statistics.median(ratios)
    print(f'\n{args.model} at {args.img_size}px, batch {args.batch_size}, {torch.get_num_threads()} threads: '
          f'leanvit train runs at {ratio:.3f} x the bare loop\'s throughput (overhead {1 - ratio:+.1%}), '
          f'median of {args.pairs} alternating pairs')


if __name__ == '__main__':
    main()
