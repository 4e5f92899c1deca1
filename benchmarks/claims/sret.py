"""SReT's claims on Fashion-MNIST, over seeds: recursion against a DeiT of the same parameters and MACs, sliced
against full group attention, soft-label distillation against labels only (Shen, Liu and Xing, "Sliced Recursive
Transformer", ECCV 2022; docs/sret.md).

One recipe for every arm: 64 x 64 inputs (the 28 x 28 images upscaled), a stratified 10,000 of the 60,000 training
images, the whole 10,000-image test split for validation, 5 epochs of AdamW (lr 2e-3, one warm-up epoch, cosine,
weight decay 0.05, label smoothing 0.1), batch 64. The arms:

- SReT-T-shaped: SReT-T's three stages, block counts (2, 5, 3), recursion 2 with NLLs and learnable residuals,
  slices (8, 4, 1) / (2, 1, 1), at head width 16 instead of 32 (1.12 M parameters) to train on 2 cores.
- DeiT-shaped: a DeiT (class token, 16 x 16 patches, so 4 x 4 tokens at 64 px) of width 80 and depth 14, chosen for
  the same parameters and MACs as the SReT arm (the script prints both ratios).
- full attention: the SReT arm with one slice everywhere (same parameters).
- soft-label KD: the SReT arm distilled, soft labels only (SReT's recipe: soft cross-entropy, no ground truth, no
  temperature), from one PoolFormer teacher (S12 layout, half width) trained 8 epochs on the same images (seed 0),
  shared by every seed.

About 45 minutes on 2 cores. A killed script resumes: finished runs are read back, the unfinished one resumes from its
checkpoints. Writes its section of docs/results.md and docs/results/sret.png.

    python -m leanvit.io.fashion_mnist          # once: the data
    python benchmarks/claims/sret.py [--seeds 0 1 2] [--output runs/claims/sret]
"""

from pathlib import Path

import leanvit
from leanvit.profiler import profile
from leanvit.train.comparison import arms_table, claim_parser, publish, train_once

IMG, TRAIN_IMAGES, EPOCHS, TEACHER_EPOCHS = 64, 10_000, 5, 8
RECIPE = dict(img_size=IMG, train_images=TRAIN_IMAGES, batch_size=64, opt='adamw', lr=2e-3, warmup_epochs=1,
              weight_decay=0.05, sched='cosine', smoothing=0.1)
SRET = dict(model='sret_t', model_kwargs=dict(head_dim=[16, 16, 16]))
ARMS = {
    'SReT-T-shaped (recursion 2, sliced)': SRET,
    'DeiT-shaped, same params and MACs': dict(model='deit_tiny_patch16_224',
                                              model_kwargs=dict(embed_dim=80, depth=14, num_heads=2)),
    'SReT, full attention (no slices)': dict(SRET, model_kwargs=dict(SRET['model_kwargs'], groups=[1, 1, 1],
                                                                     recursive_groups=[1, 1, 1])),
    'SReT, soft-label KD': dict(SRET, kd='soft_ce', kd_alpha=1.0, kd_tau=1.0),
}
FOLDERS = dict(zip(ARMS, ('sret', 'deit', 'sret_full_attention', 'sret_kd')))
# PoolFormer-S12's layout at half width: a stronger model of another kind (pooling, convolutional stem).
TEACHER = dict(model='riformer_s12', model_kwargs=dict(token_mixer='pooling', dims=[32, 64, 160, 256]))
BASE = 'SReT-T-shaped (recursion 2, sliced)'
PAIRS = [(BASE, 'DeiT-shaped, same params and MACs'), (BASE, 'SReT, full attention (no slices)'),
         ('SReT, soft-label KD', BASE)]


def macs(arm: dict) -> int:
    return profile(leanvit.create_model(arm['model'], num_classes=10, img_size=IMG, **arm['model_kwargs']),
                   (3, IMG, IMG)).macs


def main() -> None:
    parser = claim_parser(__doc__, 'sret', EPOCHS, TRAIN_IMAGES)
    args = parser.parse_args()
    root = Path(args.output)
    recipe = dict(RECIPE, data=args.data, epochs=args.epochs, train_images=args.train_images)

    teacher_epochs = max(1, round(args.epochs * TEACHER_EPOCHS / EPOCHS))
    teacher = train_once(root / 'teacher', **recipe | TEACHER | dict(epochs=teacher_epochs, seed=0))
    print(f'teacher {TEACHER["model"]}: {teacher["val_top1"]:.2f} % val top-1', flush=True)
    teacher_checkpoint = str(root / 'teacher' / 'best.safetensors')

    results = {name: [] for name in ARMS}
    for seed in args.seeds:
        for name, arm in ARMS.items():
            config = recipe | arm | dict(seed=seed)
            if 'kd' in arm:
                config |= dict(teacher=TEACHER['model'], teacher_kwargs=TEACHER['model_kwargs'],
                               teacher_checkpoint=teacher_checkpoint)
            results[name].append(train_once(root / FOLDERS[name] / f'seed{seed}', **config))
            print(f'seed {seed}, {name}: {results[name][-1]["val_top1"]:.2f} %', flush=True)

    counts = {name: macs(arm) for name, arm in ARMS.items()}
    base_params, base_macs = results[BASE][0]['params'], counts[BASE]
    extra = {name: {'MMACs': f'{counts[name] / 1e6:.1f}'} for name in ARMS}
    deit = 'DeiT-shaped, same params and MACs'
    lines = [
        '## SReT',
        '',
        f'Fashion-MNIST ({args.data}), {IMG} x {IMG} px, a stratified {args.train_images:,} training images, '
        f'validated on the 10,000 test images; {args.epochs} epochs per arm, seeds {", ".join(map(str, args.seeds))}; '
        f'teacher {TEACHER["model"]}, {teacher_epochs} epochs, {teacher["val_top1"]:.2f} % val top-1. The DeiT-shaped '
        f'arm has {results[deit][0]["params"] / base_params:.3f}x the parameters and '
        f'{counts[deit] / base_macs:.3f}x the MACs of the SReT arm. Generated by `python benchmarks/claims/sret.py`.',
        '',
        arms_table(results, args.seeds, PAIRS, extra=extra),
    ]
    publish(args.page, 'sret', f'SReT on Fashion-MNIST, {IMG} px', lines, results)


if __name__ == '__main__':
    main()
