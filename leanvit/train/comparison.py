"""Seeded comparisons: each arm of a table run once per seed, finished runs skipped, the table written with its
statistics into a results page.

A table is a folder of runs, ``ROOT/ARM/seedN/``. ``run_once`` calls the arm's training in such a folder and records
what it returned in ``result.json`` only when it returned, so a killed script, started again, skips every finished
run and resumes the unfinished one where its own checkpoints left it (``leanvit.train.engine``). A result recorded
for another configuration is refused rather than reused.

The statistics are those a reader needs to judge a difference measured over a few seeds: mean, sample standard
deviation and every seed's value per arm, and for two arms trained on the same seeds, the mean paired difference with
a paired t-test (``scipy.stats.ttest_rel``). With three seeds that test has two degrees of freedom: a p-value above
0.05 says the seeds do not separate the arms, not that they are equal.
"""

import argparse
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from leanvit.errors import RunDirectoryError
from leanvit.io.files import atomic_write, write_json

RESULT_FILE = 'result.json'


def run_once(directory: Path, settings: dict, run: Callable[[Path], dict]) -> dict:
    """``run(directory)``'s result, computed once: a later call with the same ``settings`` reads it back.

    Args:
        directory: The run's folder; ``run`` writes its checkpoints there.
        settings: What defines the run (JSON-serializable), stored with the result; a stored result whose settings
            differ is a ``RunDirectoryError`` naming both, so changing a script never silently mixes old results in.
        run: Trains (or resumes) in ``directory`` and returns a dict of finite numbers and strings.
    """
    record = directory / RESULT_FILE
    settings = json.loads(json.dumps(settings))  # as it reads back (tuples become lists)
    if record.is_file():
        try:
            stored = json.loads(record.read_text())
            stored_settings, result = stored['settings'], stored['result']
        except (ValueError, KeyError, TypeError) as e:
            raise RunDirectoryError(f'{record} is not a result this script wrote ({e}); delete it to run again') \
                from None
        if stored_settings != settings:
            raise RunDirectoryError(f'{record} was run with other settings: {stored_settings} (now: {settings}); '
                                    f'delete {directory} to run it again, or choose another output folder')
        return result
    result = run(directory)
    write_json(record, {'settings': settings, 'result': result})
    return result


def train_once(directory: Path, **config) -> dict:
    """Train ``TrainConfig(**config)`` in ``directory`` once (``run_once``); its final metrics and parameter count.

    Unless ``config`` says otherwise, a run takes every usable CPU, not fewer because something else was busy when it
    started: the runs of a table should differ only in what the table compares."""
    from leanvit.models import create_model
    from leanvit.profiler import count_params
    from leanvit.threads import usable_cpus
    from leanvit.train.config import TrainConfig
    from leanvit.train.engine import train

    def run(folder: Path) -> dict:
        final = train(TrainConfig(**{'threads': usable_cpus()} | config, output=str(folder), progress=False))
        spec = json.loads((folder / 'best.json').read_text())  # the model as the run built it
        model = create_model(spec['model'], **spec['model_kwargs'])
        return {'val_top1': final['val_top1'], 'val_top5': final['val_top5'], 'epochs': final['epoch'],
                'best_val_top1': spec['metrics']['top1'], 'params': count_params(model)}
    return run_once(directory, config, run)


@dataclass(frozen=True)
class Summary:
    """One arm over seeds."""
    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def sd(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.

    def __str__(self) -> str:
        return f'{self.mean:.2f} ± {self.sd:.2f}'

    def per_seed(self) -> str:
        return ' / '.join(f'{v:.2f}' for v in self.values)


@dataclass(frozen=True)
class PairedTest:
    """``a - b`` over seeds shared by both arms."""
    difference: float
    sd: float
    t: float
    p: float
    pairs: int

    def __str__(self) -> str:
        if self.pairs < 2:
            return f'{self.difference:+.2f} (one seed: no test)'
        if math.isnan(self.p):
            return f'{self.difference:+.2f} ± {self.sd:.2f} (identical differences: no test)'
        return f'{self.difference:+.2f} ± {self.sd:.2f}, t = {self.t:.2f}, p = {self.p:.3f}'


def paired_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """The paired t-test of ``a`` against ``b`` (the same seeds, in the same order)."""
    if len(a) != len(b):
        raise ValueError(f'a paired test needs one value per seed in both arms, got {len(a)} and {len(b)}')
    differences = [x - y for x, y in zip(a, b)]
    difference = statistics.fmean(differences)
    if len(differences) < 2:
        return PairedTest(difference, 0., math.nan, math.nan, len(differences))
    sd = statistics.stdev(differences)
    if sd == 0:  # t is undefined (0/0 or x/0); scipy would warn and return nan or inf
        return PairedTest(difference, 0., math.nan, math.nan, len(differences))
    from scipy.stats import ttest_rel  # scipy takes a moment to import: on use only

    test = ttest_rel(a, b)
    return PairedTest(difference, sd, float(test.statistic), float(test.pvalue), len(differences))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows]
    return '\n'.join(lines)


def write_section(page: Path, name: str, text: str) -> None:
    """Put ``text`` between the page's markers for ``name``, replacing what was there; add them at the end if new.

    Each script owns its section, so running one table again leaves the others as they were.
    """
    begin, end = f'<!-- begin {name}: generated by its script, do not edit -->', f'<!-- end {name} -->'
    content = page.read_text() if page.exists() else ''
    block = f'{begin}\n{text.rstrip()}\n{end}'
    start, stop = content.find(begin), content.find(end)
    if start >= 0 and stop > start:
        content = content[:start] + block + content[stop + len(end):]
    elif start >= 0 or stop >= 0:
        raise ValueError(f'{page}: the markers of section {name!r} are unpaired or out of order; fix them by hand')
    else:
        content = content.rstrip() + ('\n\n' if content.strip() else '') + block + '\n'

    def write(tmp):
        Path(tmp).write_text(content)
    atomic_write(page, write)


def plot_accuracy_params(path: Path, title: str, arms: dict[str, tuple[int, Summary]]) -> None:
    """Mean top-1 (with one sd over seeds as error bars) against parameters, one point per arm, as a PNG."""
    # A bare Figure, not pyplot: the caller's backend and figures stay untouched.
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 4))
    ax = fig.subplots()
    for index, (name, (params, summary)) in enumerate(arms.items()):
        ax.errorbar([params / 1e3], [summary.mean], yerr=[summary.sd], fmt='o', capsize=3, label=name,
                    color=f'C{index % 10}')
    ax.set(xlabel='parameters (thousands)', ylabel='val top-1 (%), mean ± sd over seeds', title=title)
    ax.grid(alpha=.3)
    ax.legend(fontsize=7, loc='best')
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=110))


def arms_table(results: dict[str, list[dict]], seeds: Sequence[int], pairs: Sequence[tuple[str, str]] = (),
               metric: str = 'val_top1', extra: dict[str, dict[str, object]] | None = None) -> str:
    """The markdown of a comparison: one row per arm (parameters, mean ± sd, per seed, any ``extra`` columns), then
    one row per paired test ``(a, b)`` of ``a - b``."""
    extra = extra or {}
    columns = list(dict.fromkeys(key for row in extra.values() for key in row))
    rows = []
    for name, runs in results.items():
        summary = Summary(tuple(r[metric] for r in runs))
        rows.append([name, f'{runs[0]["params"]:,}' if runs and 'params' in runs[0] else '-', summary,
                     summary.per_seed(), *(extra.get(name, {}).get(c, '-') for c in columns)])
    text = markdown_table(['arm', 'params', f'{metric} (%) mean ± sd', f'seeds {", ".join(map(str, seeds))}',
                           *columns], rows)
    if pairs:
        tests = [[f'{a} − {b}', paired_test([r[metric] for r in results[a]], [r[metric] for r in results[b]])]
                 for a, b in pairs]
        text += '\n\n' + markdown_table(['paired over seeds', 'difference (points), paired t-test'], tests)
    return text


def claim_parser(description: str, family: str, epochs: int, train_images: int) -> argparse.ArgumentParser:
    """The options every claim script of ``benchmarks/claims/`` takes, with its recipe's defaults."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--data', default='fashion-mnist', help='any --data of leanvit train with 10 classes')
    parser.add_argument('--epochs', type=int, default=epochs, help='epochs of each run (for a quick look)')
    parser.add_argument('--train-images', type=int, default=train_images)
    parser.add_argument('--output', default=f'runs/claims/{family}', help='where the runs are (and resume)')
    parser.add_argument('--page', default='docs/results.md', help='the results page whose section is written')
    return parser


def publish(page: str | Path, family: str, title: str, lines: list[str], results: dict[str, list[dict]]) -> None:
    """Write the family's section of the results page (``lines`` and its plot of accuracy against parameters) and
    print it."""
    page = Path(page)
    plot_accuracy_params(page.parent / 'results' / f'{family}.png', title,
                         {name: (runs[0]['params'], Summary(tuple(r['val_top1'] for r in runs)))
                          for name, runs in results.items() if 'params' in runs[0]})
    text = '\n'.join([*lines, '', f'![{title}: accuracy against parameters](results/{family}.png)'])
    write_section(page, family, text)
    print(text)
