"""Training checkpoints you can trust: weights as safetensors + JSON metadata, resume state apart, atomic writes.

A run directory holds, per saved step ``tag`` (``step-000120``):
- ``{tag}.safetensors``  model weights (loadable by ``leanvit.load_checkpoint``), and ``{tag}.json`` its metadata
  (model name and kwargs, epoch, step, metrics, config);
- ``{tag}.resume.pt``    optimizer / scheduler / EMA / scaler / RNG state, read back with weights-only unpickling;
- ``latest.json``        the tag to resume from, replaced atomically after all files of the tag are complete, so a
  kill at any moment leaves either the previous complete checkpoint or the new one;
- ``best.safetensors`` + ``best.json``  the weights with the best validation metric so far.
Only the last ``keep_last`` tags are kept (plus whatever ``best`` copies).
"""

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from leanvit.checkpoint import atomic_write, read_checkpoint, save_weights


def write_json(path: Path, data: dict) -> None:
    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(data, f, indent=2, default=str)
            f.write('\n')
    atomic_write(path, write)


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
        save_weights(model, self.directory / f'{tag}.safetensors')
        write_json(self.directory / f'{tag}.json', metadata)
        atomic_write(self.directory / f'{tag}.resume.pt', lambda tmp: torch.save(resume_state, tmp))
        if metric is not None and self._improves(metric):
            save_weights(evaluated_model or model, self.directory / 'best.safetensors')
            write_json(self.directory / 'best.json', dict(metadata, tag=tag, metric=metric))
        history = [t for t in self._history() if t != tag] + [tag]
        write_json(self.directory / 'latest.json', {'tag': tag, 'history': history[-self.keep_last:]})
        for old in history[:-self.keep_last]:
            for suffix in ('.safetensors', '.json', '.resume.pt'):
                (self.directory / f'{old}{suffix}').unlink(missing_ok=True)

    @staticmethod
    def latest_in(directory: str | os.PathLike) -> str | None:
        """The tag of the last complete checkpoint in ``directory``, or None for a new run."""
        path = Path(directory) / 'latest.json'
        return json.loads(path.read_text())['tag'] if path.exists() else None

    @staticmethod
    def load_from(directory: str | os.PathLike, tag: str) -> tuple[dict, dict, dict]:
        """(weights, metadata, resume state) of ``tag``; pickled state is read weights-only."""
        directory = Path(directory)
        weights = read_checkpoint(directory / f'{tag}.safetensors')
        metadata = json.loads((directory / f'{tag}.json').read_text())
        return weights, metadata, read_checkpoint(directory / f'{tag}.resume.pt')

    def _history(self) -> list[str]:
        path = self.directory / 'latest.json'
        return json.loads(path.read_text())['history'] if path.exists() else []

    def _improves(self, metric: float) -> bool:
        path = self.directory / 'best.json'
        if not path.exists():
            return True
        best = json.loads(path.read_text())['metric']
        return metric > best if self.higher_is_better else metric < best
