"""--log tensorboard / mlflow: what a run, a resumed run, a compression and a search log, read back through
TensorBoard's and MLflow's own readers and compared with the run's own files."""

import csv
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from leanvit.cli import main
from leanvit.errors import RunDirectoryError, UsageError
from leanvit.methods.glit.evolution import Budget, EvolutionSettings
from leanvit.methods.glit.search import search
from leanvit.train import TrainConfig, train
from leanvit.train import engine as engine_module
from leanvit.train.tracking import Tracker

TINY = dict(model='test_sret', img_size=32, batch_size=64, epochs=2, lr=2e-3, warmup_epochs=0, progress=False,
            num_workers=0, threads=1)
STEPS_PER_EPOCH = 1437 // 64  # 22


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path, monkeypatch):
    """A store of the test's own, as a user points MLflow at one."""
    uri = f'sqlite:///{tmp_path / "mlflow.db"}'
    monkeypatch.setenv('MLFLOW_TRACKING_URI', uri)
    monkeypatch.chdir(tmp_path)  # MLflow puts a sqlite store's artifacts in ./mlruns
    return uri


def events(folder) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder / 'tensorboard'), size_guidance={'scalars': 0, 'images': 0,
                                                                               'tensors': 0})
    return accumulator.Reload()


def tb_series(folder, tag) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in events(folder).Scalars(tag)]


def mlflow_run(folder, uri):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run_id = json.loads((folder / 'tracking.json').read_text())['mlflow']['run_id']
    return client, run_id


def mlflow_series(client, run_id, key) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def summary_rows(folder) -> list[dict]:
    with open(folder / 'summary.csv') as f:
        return list(csv.DictReader(f))


def test_a_run_logs_its_curves_settings_images_and_checkpoint(tmp_path, mlflow_store):
    output = tmp_path / 'run'
    train(TrainConfig(**TINY, output=str(output), log='tensorboard,mlflow'))
    rows = summary_rows(output)
    epoch_ends = [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    expected_val = [(step, pytest.approx(float(row['val_top1']))) for step, row in zip(epoch_ends, rows)]
    client, run_id = mlflow_run(output, mlflow_store)
    for series in (tb_series(output, 'val/top1'), mlflow_series(client, run_id, 'val/top1')):
        assert series == expected_val
    # Training scalars every 10 steps and at each epoch's end; the loss of a label run is its one term.
    logged_steps = [10, 20, 22, 32, 42, 44]
    for tag in ('train/loss', 'train/loss/labels', 'train/lr', 'train/grad_norm', 'train/images_per_s'):
        assert [step for step, _ in tb_series(output, tag)] == logged_steps, tag
        assert [step for step, _ in mlflow_series(client, run_id, tag)] == logged_steps, tag
    assert [v for _, v in tb_series(output, 'train/loss')] == \
        pytest.approx([v for _, v in tb_series(output, 'train/loss/labels')])
    assert all(norm > 0 for _, norm in tb_series(output, 'train/grad_norm'))
    lr = [value for _, value in mlflow_series(client, run_id, 'train/lr')]
    assert lr[0] <= TINY['lr'] and lr == sorted(lr, reverse=True)  # the cosine schedule, decaying
    assert tb_series(output, 'train/epoch_loss') == [(s, pytest.approx(float(r['train_loss'])))
                                                     for s, r in zip(epoch_ends, rows)]

    # Settings and versions: TensorBoard's HParams, MLflow's params; the YAML as text / artifact.
    contents = events(output).PluginTagToContent('hparams')
    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        contents['_hparams_/session_start_info']).session_start_info.hparams
    experiment = plugin_data_pb2.HParamsPluginData.FromString(contents['_hparams_/experiment']).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ['val/top1', 'val/top5', 'val/loss']
    assert hparams['model'].string_value == 'test_sret' and hparams['lr'].number_value == TINY['lr']
    assert hparams['version.torch'].string_value == torch.__version__
    run = client.get_run(run_id)
    assert run.data.params['model'] == 'test_sret' and float(run.data.params['lr']) == TINY['lr']
    assert run.data.params['version.timm'] and run.data.params['log'] == 'tensorboard,mlflow'
    assert run.info.status == 'FINISHED' and run.info.run_name == f'{tmp_path.name}/run'
    (tmp_path / 'download').mkdir()
    logged_yaml = open(client.download_artifacts(run_id, 'config.yaml', str(tmp_path / 'download'))).read()
    assert logged_yaml == (output / 'config.yaml').read_text()

    # Images: the confusion matrix of each epoch, the curves at the end.
    images = events(output).Images('val/confusion_matrix')
    assert [image.step for image in images] == epoch_ends and images[0].width > 100
    assert [image.step for image in events(output).Images('curves/accuracy')] == [44]
    artifacts = {a.path for a in client.list_artifacts(run_id, 'images/val/confusion_matrix')}
    assert artifacts == {f'images/val/confusion_matrix/step-{s:07d}.png' for s in epoch_ends}
    # The best checkpoint, byte for byte.
    kept = client.download_artifacts(run_id, 'run/best.safetensors', str(tmp_path / 'download'))
    assert open(kept, 'rb').read() == (output / 'best.safetensors').read_bytes()


def test_logging_changes_nothing_the_run_computes(tmp_path):
    from safetensors.torch import load_file

    for log in (None, 'tensorboard'):
        train(TrainConfig(**dict(TINY, epochs=1), output=str(tmp_path / str(log)), log=log))
    plain, logged = (load_file(tmp_path / name / 'best.safetensors') for name in ('None', 'tensorboard'))
    assert plain.keys() == logged.keys() and all(torch.equal(plain[k], logged[k]) for k in plain)


def test_a_killed_run_resumes_its_curves_without_duplicate_steps(tmp_path, mlflow_store, monkeypatch):
    train(TrainConfig(**TINY, output=str(tmp_path / 'reference'), log='tensorboard,mlflow'))
    # Killed after epoch 2 was logged but before its checkpoint: epoch 2 is trained, and logged, again.
    save = engine_module.save_checkpoint

    def killed_at_the_second_epoch(run, progress, *args):
        if progress.epoch == 2:
            raise KeyboardInterrupt
        return save(run, progress, *args)
    monkeypatch.setattr(engine_module, 'save_checkpoint', killed_at_the_second_epoch)
    output = tmp_path / 'killed'
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**TINY, output=str(output), log='tensorboard,mlflow'))
    client, run_id = mlflow_run(output, mlflow_store)
    assert client.get_run(run_id).info.status == 'KILLED'
    assert [s for s, _ in tb_series(output, 'val/top1')] == [22, 44]  # logged before the kill
    monkeypatch.setattr(engine_module, 'save_checkpoint', save)
    train(TrainConfig(**TINY, output=str(output), log='tensorboard,mlflow'))

    assert mlflow_run(output, mlflow_store)[1] == run_id  # the same MLflow run, continued
    assert client.get_run(run_id).info.status == 'FINISHED'
    reference_client, reference_id = mlflow_run(tmp_path / 'reference', mlflow_store)
    for tag in ('val/top1', 'val/loss', 'train/loss', 'train/lr'):
        expected = tb_series(tmp_path / 'reference', tag)
        assert tb_series(output, tag) == expected, tag  # each step once, with the uninterrupted run's value
        assert mlflow_series(client, run_id, tag) == mlflow_series(reference_client, reference_id, tag), tag
    # The settings were logged once.
    assert len(events(output).Tensors('config/text_summary')) == 1


def test_compress_and_search_log_their_runs_and_every_candidate(tmp_path, mlflow_store):
    teacher = tmp_path / 'teacher'
    teacher_kwargs = {'patch_size': 8, 'embed_dim': 24, 'depth': 2, 'num_heads': 3, 'class_token': False,
                      'global_pool': 'avg', 'fc_norm': False}
    train(TrainConfig(model='vit_tiny_patch16_224', model_kwargs=teacher_kwargs, img_size=32, epochs=1,
                      output=str(teacher), progress=False, threads=1))
    assert main(['compress', '--teacher', 'vit_tiny_patch16_224', '--teacher-kwargs', json.dumps(teacher_kwargs),
                 '--teacher-checkpoint', str(teacher / 'best.safetensors'), '--img-size', '32', '--epochs', '1',
                 '--output', str(tmp_path / 'mini'), '--log', 'mlflow', '--no-progress', '--threads', '1']) == 0
    client, run_id = mlflow_run(tmp_path / 'mini', mlflow_store)
    metrics = client.get_run(run_id).data.metrics
    # Weight distillation's terms, each its own curve beside the prediction distillation.
    assert {'train/loss/distillation', 'train/loss/weight_distillation'} <= set(metrics)
    assert metrics['val/top1'] == pytest.approx(float(summary_rows(tmp_path / 'mini')[-1]['val_top1']))

    config = TrainConfig(img_size=32, output=str(tmp_path / 'search'), epochs=1, batch_size=128, progress=False,
                         threads=1, model_kwargs=dict(patch_size=8, embed_dim=48, depth=3), log='tensorboard,mlflow')
    arguments = dict(budget=Budget(params=100_000), settings=EvolutionSettings(population=3, parents=2,
                                                                               generations=2), calib_batches=1)
    summary = search(config, **arguments)
    folder = tmp_path / 'search' / 'hierarchical'
    with open(folder / 'candidates.csv') as f:
        candidates = list(csv.DictReader(f))
    scored = [json.loads(line) for line in (folder / 'candidates.jsonl').read_text().splitlines()]
    assert len(scored) == len(candidates) == summary['candidates']
    client, run_id = mlflow_run(folder, mlflow_store)
    for series in (tb_series(folder, 'candidate/held_out_top1'),
                   mlflow_series(client, run_id, 'candidate/held_out_top1')):
        assert series == [(i, pytest.approx(c['score'])) for i, c in enumerate(scored, 1)]
    assert [v for _, v in tb_series(folder, 'candidate/macs')] == pytest.approx([c['macs'] for c in scored])
    assert tb_series(folder, 'best/held_out_top1') == [(len(scored), pytest.approx(summary['best']['score']))]
    assert {a.path for a in client.list_artifacts(run_id, 'search')} >= {'search/candidates.csv',
                                                                          'search/best_arch.json'}
    assert client.get_run(run_id).data.params['population'] == '3'
    assert mlflow_run(tmp_path / 'search' / 'supernet', mlflow_store)[1] != run_id  # the supernet's own run
    # The search run again logs nothing twice.
    search(config, **arguments)
    assert len(client.get_metric_history(run_id, 'candidate/held_out_top1')) == len(scored)
    assert len(tb_series(folder, 'candidate/held_out_top1')) == len(scored)


def test_a_backend_that_fails_mid_run_stops_with_one_warning(tmp_path, monkeypatch, capsys):
    from leanvit.train.tracking import TensorBoardBackend

    def full_disk(self, values, step):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(TensorBoardBackend, 'scalars', full_disk)
    final = train(TrainConfig(**dict(TINY, epochs=1), output=str(tmp_path / 'run'), log='tensorboard'))
    assert final['epoch'] == 1
    err = capsys.readouterr().err
    assert err.count('warning: --log tensorboard stopped logging (OSError: [Errno 28] No space left on device)') == 1


def test_log_errors_are_one_line(tmp_path, monkeypatch, capsys):
    run = ['train', '--model', 'test_sret', '--img-size', '32', '--epochs', '1', '--output', str(tmp_path / 'run')]
    assert main(run + ['--log', 'wandb']) == 2
    err = capsys.readouterr().err
    assert "log (--log) must name tensorboard, mlflow or both (tensorboard,mlflow), got 'wandb'" in err
    assert err.count('\n') == 1 and not (tmp_path / 'run').exists()

    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'mlflow' else find_spec(name, *a))
    with pytest.raises(UsageError, match=r'--log mlflow needs the mlflow package: pip install "leanvit\[mlflow\]"'):
        train(TrainConfig(**TINY, output=str(tmp_path / 'run'), log='tensorboard,mlflow'))
    monkeypatch.setattr(importlib.util, 'find_spec', find_spec)

    # A crafted tracking.json is named, and nothing of the run is touched.
    (tmp_path / 'crafted').mkdir()
    for crafted, field in (({'mlflow': {'run_id': '../../etc', 'tracking_uri': 'sqlite:///x'}}, 'mlflow'),
                           ({'mlflow': []}, 'mlflow'), ({'logged_params': ['wandb']}, 'logged_params')):
        (tmp_path / 'crafted' / 'tracking.json').write_text(json.dumps(crafted))
        with pytest.raises(RunDirectoryError, match=rf'tracking.json: field "{field}" must'):
            Tracker.open('mlflow', tmp_path / 'crafted', 'crafted')
    (tmp_path / 'crafted' / 'tracking.json').write_text('{"mlflow": NaN}')
    with pytest.raises(RunDirectoryError, match='holds NaN'):
        Tracker.open('tensorboard', tmp_path / 'crafted', 'crafted')


@pytest.mark.parametrize('uri', ['nosuchscheme://nowhere', 'sqlite:////proc/no/mlflow.db'])
def test_an_mlflow_store_that_cannot_be_opened_is_one_line(tmp_path, monkeypatch, capsys, uri):
    monkeypatch.setenv('MLFLOW_TRACKING_URI', uri)
    run = ['train', '--model', 'test_sret', '--img-size', '32', '--epochs', '1', '--no-progress',
           '--output', str(tmp_path / 'run'), '--log', 'mlflow']
    assert main(run) == 2
    err = capsys.readouterr().err
    assert f'--log mlflow: cannot use the MLflow store {uri}' in err and err.count('\n') == 1, err


def test_a_file_where_the_event_folder_goes_is_one_line(tmp_path, capsys):
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'tensorboard').write_text('mine')
    run = ['train', '--model', 'test_sret', '--img-size', '32', '--epochs', '1', '--no-progress',
           '--output', str(tmp_path / 'run'), '--log', 'tensorboard']
    assert main(run) == 1
    err = capsys.readouterr().err
    assert f'--log tensorboard writes into {tmp_path / "run" / "tensorboard"}, which is a file' in err
    assert err.count('\n') == 1 and (tmp_path / 'run' / 'tensorboard').read_text() == 'mine'
