"""Writing a trained model as a timm / Hugging Face Hub model folder, with a model card of measured numbers.

``leanvit export --checkpoint runs/x/best.safetensors --format hub --output DIR`` (or ``leanvit train --hub``, into
``OUTPUT/hub``) writes what ``timm.create_model('local-dir:DIR', pretrained=True)`` reads after ``import leanvit``,
and what ``hf-hub:USER/NAME`` reads once the folder is uploaded (``huggingface-cli upload USER/NAME DIR``):
- ``config.json``, written by timm's own ``save_config_for_hf``: the architecture, ``num_classes``, the arguments
  that rebuild the model as the run built it (``model_args``: input size, patch size, a searched architecture, a
  compressed student's sharing), and ``pretrained_cfg`` with the run's evaluation transform (input size, mean, std,
  crop, interpolation) and the class names. ``timm.data.resolve_data_config(model=model)`` and ``create_transform``
  then reproduce the transform the run evaluated with. A ``leanvit`` entry adds the run's data (so that
  ``leanvit eval --checkpoint DIR`` evaluates on it), the recipe and the measured numbers.
- ``model.safetensors``: the weights in the form timm builds (the training form; ``reparameterize()`` folds it).
- ``README.md``: the model card: params, MACs, top-1 / top-5 on the run's validation split, throughput on this CPU
  (named), the recipe, the paper, the licenses.
The folder is written beside ``DIR``, loaded back through timm and checked to reproduce the model's outputs and its
evaluation transform, and only then moved into place: ``DIR`` is the old folder or a checked new one.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import shutil
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import timm
import torch
from timm.models import PretrainedCfg
from timm.models._hub import save_config_for_hf
from timm.utils.model import reparameterize_model
from torch.utils.data import DataLoader

from leanvit.deploy.bench import cpu_name
from leanvit.errors import ExportVerificationError, RunDirectoryError, UsageError
from leanvit.io.data import FASHION_MNIST
from leanvit.io.model_folder import CONFIG, RECORD, WEIGHTS, is_model_folder
from leanvit.io.weights import save_weights
from leanvit.profiler import count_params, profile
from leanvit.train.evaluation import data_config, evaluate_model, load_trained_model, run_datasets, run_metadata

# The recipe settings the card lists (all of them are in config.json's leanvit.recipe).
CARD_RECIPE = ('epochs', 'batch_size', 'opt', 'lr', 'weight_decay', 'sched', 'warmup_epochs', 'augment', 'mixup',
               'cutmix', 'smoothing', 'drop_path', 'teacher', 'kd', 'kd_alpha', 'kd_tau', 'objectives',
               'init_checkpoint', 'train_images', 'holdout', 'seed')
LICENSES = {'mit': 'MIT', 'apache-2.0': 'Apache-2.0', 'bsd-3-clause': 'BSD-3-Clause'}  # timm's ids, as written
TRANSFORM_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')
SPEED_BATCH = 32


def write_model_folder(checkpoint: str | os.PathLike, output: str | os.PathLike, *, model_name: str | None = None,
                       model_kwargs: dict | None = None, data: str | None = None, batch_size: int = 64,
                       trust: bool = False) -> dict:
    """Write the model of ``checkpoint`` (a run's checkpoint with its sidecar, or another model folder) as a model
    folder at ``output`` (see the module docstring) and return leanvit's record in its ``config.json``.

    Args:
        model_name, model_kwargs: For a checkpoint without a sidecar (``leanvit.train.evaluation.trained_model_spec``).
        data: The images to measure top-1 on (default: the run's own, as its sidecar records them).
        batch_size: Images per evaluation batch.
        trust: Unpickle a ``.pth`` checkpoint fully (``leanvit.io.weights.read_checkpoint``).

    Raises:
        UsageError: ``output`` is a file, a link, or a folder that is not a model folder.
        ExportVerificationError: timm does not rebuild the same model, or not the same transform, from the folder.
    """
    output = Path(output)
    check_output(output)
    model, name, kwargs = load_trained_model(checkpoint, model_name, model_kwargs, trust=trust)
    model.eval()
    cfg = data_config(model, kwargs.get('img_size'))
    recorded = run_metadata(Path(checkpoint)).get('config') or {}
    bundle, source = run_datasets(checkpoint, name, model.num_classes, cfg, recorded, data)
    deployed = reparameterize_model(copy.deepcopy(model))
    evaluation = evaluate_model(deployed, DataLoader(bundle.val, batch_size))
    macs = profile(deployed, cfg['input_size']).macs
    record = dict(
        version=version('leanvit'), source=str(checkpoint), model=name, data=bundle.description, data_source=source,
        metrics=dict(top1=evaluation.top1, top5=evaluation.top5, loss=evaluation.loss, images=evaluation.images),
        params=count_params(model), params_reparameterized=count_params(deployed), macs=macs,
        speed=measure_speed(deployed, cfg['input_size']), recipe=recorded,
        date=datetime.datetime.now().astimezone().isoformat(timespec='minutes'))
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f'.{output.name}.', suffix='.tmp'))
    try:
        save_weights(model, staging / WEIGHTS)
        # timm's writer: the layout stays the one timm's reader expects, release after release.
        # The folder's pretrained_cfg carries what an overlay set (a compressed student's mean and std): timm takes
        # one or the other, not both.
        model_args = {k: v for k, v in kwargs.items()
                      if k not in ('num_classes', 'pretrained', 'checkpoint_path', 'pretrained_cfg_overlay')}
        save_config_for_hf(model, str(staging / CONFIG), data_config=cfg, model_args=model_args,
                           model_config=dict(label_names=list(bundle.class_names), **{RECORD: record}))
        keep_timm_fields(staging / CONFIG)
        (staging / 'README.md').write_text(model_card(model, name, cfg, record, output))
        verify(staging, model, cfg)
        replace_folder(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def keep_timm_fields(config_file: Path) -> None:
    """Drop the pretrained cfg fields timm's ``PretrainedCfg`` does not know (leanvit's published figures,
    ``paper_params``...): timm refuses a cfg with an unknown field."""
    known = {field.name for field in dataclasses.fields(PretrainedCfg)}
    config = json.loads(config_file.read_text())
    config['pretrained_cfg'] = {k: v for k, v in config['pretrained_cfg'].items() if k in known}
    config_file.write_text(json.dumps(config, indent=2))


def check_output(output: Path) -> None:
    """Refuse an ``output`` that writing the folder would destroy: a file, a link, or a folder of other files."""
    if output.is_symlink():
        raise UsageError(f'--output {output} is a link; give the folder itself')
    if output.exists() and not output.is_dir():
        raise UsageError(f'--output {output} is a file; a model folder is a folder (config.json, {WEIGHTS}, '
                         f'README.md)')
    if output.is_dir() and any(output.iterdir()) and not is_model_folder(output):
        raise UsageError(f'--output {output} is a folder of other files; give a new or empty folder, or a model '
                         f'folder to replace')


def replace_folder(staging: Path, output: Path) -> None:
    """Move the checked folder ``staging`` to ``output``, replacing a model folder there (two renames: a kill in
    between leaves the old folder as ``.NAME.old-*`` beside it)."""
    try:
        if not output.exists():
            os.replace(staging, output)
            return
        old = Path(tempfile.mkdtemp(dir=output.parent, prefix=f'.{output.name}.old-'))
        os.replace(output, old / output.name)
        os.replace(staging, output)
    except OSError as e:  # another process wrote a folder there meanwhile
        raise RunDirectoryError(f'cannot move the model folder into {output}: {e.strerror}; is another export '
                                f'writing it?') from None
    shutil.rmtree(old, ignore_errors=True)


@torch.inference_mode()
def verify(folder: Path, model: torch.nn.Module, cfg: dict) -> None:
    """Raise an ExportVerificationError unless timm builds ``model`` (same outputs) and its evaluation transform
    ``cfg`` from ``folder``, as a user would: ``timm.create_model('local-dir:...', pretrained=True)``."""
    rebuilt = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    images = torch.randn(2, *cfg['input_size'], generator=torch.Generator().manual_seed(0))
    difference = (rebuilt(images) - model(images)).abs().max().item()
    if difference != 0:
        raise ExportVerificationError(f'timm rebuilds another model from {folder}: outputs differ by up to '
                                      f'{difference:.3g}')
    resolved = timm.data.resolve_data_config(model=rebuilt)
    differing = [f'{key}: {resolved.get(key)!r} instead of {cfg.get(key)!r}' for key in TRANSFORM_KEYS
                 if _plain(resolved.get(key)) != _plain(cfg.get(key))]
    if differing:
        raise ExportVerificationError(f'timm resolves another evaluation transform from {folder}: '
                                      f'{"; ".join(differing)}')


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@torch.inference_mode()
def measure_speed(model: torch.nn.Module, input_size: tuple[int, ...], seconds: float = 1.0) -> dict:
    """The eager inference form's median latency at batch 1 and throughput at batch ``SPEED_BATCH`` on this CPU,
    over about ``seconds`` each, with the CPU and threads that decide them."""
    def median_call(batch: int) -> float:
        images = torch.randn(batch, *input_size)
        model(images)  # warm-up: first-call allocations
        times, start = [], time.perf_counter()
        while len(times) < 5 or time.perf_counter() - start < seconds:
            begin = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - begin)
        return statistics.median(times)
    model.eval()
    return dict(batch1_ms=1e3 * median_call(1), batch=SPEED_BATCH, images_per_s=SPEED_BATCH / median_call(SPEED_BATCH),
                runtime=f'PyTorch {torch.__version__} eager, inference form', cpu=cpu_name(),
                threads=torch.get_num_threads())


def data_terms(data: str | None) -> str:
    """What is known of the terms of the run's images."""
    if data in (None, 'digits'):
        return ("scikit-learn's bundled copy of the UCI optical recognition of handwritten digits (CC BY 4.0)")
    if data == FASHION_MNIST or str(data).startswith(f'{FASHION_MNIST}:'):
        return 'Fashion-MNIST (MIT licence, Zalando Research)'
    return 'your own images: their terms apply to these weights'


def model_card(model: torch.nn.Module, name: str, cfg: dict, record: dict, output: Path) -> str:
    """README.md of the folder: front matter the Hub reads, then the measured numbers, recipe, paper and licenses."""
    pretrained = model.pretrained_cfg
    paper = pretrained.get('paper_name')
    paper_ids = pretrained.get('paper_ids')
    code = pretrained.get('origin_url') or ''
    code = code if code.startswith('https://github.com') else ''
    metrics, speed = record['metrics'], record['speed']
    size = 'x'.join(map(str, cfg['input_size']))
    params = f'{record["params"]:,}'
    if record['params_reparameterized'] != record['params']:
        params += f' ({record["params_reparameterized"]:,} after `reparameterize()`)'
    recipe = record['recipe']
    distilled = recipe.get('teacher') or recipe.get('teacher_logits')
    recipe_rows = [f'| {key} | {recipe[key]} |' for key in CARD_RECIPE if recipe.get(key) not in (None, {}, '')
                   and (distilled or not key.startswith('kd'))]
    paper_line = (f'{paper}' + (f' ([{paper_ids}](https://arxiv.org/abs/{paper_ids.removeprefix("arXiv:")}))'
                                if paper_ids and paper_ids.startswith('arXiv:') else '')
                  if paper else 'see the architecture\'s source')
    lines = [
        '---', 'library_name: timm', 'license: apache-2.0', 'pipeline_tag: image-classification',
        'tags: [image-classification, timm, leanvit]', '---', '',
        f'# {name}, trained with leanvit', '',
        f'{name} trained by leanvit on {record["data"]}.', '',
        '## Measured', '',
        f'Measured by leanvit {record["version"]} on {record["date"]}, from `{record["source"]}`.', '',
        '| | |', '|---|---|',
        f'| parameters | {params} |',
        f'| MACs per image | {record["macs"]:,} at {size} (inference form) |',
        f'| top-1 / top-5 | {metrics["top1"]:.2f} % / {metrics["top5"]:.2f} % on {metrics["images"]:,} validation '
        f'images of the run\'s data |',
        f'| latency, batch 1 | {speed["batch1_ms"]:.2f} ms |',
        f'| throughput, batch {speed["batch"]} | {speed["images_per_s"]:,.0f} images/s |',
        f'| measured on | {speed["cpu"]}, {speed["threads"]} threads, {speed["runtime"]} |', '',
        'Speed depends on the CPU and its load: measure on yours with `leanvit bench --checkpoint DIR`.', '',
        '## Data', '', f'{record["data"]}.', '',
        '## Training recipe', '',
        *(['| setting | value |', '|---|---|', *recipe_rows, '',
           "Every setting of the run is in config.json's `leanvit.recipe`."] if recipe_rows
          else ['The checkpoint recorded no training run.']), '',
        '## Use', '',
        '```python',
        'import timm',
        'import leanvit  # registers the architecture with timm',
        '',
        f"model = timm.create_model('local-dir:{output}', pretrained=True).eval()  # or 'hf-hub:USER/NAME'",
        'transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))',
        '```', '',
        '`leanvit eval --checkpoint DIR` evaluates it on the run\'s data, `leanvit predict --checkpoint DIR IMAGES` '
        'classifies images, `leanvit export --checkpoint DIR --format onnx --output model.onnx` exports it.', '',
        '## Paper', '', paper_line + (f'; official code: {code}' if code else '') + '.', '',
        '## License', '',
        'leanvit is Apache-2.0' + (f'; the architecture\'s official code is '
                                   f'{LICENSES.get(pretrained["license"], pretrained["license"])}'
                                   if pretrained.get('license') else '')
        + f'. The weights were trained by leanvit on {data_terms(record["recipe"].get("data"))}.', '',
    ]
    return '\n'.join(lines)
