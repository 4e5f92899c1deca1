"""Seeded comparisons: finished runs are skipped, changed settings refused, statistics against scipy's and by hand."""

import math
import statistics

import pytest
from scipy.stats import ttest_rel

from leanvit.errors import RunDirectoryError
from leanvit.train.comparison import Summary, markdown_table, paired_test, plot_accuracy_params, run_once, write_section


def test_run_once_skips_a_finished_run_and_reruns_an_unfinished_one(tmp_path):
    calls = []

    def run(directory):
        calls.append(directory)
        return {'val_top1': 91.5}

    assert run_once(tmp_path / 'a' / 'seed0', {'epochs': 3}, run) == {'val_top1': 91.5}
    assert run_once(tmp_path / 'a' / 'seed0', {'epochs': 3}, run) == {'val_top1': 91.5}
    assert len(calls) == 1

    def killed(directory):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_once(tmp_path / 'b' / 'seed0', {'epochs': 3}, killed)
    assert not (tmp_path / 'b' / 'seed0' / 'result.json').exists()  # nothing recorded: the next call runs it
    assert run_once(tmp_path / 'b' / 'seed0', {'epochs': 3}, run) == {'val_top1': 91.5}
    assert len(calls) == 2


def test_run_once_refuses_a_result_of_other_settings_or_a_crafted_file(tmp_path):
    run_once(tmp_path, {'epochs': 3}, lambda d: {'val_top1': 1.})
    with pytest.raises(RunDirectoryError, match=r"other settings: \{'epochs': 3\} \(now: \{'epochs': 4\}\)"):
        run_once(tmp_path, {'epochs': 4}, lambda d: {'val_top1': 2.})
    (tmp_path / 'result.json').write_text('[1, 2]')
    with pytest.raises(RunDirectoryError, match='is not a result this script wrote'):
        run_once(tmp_path, {'epochs': 3}, lambda d: {'val_top1': 2.})
    (tmp_path / 'result.json').write_text('{"settings": ')
    with pytest.raises(RunDirectoryError, match='is not a result this script wrote'):
        run_once(tmp_path, {'epochs': 3}, lambda d: {'val_top1': 2.})


def test_run_once_refuses_to_record_a_non_finite_result(tmp_path):
    with pytest.raises(ValueError, match='val_top1'):
        run_once(tmp_path, {}, lambda d: {'val_top1': math.nan})
    assert not (tmp_path / 'result.json').exists()


def test_summary_and_paired_test_match_statistics_and_scipy():
    a, b = [90.1, 91.3, 89.8], [88.0, 90.2, 88.9]
    s = Summary(tuple(a))
    assert s.mean == pytest.approx(statistics.mean(a)) and s.sd == pytest.approx(statistics.stdev(a))
    assert str(s) == f'{statistics.mean(a):.2f} ± {statistics.stdev(a):.2f}'
    assert s.per_seed() == '90.10 / 91.30 / 89.80'
    test = paired_test(a, b)
    reference = ttest_rel(a, b)
    assert test.t == pytest.approx(reference.statistic) and test.p == pytest.approx(reference.pvalue)
    assert test.difference == pytest.approx(statistics.mean([x - y for x, y in zip(a, b)]))
    assert f'p = {reference.pvalue:.3f}' in str(test)


def test_paired_test_edge_cases_say_why_there_is_no_test():
    assert 'identical differences' in str(paired_test([2., 3.], [1., 2.]))
    assert 'one seed' in str(paired_test([2.], [1.]))
    with pytest.raises(ValueError, match='one value per seed in both arms, got 2 and 3'):
        paired_test([1., 2.], [1., 2., 3.])


def test_write_section_replaces_only_its_own_section(tmp_path):
    page = tmp_path / 'results.md'
    page.write_text('# Results\n\nIntro.\n')
    write_section(page, 'sret', 'SReT table v1')
    write_section(page, 'glit', 'GLiT table')
    write_section(page, 'sret', 'SReT table v2')
    text = page.read_text()
    assert text.startswith('# Results\n\nIntro.\n')
    assert 'SReT table v2' in text and 'SReT table v1' not in text and 'GLiT table' in text
    assert text.index('SReT table v2') < text.index('GLiT table')
    page.write_text(text.replace('<!-- end sret -->', ''))
    with pytest.raises(ValueError, match="markers of section 'sret' are unpaired"):
        write_section(page, 'sret', 'v3')


def test_markdown_table_and_plot(tmp_path):
    assert markdown_table(['arm', 'top-1'], [['a', 1], ['b', 2]]) == '| arm | top-1 |\n|---|---|\n| a | 1 |\n| b | 2 |'
    plot_accuracy_params(tmp_path / 'p.png', 'title', {'a': (1000, Summary((1., 2.))), 'b': (2000, Summary((3.,)))})
    assert (tmp_path / 'p.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
