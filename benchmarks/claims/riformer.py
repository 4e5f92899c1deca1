"""RIFormer's claim on Fashion-MNIST, over seeds: a MetaFormer with no token mixer at inference, trained with the
paper's recipe, recovers the accuracy of its token-mixer teacher (Wang et al., "RIFormer: Keep Your Vision Backbone
Effective but Removing Token Mixer", CVPR 2023; docs/riformer.md).

Per seed: the PoolFormer teacher (pooling mixer), then the student (affine mixer while training, none after
``reparameterize()``) four times, adding one part of the recipe each time (recipes/digits_riformer.yaml's settings):
  1. supervised: labels only, label smoothing 0.1, no teacher;
  2. + soft KD: the teacher's soft labels only (soft cross-entropy, no ground truth);
  3. + module imitation: block-output, mixer-output and relation terms, weight 1 each;
  4. + teacher weights: the student starts from every non-mixer weight of the teacher (the full recipe).
Every student is scored after ``reparameterize()`` (no token mixer), and that score is checked to equal the training
form's on the validation split.

One recipe: PoolFormer-S12's layout (depths 2, 2, 6, 2) at widths 24 / 48 / 96 / 192 (1.3 M parameters), 32 x 32
inputs, a stratified 10,000 of the 60,000 training images, the whole 10,000-image test split for validation, 5 epochs
of AdamW (lr 4e-3, one warm-up epoch, cosine, weight decay 0.05), batch 64; the teacher trains the same way with
label smoothing 0.1. About 20 minutes on 2 cores; a killed script resumes, skipping finished runs.

    python -m leanvit.io.fashion_mnist          # once: the data
    python benchmarks/claims/riformer.py [--seeds 0 1 2] [--output runs/claims/riformer]
"""

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import leanvit
from leanvit.io.data import build_datasets
from leanvit.train.comparison import arms_table, claim_parser, publish, run_once, train_once
from leanvit.train.evaluation import data_config, evaluate_model

IMG, TRAIN_IMAGES, EPOCHS = 32, 10_000, 5
LAYOUT = dict(depths=[2, 2, 6, 2], dims=[24, 48, 96, 192])
RECIPE = dict(model='riformer_s12', model_kwargs=LAYOUT, img_size=IMG, train_images=TRAIN_IMAGES, batch_size=64,
              opt='adamw', lr=4e-3, warmup_epochs=1, weight_decay=0.05, sched='cosine', min_lr=1e-5)
TEACHER = dict(model='riformer_s12', model_kwargs=LAYOUT | dict(token_mixer='pooling'), smoothing=0.1)
DISTILLED = dict(kd='soft_ce', kd_alpha=1.0, kd_tau=1.0)
IMITATION = dict(objectives={'module_imitation': dict(block_output=1.0, mixer_output=1.0, relation=1.0)})
RUNGS = {
    'supervised': dict(smoothing=0.1),
    '+ soft KD': DISTILLED,
    '+ module imitation': DISTILLED | IMITATION,
    '+ teacher weights': DISTILLED | IMITATION | dict(init_from_teacher=True),
}
FOLDERS = dict(zip(RUNGS, ('supervised', 'soft_kd', 'module_imitation', 'teacher_weights')))
TEACHER_ROW = 'PoolFormer teacher (pooling mixer)'


def deploy_top1(folder: Path, data: str) -> dict:
    """Val top-1 of a run's final weights in training form and after reparameterize() (no token mixer)."""
    spec = json.loads((folder / 'best.json').read_text())
    tag = json.loads((folder / 'latest.json').read_text())['tag']
    model = leanvit.create_model(spec['model'], **spec['model_kwargs'])
    leanvit.load_checkpoint(model, folder / f'{tag}.safetensors')
    bundle = build_datasets(data, data_config(model, IMG), augment='none')
    loader = DataLoader(bundle.val, 256)
    trained = evaluate_model(model, loader, torch.device('cpu')).metrics()['top1']
    deployed = evaluate_model(model.reparameterize(), loader, torch.device('cpu')).metrics()['top1']
    if abs(deployed - trained) > 100 / len(bundle.val) * 2:  # two images' worth: float reassociation only
        raise AssertionError(f'{folder}: the deploy model scores {deployed:.2f}% against {trained:.2f}% in training '
                             f'form')
    return {'trained_top1': trained, 'deploy_top1': deployed}


def main() -> None:
    parser = claim_parser(__doc__, 'riformer', EPOCHS, TRAIN_IMAGES)
    args = parser.parse_args()
    root = Path(args.output)
    recipe = dict(RECIPE, data=args.data, epochs=args.epochs, train_images=args.train_images)

    results = {TEACHER_ROW: [], **{name: [] for name in RUNGS}}
    for seed in args.seeds:
        teacher_folder = root / 'teacher' / f'seed{seed}'
        results[TEACHER_ROW].append(train_once(teacher_folder, **recipe | TEACHER | dict(seed=seed)))
        with_teacher = dict(teacher=TEACHER['model'], teacher_kwargs=TEACHER['model_kwargs'],
                            teacher_checkpoint=str(teacher_folder / 'best.safetensors'))
        for name, rung in RUNGS.items():
            folder = root / FOLDERS[name] / f'seed{seed}'
            config = recipe | rung | dict(seed=seed) | (with_teacher if 'kd' in rung else {})
            result = train_once(folder, **config)
            deployed = run_once(folder / 'deploy', {'data': args.data}, lambda _: deploy_top1(folder, args.data))
            results[name].append(result | {'val_top1': deployed['deploy_top1']})
            print(f'seed {seed}, {name}: {deployed["deploy_top1"]:.2f} % without token mixer', flush=True)

    names = list(RUNGS)
    pairs = [(b, a) for a, b in zip(names, names[1:])] + [('+ teacher weights', TEACHER_ROW)]
    lines = [
        '## RIFormer',
        '',
        f'Fashion-MNIST, {IMG} x {IMG} px, a stratified {args.train_images:,} training images, validated on the 10,000 '
        f'test images; {args.epochs} epochs per model, seeds {", ".join(map(str, args.seeds))}; PoolFormer-S12 layout '
        f'at widths {"/".join(map(str, LAYOUT["dims"]))}. Students are scored after `reparameterize()`, with no token '
        f'mixer (checked equal to the training form). Each rung adds one part of the recipe to the one above; the last '
        f'paired row compares the full recipe with its teacher. Generated by `python benchmarks/claims/riformer.py`.',
        '',
        arms_table(results, args.seeds, pairs),
    ]
    publish(args.page, 'riformer', f'RIFormer on Fashion-MNIST, {IMG} px', lines, results)


if __name__ == '__main__':
    main()
