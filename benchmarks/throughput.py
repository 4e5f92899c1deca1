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
  minivit   Mini-DeiT-Ti and Mini-Swin-T, canonical and re-parameterized, against timm's DeiT-Ti and Swin-T, and
            against the official models when --official-minivit names the MiniViT folder of a
            github.com/microsoft/Cream checkout (Mini-DeiT needs the ``easydict`` package); the official code is
            imported from there, never shipped with leanvit. Both get the same weights (checked).
  minivit-large  Mini-DeiT-S/B and Mini-Swin-S/B (re-parameterized) against timm's DeiT-S/B and Swin-S/B.
  glit      GLiT-Tiny, canonical and re-parameterized, against timm's DeiT-Ti, and against the official model when
            --official-glit names a github.com/bychen515/GLiT checkout (needs ``einops``), with the same weights.

    python benchmarks/throughput.py --suite sret|riformer|minivit|minivit-large [--rounds 15] [--iters 2]
                                     [--markdown FILE] [--official-minivit DIR] [--official-glit DIR]
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


def _official_module(path: str, name: str):
    """Import one file of the official code under its own module name (its two code bases both have a ``models``)."""
    import importlib.util
    import sys

    sys.path.insert(0, str(Path(path).parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # timm's register_model looks it up there
    spec.loader.exec_module(module)
    return module


def minivit_suite(scratch: str, batch_size: int, official: str | None = None) -> tuple[dict, dict, list]:
    models, ratios, minis = {}, [], {}
    pairs = (('mini_deit_tiny_patch16_224', 'deit_tiny_patch16_224'),
             ('mini_swin_tiny_patch4_window7_224', 'swin_tiny_patch4_window7_224'))
    for mini_name, timm_name in pairs:  # before the official code, which re-registers timm's DeiT names
        short = mini_name.rsplit('_patch', 1)[0]
        models[timm_name] = timm.create_model(timm_name)
        minis[short] = timm.create_model(mini_name).eval()
        ratios += [(short + REPARAMETERIZED, timm_name), (short, timm_name)]
    for short, mini in minis.items():
        if official:
            reference = official_minivit(official, short)
            # Same weights in both, so that both compute the same function.
            mini.load_state_dict(leanvit.models.minivit.checkpoint_filter_fn(reference.state_dict(), mini))
            check = torch.randn(2, 3, 224, 224)
            with torch.inference_mode():
                error = (mini(check) - reference(check)).abs().max()
            print(f'leanvit vs official {short}, same weights: max logit difference {error:.2e}')
            models[f'official {short}'] = reference
            timm_name = next(t for m, t in pairs if m.startswith(short))
            ratios += [(short + REPARAMETERIZED, f'official {short}'), (short, f'official {short}'),
                       (f'official {short}', timm_name)]
        models[short] = mini
        models[short + REPARAMETERIZED] = reparameterize_model(copy.deepcopy(mini))
    return {n: eager(m) for n, m in models.items()}, models, ratios


def official_minivit(folder: str, name: str) -> torch.nn.Module:
    """The official Mini-DeiT-Ti or Mini-Swin-T, built by the official code in ``folder`` (MiniViT of Cream)."""
    if name == 'mini_deit_tiny':
        module = _official_module(f'{folder}/Mini-DeiT/mini_deit_models.py', 'official_mini_deit_models')
        return module.mini_deit_tiny_patch16_224().eval()  # the file re-registers timm names: call it directly
    module = _official_module(f'{folder}/Mini-Swin/models/swin_transformer_minivit.py', 'official_mini_swin')
    # Mini-Swin-T as the official config builds it (configs/swin_tiny_patch4_window7_224_minivit_sharenum6.yaml).
    return module.SwinTransformerMiniViT(
        embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, is_sep_layernorm=True,
        is_transform_FFN=True, is_transform_heads=True, separate_layer_num_list=[1, 1, 1, 1]).eval()


def minivit_large_suite(scratch: str, batch_size: int) -> tuple[dict, dict, list]:
    models, ratios = {}, []
    for mini_name, timm_name in (('mini_deit_small_patch16_224', 'deit_small_patch16_224'),
                                 ('mini_deit_base_patch16_224', 'deit_base_patch16_224'),
                                 ('mini_swin_small_patch4_window7_224', 'swin_small_patch4_window7_224'),
                                 ('mini_swin_base_patch4_window7_224', 'swin_base_patch4_window7_224')):
        short = mini_name.rsplit('_patch', 1)[0] + REPARAMETERIZED
        models[timm_name] = timm.create_model(timm_name)
        models[short] = reparameterize_model(timm.create_model(mini_name).eval())
        ratios.append((short, timm_name))
    return {n: eager(m) for n, m in models.items()}, models, ratios


def glit_suite(scratch: str, batch_size: int, official: str | None = None) -> tuple[dict, dict, list]:
    glit = timm.create_model('glit_tiny_patch16_224').eval()
    models = {'deit_tiny_patch16_224': timm.create_model('deit_tiny_patch16_224'), 'glit_tiny': glit}
    ratios = [('glit_tiny' + REPARAMETERIZED, 'deit_tiny_patch16_224'), ('glit_tiny', 'deit_tiny_patch16_224')]
    if official:
        import timm.models.vision_transformer as vit
        from timm.models.vision_transformer_hybrid import HybridEmbed
        vit.HybridEmbed = HybridEmbed  # where the official code (timm 0.3) imports it from
        module = _official_module(f'{official}/glit_models.py', 'official_glit_models')
        reference = module.glit_tiny_patch16_224().eval()
        glit.load_state_dict(leanvit.models.glit.checkpoint_filter_fn(reference.state_dict(), glit))
        check = torch.randn(2, 3, 224, 224)
        with torch.inference_mode():
            error = (glit(check) - reference(check)).abs().max()
        print(f'leanvit vs official glit_tiny, same weights: max logit difference {error:.2e}')
        models['official glit_tiny'] = reference
        ratios += [('glit_tiny' + REPARAMETERIZED, 'official glit_tiny'), ('glit_tiny', 'official glit_tiny'),
                   ('official glit_tiny', 'deit_tiny_patch16_224')]
    models['glit_tiny' + REPARAMETERIZED] = reparameterize_model(copy.deepcopy(glit))
    return {n: eager(m) for n, m in models.items()}, models, ratios


SUITES = {'glit': glit_suite, 'sret': sret_suite, 'riformer': riformer_suite, 'minivit': minivit_suite,
          'minivit-large': minivit_large_suite}


def matmul_peak_gmacs(size: int = 2048, repeats: int = 5) -> float:
    """Multiply-accumulates per second (G) of the best of ``repeats`` square float32 GEMMs: the CPU's practical
    peak, against which a model's MAC rate says how much of the time it spends doing arithmetic."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return size ** 3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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
    parser.add_argument('--official-minivit', help='minivit suite: the MiniViT folder of a Cream checkout')
    parser.add_argument('--official-glit', help='glit suite: a checkout of the official GLiT repository')
    args = parser.parse_args()

    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, 224, 224)
    with tempfile.TemporaryDirectory() as scratch:
        extra = dict(minivit=dict(official=args.official_minivit), glit=dict(official=args.official_glit))
        extra = extra.get(args.suite, {})
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
    if args.suite.startswith(('minivit', 'glit')):
        peak = matmul_peak_gmacs()
        lines += ['', f'Share of the matmul peak ({peak:.1f} GMAC/s, the best 2048 x 2048 float32 GEMM, measured after '
                      'the rounds): the model\'s MACs per second over it.', '', '| model | GMAC/s | share of peak |',
                  '|---|---|---|']
        for n in names:
            rate = gmacs[n] * statistics.median(speeds[n])
            lines.append(f'| {n} | {rate:.1f} | {rate / peak:.1%} |')
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
