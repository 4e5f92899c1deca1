"""Markdown summary of a `make demo` run, for the README: what was trained, what it reached, what it costs.

Usage: python scripts/demo_report.py runs/demo
"""

import json
import sys
from pathlib import Path

import leanvit


def main(run: Path) -> None:
    rows = ['| run | model | val top-1 (%) | val top-5 (%) | params | GMACs | train images/s | eval images/s |',
            '|---|---|---|---|---|---|---|---|']
    for part in ('teacher', 'student'):
        final = json.loads((run / part / 'final.json').read_text())
        meta = json.loads((run / part / 'best.json').read_text())
        evaluation = json.loads((run / part / 'eval_best.safetensors.json').read_text())
        model = leanvit.create_model(meta['model'], **meta['model_kwargs'])
        size = meta['model_kwargs'].get('img_size') or model.pretrained_cfg['input_size'][-1]
        cost = leanvit.profile(model, (3, size, size))
        rows.append(f'| {part} | {meta["model"]} at {size}px | {evaluation["top1"]:.2f} | {evaluation["top5"]:.2f} | '
                    f'{cost.params:,} | {cost.gmacs:.4f} | {final["train_images_per_s"]:.0f} | '
                    f'{evaluation["images_per_s"]:.0f} |')
    config = json.loads((run / 'student' / 'best.json').read_text())['config']
    print(f'`make demo` trains the teacher, then distils the student with `{config["kd"]}` '
          f'(alpha {config["kd_alpha"]}, tau {config["kd_tau"]}) on the embedded digits (1,437 train / 360 val '
          f'images). Best checkpoints, evaluated by `leanvit eval`:\n')
    print('\n'.join(rows))


if __name__ == '__main__':
    main(Path(sys.argv[1]))
