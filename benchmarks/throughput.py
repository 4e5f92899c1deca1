"""leanvit against the official implementations, same weights, eval throughput in one process (batch 16, 224, CPU).

What needs no official code is `leanvit bench` (every model, every runtime, the README's speed table). This script
keeps the one comparison bench cannot make: against the authors' own code, imported from a checkout of their
repository (never shipped with leanvit), with leanvit's model given the official model's weights (checked).

Shared CPUs drift by tens of percent between minutes, so models are timed in interleaved rounds (the order rotates
every round) and each ratio is the median over rounds of the ratio within a round.

Suites:
  minivit  Mini-DeiT-Ti and Mini-Swin-T against the official models: --official-minivit names the MiniViT folder
           of a github.com/microsoft/Cream checkout (Mini-DeiT needs the ``easydict`` package).
  glit     GLiT-Tiny against the official model: --official-glit names a github.com/bychen515/GLiT checkout
           (needs ``einops``).

    python benchmarks/throughput.py --suite minivit --official-minivit DIR [--rounds 15] [--markdown FILE]
"""

import argparse
import importlib.util
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from timm.utils.model import reparameterize_model

import leanvit
from leanvit.deploy.bench import cpu_name
from leanvit.deploy.export import export_model
from leanvit.io.exported import onnx_session


def eager(model: torch.nn.Module):
    model.eval()

    def run(images: torch.Tensor):
        with torch.inference_mode():
            return model(images)
    return run


def onnxruntime_runner(model: torch.nn.Module, path: Path):
    """leanvit's deployment file of ``model`` (folded, exported, verified) in ONNX Runtime, on torch's threads."""
    export_model(model, path, 'onnx', reparam=True)
    session = onnx_session(path, torch.get_num_threads())  # the threads chosen for this command
    return lambda images: session.run(None, {'input': images.numpy()})


def official_module(path: str, name: str):
    """Import one file of the official code under its own module name (its two code bases both have a ``models``)."""
    sys.path.insert(0, str(Path(path).parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # timm's register_model looks it up there
    spec.loader.exec_module(module)
    return module


def official_minivit(folder: str, short: str) -> torch.nn.Module:
    """The official Mini-DeiT-Ti or Mini-Swin-T, built by the official code in ``folder`` (MiniViT of Cream)."""
    if short == 'mini_deit_tiny':
        module = official_module(f'{folder}/Mini-DeiT/mini_deit_models.py', 'official_mini_deit_models')
        return module.mini_deit_tiny_patch16_224().eval()  # the file re-registers timm names: call it directly
    module = official_module(f'{folder}/Mini-Swin/models/swin_transformer_minivit.py', 'official_mini_swin')
    # Mini-Swin-T as the official config builds it (configs/swin_tiny_patch4_window7_224_minivit_sharenum6.yaml).
    return module.SwinTransformerMiniViT(
        embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, is_sep_layernorm=True,
        is_transform_FFN=True, is_transform_heads=True, separate_layer_num_list=[1, 1, 1, 1]).eval()


def official_glit(folder: str, short: str) -> torch.nn.Module:
    import timm.models.vision_transformer as vit
    from timm.models.vision_transformer_hybrid import HybridEmbed
    vit.HybridEmbed = HybridEmbed  # where the official code (timm 0.3) imports it from
    return official_module(f'{folder}/glit_models.py', 'official_glit_models').glit_tiny_patch16_224().eval()


SUITES = {  # suite: ([(leanvit model, short name)], builder of the official model, leanvit's checkpoint converter)
    'minivit': ([('mini_deit_tiny_patch16_224', 'mini_deit_tiny'), ('mini_swin_tiny_patch4_window7_224',
                                                                     'mini_swin_tiny')], official_minivit,
                lambda: leanvit.models.minivit.checkpoint_filter_fn),
    'glit': ([('glit_tiny_patch16_224', 'glit_tiny')], official_glit, lambda: leanvit.models.glit.checkpoint_filter_fn),
}


def build_runners(suite: str, official_folder: str, scratch: str) -> tuple[dict, list]:
    names, build_official, converter = SUITES[suite]
    leanvit_models = {short: timm.create_model(name).eval() for name, short in names}  # before the official code,
    runners, ratios = {}, []                                                          # which re-registers timm names
    for short, model in leanvit_models.items():
        reference = build_official(official_folder, short)
        model.load_state_dict(converter()(reference.state_dict(), model))  # same weights, same function
        check = torch.randn(2, 3, 224, 224)
        with torch.inference_mode():
            error = (model(check) - reference(check)).abs().max()
        print(f'leanvit vs official {short}, same weights: max logit difference {error:.2e}')
        runners[f'official {short}'] = eager(reference)
        runners[short] = eager(model)
        runners[f'{short} folded'] = eager(reparameterize_model(model))
        runners[f'{short} ONNX Runtime'] = onnxruntime_runner(model, Path(scratch) / f'{short}.onnx')
        ratios += [(variant, f'official {short}') for variant in (short, f'{short} folded', f'{short} ONNX Runtime')]
    return runners, ratios


def images_per_second(run, images: torch.Tensor, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        run(images)
    return iters * images.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--suite', choices=sorted(SUITES), required=True)
    parser.add_argument('--official-minivit', help='minivit suite: the MiniViT folder of a Cream checkout')
    parser.add_argument('--official-glit', help='glit suite: a checkout of the official GLiT repository')
    parser.add_argument('--rounds', type=int, default=15)
    parser.add_argument('--iters', type=int, default=2, help='forward passes per model per round')
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--markdown', help='also write the results table to this file')
    args = parser.parse_args()
    official = args.official_minivit if args.suite == 'minivit' else args.official_glit
    if not official:
        parser.error(f'--suite {args.suite} compares with the official code: pass --official-{args.suite} DIR')

    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, 224, 224)
    with tempfile.TemporaryDirectory() as scratch:
        runners, ratios = build_runners(args.suite, official, scratch)
        names = list(runners)
        for run in runners.values():
            images_per_second(run, images, 1)  # warm-up
        speeds = {name: [] for name in names}
        for round_index in range(args.rounds):
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for name in order:
                speeds[name].append(images_per_second(runners[name], images, args.iters))
            print(f'round {round_index + 1}/{args.rounds}: ' + ', '.join(f'{n} {speeds[n][-1]:.1f}' for n in names),
                  flush=True)

    lines = [f'Eval throughput on {cpu_name()} ({platform.machine()}), batch {args.batch_size}, 224 x 224, '
             f'{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.rounds} interleaved '
             f'rounds of {args.iters} batches.', '', '| model | images/s (median) |', '|---|---|']
    lines += [f'| {n} | {statistics.median(speeds[n]):.1f} |' for n in names]
    lines += ['', '| ratio | throughput ratio (median of per-round ratios) |', '|---|---|']
    lines += [f'| {a} / {b} | {statistics.median(x / y for x, y in zip(speeds[a], speeds[b])):.3f} |'
              for a, b in ratios]
    table = '\n'.join(lines)
    print('\n' + table)
    if args.markdown:
        Path(args.markdown).write_text(table + '\n')


if __name__ == '__main__':
    main()
