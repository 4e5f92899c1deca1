"""Where a run's numbers go besides its own folder: TensorBoard event files and MLflow runs (``--log``).

A ``Tracker`` fans each value out to the backends a run asks for (``--log tensorboard``, ``--log mlflow`` or
``--log tensorboard,mlflow``); both are optional extras (``pip install "leanvit[tensorboard]"`` /
``"leanvit[mlflow]"``). What goes where:
- TensorBoard: event files in ``FOLDER/tensorboard`` (``tensorboard --logdir runs`` shows every run below ``runs``):
  scalars, images, the settings as hyperparameters (the HParams tab) and as text.
- MLflow: one MLflow run per leanvit run, in experiment ``leanvit`` (or ``$MLFLOW_EXPERIMENT_NAME``), in the store
  MLflow itself picks: ``$MLFLOW_TRACKING_URI`` if set, else MLflow's local default, ``mlflow.db`` and ``mlruns/``
  in the current folder (``mlflow ui`` started there shows them). Metrics, params, images and files as artifacts.

Steps are the run's optimizer steps, so a resumed run continues its curves. A run killed after it logged a value but
before its next checkpoint logs that step again when it resumes; neither backend shows it twice:
- TensorBoard: the resumed writer starts with ``purge_step``, and TensorBoard's readers drop every event the killed
  process wrote from that step on.
- MLflow keeps every logged value, so the tracker reads the last step of each metric when it reopens a run and
  skips values up to it; a resumed run recomputes exactly those values (resume is exact).
``FOLDER/tracking.json`` records the MLflow run (id and store), so that a resumed run logs into the same one.

A backend that fails mid-run (a full disk, a server gone) stops logging with one warning line; the training goes on.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from leanvit.errors import RunDirectoryError, UsageError
from leanvit.io.files import write_json

# Backend name -> (the module it needs, the extra that installs it).
BACKENDS = {'tensorboard': ('tensorboard', 'tensorboard'), 'mlflow': ('mlflow', 'mlflow')}
STATE_FILE = 'tracking.json'
EXPERIMENT = 'leanvit'
MLFLOW_RUN_ID = re.compile(r'[0-9a-f]{32}')
HPARAMS_METRICS = ('val/top1', 'val/top5', 'val/loss')
MLFLOW_PARAM_LENGTH = 6000  # MLflow refuses longer param values


def parse_backends(log: str | None) -> tuple[str, ...]:
    """The backends ``--log`` names (comma-separated), checked: known, and their package installed.

    Raises:
        UsageError: an unknown name, or a backend whose package is missing (naming the extra that installs it).
    """
    if not log:
        return ()
    names = tuple(dict.fromkeys(name.strip() for name in log.split(',')))
    for name in names:
        if name not in BACKENDS:
            raise UsageError(f'log (--log) must name tensorboard, mlflow or both (tensorboard,mlflow), got {log!r}')
        module, extra = BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            raise UsageError(f'--log {name} needs the {module} package: pip install "leanvit[{extra}]"')
    return names


def versions() -> dict[str, str]:
    """The versions of leanvit and of the libraries that decide its numbers (torch's with its build), as run
    parameters."""
    from importlib.metadata import version

    import timm
    import torch
    return {'version.leanvit': version('leanvit'), 'version.torch': torch.__version__, 'version.timm': timm.__version__}


def flat_params(values: Mapping) -> dict[str, str | int | float | bool]:
    """``values`` as flat parameters both backends take: numbers, strings and booleans as they are; None, lists and
    dicts as JSON."""
    flat = {}
    for key, value in values.items():
        plain = isinstance(value, (str, bool)) or (isinstance(value, (int, float)) and math.isfinite(value))
        flat[key] = value if plain else json.dumps(value)
    return flat


class TensorBoardBackend:
    """Event files in ``folder/tensorboard``."""
    name = 'tensorboard'

    def __init__(self, folder: Path, purge_from: int | None):
        from torch.utils.tensorboard import SummaryWriter

        events = folder / 'tensorboard'
        if events.exists() and not events.is_dir():
            raise RunDirectoryError(f'--log tensorboard writes into {events}, which is a file: move it aside')
        self.writer = SummaryWriter(str(events), purge_step=purge_from)

    def params(self, params: dict, text: str) -> None:
        from torch.utils.tensorboard.summary import hparams

        # In the run's own event file, not the sub-folder SummaryWriter.add_hparams makes: one run, one folder. The
        # metrics are only named: the HParams tab shows the run's own curves of those tags beside its settings.
        for summary in hparams(params, dict.fromkeys(HPARAMS_METRICS, 0.)):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text('config', '\n'.join('    ' + line for line in text.splitlines()), 0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def image(self, tag: str, png: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(png) as image:
            self.writer.add_image(tag, np.asarray(image.convert('RGB')), step, dataformats='HWC')

    def artifact(self, path: Path, folder: str | None) -> None:
        pass  # TensorBoard keeps no files; the run folder has them

    def close(self, status: str) -> None:
        self.writer.close()


class MlflowBackend:
    """One MLflow run, continued across resumes (its id in ``tracking.json``)."""
    name = 'mlflow'

    def __init__(self, folder: Path, name: str, recorded: dict):
        import mlflow
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        logging.getLogger('mlflow.store.db.utils').setLevel(logging.WARNING)  # "Creating initial ... tables"
        self.uri = mlflow.get_tracking_uri()
        try:
            self.client = MlflowClient(self.uri)
            run_id = recorded.get('run_id') if recorded.get('tracking_uri') == self.uri else None
            if run_id is not None:
                try:
                    self.client.get_run(run_id)
                except MlflowException:  # the store was emptied or moved: a new MLflow run, said below
                    print(f'note: MLflow run {run_id} of {folder} is not in {self.uri}; logging to a new run',
                          file=sys.stderr, flush=True)
                    run_id = None
            self.resumed = run_id is not None
            if run_id is None:
                experiment_name = mlflow.environment_variables.MLFLOW_EXPERIMENT_NAME.get() or EXPERIMENT
                experiment = self.client.get_experiment_by_name(experiment_name)
                experiment_id = (experiment.experiment_id if experiment is not None
                                 else self.client.create_experiment(experiment_name))
                run_id = self.client.create_run(experiment_id, run_name=name,
                                                tags={'leanvit.folder': str(folder.resolve())}).info.run_id
            else:
                self.client.update_run(run_id, status='RUNNING')
        except Exception as e:  # MLflow's own errors, and the database's or the network's beneath them
            raise UsageError(f'--log mlflow: cannot use the MLflow store {self.uri}: {type(e).__name__}: '
                             f'{" ".join(str(e).split())[:300]}') from None
        self.run_id = run_id
        # The last step of each metric already logged: a resumed run skips up to it (see the module docstring).
        self.logged = {key: max(m.step for m in self.client.get_metric_history(run_id, key))
                       for key in self.client.get_run(run_id).data.metrics} if self.resumed else {}

    def params(self, params: dict, text: str) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(key, str(value)[:MLFLOW_PARAM_LENGTH])
                                                   for key, value in params.items()])
        self.client.log_text(self.run_id, text, 'config.yaml')

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in values.items()
                   if step > self.logged.get(key, -1)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def image(self, tag: str, png: Path, step: int) -> None:
        with tempfile.TemporaryDirectory() as folder:  # the artifact's name is its file's: one per step
            named = Path(folder) / f'step-{step:07d}.png'
            shutil.copyfile(png, named)
            self.client.log_artifact(self.run_id, str(named), f'images/{tag}')

    def artifact(self, path: Path, folder: str | None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), folder)
        else:
            self.client.log_artifact(self.run_id, str(path), folder)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


@dataclasses.dataclass
class Tracker:
    """The backends a run logs to; with none, every call does nothing (a run without ``--log``, or a rank > 0).

    Attributes:
        backends: The open backends.
        settings_due: The backends that have not logged the run's settings yet (each does once per run folder; a
            resumed run that adds ``--log mlflow`` logs them to MLflow only).
        state_path: ``tracking.json``; None without backends.
        state: Its contents, as written last.
    """
    backends: list = dataclasses.field(default_factory=list)
    settings_due: list[str] = dataclasses.field(default_factory=list)
    state_path: Path | None = None
    state: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def open(cls, log: str | None, folder: str | Path, name: str, purge_from: int | None = None) -> Tracker:
        """The tracker of the run in ``folder``, named ``name`` in MLflow.

        Args:
            log: ``--log``'s value.
            folder: The run folder; ``tracking.json`` and ``tensorboard/`` go there.
            name: The MLflow run's name.
            purge_from: On resume, the first step of the resumed run: TensorBoard drops what a killed process logged
                from it on. Ignored for a fresh folder.
        """
        names = parse_backends(log)
        if not names:
            return cls()
        folder = Path(folder)
        state_path = folder / STATE_FILE
        state = read_state(state_path) if state_path.exists() else None
        backends = []
        try:
            if 'tensorboard' in names:
                backends.append(TensorBoardBackend(folder, purge_from if state is not None else None))
            if 'mlflow' in names:
                backends.append(MlflowBackend(folder, name, (state or {}).get('mlflow', {})))
        except BaseException:
            for backend in backends:
                backend.close('FAILED')
            raise
        record = dict(state or {})
        for backend in backends:
            if isinstance(backend, MlflowBackend):
                record['mlflow'] = dict(run_id=backend.run_id, tracking_uri=backend.uri)
        record.setdefault('logged_params', [])
        write_json(state_path, record)
        return cls(backends, [b.name for b in backends if b.name not in record['logged_params']], state_path, record)

    @property
    def active(self) -> bool:
        return bool(self.backends)

    def params(self, params: dict, text: str) -> None:
        """Log the run's settings (flat) and their YAML ``text``, to each backend that has not logged them before."""
        if not self.settings_due:
            return
        self._each('params', flat_params(params), text, only=self.settings_due)
        self.state['logged_params'] = sorted(set(self.state['logged_params']) | set(self.settings_due))
        write_json(self.state_path, self.state)
        self.settings_due = []

    def scalars(self, values: dict[str, float], step: int) -> None:
        self._each('scalars', values, step)

    def image(self, tag: str, png: str | Path, step: int) -> None:
        self._each('image', tag, Path(png), step)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        """Keep the file or folder ``path`` with the run (MLflow), under ``folder``."""
        self._each('artifact', Path(path), folder)

    def close(self, status: str = 'FINISHED') -> None:
        self._each('close', status)
        self.backends = []

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close('FINISHED' if kind is None else 'KILLED' if issubclass(kind, KeyboardInterrupt) else 'FAILED')

    def _each(self, method: str, *args, only: list[str] | None = None) -> None:
        for backend in list(self.backends):
            if only is not None and backend.name not in only:
                continue
            try:
                getattr(backend, method)(*args)
            except Exception as e:  # logging must not cost the run: say so once and go on without that backend
                print(f'warning: --log {backend.name} stopped logging ({type(e).__name__}: '
                      f'{" ".join(str(e).split())[:200]}); the run goes on', file=sys.stderr, flush=True)
                self.backends.remove(backend)


def read_state(path: Path) -> dict:
    """``tracking.json``, checked: a crafted or damaged file is a RunDirectoryError naming it."""
    from leanvit.train.run_directory import read_sidecar

    state = read_sidecar(path)
    mlflow = state.get('mlflow', {})
    logged = state.get('logged_params', [])
    if (not isinstance(mlflow, dict) or not isinstance(mlflow.get('run_id', ''), str)
            or not isinstance(mlflow.get('tracking_uri', ''), str)
            or ('run_id' in mlflow and not MLFLOW_RUN_ID.fullmatch(mlflow['run_id']))):
        raise RunDirectoryError(f'{path}: field "mlflow" must hold an MLflow run_id (32 hex digits) and its '
                                f'tracking_uri, got {mlflow!r}; delete the file to log to a new MLflow run')
    if not isinstance(logged, list) or not all(name in BACKENDS for name in logged):
        raise RunDirectoryError(f'{path}: field "logged_params" must list backends ({", ".join(BACKENDS)}), got '
                                f'{logged!r}; delete the file to log the settings again')
    return state
