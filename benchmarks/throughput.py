"""Eval throughput of SReT against references measured in the same run (batch 16, 224 x 224, CPU).

Shared CPUs drift by tens of percent between minutes, so absolute images/s mean little. Models are timed in
interleaved rounds (the order rotates every round) and each ratio is the median over rounds of the ratio within
a round, where both models ran seconds apart.

    python benchmarks/throughput.py [--rounds 15] [--iters 2] [--markdown benchmarks/results.md]
"""

import argparse
import platform
import statistics
import time

import timm
import torch

import leanvit

MODELS = ('deit_tiny_patch16_224', 'sret_t', 'sret_t_unsliced')
RATIOS = (('sret_t', 'deit_tiny_patch16_224'), ('sret_t', 'sret_t_unsliced'))


def images_per_second(model: torch.nn.Module, images: torch.Tensor, iters: int) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(iters):
            model(images)
        return iters * images.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rounds', type=int, default=15)
    parser.add_argument('--iters', type=int, default=2, help='forward passes per model per round')
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--markdown', help='also write the results table to this file')
    args = parser.parse_args()

    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, 224, 224)
    models = {name: timm.create_model(name).eval() for name in MODELS}
    gmacs = {name: leanvit.profile(model, (3, 224, 224)).gmacs for name, model in models.items()}
    for model in models.values():
        images_per_second(model, images, 1)  # warm-up

    speeds = {name: [] for name in MODELS}
    for round_index in range(args.rounds):
        order = MODELS[round_index % len(MODELS):] + MODELS[:round_index % len(MODELS)]
        for name in order:
            speeds[name].append(images_per_second(models[name], images, args.iters))
        print(f'round {round_index + 1}/{args.rounds}: '
              + ', '.join(f'{n} {speeds[n][-1]:.1f}' for n in MODELS), flush=True)

    lines = [
        f'Eval throughput, batch {args.batch_size}, 224 x 224, {torch.get_num_threads()} CPU threads '
        f'({platform.processor() or platform.machine()}), torch {torch.__version__}, median of {args.rounds} '
        f'interleaved rounds of {args.iters} batches.',
        '',
        '| model | GMACs | images/s (median) |',
        '|---|---|---|',
    ]
    lines += [f'| {n} | {gmacs[n]:.3f} | {statistics.median(speeds[n]):.1f} |' for n in MODELS]
    lines += ['', '| ratio | throughput ratio (median of per-round ratios) | MAC ratio |', '|---|---|---|']
    for a, b in RATIOS:
        ratio = statistics.median(x / y for x, y in zip(speeds[a], speeds[b]))
        lines.append(f'| {a} / {b} | {ratio:.3f} | {gmacs[b] / gmacs[a]:.3f} |')
    saving = 1 - gmacs['sret_t'] / gmacs['sret_t_unsliced']
    time_saving = 1 - statistics.median(y / x for x, y in zip(speeds['sret_t'], speeds['sret_t_unsliced']))
    lines += ['', f'Slicing removes {saving:.1%} of the MACs of sret_t_unsliced and {time_saving:.1%} of its time '
                  f'({time_saving / saving:.2f} of the MAC saving).']
    table = '\n'.join(lines)
    print('\n' + table)
    if args.markdown:
        with open(args.markdown, 'w') as f:
            f.write(table + '\n')


if __name__ == '__main__':
    main()
