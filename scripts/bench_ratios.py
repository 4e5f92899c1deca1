"""The deployment ratios of a `leanvit bench` CSV, as a Markdown table: per model and batch size, how each runtime
compares with the one it replaces (docs/deploy.md's tables come from this).

Each ratio divides two runners' "x baseline" figures, each the median over rounds of a within-round ratio to the
same baseline runner, so the CPU's drift between rounds cancels as it does in the bench itself.

Usage: python scripts/bench_ratios.py benchmarks/bench/bench.csv [more.csv ...]
"""

import csv
import sys
from collections import defaultdict

# (numerator, denominator, column title): throughput ratios, then one size ratio.
SPEED = (('onnx', 'folded', 'ONNX / folded eager'), ('onnx', 'onnx-plain', 'ONNX / plain export'),
         ('onnx-int8', 'onnx', 'INT8 / ONNX'), ('compile', 'folded', 'compile / folded eager'))


def table(path: str) -> str:
    rows = list(csv.DictReader(open(path)))
    by = defaultdict(dict)
    for row in rows:
        by[(row['model'], int(row['batch_size']))][row['backend']] = row
    speed = [(a, b, title) for a, b, title in SPEED if any(a in r and b in r for r in by.values())]
    first = rows[0]
    lines = [f'{first["cpu"]}, {first["threads"]} thread{"s" if first["threads"] != "1" else ""}, '
             f'{first["rounds"]} rounds; from {path}.', '',
             '| model | batch | ' + ' | '.join(title for _, _, title in speed) + ' | INT8 / ONNX file |',
             '|---|--:|' + '--:|' * (len(speed) + 1)]
    for (model, batch), backends in by.items():
        cells = []
        for a, b, _ in speed:
            if a in backends and b in backends:
                cells.append(f'{float(backends[a]["ratio_to_baseline"]) / float(backends[b]["ratio_to_baseline"]):.2f}')
            else:
                cells.append('-')
        sizes = backends.get('onnx-int8', {}).get('file_bytes'), backends.get('onnx', {}).get('file_bytes')
        cells.append(f'{int(sizes[0]) / int(sizes[1]):.2f}' if all(sizes) else '-')
        if len(backends) > 1:  # the baseline alone has nothing to compare
            lines.append(f'| {model} | {batch} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


if __name__ == '__main__':
    print('\n\n'.join(table(path) for path in sys.argv[1:]))
