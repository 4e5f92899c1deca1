"""MiniViT's ablation on the bundled digits (8 x 8 images upscaled to 32 x 32), small enough for a CPU.

A DeiT-style teacher (timm ViT without class token, 8 layers of width 64) is trained first; then, for each seed,
the weight-multiplexed students of the paper's ablation (Zhang et al., "MiniViT", CVPR 2022, Table 5): sharing only,
+ per-layer LayerNorms, + weight transformations, + weight distillation, and the student compressed from the trained
teacher (`leanvit compress`) against the same student trained from scratch with the same distillation. Every model is
scored on the same validation split; the table gives the mean and spread over seeds, the parameters, and the
compressed student's agreement with its teacher before training. Then the paper's diagnostics: gradient norms of
sharing-only vs multiplexed students, and CKA between the teacher and the compressed student before and after
distillation.

    python benchmarks/minivit_digits.py [--seeds 0 1 2] [--epochs 15] [--teacher-epochs 30] [--output runs/minivit]
                                        [--rows ROW ...]
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from leanvit.methods.minivit.multiplex import compress
from leanvit.train import TrainConfig, train

TEACHER = 'vit_tiny_patch16_224'
TEACHER_KWARGS = dict(patch_size=4, embed_dim=64, depth=8, num_heads=2, class_token=False, global_pool='avg',
                      fc_norm=False)
STUDENT = 'mini_deit_tiny_patch16_224'
STUDENT_KWARGS = dict(patch_size=4, embed_dim=64, depth=8, num_heads=2, share=2, rpe=False)
SHARING_ONLY = dict(separate_norms=False, attn_transform=False, local_conv=False)
DISTILLATION = dict(kd='soft_ce', kd_alpha=0.5, objectives={'weight_distillation': {}})

COMPRESSED = 'compressed from the teacher'
# name -> (student model kwargs on top of STUDENT_KWARGS, distilled from the teacher)
ABLATION = {
    'sharing only': (SHARING_ONLY, False),
    '+ per-layer norms': (SHARING_ONLY | dict(separate_norms=True), False),
    '+ transformations': (dict(attn_transform=True, local_conv=True), False),
    '+ weight distillation': (dict(attn_transform=True, local_conv=True), True),
    # What `leanvit compress` builds (no local conv: it cannot start at the identity), trained from scratch.
    'compress student, from scratch': (dict(attn_transform=True, local_conv=False), True),
}


def run(output: Path, **config) -> dict:
    return train(TrainConfig(img_size=32, output=str(output), **config))


def params(model: str, kwargs: dict) -> int:
    import leanvit
    return leanvit.count_params(leanvit.create_model(model, num_classes=10, img_size=32, **kwargs))


def last_checkpoint(run_dir: Path) -> str:
    return str(run_dir / (json.loads((run_dir / 'latest.json').read_text())['tag'] + '.safetensors'))


def analyze(*args: str) -> None:
    subprocess.run([sys.executable, '-m', 'leanvit.cli', 'analyze', *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=15)
    parser.add_argument('--teacher-epochs', type=int, default=30)
    parser.add_argument('--output', default='runs/minivit')
    parser.add_argument('--rows', nargs='+', choices=[*ABLATION, COMPRESSED], default=[*ABLATION, COMPRESSED],
                        metavar='ROW', help='rows of the table to run (default: all, then the diagnostics)')
    args = parser.parse_args()
    root = Path(args.output)

    teacher_dir = root / 'teacher'
    teacher = run(teacher_dir, model=TEACHER, model_kwargs=TEACHER_KWARGS, epochs=args.teacher_epochs)
    teacher_checkpoint = last_checkpoint(teacher_dir)
    with_teacher = dict(teacher=TEACHER, teacher_kwargs=TEACHER_KWARGS, teacher_checkpoint=teacher_checkpoint)

    scores = {name: [] for name in args.rows}
    agreement = []
    for seed in args.seeds:
        for name, (kwargs, distilled) in ABLATION.items():
            if name not in args.rows:
                continue
            extra = (DISTILLATION | with_teacher) if distilled else {}
            result = run(root / f'seed{seed}' / name.replace(' ', '_').replace('+', 'plus').replace(',', ''),
                         model=STUDENT, model_kwargs=STUDENT_KWARGS | kwargs, epochs=args.epochs, seed=seed, **extra)
            scores[name].append(result['val_top1'])
        if COMPRESSED not in args.rows:
            continue
        compressed_dir = root / f'seed{seed}' / 'compressed'
        result = compress(TrainConfig(img_size=32, output=str(compressed_dir), epochs=args.epochs, seed=seed,
                                      **DISTILLATION, **with_teacher), share=2)
        scores[COMPRESSED].append(result['val_top1'])
        agreement.append(json.loads((compressed_dir / 'compress.json').read_text())['untrained_agreement'])

    counts = {name: params(STUDENT, STUDENT_KWARGS | kwargs) for name, (kwargs, _) in ABLATION.items()}
    counts[COMPRESSED] = counts['compress student, from scratch']
    lines = [f'Digits, 32 x 32, val split of the bundled digits; {args.epochs} epochs per student, seeds '
             f'{args.seeds}; teacher {TEACHER} {TEACHER_KWARGS}, {args.teacher_epochs} epochs.', '',
             '| model | params | val top-1 (mean ± sd over seeds) | per seed |', '|---|---|---|---|',
             f'| teacher | {params(TEACHER, TEACHER_KWARGS):,} | {teacher["val_top1"]:.1f} | - |']
    for name, values in scores.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.
        lines.append(f'| {name} | {counts[name]:,} | {statistics.mean(values):.1f} ± {spread:.1f} | '
                     f'{", ".join(f"{v:.1f}" for v in values)} |')
    if agreement:
        lines += ['', 'Compressed student before training, against its teacher on the validation split: top-1 '
                  'agreement ' + ', '.join(f'{a["top1_agreement"]:.1%}' for a in agreement) + '; logit RMSE '
                  + ', '.join(f'{a["logit_rmse"]:.3g}' for a in agreement) + '.']
    table = '\n'.join(lines)
    print(table)
    (root / 'report.md').write_text(table + '\n')
    if set(args.rows) != {*ABLATION, COMPRESSED}:
        return

    # The paper's diagnostics (Sec. 3.1): gradient norms of sharing only vs multiplexed, and CKA to the teacher.
    for name in ('sharing only', '+ transformations'):
        kwargs = json.dumps(STUDENT_KWARGS | ABLATION[name][0])
        analyze('grad-norms', '--model', STUDENT, '--model-kwargs', json.dumps(json.loads(kwargs) | {'img_size': 32}),
                '--steps', '100', '--output', str(root / 'grad_norms' / name.replace(' ', '_').replace('+', 'plus')))
    compressed = root / f'seed{args.seeds[0]}' / 'compressed'
    spec = json.loads((compressed / 'compress.json').read_text())['report']
    teacher_args = ['--checkpoint-a', teacher_checkpoint]  # a run's checkpoint names its model
    analyze('cka', *teacher_args, '--model-b', spec['model'], '--model-kwargs-b', json.dumps(spec['model_kwargs']),
            '--checkpoint-b', str(compressed / 'multiplexed.safetensors'), '--output', str(root / 'cka_before'))
    analyze('cka', *teacher_args, '--checkpoint-b', last_checkpoint(compressed), '--output', str(root / 'cka_after'))


if __name__ == '__main__':
    main()
