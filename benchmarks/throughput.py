"""Eval throughput of leanvit models against references measured in the same run (batch 16, 224 x 224, CPU).

Shared CPUs drift by tens of percent between minutes, so absolute images/s mean little. Models are timed in
interleaved rounds (the order rotates every round) and each ratio is the median over rounds of the ratio within
a round, where both models ran seconds apart.

"re-parameterized" is ``timm.utils.model.reparameterize_model``: the CPU inference forms of leanvit's layers (and, for
RIFormer, the paper's fold of the token mixer); the canonical model is what training and hooks see.

Suites:
  sret      SReT-T, canonical and re-parameterized, against DeiT-Ti, and re-parameterized against its unsliced form.
  riformer  RIFormer-S12 deployed (no token mixer, re-parameterized) against timm's PoolFormer-S12, against leanvit's
            PoolFormer form (same code, pooling mixer, re-parameterized) and against its own training form, and the
            deploy model (the paper's fold only) in ONNX Runtime against eager PyTorch.
  minivit   Mini-DeiT-Ti, canonical and re-parameterized, against DeiT-Ti, and against the official Mini-DeiT-Ti when
            --official-minivit names the Mini-DeiT folder of a github.com/microsoft/Cream checkout (it needs the
            ``easydict`` package); the official code is imported from there, never shipped with leanvit.

    python benchmarks/throughput.py --suite sret|riformer|minivit [--rounds 15] [--iters 2] [--markdown FILE]
"""

import argparse
import copy
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from timm.utils.model import reparameterize_model

import leanvit

Runner = Callable[[torch.Tensor], object]


def eager(model: torch.nn.Module) -> Runner:
    model.eval()

    def run(images: torch.Tensor):
        with torch.inference_mode():
            return model(images)
    return run


def onnxruntime_session(model: torch.nn.Module, scratch: str, batch_size: int) -> Runner:
    """The model exported (and verified) by leanvit.export, run by ONNX Runtime on as many threads as torch."""
    import onnxruntime

    from leanvit.export import export_model
    path = Path(scratch) / 'model.onnx'
    export_model(model, path, 'onnx', batch_size=batch_size)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    input_name = session.get_inputs()[0].name
    return lambda images: session.run(None, {input_name: images.numpy()})


REPARAMETERIZED = ' (re-parameterized)'
SLICED, UNSLICED = 'sret_t' + REPARAMETERIZED, 'sret_t_unsliced' + REPARAMETERIZED


def sret_suite(scratch: str, batch_size: int) -> tuple[dict, dict, list]:
    sret_t = timm.create_model('sret_t').eval()
    models = {
        'deit_tiny_patch16_224': timm.create_model('deit_tiny_patch16_224'),
        'sret_t': sret_t,
        SLICED: reparameterize_model(sret_t),
        UNSLICED: reparameterize_model(timm.create_model('sret_t_unsliced').eval()),
    }
    ratios = [(SLICED, 'deit_tiny_patch16_224'), ('sret_t', 'deit_tiny_patch16_224'), (SLICED, 'sret_t'),
              (SLICED, UNSLICED)]
    return {n: eager(m) for n, m in models.items()}, models, ratios


def riformer_suite(scratch: str, batch_size: int) -> tuple[dict, dict, list]:
    training = leanvit.create_model('riformer_s12').eval()
    deploy = reparameterize_model(training)  # the paper's fold and the CPU inference forms of the MLPs
    folded = reparameterize_model(copy.deepcopy(training).reparameterize(fold_layer_scale=True))
    models = {
        'poolformer_s12 (timm)': timm.create_model('poolformer_s12'),
        # The same implementation with PoolFormer's mixer: isolates what removing the mixer buys.
        'poolformer_s12 (leanvit)': reparameterize_model(leanvit.create_model('riformer_s12', token_mixer='pooling')),
        'riformer_s12 training form': training,
        'riformer_s12 deploy': deploy,
        'riformer_s12 deploy, ls1 folded': folded,
    }
    runners = {n: eager(m) for n, m in models.items()}
    # ONNX Runtime optimises convolutions itself: it gets the paper's deploy form, without the CPU forms of PyTorch.
    paper_deploy = copy.deepcopy(training).reparameterize()
    runners['riformer_s12 deploy, ONNX Runtime'] = onnxruntime_session(paper_deploy, scratch, batch_size)
    models['riformer_s12 deploy, ONNX Runtime'] = paper_deploy
    ratios = [('riformer_s12 deploy', 'poolformer_s12 (timm)'),
              ('riformer_s12 deploy, ls1 folded', 'poolformer_s12 (timm)'),
              ('riformer_s12 deploy', 'poolformer_s12 (leanvit)'),
              ('riformer_s12 deploy', 'riformer_s12 training form'),
              ('riformer_s12 deploy, ONNX Runtime', 'riformer_s12 deploy')]
    return runners, models, ratios


def minivit_suite(scratch: str, batch_size: int, official: str | None = None) -> tuple[dict, dict, list]:
    mini = timm.create_model('mini_deit_tiny_patch16_224').eval()
    models = {
        'deit_tiny_patch16_224': timm.create_model('deit_tiny_patch16_224'),
        'mini_deit_tiny': mini,
        'mini_deit_tiny' + REPARAMETERIZED: reparameterize_model(mini),
    }
    ratios = [('mini_deit_tiny' + REPARAMETERIZED, 'deit_tiny_patch16_224'),
              ('mini_deit_tiny', 'deit_tiny_patch16_224')]
    if official:
        import sys
        sys.path.insert(0, official)
        import mini_deit_models  # the official file; it re-registers the names in timm, so call it directly

        reference = mini_deit_models.mini_deit_tiny_patch16_224().eval()
        # Same weights in both, so that both compute the same function (checked below).
        mini.load_state_dict(leanvit.models.minivit.checkpoint_filter_fn(reference.state_dict(), mini))
        models['mini_deit_tiny' + REPARAMETERIZED] = reparameterize_model(mini)
        check = torch.randn(2, 3, 224, 224)
        with torch.inference_mode():
            error = (models['mini_deit_tiny' + REPARAMETERIZED](check) - reference(check)).abs().max()
        print(f'leanvit vs official Mini-DeiT-Ti, same weights: max logit difference {error:.2e}')
        models['official mini_deit_tiny'] = reference
        ratios += [('mini_deit_tiny' + REPARAMETERIZED, 'official mini_deit_tiny'),
                   ('mini_deit_tiny', 'official mini_deit_tiny'),
                   ('official mini_deit_tiny', 'deit_tiny_patch16_224')]
    return {n: eager(m) for n, m in models.items()}, models, ratios


SUITES = {'sret': sret_suite, 'riformer': riformer_suite, 'minivit': minivit_suite}


def images_per_second(run: Runner, images: torch.Tensor, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        run(images)
    return iters * images.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--suite', choices=sorted(SUITES), default='sret')
    parser.add_argument('--rounds', type=int, default=15)
    parser.add_argument('--iters', type=int, default=2, help='forward passes per model per round')
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--markdown', help='also write the results table to this file')
    parser.add_argument('--official-minivit', help='minivit suite: the MiniViT/Mini-DeiT folder of a Cream checkout')
    args = parser.parse_args()

    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, 224, 224)
    with tempfile.TemporaryDirectory() as scratch:
        extra = dict(official=args.official_minivit) if args.suite == 'minivit' else {}
        runners, models, ratios = SUITES[args.suite](scratch, args.batch_size, **extra)
        names = list(runners)
        gmacs = {name: leanvit.profile(model, (3, 224, 224)).gmacs for name, model in models.items()}
        for run in runners.values():
            images_per_second(run, images, 1)  # warm-up

        speeds = {name: [] for name in names}
        for round_index in range(args.rounds):
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for name in order:
                speeds[name].append(images_per_second(runners[name], images, args.iters))
            rates = ', '.join(f'{n} {speeds[n][-1]:.1f}' for n in names)
            print(f'round {round_index + 1}/{args.rounds}: {rates}', flush=True)

    lines = [
        (f'Eval throughput, batch {args.batch_size}, 224 x 224, {torch.get_num_threads()} CPU threads '
         f'({platform.processor() or platform.machine()}), torch {torch.__version__}, median of {args.rounds} '
         f'interleaved rounds of {args.iters} batches.'),
        '',
        '| model | GMACs | images/s (median) |',
        '|---|---|---|',
    ]
    lines += [f'| {n} | {gmacs[n]:.3f} | {statistics.median(speeds[n]):.1f} |' for n in names]
    lines += ['', '| ratio | throughput ratio (median of per-round ratios) | MAC ratio |', '|---|---|---|']
    for a, b in ratios:
        ratio = statistics.median(x / y for x, y in zip(speeds[a], speeds[b]))
        lines.append(f'| {a} / {b} | {ratio:.3f} | {gmacs[b] / gmacs[a]:.3f} |')
    if args.suite == 'sret':
        saving = 1 - gmacs[SLICED] / gmacs[UNSLICED]
        time_saving = 1 - statistics.median(y / x for x, y in zip(speeds[SLICED], speeds[UNSLICED]))
        lines += ['', (f'Slicing removes {saving:.1%} of the MACs of sret_t_unsliced and {time_saving:.1%} of its '
                       f'time ({time_saving / saving:.2f} of the MAC saving; both re-parameterized).')]
    table = '\n'.join(lines)
    print('\n' + table)
    if args.markdown:
        with open(args.markdown, 'w') as f:
            f.write(table + '\n')


if __name__ == '__main__':
    main()
