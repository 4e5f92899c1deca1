"""Reading a timm / Hugging Face Hub model folder (``config.json`` + ``model.safetensors``) as a trained model.

``leanvit export --format hub`` writes such folders (``leanvit.deploy.hub``); timm's ``push_to_hf_hub`` and
``save_for_hf`` write the same layout. Every command that takes a run's checkpoint takes a folder too: the model is
``config.json``'s ``architecture`` built with its ``model_args`` and ``num_classes``, the weights are
``model.safetensors``, and the run's settings (its data, for ``leanvit eval``) are the ``leanvit`` record's
``recipe``, where the folder was written by leanvit. Each field is checked before it is used: a crafted file is
one error naming it.
"""

import json
import math
import os
from pathlib import Path

from leanvit.errors import CheckpointError

CONFIG = 'config.json'
WEIGHTS = 'model.safetensors'
RECORD = 'leanvit'   # leanvit's own entry in config.json: the run's data and the measured numbers
PIPELINE = ('mean', 'std', 'interpolation', 'crop_pct', 'crop_mode')  # the evaluation transform's pretrained cfg


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a ``config.json``."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file()


def read_model_folder(path: str | os.PathLike) -> dict:
    """The sidecar-like record of the model folder ``path``: ``model`` (the architecture), ``model_kwargs``
    (``model_args``, ``num_classes``, and the pretrained cfg's input pipeline as ``pretrained_cfg_overlay``),
    ``config`` (the run's settings: its data, split and seed among them; {}
    for a folder not written by leanvit) and ``leanvit`` (leanvit's whole record, or {}).

    Raises:
        CheckpointError: ``config.json`` is not JSON, lacks a field, or a field has the wrong type; or
            ``model.safetensors`` is missing.
    """
    path = Path(path)
    config_file = path / CONFIG

    def refuse(constant):
        raise CheckpointError(f'{config_file} holds {constant}, which is not a JSON number')
    try:
        cfg = json.loads(config_file.read_text(), parse_constant=refuse)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f'{config_file} is not JSON ({e}); it is corrupt or not a model folder\'s') from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f'{config_file} must hold a JSON object, got {type(cfg).__name__}')
    architecture, num_classes = cfg.get('architecture'), cfg.get('num_classes')
    model_args, record = cfg.get('model_args', {}), cfg.get(RECORD, {})
    if not isinstance(architecture, str) or not architecture:
        raise CheckpointError(f'{config_file}: field "architecture" must name a model, got {architecture!r}')
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise CheckpointError(f'{config_file}: field "num_classes" must be a non-negative integer, got {num_classes!r}')
    pretrained_cfg = cfg.get('pretrained_cfg', {})
    for key, value in (('model_args', model_args), (RECORD, record), ('pretrained_cfg', pretrained_cfg)):
        if not isinstance(value, dict):
            raise CheckpointError(f'{config_file}: field "{key}" must be a JSON object, got {value!r}')
    run_config = record.get('recipe', {})
    if not isinstance(run_config, dict):
        raise CheckpointError(f'{config_file}: field "{RECORD}.recipe" must be a JSON object (the run\'s settings), '
                              f'got {run_config!r}')
    if not (path / WEIGHTS).is_file():
        raise CheckpointError(f'model folder {path} has no {WEIGHTS}')
    _check_finite(model_args, config_file)
    # The folder's input pipeline (a compressed student keeps its teacher's mean and std), as timm applies it when
    # it loads the folder.
    pipeline = {key: pretrained_cfg[key] for key in PIPELINE if key in pretrained_cfg}
    kwargs = dict(model_args, num_classes=num_classes) | ({'pretrained_cfg_overlay': pipeline} if pipeline else {})
    return dict(model=architecture, model_kwargs=kwargs, config=run_config, leanvit=record)


def weights_of(path: str | os.PathLike) -> Path:
    """The weights file of ``path``: ``model.safetensors`` for a model folder, ``path`` itself otherwise."""
    path = Path(path)
    return path / WEIGHTS if is_model_folder(path) else path


def _check_finite(value, source: Path) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise CheckpointError(f'{source}: model_args hold {value}, not a finite number')
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        _check_finite(item, source)
