"""A run directory is the user's data: sidecars are validated, one process owns it, killed writes are cleaned up."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from leanvit.cli import main
from leanvit.errors import RunDirectoryError, RunLockedError
from leanvit.io.files import atomic_write, remove_stale_temporaries
from leanvit.train import TrainConfig, train
from leanvit.train.run_directory import CheckpointManager, RunLock

TINY = dict(model='test_sret', img_size=32, batch_size=64, epochs=1, lr=2e-3, progress=False)


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory) -> Path:
    """A complete one-epoch run; tests copy it before tampering with it."""
    run = tmp_path_factory.mktemp('run') / 'run'
    train(TrainConfig(**TINY, output=str(run)))
    return run


def copy_run(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, err


def train_cli(capsys, run: Path, *extra) -> tuple[int, str]:
    """``leanvit train`` with the settings of ``finished_run`` but one more epoch (a resumable change)."""
    return run_cli(capsys, 'train', '--output', run, '--model', 'test_sret', '--img-size', 32, '--epochs', 2,
                   '--lr', 2e-3, '--no-progress', '--resume-anyway', *extra)


def assert_one_line_naming(err: str, *parts: str):
    assert 'Traceback' not in err
    assert len(err.strip().splitlines()) == 1, err
    for part in parts:
        assert part in err, (part, err)


@pytest.mark.parametrize('history', [['../victim/important'], ['/tmp/elsewhere/step-0000001'], ['step-1; rm -rf'],
                                     'step-0000001', [7]])
def test_a_history_entry_outside_the_run_directory_is_refused_and_nothing_is_deleted(finished_run, tmp_path, capsys,
                                                                                     history):
    run = copy_run(finished_run, tmp_path / 'run')
    victim = tmp_path / 'victim' / 'important.safetensors'
    victim.parent.mkdir()
    victim.write_bytes(b'precious')
    latest = json.loads((run / 'latest.json').read_text())
    (run / 'latest.json').write_text(json.dumps(dict(latest, history=history)))
    before = sorted(p.name for p in run.iterdir())
    code, err = train_cli(capsys, run, '--keep-last', 1)
    assert code == 1
    assert_one_line_naming(err, str(run / 'latest.json'), 'field "history"')
    assert victim.read_bytes() == b'precious'
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_tag_naming_another_run_is_refused_and_nothing_is_imported(finished_run, tmp_path, capsys):
    other = copy_run(finished_run, tmp_path / 'other')
    run = copy_run(finished_run, tmp_path / 'run')
    tag = json.loads((other / 'latest.json').read_text())['tag']
    (run / 'latest.json').write_text(json.dumps({'tag': str(other / tag), 'history': [tag]}))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != 'run.lock'}
    code, err = train_cli(capsys, run)
    assert code == 1
    assert_one_line_naming(err, str(run / 'latest.json'), 'field "tag"', repr(str(other / tag)))
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != 'run.lock'} == before


@pytest.mark.parametrize('name, content, field', [
    ('latest.json', '{"tag": "step-00', 'not valid JSON'),
    ('latest.json', '["step-0000022"]', 'must hold a JSON object'),
    ('latest.json', '{"history": ["step-0000022"]}', 'field "tag"'),
    ('TAG.json', '{"epoch": -1, "step": 0, "history": [], "epoch_stats": {}}', 'field "epoch"'),
    ('TAG.json', '{"epoch": 1, "step": 0, "history": "x", "epoch_stats": {}}', 'field "history"'),
    ('TAG.json', '{"epoch": 1, "step": 0, "history": [], "epoch_stats": {"seen": "a"}}', 'field "epoch_stats"'),
    ('best.json', '{"metric": "high"}', 'field "metric"'),
    ('best.json', '{"metric": NaN}', 'holds NaN, which is not a JSON number'),
])
def test_a_sidecar_that_fails_validation_is_an_error_naming_file_and_field(finished_run, tmp_path, capsys, name,
                                                                           content, field):
    run = copy_run(finished_run, tmp_path / 'run')
    tag = json.loads((run / 'latest.json').read_text())['tag']
    path = run / name.replace('TAG', tag)
    path.write_text(content)
    code, err = train_cli(capsys, run)
    assert code == 1
    assert_one_line_naming(err, str(path), field)


def test_a_checkpoint_named_by_latest_json_but_missing_is_named(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / 'run')
    tag = json.loads((run / 'latest.json').read_text())['tag']
    (run / f'{tag}.resume.pt').unlink()
    code, err = train_cli(capsys, run)
    assert code == 1
    assert_one_line_naming(err, f'{tag}.resume.pt is missing from {run}')


def test_pruning_deletes_only_the_checkpoints_it_recorded(tmp_path):
    model = nn.Linear(2, 2)
    (tmp_path / 'step-0000099.safetensors').write_bytes(b'not recorded by leanvit')
    (tmp_path / 'notes.txt').write_text('mine')
    manager = CheckpointManager(tmp_path, keep_last=1)
    meta = dict(epoch=0, step=0, history=[], epoch_stats=dict(seen=0, correct=0, loss_sum=0.))
    for step in (1, 2, 3):
        manager.save(f'step-{step:07d}', model, meta, resume_state={})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'latest.json', 'notes.txt', 'step-0000003.json', 'step-0000003.resume.pt', 'step-0000003.safetensors',
        'step-0000099.safetensors']


def test_a_second_process_on_a_run_directory_stops_at_once_naming_the_holder(tmp_path):
    run = tmp_path / 'run'
    holder = subprocess.Popen(
        [sys.executable, '-c', 'import sys, time\nfrom leanvit.train.run_directory import RunLock\n'
                               'lock = RunLock(sys.argv[1]).__enter__()\nprint("locked", flush=True)\ntime.sleep(120)',
         str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        second = subprocess.run([sys.executable, '-m', 'leanvit.cli', 'train', '--output', str(run), '--model',
                                 'test_sret', '--img-size', '32', '--epochs', '1', '--no-progress'],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert_one_line_naming(second.stderr, f'run directory {run} is in use by another leanvit run',
                               f'pid {holder.pid} on host {socket.gethostname()}')
        assert sorted(p.name for p in run.iterdir()) == ['run.lock']  # the second process wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel released the killed holder's lock: the next run takes the directory over and says so.
    with RunLock(run):
        assert f'pid {os.getpid()} on host' in (run / 'run.lock').read_text()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'run.lock').write_text('pid 999999 on host gone, since 2026-01-01T00:00:00+00:00\n')
    with RunLock(run):
        out = capsys.readouterr().out
    assert 'taking over the lock of a run that ended without releasing it (pid 999999 on host gone' in out
    assert (run / 'run.lock').read_text() == ''  # released on exit


def test_the_lock_is_held_for_the_whole_run(tmp_path):
    with RunLock(tmp_path / 'run'):
        with pytest.raises(RunLockedError, match=f'pid {os.getpid()} on host {socket.gethostname()}'):
            train(TrainConfig(**TINY, output=str(tmp_path / 'run')))


def test_stale_temporaries_of_the_run_are_removed_on_start_and_nothing_else(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / 'run')
    stale = [run / '.step-0000044.safetensors.k3j_x9qa.tmp', run / '.latest.json.abcdefgh.tmp']
    for path in stale:
        path.write_bytes(b'half-written')
    kept = [run / '.notes.tmp', run / 'draft.tmp']
    for path in kept:
        path.write_text('mine')
    code, err = train_cli(capsys, run)
    assert code == 0, err
    assert not any(path.exists() for path in stale)
    assert all(path.read_text() == 'mine' for path in kept)
    assert not [p for p in run.iterdir() if p.name.endswith('.tmp') and p not in kept]


def test_remove_stale_temporaries_matches_atomic_writes_own_names(tmp_path, monkeypatch):
    # With os.replace doing nothing, the temporary stays where a SIGKILL mid-write would leave it.
    monkeypatch.setattr(os, 'replace', lambda *args: None)
    atomic_write(tmp_path / 'w.safetensors', lambda tmp: Path(tmp).write_bytes(b'x'))
    (leftover,) = list(tmp_path.iterdir())
    assert remove_stale_temporaries(tmp_path) == [leftover]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('umask, mode', [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        atomic_write(tmp_path / 'f.json', lambda tmp: Path(tmp).write_text('{}'))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / 'f.json').stat().st_mode) == mode


def test_checkpoints_of_a_run_follow_the_umask(finished_run):
    expected = 0o666 & ~_current_umask()
    for name in ('best.safetensors', 'latest.json', 'config.yaml', 'summary.csv'):
        assert stat.S_IMODE((finished_run / name).stat().st_mode) == expected, name


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_an_output_that_is_a_file_is_named(tmp_path, capsys):
    target = tmp_path / 'results.txt'
    target.write_text('not a folder')
    code, err = train_cli(capsys, target)
    assert code == 1
    assert_one_line_naming(err, f'run directory {target} is a file, not a folder')
    assert target.read_text() == 'not a folder'


def test_an_output_that_cannot_be_written_is_named(tmp_path, capsys):
    if os.geteuid() != 0:
        folder = tmp_path / 'read-only'
        folder.mkdir()
        folder.chmod(0o555)
    elif os.path.isdir('/sys/kernel'):
        folder = Path('/sys/kernel')  # root ignores permission bits; sysfs refuses new entries even to root
    else:
        pytest.skip('no read-only folder to try as root')
    code, err = train_cli(capsys, folder / 'run')
    assert code == 1
    assert_one_line_naming(err, f'cannot write to run directory {folder / "run"}')


def test_run_directory_errors_are_value_errors_for_library_callers(tmp_path):
    (tmp_path / 'latest.json').write_text('[]')
    with pytest.raises(ValueError):
        CheckpointManager.latest_in(tmp_path)
    assert issubclass(RunDirectoryError, ValueError)


def test_resume_state_that_is_not_leanvits_is_named(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / 'run')
    tag = json.loads((run / 'latest.json').read_text())['tag']
    torch.save({'optimizer': {}}, run / f'{tag}.resume.pt')
    code, err = train_cli(capsys, run)
    assert code == 1
    assert_one_line_naming(err, f'{tag}.resume.pt is not a leanvit resume state')


def test_a_run_directory_belongs_to_one_configuration(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / 'run')
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != 'run.lock'}
    code, err = run_cli(capsys, 'train', '--output', run, '--model', 'test_sret', '--img-size', 32, '--epochs', 1,
                        '--lr', 0.25, '--no-progress')
    assert code == 2
    assert_one_line_naming(err, f'run directory {run} holds a run with other settings (lr: 0.002 -> 0.25)',
                           '--resume-anyway')
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != 'run.lock'} == before
    code = main(['train', '--output', str(run), '--model', 'test_sret', '--img-size', '32', '--epochs', '1',
                 '--lr', '2e-3', '--no-progress', '--keep-last', '3'])
    out = capsys.readouterr().out
    assert code == 0 and f'{run} already finished its 1 epochs; nothing to train' in out


def test_config_yaml_records_only_the_settings_that_apply(finished_run):
    import yaml

    recorded = yaml.safe_load((finished_run / 'config.yaml').read_text())
    assert recorded['model'] == 'test_sret' and recorded['lr'] == 2e-3
    assert not {'kd', 'kd_alpha', 'kd_tau', 'teacher_checkpoint', 'val_split'} & set(recorded)
    assert TrainConfig(**recorded) == TrainConfig(**TINY, output=str(finished_run))  # still a valid recipe


def test_a_log_file_gets_no_progress_bar_redraws(tmp_path):
    result = subprocess.run([sys.executable, '-m', 'leanvit.cli', 'train', '--output', str(tmp_path / 'run'),
                             '--model', 'test_sret', '--img-size', '32', '--epochs', '1'],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert '\r' not in result.stdout + result.stderr
    assert 'epoch 1/1: train loss' in result.stdout
    header = result.stdout.split('epoch 1/1')[0]  # the run's header: what is trained, on what, where
    import leanvit

    params = leanvit.count_params(leanvit.create_model('test_sret', img_size=32, num_classes=10))
    for line in (f'model      test_sret: {params:,} parameters, input 3x32x32', 'data       digits',
                 'teacher    none (labels)', 'compute threads', f'output     {tmp_path / "run"} (new run)'):
        assert line in header, (line, header)


def test_a_sidecar_asking_for_pretrained_pickle_weights_loads_nothing_from_them(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / 'run')
    marker = tmp_path / 'executed'
    import pickle

    class WritesAFile:
        def __reduce__(self):
            return (open, (str(marker), 'w'))
    with open(tmp_path / 'evil.pth', 'wb') as f:
        pickle.dump({'payload': WritesAFile()}, f)
    meta = json.loads((run / 'best.json').read_text())
    meta['model_kwargs'].update(pretrained=True, pretrained_cfg_overlay={'file': str(tmp_path / 'evil.pth')})
    (run / 'best.json').write_text(json.dumps(meta))
    # The checkpoint's weights replace pretrained ones anyway: the rebuild asks for none.
    code, err = run_cli(capsys, 'eval', '--checkpoint', run / 'best.safetensors')
    assert code == 0 and not marker.exists(), err


def test_a_lock_file_that_is_a_folder_is_named(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / 'run')
    (run / 'run.lock').unlink(missing_ok=True)
    (run / 'run.lock').mkdir()
    code, err = train_cli(capsys, run)
    assert code == 1
    assert_one_line_naming(err, f'{run / "run.lock"} is a folder, not the lock file leanvit keeps there')


def test_resuming_after_the_architecture_file_changed_names_the_architecture(tmp_path, capsys):
    arch = tmp_path / 'arch.json'
    arch.write_text(json.dumps({'blocks': [{'global_heads': 1}, {'global_heads': 0, 'kernel_size': 17}]}))
    command = ['train', '--model', 'glit_custom', '--arch', arch, '--img-size', 32, '--batch-size', 128, '--epochs',
               1, '--no-progress', '--model-kwargs', '{"patch_size": 8, "embed_dim": 48}', '--output', tmp_path / 'r']
    code, err = run_cli(capsys, *command)
    assert code == 0, err
    arch.write_text(json.dumps({'blocks': [{'global_heads': 3}, {'global_heads': 0, 'kernel_size': 17}]}))
    for extra in ([], ['--resume-anyway']):
        code, err = run_cli(capsys, *command, '--epochs', 2, *extra)
        assert code == 2
        assert_one_line_naming(err, f'arch (--arch) {arch} describes another architecture than the one the run in '
                                    f'{tmp_path / "r"} was trained with')
    arch.write_text(json.dumps({'blocks': [{'global_heads': '1'}]}))
    code, err = run_cli(capsys, *command)
    assert code == 2
    assert_one_line_naming(err, "block 0: global_heads must be an integer, got '1' (str)")


@pytest.mark.parametrize('part, value, message', [('rng', {'torch': 'x'}, 'field "rng" cannot be restored'),
                                                  ('optimizer', {}, 'field "optimizer" cannot be restored'),
                                                  ('objectives', [1], 'field "objectives" must be a dict'),
                                                  ('scheduler', 7, 'field "scheduler" cannot be restored')])
def test_a_damaged_part_of_the_resume_state_is_named(finished_run, tmp_path, capsys, part, value, message):
    run = copy_run(finished_run, tmp_path / 'run')
    tag = json.loads((run / 'latest.json').read_text())['tag']
    state = torch.load(run / f'{tag}.resume.pt', weights_only=True)
    state[part] = value
    torch.save(state, run / f'{tag}.resume.pt')
    code, err = train_cli(capsys, run)
    assert code == 1
    assert_one_line_naming(err, f'{run / f"{tag}.resume.pt"}: {message}')


def test_optimizer_state_of_the_wrong_shape_is_named_before_training(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / 'run')
    tag = json.loads((run / 'latest.json').read_text())['tag']
    state = torch.load(run / f'{tag}.resume.pt', weights_only=True)
    first = next(iter(state['optimizer']['state'].values()))
    first['exp_avg'] = torch.zeros(1)
    torch.save(state, run / f'{tag}.resume.pt')
    code, err = train_cli(capsys, run)
    assert code == 1
    assert_one_line_naming(err, f'{run / f"{tag}.resume.pt"}: field "optimizer" holds state \'exp_avg\' of shape (1,)')


def test_a_run_records_its_data_folder_so_it_is_found_from_anywhere(tmp_path, capsys, monkeypatch):
    from PIL import Image
    for label in ('a', 'b'):
        (tmp_path / 'photos' / label).mkdir(parents=True)
        for i in range(8):
            image = Image.new('L', (16, 16), 30 * i + (20 if label == 'b' else 0))
            image.save(tmp_path / 'photos' / label / f'{i}.png')
    monkeypatch.chdir(tmp_path)
    command = ['train', '--model', 'test_sret', '--img-size', 32, '--data', 'photos', '--val-split', 0.5,
               '--batch-size', 4, '--epochs', 1, '--no-progress', '--output', 'run']
    code, err = run_cli(capsys, *command)
    assert code == 0, err
    assert json.loads((tmp_path / 'run' / 'best.json').read_text())['config']['data'] == str(tmp_path / 'photos')
    code, err = run_cli(capsys, *command)  # the same relative --data resumes the same run
    assert code == 0, err
    monkeypatch.chdir(tmp_path / 'photos')
    code, err = run_cli(capsys, 'eval', '--checkpoint', tmp_path / 'run' / 'best.safetensors')
    assert code == 0, err
