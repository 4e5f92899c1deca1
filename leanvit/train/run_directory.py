"""Training checkpoints you can trust: weights as safetensors + JSON metadata, resume state apart, atomic writes.

A run directory holds, per saved step ``tag`` (``step-000120``):
- ``{tag}.safetensors``  model weights (loadable by ``leanvit.load_checkpoint``), and ``{tag}.json`` its metadata
  (model name and kwargs, epoch, step, metrics, config);
- ``{tag}.resume.pt``    optimizer / scheduler / EMA / scaler / RNG state, read back with weights-only unpickling;
- ``latest.json``        the tag to resume from, replaced atomically after all files of the tag are complete, so a
  kill at any moment leaves either the previous complete checkpoint or the new one;
- ``best.safetensors`` + ``best.json``  the weights with the best validation metric so far.
Only the last ``keep_last`` tags are kept (plus whatever ``best`` copies).

Everything read back is validated before it is used: a tag is a plain checkpoint name (``step-`` and digits) inside
the run directory, so a crafted ``latest.json`` can neither point a resume at another run nor make pruning delete
files leanvit did not write there. A sidecar that fails validation is a ``RunDirectoryError`` naming the file and the
field. ``RunLock`` gives one process at a time the run directory.
"""

import datetime
import fcntl
import json
import math
import os
import random
import re
import socket
from pathlib import Path

import numpy as np
import torch

from leanvit.errors import RunDirectoryError, RunLockedError
from leanvit.io.files import atomic_write, remove_stale_temporaries, write_json
from leanvit.io.weights import read_checkpoint, save_weights

TAG = re.compile(r'step-\d{7,}')
CHECKPOINT_SUFFIXES = ('.safetensors', '.json', '.resume.pt')
RESUME_KEYS = ('optimizer', 'scheduler', 'scaler', 'rng', 'ema')


def rng_state() -> dict:
    """Every random generator a CPU training step draws from, as tensors and plain numbers (weights-only safe)."""
    np_state = np.random.get_state()
    return {
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                  'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'python': [list(v) if isinstance(v, tuple) else v for v in random.getstate()],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    np_state = state['numpy']
    np.random.set_state(('MT19937', np_state['keys'].numpy().astype(np.uint32), np_state['pos'],
                         np_state['has_gauss'], np_state['cached_gaussian']))
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))


class CheckpointManager:
    """Saves and restores a run's checkpoints in ``directory`` (see the module docstring for the layout)."""

    def __init__(self, directory: str | os.PathLike, keep_last: int = 2, higher_is_better: bool = True):
        if keep_last < 1:
            raise ValueError(f'keep_last must be at least 1, got {keep_last}')
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last
        self.higher_is_better = higher_is_better

    def save(self, tag: str, model: torch.nn.Module, metadata: dict, resume_state: dict,
             metric: float | None = None, evaluated_model: torch.nn.Module | None = None) -> None:
        """Write weights, metadata and resume state for ``tag``, then point ``latest.json`` at it.

        ``metric`` is the validation score of ``evaluated_model`` (default ``model``; an EMA copy when one is
        kept): if it is the best so far, those weights become ``best.safetensors``.
        """
        if not TAG.fullmatch(tag):
            raise ValueError(f'checkpoint tag must look like step-0000120, got {tag!r}')
        save_weights(model, self.directory / f'{tag}.safetensors')
        write_json(self.directory / f'{tag}.json', metadata)
        atomic_write(self.directory / f'{tag}.resume.pt', lambda tmp: torch.save(resume_state, tmp))
        if metric is not None and self._improves(metric):
            save_weights(evaluated_model or model, self.directory / 'best.safetensors')
            write_json(self.directory / 'best.json', dict(metadata, tag=tag, metric=metric))
        latest = read_latest(self.directory)
        history = [t for t in (latest['history'] if latest else []) if t != tag] + [tag]
        write_json(self.directory / 'latest.json', {'tag': tag, 'history': history[-self.keep_last:]})
        # Only tags that latest.json recorded, each a validated plain name, so only files this run wrote go.
        for old in history[:-self.keep_last]:
            for suffix in CHECKPOINT_SUFFIXES:
                (self.directory / f'{old}{suffix}').unlink(missing_ok=True)

    @staticmethod
    def latest_in(directory: str | os.PathLike) -> str | None:
        """The tag of the last complete checkpoint in ``directory``, or None for a new run."""
        latest = read_latest(directory)
        return latest['tag'] if latest else None

    @staticmethod
    def load_from(directory: str | os.PathLike, tag: str) -> tuple[dict, dict, dict]:
        """(weights, metadata, resume state) of ``tag``, each validated; pickled state is read weights-only."""
        directory = Path(directory)
        if not TAG.fullmatch(tag):
            raise RunDirectoryError(f'checkpoint tag must look like step-0000120, got {tag!r}')
        missing = [f'{tag}{suffix}' for suffix in CHECKPOINT_SUFFIXES if not (directory / f'{tag}{suffix}').is_file()]
        if missing:
            verb = 'is' if len(missing) == 1 else 'are'
            raise RunDirectoryError(f'{directory / "latest.json"} names checkpoint {tag}, but {", ".join(missing)} '
                                    f'{verb} missing from {directory}; move the run directory aside to start over')
        weights = read_checkpoint(directory / f'{tag}.safetensors')
        metadata = _check_metadata(directory / f'{tag}.json')
        state = read_checkpoint(directory / f'{tag}.resume.pt')
        if not isinstance(state, dict) or not set(RESUME_KEYS) <= set(state):
            raise RunDirectoryError(f'{directory / f"{tag}.resume.pt"} is not a leanvit resume state: expected the '
                                    f'keys {", ".join(RESUME_KEYS)}')
        return weights, metadata, state

    def _improves(self, metric: float) -> bool:
        path = self.directory / 'best.json'
        if not path.exists():
            return True
        best = read_sidecar(path).get('metric')
        if isinstance(best, bool) or not isinstance(best, (int, float)) or not math.isfinite(best):
            raise RunDirectoryError(f'{path}: field "metric" must be a finite number, got {best!r}')
        return metric > best if self.higher_is_better else metric < best


def read_sidecar(path: Path) -> dict:
    """A JSON object leanvit wrote into a run directory; anything else is a RunDirectoryError naming the file."""
    def refuse(constant):  # Python's json reads NaN and Infinity, which are not JSON and never written by leanvit
        raise RunDirectoryError(f'{path} holds {constant}, which is not a JSON number; it is corrupt or was not '
                                f'written by leanvit')
    try:
        data = json.loads(path.read_text(), parse_constant=refuse)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirectoryError(f'{path} is not valid JSON ({e}); it is corrupt or was not written by leanvit')
    except RecursionError:
        raise RunDirectoryError(f'{path} nests deeper than any file leanvit writes; it is corrupt or was not written '
                                f'by leanvit') from None
    if not isinstance(data, dict):
        raise RunDirectoryError(f'{path} must hold a JSON object, got a {type(data).__name__}')
    return data


def read_latest(directory: str | os.PathLike) -> dict | None:
    """``latest.json`` of ``directory`` with its fields validated, or None if there is none (a new run)."""
    path = Path(directory) / 'latest.json'
    if not path.exists():
        return None
    latest = read_sidecar(path)
    tag, history = latest.get('tag'), latest.get('history')
    if not isinstance(tag, str) or not TAG.fullmatch(tag):
        raise RunDirectoryError(f'{path}: field "tag" must name a checkpoint of this directory, such as '
                                f'step-0000120, got {tag!r}')
    if not isinstance(history, list) or not all(isinstance(t, str) and TAG.fullmatch(t) for t in history):
        raise RunDirectoryError(f'{path}: field "history" must be a list of checkpoint names of this directory, '
                                f'such as ["step-0000120"], got {history!r}')
    return {'tag': tag, 'history': history}


def _check_metadata(path: Path) -> dict:
    """A checkpoint's metadata sidecar, with the fields a resume reads checked."""
    meta = read_sidecar(path)
    for key in ('epoch', 'step'):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RunDirectoryError(f'{path}: field "{key}" must be an integer >= 0, got {value!r}')
    if not isinstance(meta.get('history'), list) or not all(isinstance(row, dict) for row in meta['history']):
        raise RunDirectoryError(f'{path}: field "history" must be a list of per-epoch records, '
                                f'got {meta.get("history")!r}')
    stats = meta.get('epoch_stats')
    if not (isinstance(stats, dict) and all(isinstance(stats.get(k), int) and not isinstance(stats.get(k), bool)
                                            for k in ('seen', 'correct'))
            and isinstance(stats.get('loss_sum'), (int, float)) and not isinstance(stats.get('loss_sum'), bool)):
        raise RunDirectoryError(f'{path}: field "epoch_stats" must hold integers "seen", "correct" and a number '
                                f'"loss_sum", got {stats!r}')
    return meta


class RunLock:
    """One process at a time in a run directory: a lock held from the start of a run (or resume) to its end.

    The lock is an ``fcntl.flock`` on ``run.lock``, which the kernel releases when its holder exits in any way, so a
    lock left by a killed process is stale by construction and the next run takes it over (and says so). The file
    records the holder (pid, host, start time) for the message a second process gets. It is never deleted: a
    process that still waits on the old file would otherwise lock a different one than the next process.
    Entering also checks that the directory is a writable folder, and removes the temporaries a killed write left.
    """

    FILE = 'run.lock'

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._file = None

    def __enter__(self) -> 'RunLock':
        if self.directory.exists() and not self.directory.is_dir():
            raise RunDirectoryError(f'run directory {self.directory} is a file, not a folder; choose another output')
        path = self.directory / self.FILE
        if path.is_dir() or (path.exists() and not path.is_file()):
            raise RunDirectoryError(f'{path} is a {"folder" if path.is_dir() else "special file"}, not the lock file '
                                    f'leanvit keeps there; remove it, or choose another output')
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            lock = open(path, 'a+')  # 'a+': the holder's record stays until we own the lock
        except OSError as e:
            raise RunDirectoryError(f'cannot write to run directory {self.directory}: {e.filename or path}: '
                                    f'{e.strerror or e}') from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or 'a process that has not recorded itself yet'
            lock.close()
            raise RunLockedError(f'run directory {self.directory} is in use by another leanvit run ({holder}); wait '
                                 f'for it to finish or choose another output') from None
        lock.seek(0)
        stale = lock.read().strip()
        if stale:
            print(f'{self.directory}: taking over the lock of a run that ended without releasing it ({stale})',
                  flush=True)
        lock.seek(0)
        lock.truncate()
        started = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
        lock.write(f'pid {os.getpid()} on host {socket.gethostname()}, since {started}\n')
        lock.flush()
        self._file = lock
        removed = remove_stale_temporaries(self.directory)
        if removed:
            print(f'{self.directory}: removed {len(removed)} unfinished temporary file(s) of a killed write: '
                  f'{", ".join(p.name for p in removed)}', flush=True)
        return self

    def __exit__(self, *exc_info) -> None:
        self._file.seek(0)
        self._file.truncate()
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None
