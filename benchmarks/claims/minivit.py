"""MiniViT's claim on Fashion-MNIST, over seeds: a weight-multiplexed student compressed from a trained teacher
(share 2) keeps the teacher's accuracy with about half its parameters, and does better than the same student trained
from scratch; with and without weight distillation, at equal epochs (Zhang et al., "MiniViT: Compressing Vision
Transformers with Weight Multiplexing", CVPR 2022; docs/minivit.md).

Per seed: a DeiT-style teacher (timm ViT, no class token, average pooling; width 64, depth 8, 2 heads, 8 x 8
patches, so 4 x 4 tokens) trained on labels, then four students of the same multiplexed architecture (`leanvit
compress`'s: blocks shared in pairs, per-layer norms and attention transformations, 2 heads, no relative positions):
  - compressed + weight distillation: started from the multiplexed teacher, trained with prediction (soft
    cross-entropy, alpha 0.5) and attention-relation and hidden-state distillation (`leanvit compress`'s default);
  - compressed, labels only: the same start, no teacher while training;
  - scratch + weight distillation: random start, the same distillation;
  - scratch, labels only: random start, labels alone (`leanvit compress --from-scratch`).

One recipe: 32 x 32 inputs, a stratified 6,000 of the 60,000 training images, the whole 10,000-image test split for
validation, 5 epochs for every model (teacher included) of AdamW (lr 2e-3, one warm-up epoch, cosine, weight decay
0.05), batch 64. About 25 minutes on one core; a killed script resumes, skipping finished runs.

    python -m leanvit.io.fashion_mnist          # once: the data
    python benchmarks/claims/minivit.py [--seeds 0 1 2] [--output runs/claims/minivit]
"""

import json
from pathlib import Path

from leanvit.methods.minivit.multiplex import MULTIPLEXED, RECORD, compress
from leanvit.threads import usable_cpus
from leanvit.train import TrainConfig
from leanvit.train.comparison import arms_table, claim_parser, publish, run_once, train_once

IMG, TRAIN_IMAGES, EPOCHS = 32, 6_000, 5
RECIPE = dict(img_size=IMG, train_images=TRAIN_IMAGES, batch_size=64, opt='adamw', lr=2e-3, warmup_epochs=1,
              weight_decay=0.05, sched='cosine')
TEACHER = dict(model='vit_tiny_patch16_224', model_kwargs=dict(patch_size=8, embed_dim=64, depth=8, num_heads=2,
                                                                class_token=False, global_pool='avg', fc_norm=False))
DISTILLATION = dict(kd='soft_ce', kd_alpha=0.5, objectives={'weight_distillation': {}})
TEACHER_ROW = 'teacher (DeiT-style)'
ARMS = ('compressed + weight distillation', 'compressed, labels only', 'scratch + weight distillation',
        'scratch, labels only')
FOLDERS = dict(zip(ARMS, ('compressed_wd', 'compressed_labels', 'scratch_wd', 'scratch_labels')))


def main() -> None:
    parser = claim_parser(__doc__, 'minivit', EPOCHS, TRAIN_IMAGES)
    args = parser.parse_args()
    root = Path(args.output)
    recipe = dict(RECIPE, data=args.data, epochs=args.epochs, train_images=args.train_images)

    results = {TEACHER_ROW: [], **{name: [] for name in ARMS}}
    agreement = []
    for seed in args.seeds:
        teacher_folder = root / 'teacher' / f'seed{seed}'
        results[TEACHER_ROW].append(train_once(teacher_folder, **recipe | TEACHER | dict(seed=seed)))
        with_teacher = dict(teacher=TEACHER['model'], teacher_kwargs=TEACHER['model_kwargs'],
                            teacher_checkpoint=str(teacher_folder / 'best.safetensors'))
        base = recipe | dict(seed=seed)

        # `leanvit compress`: multiplex the teacher, then train the student with weight distillation.
        compressed = root / FOLDERS[ARMS[0]] / f'seed{seed}'

        def compress_run(folder, config=base | DISTILLATION | with_teacher):
            final = compress(TrainConfig(**config, output=str(folder), progress=False, threads=usable_cpus()),
                             share=2)
            report = json.loads((folder / RECORD).read_text())
            return {'val_top1': final['val_top1'], 'params': report['report']['student_params'],
                    'untrained_top1_agreement': report['untrained_agreement']['top1_agreement']}
        results[ARMS[0]].append(run_once(compressed, base | DISTILLATION | with_teacher | {'share': 2}, compress_run))
        agreement.append(results[ARMS[0]][-1]['untrained_top1_agreement'])
        student = json.loads((compressed / RECORD).read_text())['report']
        kwargs = {k: v for k, v in student['model_kwargs'].items() if k not in ('num_classes', 'pretrained')}
        architecture = dict(model=student['model'], model_kwargs=kwargs)

        results[ARMS[1]].append(train_once(root / FOLDERS[ARMS[1]] / f'seed{seed}', **base | architecture | dict(
            init_checkpoint=str(compressed / MULTIPLEXED))))
        results[ARMS[2]].append(train_once(root / FOLDERS[ARMS[2]] / f'seed{seed}',
                                           **base | architecture | DISTILLATION | with_teacher))
        results[ARMS[3]].append(train_once(root / FOLDERS[ARMS[3]] / f'seed{seed}', **base | architecture))
        print(f'seed {seed}: ' + ', '.join(f'{name} {runs[-1]["val_top1"]:.2f} %' for name, runs in results.items()),
              flush=True)

    pairs = [(ARMS[0], ARMS[2]), (ARMS[0], ARMS[1]), (ARMS[2], ARMS[3]), (ARMS[0], TEACHER_ROW)]
    lines = [
        '## MiniViT',
        '',
        f'Fashion-MNIST, {IMG} x {IMG} px, a stratified {args.train_images:,} training images, validated on the '
        f'10,000 test images; {args.epochs} epochs for every model, seeds {", ".join(map(str, args.seeds))}. The '
        f'students share blocks in pairs (share 2). Before any training, the multiplexed student agrees with its '
        f'teacher on {", ".join(f"{a:.1%}" for a in agreement)} of the validation images (top-1, per seed). '
        f'Generated by `python benchmarks/claims/minivit.py`.',
        '',
        arms_table(results, args.seeds, pairs),
    ]
    publish(args.page, 'minivit', f'MiniViT on Fashion-MNIST, {IMG} px', lines, results)


if __name__ == '__main__':
    main()
