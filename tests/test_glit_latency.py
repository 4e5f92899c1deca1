"""GLiT's latency table, the search under a latency budget, and the supernet's ranking check."""

import argparse
import json
import math

import pytest
from scipy.stats import kendalltau, spearmanr

from leanvit.argtypes import milliseconds
from leanvit.errors import RunDirectoryError, UsageError
from leanvit.methods.glit import latency
from leanvit.methods.glit.evolution import Budget, Candidate
from leanvit.methods.glit.latency import LatencyTable, load_or_measure, measure_architectures, prediction_errors
from leanvit.methods.glit.ranking import rank_correlation
from leanvit.methods.glit.search import glit_tiny_shaped, search
from leanvit.models.glit import GLIT_TINY, BlockArch, SearchSpace
from leanvit.train import TrainConfig

SPACE = SearchSpace()
TINY = dict(img_size=16, patch_size=8, embed_dim=12, num_heads=3, num_classes=4)


@pytest.fixture
def quick_timing(monkeypatch):
    monkeypatch.setattr(latency, 'ROUNDS', 2)
    monkeypatch.setattr(latency, 'ITERS', 2)


def toy_table(**changes) -> LatencyTable:
    blocks = {block: 0.1 * (i + 1) for i, block in enumerate(SPACE.all_blocks(3))}
    fields = dict(backend='eager', batch_size=1, geometry=TINY, depth=2, machine=latency.this_machine('eager', 1),
                  int8_method=None, fixed_ms=0.5, blocks=blocks)
    return LatencyTable(**fields | changes)


def test_prediction_is_the_fixed_part_plus_each_block():
    table = toy_table()
    a, b = SPACE.all_blocks(3)[0], SPACE.all_blocks(3)[5]
    assert table.predict((a, b)) == pytest.approx(0.5 + 0.1 + 0.6)
    assert table.range(2) == pytest.approx((0.5 + 2 * 0.1, 0.5 + 2 * 0.1 * len(SPACE.all_blocks(3))))


def test_table_round_trips_and_refuses_crafted_files():
    table = toy_table()
    record = json.loads(json.dumps(table.to_json()))
    assert LatencyTable.from_json(record, 'table.json') == table
    for field, value, message in (('fixed_ms', float('nan'), 'fixed_ms'), ('fixed_ms', -1, 'fixed_ms'),
                                  ('backend', 'tensorrt', 'backend'), ('depth', 0, 'depth'),
                                  ('blocks', [], 'blocks'), ('blocks', [{'global_heads': 3}], r'blocks\[0\]'),
                                  ('blocks', [{'global_heads': 'x', 'ms': 1}], 'global_heads')):
        with pytest.raises(RunDirectoryError, match=message):
            LatencyTable.from_json(dict(record, **{field: value}), 'table.json')
    with pytest.raises(RunDirectoryError, match='must hold the fields'):
        LatencyTable.from_json({k: v for k, v in record.items() if k != 'machine'}, 'table.json')


def test_table_is_measured_once_and_refused_on_another_machine(tmp_path, quick_timing, monkeypatch):
    path = tmp_path / 'eager-batch1.json'
    table = load_or_measure(path, SPACE, TINY, 2, 'eager', 1, threads=1)
    assert set(table.blocks) == set(SPACE.all_blocks(3))
    assert all(ms >= 0 and math.isfinite(ms) for ms in table.blocks.values()) and table.fixed_ms > 0
    assert table.machine == dict(latency.this_machine('eager', 1), busy_cpus=table.machine['busy_cpus'])

    def no_measuring(*args):
        raise AssertionError('measured again')
    monkeypatch.setattr(latency, 'measure_table', no_measuring)
    assert load_or_measure(path, SPACE, TINY, 2, 'eager', 1, threads=1) == table

    with pytest.raises(UsageError, match=r"threads 1 \(here: 2\)"):
        load_or_measure(path, SPACE, TINY, 2, 'eager', 1, threads=2)
    with pytest.raises(UsageError, match='batch_size 1 .here: 4.'):
        load_or_measure(path, SPACE, TINY, 2, 'eager', 4, threads=1)
    record = json.loads(path.read_text())
    path.write_text(json.dumps(dict(record, blocks=record['blocks'][1:])))
    with pytest.raises(RunDirectoryError, match='lacks 1 block choice'):
        load_or_measure(path, SPACE, TINY, 2, 'eager', 1, threads=1)
    record['machine']['cpu'] = 'Another CPU 9000'
    path.write_text(json.dumps(record))
    with pytest.raises(UsageError, match="cpu 'Another CPU 9000'.*on the machine, runtime and model"):
        load_or_measure(path, SPACE, TINY, 2, 'eager', 1, threads=1)
    with pytest.raises(UsageError, match='--backend'):
        load_or_measure(path, SPACE, TINY, 2, 'tensorrt', 1, threads=1)


def test_whole_models_are_timed_in_the_tables_runtime(quick_timing):
    archs = [(SPACE.all_blocks(3)[0],) * 2, (SPACE.all_blocks(3)[-1],) * 2]
    for backend in ('eager', 'onnx'):
        timed = measure_architectures(archs, toy_table(backend=backend, machine=latency.this_machine(backend, 1)))
        assert len(timed) == 2 and all(ms > 0 and math.isfinite(ms) for ms in timed)


def test_prediction_errors():
    errors = prediction_errors([1.1, 0.8, 1.0], [1.0, 1.0, 1.0])
    assert errors['count'] == 3
    assert errors['median_abs_percent'] == pytest.approx(10.)
    assert errors['worst_percent'] == pytest.approx(-20.)


def test_latency_budget_and_candidates_with_and_without_latency():
    budget = Budget(latency_ms=2.)
    assert budget.admits(1e9, 10**9, 1.5) and not budget.admits(0, 0, 2.5)
    assert not budget.admits(0, 0)  # no prediction: a latency budget cannot be met
    assert Budget(macs=10).admits(5, 0) and str(budget) == '2 ms'
    record = Candidate((BlockArch(1),), 50., 1e6, 1000, 'flat', 0, 1.25).to_json()
    assert Candidate.from_json(record).latency_ms == 1.25
    old = {k: v for k, v in record.items() if k != 'latency_ms'}  # a log written before latencies
    assert Candidate.from_json(old).latency_ms is None
    with pytest.raises(ValueError, match='"latency_ms" must be a finite number >= 0 or null'):
        Candidate.from_json(dict(record, latency_ms=-1.))


@pytest.mark.parametrize('text, expected', [('12ms', 12.), ('0.8ms', .8), ('1.5s', 1500.), ('250us', .25),
                                            ('3', 3.)])
def test_milliseconds_argument(text, expected):
    assert milliseconds(text) == pytest.approx(expected)


@pytest.mark.parametrize('text', ['fast', '-2ms', '0', 'nanms', '12 parsecs'])
def test_milliseconds_argument_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError, match='duration'):
        milliseconds(text)


def test_glit_tiny_shaped():
    assert glit_tiny_shaped(12) == GLIT_TINY
    assert glit_tiny_shaped(6) == GLIT_TINY[::2]
    assert [b.global_heads for b in glit_tiny_shaped(6, num_heads=6)] == [2 * b.global_heads for b in GLIT_TINY[::2]]


def test_rank_correlation_is_scipys():
    proxy, truth = [1., 3., 2., 5., 4.], [10., 20., 40., 30., 50.]
    corr = rank_correlation(proxy, truth)
    assert corr['kendall_tau'] == pytest.approx(kendalltau(proxy, truth).statistic)
    assert corr['spearman_p'] == pytest.approx(spearmanr(proxy, truth).pvalue)
    assert rank_correlation([1., 1., 1.], [1., 2., 3.]) == dict(architectures=3, kendall_tau=0., kendall_p=1.,
                                                                spearman_rho=0., spearman_p=1.)


def test_search_under_a_latency_budget_with_rank_check(tmp_path, quick_timing):
    config = TrainConfig(img_size=32, output=str(tmp_path / 'search'), epochs=1, batch_size=128, progress=False,
                         threads=1, model_kwargs=dict(patch_size=8, embed_dim=12, depth=2), log='tensorboard')
    from leanvit.methods.glit.evolution import EvolutionSettings
    settings = EvolutionSettings(population=3, parents=2, generations=2)
    with pytest.raises(UsageError, match=r'budget-latency 1e-06ms is below the cheapest architecture'):
        search(config, budget=Budget(latency_ms=1e-6), settings=settings, backend='eager')
    assert not (tmp_path / 'search' / 'supernet').exists()  # refused before the supernet trained
    table = LatencyTable.from_json(json.loads((tmp_path / 'search' / 'latency' / 'eager-batch1.json').read_text()),
                                   'table')
    budget = Budget(latency_ms=sum(table.range(2)) / 2)
    summary = search(config, budget=budget, settings=settings, calib_batches=1, backend='eager', random_baselines=2,
                     rank_check=2, rank_check_epochs=1)
    folder = tmp_path / 'search' / 'hierarchical'
    measured = summary['latency']['measured']
    assert [r['role'] for r in measured][0] == 'best' and [r['role'] for r in measured][-1] == 'glit-tiny-shaped'
    assert sum(r['role'] == 'random' for r in measured) == 2
    assert all(r['within_budget'] for r in measured if r['role'] != 'glit-tiny-shaped')
    assert summary['best']['latency_ms'] <= budget.latency_ms
    assert summary['latency']['prediction_error']['count'] == len(measured)
    rows = [line.split(',') for line in (folder / 'candidates.csv').read_text().splitlines()]
    assert rows[0][5:7] == ['predicted_latency_ms', 'measured_latency_ms']
    assert all(row[5] for row in rows[1:]) and any(row[6] for row in rows[1:])
    assert (folder / 'pareto.png').stat().st_size > 0
    best = json.loads((folder / 'best_arch.json').read_text())
    assert best['measured_latency_ms'] == measured[0]['measured_ms']
    # --log: every candidate's predicted latency, and the measured one of those timed, in TensorBoard.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logged = EventAccumulator(str(folder / 'tensorboard'), size_guidance={'scalars': 0}).Reload()
    scored = [json.loads(line) for line in (folder / 'candidates.jsonl').read_text().splitlines()]
    assert [(e.step, e.value) for e in logged.Scalars('candidate/predicted_latency_ms')] == \
        [(i, pytest.approx(c['latency_ms'])) for i, c in enumerate(scored, 1)]
    timed = {json.dumps(r['arch']): r['measured_ms'] for r in measured}
    assert [(e.step, e.value) for e in logged.Scalars('candidate/measured_latency_ms')] == \
        [(i, pytest.approx(timed[json.dumps(c['arch'])])) for i, c in enumerate(scored, 1)
         if json.dumps(c['arch']) in timed]
    assert [e.step for e in logged.Images('search/pareto')] == [len(scored)]
    check = summary['rank_check']
    assert check['architectures'] == 2 and -1 <= check['kendall_tau'] <= 1
    assert len(json.loads((tmp_path / 'search' / 'rank_check' / 'rank_check.json').read_text())['rows']) == 2


def test_cli_refuses_latency_options_without_a_latency_budget(capsys, tmp_path):
    from leanvit.cli import main
    for option in (['--backend', 'eager'], ['--latency-batch', '4']):
        assert main(['search', *option, '--output', str(tmp_path / 's')]) == 2
        assert 'give --budget-latency' in capsys.readouterr().err
    assert not (tmp_path / 's').exists()


def test_other_processes_wait_for_rank_zeros_table(tmp_path):
    from leanvit.methods.glit.search import _wait_for
    with pytest.raises(TimeoutError, match='rank 0'):
        _wait_for(tmp_path / 'onnx-batch1.json', timeout_s=0.05)
    (tmp_path / 'onnx-batch1.json').write_text('{}')
    _wait_for(tmp_path / 'onnx-batch1.json', timeout_s=0.05)


def test_rank_check_refused_under_torchrun_before_anything_trains(tmp_path, monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    config = TrainConfig(img_size=32, output=str(tmp_path / 'search'), epochs=1, progress=False,
                         model_kwargs=dict(patch_size=8, embed_dim=12, depth=2))
    with pytest.raises(UsageError, match='--rank-check.*without torchrun'):
        search(config, rank_check=3)
    assert not (tmp_path / 'search' / 'supernet').exists()


def test_cli_search_takes_a_latency_budget_and_refuses_one_outside_the_space(capsys, tmp_path, quick_timing):
    from leanvit.cli import main
    output = tmp_path / 's'
    code = main(['search', '--budget-latency', '1000s', '--backend', 'eager', '--img-size', '16', '--threads', '1',
                 '--model-kwargs', '{"patch_size": 8, "embed_dim": 12, "depth": 2}', '--output', str(output)])
    assert code == 2
    assert 'budget-latency 1e+06ms is above the dearest architecture' in capsys.readouterr().err
    assert (output / 'latency' / 'eager-batch1.json').exists() and not (output / 'supernet').exists()
    assert main(['search', '--rank-check-epochs', '2', '--output', str(output)]) == 2
    assert 'give --rank-check too' in capsys.readouterr().err
