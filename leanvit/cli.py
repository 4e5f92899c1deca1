"""The ``leanvit`` command line.

Problems with the user's input are one line on stderr, never a traceback: exit status 2 for
a usage error (an argument or recipe value), 1 for any other input (a file, a folder, a checkpoint); a traceback
means a bug in leanvit.
"""

import argparse
import csv
import dataclasses
import fnmatch
import io
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from timm.models import get_arch_pretrained_cfgs
from timm.utils.model import reparameterize_model
from torch.utils.data import DataLoader

import leanvit
from leanvit.argtypes import (
    fraction,
    json_object,
    metric_amount,
    milliseconds,
    non_negative_float,
    non_negative_int,
    number_in,
    positive_int,
    probability,
)
from leanvit.deploy import bench
from leanvit.deploy.export import DEFAULT_ATOL, FORMATS, export_model
from leanvit.deploy.hub import write_model_folder
from leanvit.deploy.predict import format_predictions, predict, write_predictions_csv
from leanvit.deploy.quantize import quantize_export
from leanvit.errors import LeanvitError, UsageError
from leanvit.io.data import build_datasets
from leanvit.io.exported import exported_format
from leanvit.methods.glit.evolution import Budget, EvolutionSettings
from leanvit.methods.glit.latency import BACKENDS as LATENCY_BACKENDS
from leanvit.methods.glit.search import search
from leanvit.methods.minivit.diagnostics import analyze_cka, analyze_gradient_norms
from leanvit.methods.minivit.multiplex import compress
from leanvit.threads import choose_threads
from leanvit.train import train
from leanvit.train.config import GROUPS, TrainConfig, flag, read_architecture_file, value_types
from leanvit.train.evaluation import (
    data_config,
    evaluate_checkpoint,
    evaluation_files,
    load_trained_model,
    run_datasets,
    run_metadata,
    trained_model_spec,
)
from leanvit.train.teacher_logits import compute_teacher_logits, save_teacher_logits

EXIT_USAGE = 2
EXIT_INPUT = 1
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT

MODEL_COLUMNS = ('model', 'params', 'gmacs', 'input', 'paper_params', 'paper_gmacs', 'paper_top1', 'deploy_params',
                 'paper_deploy_params')


def model_rows(pattern: str = '', include_test: bool = False) -> list[dict]:
    """One row per published configuration: measured params / GMACs at its input size beside the paper's figures.

    A configuration is ``architecture.tag`` (timm's pretrained tag, e.g. ``sret_t.distill_in1k``), or the bare
    architecture where it has no tag (the test models); ``pattern`` matches either the tagged or the bare name.
    """

    rows = []
    for arch in leanvit.list_models(include_test=include_test):
        for name in get_arch_pretrained_cfgs(arch) or [arch]:
            if pattern and not (fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(arch, pattern)):
                continue
            # Counting needs shapes, not values: on the meta device building a model and a 40-GMAC forward cost
            # nothing.
            with torch.device('meta'):
                model = leanvit.create_model(name)
            cfg = model.pretrained_cfg
            measured = leanvit.profile(model, cfg['input_size'])
            # Re-parameterizable models (RIFormer) also report their inference form.
            deployed = leanvit.count_params(model.reparameterize()) if hasattr(model, 'reparameterize') else None
            rows.append(dict(
                model=name, params=measured.params, gmacs=round(measured.gmacs, 3), input=cfg['input_size'][-1],
                paper_params=cfg.get('paper_params'), paper_gmacs=cfg.get('paper_gmacs'),
                paper_top1=cfg.get('paper_top1'), deploy_params=deployed,
                paper_deploy_params=cfg.get('paper_deploy_params'),
            ))
    return rows


def format_rows(rows: list[dict], fmt: str) -> str:
    if fmt == 'json':
        return json.dumps(rows, indent=2)
    if fmt == 'csv':
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=MODEL_COLUMNS, lineterminator='\n')
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().rstrip('\n')
    cells = [[_cell(row[c]) for c in MODEL_COLUMNS] for row in rows]
    if fmt == 'markdown':
        lines = ['| ' + ' | '.join(MODEL_COLUMNS) + ' |', '|' + '---|' * len(MODEL_COLUMNS)]
        return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in cells])
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(MODEL_COLUMNS)] if cells else \
        [len(c) for c in MODEL_COLUMNS]
    return '\n'.join('  '.join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
                     for r in [list(MODEL_COLUMNS)] + cells)


def _cell(value) -> str:
    if value is None:
        return '-'
    if isinstance(value, int):
        return f'{value:,}'
    return str(value)


def cmd_models(args: argparse.Namespace) -> int:
    rows = model_rows(args.filter, include_test=args.all)
    if not rows:
        print(f'no leanvit model matches {args.filter!r}; try `leanvit models` for the full list', file=sys.stderr)
        return 1
    print(format_rows(rows, args.format))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    # `profile sret_t` is a shorthand for `profile --model sret_t`; two different names are a mistake, not a choice.
    if args.name and args.model and args.name != args.model:
        raise UsageError(f'two model names: {args.name} and --model {args.model}; give one')
    model_name = args.model or args.name

    threads, why = choose_threads(args.threads)
    kwargs = dict(args.model_kwargs or {})
    if args.arch:
        kwargs['arch'] = read_architecture_file(args.arch)
    if args.img_size:
        kwargs['img_size'] = args.img_size
    if args.checkpoint and exported_format(args.checkpoint):
        raise UsageError(f'{args.checkpoint} is an exported file: profile measures a PyTorch model, so give the '
                         f'checkpoint it was exported from (`leanvit eval --checkpoint {args.checkpoint}` times the '
                         f'file)')
    if args.checkpoint:  # a run's checkpoint rebuilds its model as the run built it (name, size, arguments)
        name, kwargs = trained_model_spec(args.checkpoint, model_name, kwargs)
    elif model_name:
        name = model_name
    else:
        raise UsageError('profile needs --model NAME (e.g. --model sret_t) or a run\'s --checkpoint')
    model = leanvit.create_model(name, **kwargs)
    if args.checkpoint:
        leanvit.load_checkpoint(model, args.checkpoint, trust=args.trust_checkpoint)
    model.eval()
    input_size = data_config(model, kwargs.get('img_size'))['input_size']
    measured = leanvit.profile(model, input_size)  # the architecture's true figures, before re-parameterizing
    model = reparameterize_model(model)  # timed as deployed: the inference form
    images = torch.randn(args.batch_size, *input_size)
    with torch.inference_mode():
        model(images)  # warm-up: first-call allocations and kernel selection
        start = time.perf_counter()
        for _ in range(args.iters):
            logits = model(images)
        elapsed = time.perf_counter() - start
    print(f'model      {name} ({"x".join(map(str, input_size))})' + (f' from {args.checkpoint}' if args.checkpoint
                                                                    else ''))
    print(f'params     {measured.params:,}')
    print(f'GMACs      {measured.gmacs:.4g}  (FLOPs = 2 x MACs)')
    print(f'output     {tuple(logits.shape)}, top-1 class of image 0: {int(logits[0].argmax())}')
    print(f'images/s   {args.batch_size * args.iters / elapsed:.1f}  (eval, re-parameterized, batch {args.batch_size}, '
          f'{threads} threads: {why}, {args.iters} iterations)')
    return 0


def train_config(args: argparse.Namespace, **defaults) -> TrainConfig:
    """The TrainConfig of a command: its flags over its recipe (--config) over ``defaults`` (the command's own
    defaults, where they differ from TrainConfig's). A recipe value that does not apply to the command is an error
    (the command has no flag for it: its parser refuses one)."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    config = TrainConfig.from_yaml(args.config, **overrides) if args.config else TrainConfig(**overrides)
    # What the command sets itself, given by the recipe, is refused rather than silently replaced.
    stock = TrainConfig()
    for name in getattr(args, 'refused_config_keys', ()):
        if getattr(config, name) != getattr(stock, name):
            raise UsageError(f'recipe {args.config}: {name} does not apply to leanvit {args.command}'
                             + WHY_REFUSED.get((args.command, name), ''))
    # A default applies where neither a flag nor the recipe chose a value, i.e. where TrainConfig's own default stands.
    unset = {name: value for name, value in defaults.items()
             if name not in overrides and getattr(config, name) == TrainConfig.__dataclass_fields__[name].default}
    return dataclasses.replace(config, **unset) if unset else config


# Training options that some commands set themselves: those commands have no flag for them, and refuse them in a
# recipe. The why, for the message a user gets who gives one anyway.
SEARCH_SETS = ('model', 'arch', 'teacher', 'teacher_checkpoint', 'teacher_kwargs', 'trust_teacher_checkpoint', 'kd',
               'kd_alpha', 'kd_tau', 'init_from_teacher', 'teacher_logits')
COMPRESS_SETS = ('model', 'model_kwargs', 'arch', 'init_checkpoint', 'init_from_teacher', 'teacher_logits')
WHY_REFUSED = {('search', 'model'): ': it trains the GLiT supernet (retrain the searched architecture with '
                                    '`leanvit train --model glit_custom --arch OUTPUT/hierarchical/best_arch.json`)',
               ('compress', 'model'): ': the student is built from the teacher (--share and the transformation '
                                      'flags shape it)'}


def cmd_train(args: argparse.Namespace) -> int:
    config = train_config(args)

    final = train(config, resume_anyway=args.resume_anyway)
    print(json.dumps(final, indent=2))
    write_run_model_folder(args, config)
    return 0


def write_run_model_folder(args: argparse.Namespace, config: TrainConfig) -> None:
    """``--hub``: the run's best checkpoint as a timm / Hub model folder, OUTPUT/hub (as `export --format hub`)."""
    if not args.hub:
        return
    best, folder = Path(config.output) / 'best.safetensors', Path(config.output) / 'hub'
    if not best.is_file():
        raise UsageError(f'--hub: {config.output} has no best.safetensors to write as a model folder')
    record = write_model_folder(best, folder)
    print(f'wrote      {folder}: timm model folder (top-1 {record["metrics"]["top1"]:.2f} % on '
          f'{record["metrics"]["images"]} validation images)')


def cmd_compress(args: argparse.Namespace) -> int:
    config = train_config(args)

    init = int(args.shared_init) if args.shared_init.isdigit() else args.shared_init
    final = compress(config, share=args.share, init=init, attn_transform=args.attn_transform,
                     local_conv=args.local_conv, rpe=args.rpe, from_scratch=args.from_scratch,
                     resume_anyway=args.resume_anyway)
    print(json.dumps(final, indent=2))
    write_run_model_folder(args, config)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    config = train_config(args, output='runs/search')

    # Every value EvolutionSettings checks was range-checked by the parser: a ValueError here would be a bug.
    settings = EvolutionSettings(population=args.population, parents=args.parents, mutation_prob=args.mutation_prob,
                                 crossover_share=args.crossover_share, generations=args.generations, seed=config.seed)
    if args.budget_latency is None and (args.backend or args.latency_batch):
        raise UsageError('--backend and --latency-batch say where a latency budget holds: give --budget-latency '
                         '(e.g. --budget-latency 12ms) too')
    if args.rank_check_epochs and not args.rank_check:
        raise UsageError('--rank-check-epochs sets the retraining of --rank-check N: give --rank-check too')
    if args.sandwich:  # a path_sampling option: the supernet's run records it with its other objectives
        config = dataclasses.replace(config, objectives=config.objectives | {
            'path_sampling': {'seed': config.seed, **config.objectives.get('path_sampling', {}),
                              'sandwich': args.sandwich}})
    summary = search(config, space=args.space,
                     budget=Budget(args.budget_macs, args.budget_params, args.budget_latency),
                     strategy=args.strategy, settings=settings, calib_batches=args.calib_batches,
                     resume_anyway=args.resume_anyway, backend=args.backend or 'onnx',
                     latency_batch=args.latency_batch or 1,
                     random_baselines=args.random_baselines, rank_check=args.rank_check,
                     rank_check_epochs=args.rank_check_epochs)
    if 'latency' in summary:  # every measured architecture is in search.json; the terminal gets the figures
        summary['latency'] = {k: v for k, v in summary['latency'].items() if k != 'measured'}
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:

    threads, why = choose_threads(args.threads)
    # Beside the checkpoint; beside a model folder, not in it (what is in it is what gets uploaded).
    output = args.output or str(Path(args.checkpoint).parent)
    report = evaluate_checkpoint(args.checkpoint, output, model_name=args.model, model_kwargs=args.model_kwargs,
                                 data=args.data, batch_size=args.batch_size,
                                 trust=args.trust_checkpoint)
    print(f'model      {report["model"]} ({"x".join(map(str, report["input_size"]))}) from {args.checkpoint}')
    print(f'data       {report["data"]} ({report["data_source"]})')
    print(f'top-1      {report["top1"]:.2f}%')
    print(f'top-5      {report["top5"]:.2f}%')
    print(f'loss       {report["loss"]:.4f}')
    print(f'images/s   {report["images_per_s"]:.1f}  (eval loop with data loading, batch {args.batch_size}, '
          f'{threads} threads: {why})')
    print(f'images     {report["images"]}')
    print(f'wrote      {", ".join(map(str, evaluation_files(args.checkpoint, output)))}')
    return 0


def cmd_predict(args: argparse.Namespace) -> int:

    choose_threads(args.threads)
    predictions = predict(args.checkpoint, args.images, args.top_k, model_name=args.model,
                          model_kwargs=args.model_kwargs, trust=args.trust_checkpoint, batch_size=args.batch_size)
    print('\n'.join(format_predictions(predictions)), flush=True)
    if args.output:
        write_predictions_csv(args.output, predictions)
        print(f'wrote {args.output}')
    return 0


def cmd_teacher_logits(args: argparse.Namespace) -> int:

    choose_threads(args.threads)
    teacher, name, kwargs = load_trained_model(args.checkpoint, args.model, args.model_kwargs,
                                               trust=args.trust_checkpoint)
    # The evaluation transform on the training split: one deterministic view per image, in the split's order. Without
    # --data, the images the run trained on, as eval and export read them.
    cfg = data_config(teacher, kwargs.get('img_size'))
    if args.data is None and args.val_split is None:
        recorded = run_metadata(Path(args.checkpoint)).get('config') or {}
        data, _ = run_datasets(args.checkpoint, name, teacher.num_classes, cfg, recorded, augment='none')
    else:
        data = build_datasets(args.data, cfg, val_split=args.val_split, augment='none', seed=args.seed)
    logits = compute_teacher_logits(teacher, data.train, args.batch_size)
    save_teacher_logits(args.output, logits, dict(teacher=name, teacher_kwargs=kwargs,
                                                  checkpoint=str(args.checkpoint), data=data.description))
    print(f'wrote {args.output}: logits of {name} for {logits.shape[0]} training images x {logits.shape[1]} classes '
          f'({data.description})')
    return 0


def cmd_export(args: argparse.Namespace) -> int:

    choose_threads(args.threads)
    if args.format == 'hub':
        return export_model_folder(args)
    # leanvit eval and predict tell an ONNX file by its extension, so the name and the format must agree.
    suffix = Path(args.output).suffix.lower()
    fmt = args.format or {'.onnx': 'onnx', '.pt': 'torchscript', '.pth': 'torchscript'}.get(suffix)
    if fmt is None:
        raise UsageError(f'--output {args.output}: name the file .onnx (ONNX) or .pt (TorchScript), or pass --format')
    if (fmt == 'onnx') != (suffix == '.onnx'):
        raise UsageError(f'--output {args.output} does not fit --format {fmt}: an ONNX file is named .onnx, and only '
                         f'an ONNX file is')
    if args.quantize and fmt != 'onnx':
        raise UsageError('--quantize int8 quantizes an ONNX file: name --output .onnx')
    model, name, kwargs = load_trained_model(args.checkpoint, args.model, args.model_kwargs,
                                             trust=args.trust_checkpoint)
    cfg = data_config(model, args.img_size or kwargs.get('img_size'))
    input_size = cfg['input_size']
    # What `leanvit eval` needs to evaluate the file as it evaluates the checkpoint: the input pipeline, the classes
    # and the run's data.
    recorded = run_metadata(Path(args.checkpoint)).get('config') or {}
    metadata = dict(model=name, model_kwargs=kwargs, num_classes=model.num_classes, data_config=cfg,
                    config={key: recorded[key] for key in ('data', 'val_split', 'seed') if key in recorded})
    # The images INT8 is calibrated and checked on, found (or refused) before minutes of export: the training split
    # through the evaluation transform, since calibration must see what inference will see.
    datasets = run_datasets(args.checkpoint, name, model.num_classes, cfg, recorded, args.data, augment='none') \
        if args.quantize else None
    report = export_model(model, args.output, fmt, input_size, batch_size=args.batch_size,
                          dynamic_batch=not args.static_batch, opset=args.opset, atol=args.atol, reparam=args.reparam,
                          metadata=metadata)
    print(f'model      {name} ({"x".join(map(str, input_size))}) from {args.checkpoint}')
    if report.reparam_modules is not None:
        print(f'reparam    {report.reparam_modules} modules folded; max abs diff vs the original model '
              f'{report.reparam_max_diff:.3g}')
    opset = f', opset {report.opset}' if report.opset is not None else ''
    batch = 'any batch size' if report.dynamic_batch else f'batch size {report.input_shape[0]} only'
    print(f'format     {report.format}{opset}, {batch}')
    print(f'verified   max abs diff vs PyTorch {report.max_diff:.3g} (tolerance {report.atol:g}, batch sizes '
          f'{", ".join(map(str, report.batch_sizes))})')
    print(f'wrote      {report.path} ({report.path.stat().st_size / 2 ** 20:.1f} MiB)')
    if args.quantize:
        quantize_run_export(args, report.path, *datasets)
    return 0


def export_model_folder(args: argparse.Namespace) -> int:
    """``export --format hub``: a timm / Hugging Face Hub model folder with its model card (leanvit.deploy.hub)."""
    if args.quantize:
        raise UsageError('--quantize int8 quantizes an ONNX file; --format hub writes the float model folder')
    if args.img_size:
        raise UsageError('--format hub writes the model at the size it was built for: to build it at another, pass '
                         'img_size in --model-kwargs')
    record = write_model_folder(args.checkpoint, args.output, model_name=args.model, model_kwargs=args.model_kwargs,
                                data=args.data, trust=args.trust_checkpoint)
    metrics, speed = record['metrics'], record['speed']
    print(f'model      {record["model"]} from {args.checkpoint}: {record["params"]:,} parameters, '
          f'{record["macs"] / 1e6:.2f} MMACs')
    print(f'measured   top-1 {metrics["top1"]:.2f} %, top-5 {metrics["top5"]:.2f} % on {metrics["images"]} images of '
          f'{record["data"]}; {speed["images_per_s"]:.0f} images/s at batch {speed["batch"]} on {speed["cpu"]}')
    print(f'verified   timm.create_model(\'local-dir:{args.output}\', pretrained=True) gives the same outputs and '
          f'evaluation transform')
    print(f'wrote      {args.output}: config.json, model.safetensors, README.md')
    return 0


def quantize_run_export(args: argparse.Namespace, float_path: Path, bundle, source: str) -> None:
    """``export --quantize int8``: the INT8 file beside the float one, calibrated on the run's training images and
    written only if its top-1 on the run's validation images is within --max-drop of the float file's."""


    int8_path = float_path.with_name(float_path.stem + '.int8.onnx')
    # A file exported with --static-batch runs its batch size only.
    batch_size = args.batch_size if args.static_batch else args.calib_batch_size
    calibration = DataLoader(bundle.train, batch_size=batch_size, shuffle=True,
                             generator=torch.Generator().manual_seed(0))
    report = quantize_export(float_path, int8_path, calibration, DataLoader(bundle.val, batch_size=64),
                             args.calib_batches, args.max_drop, args.int8_method)
    how = f'static QDQ, calibrated on {report.calibration_images} training images' if report.method == 'static' \
        else 'dynamic (MatMul weights; activations quantized per batch)'
    print(f'int8       {how}: {report.why}')
    print(f'data       {bundle.description} ({source})')
    change = report.int8_top1 - report.float_top1 + 0.  # + 0. prints no change as +0.00, not -0.00
    print(f'top-1      float {report.float_top1:.2f}%, int8 {report.int8_top1:.2f}% ({change:+.2f} points; '
          f'--max-drop {args.max_drop:g}), same prediction on {report.agreement:.2f}% of {report.images} images')
    print(f'wrote      {report.path} ({report.int8_bytes / 2 ** 20:.1f} MiB, '
          f'{report.int8_bytes / report.float_bytes:.2f}x the float file)')


def cmd_analyze(args: argparse.Namespace) -> int:

    if args.analysis == 'grad-norms':
        report = analyze_gradient_norms(
            args.output, model_name=args.model, model_kwargs=args.model_kwargs, checkpoint=args.checkpoint,
            trust=args.trust_checkpoint, data=args.data, val_split=args.val_split, steps=args.steps,
            batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, augment=args.augment,
            seed=args.seed, pattern=args.blocks)
        print(f'model      {report["model"]} ' + (f'from {args.checkpoint}' if args.checkpoint else
                                                  f'(new, seed {args.seed})')
              + ("; its classifier replaced for the data's classes" if report['head_replaced'] and args.checkpoint
                 else ''))
        print(f'data       {report["data"]}')
        print(f'trained    {report["steps"]} steps of cross-entropy, AdamW lr {args.lr:g}, weight decay '
              f'{args.weight_decay:g}, batch {args.batch_size}, on {report["device"]}')
        print(f'layers     {len(report["layers"])} blocks, a shared block once (one gradient for all its '
              f'applications): {", ".join(report["layers"])}')
    else:
        report = analyze_cka(
            args.output, model_a=args.model_a, model_kwargs_a=args.model_kwargs_a, checkpoint_a=args.checkpoint_a,
            model_b=args.model_b, model_kwargs_b=args.model_kwargs_b, checkpoint_b=args.checkpoint_b,
            trust=args.trust_checkpoint, data=args.data, split=args.split, val_split=args.val_split, seed=args.seed,
            max_images=args.max_images, batch_size=args.batch_size, pattern_a=args.blocks_a,
            pattern_b=args.blocks_b, layout_a=args.layout_a, layout_b=args.layout_b)
        for side, name, checkpoint, layers in (('A', report['model_a'], args.checkpoint_a, report['layers_a']),
                                               ('B', report['model_b'], args.checkpoint_b, report['layers_b'])):
            print(f'model {side}    {name}' + (f' from {checkpoint}' if checkpoint else ' (new, untrained)')
                  + f': {len(layers)} layers')
        print(f'data       {report["data"]}: the first {report["images"]} images of the {report["split"]} split')
    print(f'wrote      {", ".join(report["files"])}')
    return 0


def _add_config_flags(parser: 'Parser', refused: tuple[str, ...] = (), meaning: dict[str, str] | None = None) -> None:
    """One flag per TrainConfig field, grouped by topic, with the field's help line and default; only flags given on
    the command line override the recipe.

    Types come from the field annotations, and a number is checked against its field's range as it is parsed, so an
    argument error comes before anything loads; ``TrainConfig`` checks a recipe value against the same range.
    ``refused`` fields are set by the command itself: they get no flag (its --help lists only what works), the
    parser refuses their flags with the reason, and `train_config` refuses them in a recipe. ``meaning`` replaces a
    field's help line where the command gives it another meaning (search's --epochs train the supernet).
    """
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    parser.set_defaults(refused_config_keys=refused)
    for field in dataclasses.fields(TrainConfig):
        name = '--' + flag(field.name)
        kind = next(t for t in value_types(field) if t is not type(None))
        if field.name in refused:
            why = WHY_REFUSED.get((parser.prog.split()[-1], field.name), '')
            parser.refused_options.update({name: why} | ({'--no-' + flag(field.name): why} if kind is bool else {}))
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        shown = 'none' if default is None else json.dumps(default) if isinstance(default, dict) else default
        valid = field.metadata.get('range')
        help_text = f'{(meaning or {}).get(field.name, field.metadata["help"])} (default: {shown}' + \
            (f'; {valid}' if valid else '') + ')'
        group = groups[field.metadata['group']]
        if kind is bool:
            group.add_argument(name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        elif kind is dict:
            group.add_argument(name, type=json_object, default=argparse.SUPPRESS, metavar='JSON', help=help_text)
        elif kind in (int, float):
            bounds = dataclasses.asdict(valid) if valid else {}  # an Interval: low, high, low_open, high_open
            group.add_argument(name, type=number_in(kind, **bounds), default=argparse.SUPPRESS, help=help_text,
                               metavar=kind.__name__.upper())
        else:
            group.add_argument(name, type=kind, default=argparse.SUPPRESS, help=help_text,
                               metavar=kind.__name__.upper())


def _add_checkpoint_args(parser: argparse.ArgumentParser, data_default: str | None = None) -> None:
    """Which trained model to run (shared by eval, teacher-logits and export), and on which data if the command
    reads data (``data_default`` says what it reads without --data)."""
    parser.add_argument('--checkpoint', required=True, help="a leanvit run's .safetensors (its .json names the "
                                                            "model), any checkpoint leanvit loads with --model, or "
                                                            "for eval and predict a file `leanvit export` wrote")
    parser.add_argument('--model', default=None, help="model name (default: from the checkpoint's .json)")
    parser.add_argument('--model-kwargs', type=json_object, default=None, metavar='JSON',
                        help="model arguments, e.g. '{\"num_classes\": 10}'; override the checkpoint's .json")
    _add_trust_flag(parser)
    _add_threads_flag(parser)
    if data_default:
        parser.add_argument('--data', default=None,
                            help=f'an image folder or torch/NAME:ROOT, as in training (default: {data_default})')


def _add_analysis_data_args(parser: argparse.ArgumentParser) -> None:
    """The data an analysis reads (default: the bundled digits) and how a single folder of class folders is split."""
    parser.add_argument('--data', default=None, help='an image folder or torch/NAME:ROOT, as in training (default: '
                                                     'the bundled digits)')
    parser.add_argument('--val-split', type=fraction, default=None,
                        help='fraction held out for validation, for a folder of class folders without train/ and val/ '
                             '(in (0, 1))')
    parser.add_argument('--seed', type=non_negative_int, default=0,
                        help='seed of initialisation, data order and --val-split')


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points at --help (the train usage block is 30 lines long), a
    training option that the command sets itself is refused with the reason, and --out is read as --output."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Flags of `leanvit train` that this command has not (it sets their values itself), with the reason to give.
        # Looked for before argparse parses: unknown to it, search's --model would be taken as a prefix of
        # --model-kwargs.
        self.refused_options: dict[str, str] = {}

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        if self.refused_options or '--output' in self._option_string_actions:
            args = self._screen(args)
        return super().parse_known_args(args, namespace)

    def _screen(self, args: list[str]) -> list[str]:
        """``args`` with the deprecated --out renamed --output (saying so once); a refused option is an error."""
        screened, warned = [], False
        for i, arg in enumerate(args):
            if arg == '--':  # what follows is positional
                return screened + args[i:]
            option, equals, value = arg.partition('=')
            if option in self.refused_options:
                self.error(f'{option} does not apply to {self.prog}{self.refused_options[option]}')
            # export, predict and teacher-logits took --out up to leanvit 0.1.0: still read, for one release.
            if option == '--out' and '--output' in self._option_string_actions:
                if not warned:
                    print(f'{self.prog}: warning: --out is deprecated; use --output', file=sys.stderr)
                warned, arg = True, '--output' + equals + value
            screened.append(arg)
        return screened

    def error(self, message: str):
        self.exit(EXIT_USAGE, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def _add_hub_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--hub', action='store_true',
                        help='at the end, also write the best checkpoint as a timm / Hugging Face Hub model folder, '
                             'OUTPUT/hub, with a model card of measured numbers (as `leanvit export --format hub`)')


def _add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--threads', type=positive_int, default=None,
                        help='compute threads (default: OMP_NUM_THREADS if set, else the CPUs not busy with other '
                             'processes, as `leanvit train` chooses)')


def _add_trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='unpickle a .pth fully, which can run code it carries: only for a file whose origin you '
                             'trust (default: weights-only, which refuses code)')


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog='leanvit', formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Parameter-efficient vision transformers (SReT, GLiT, MiniViT, RIFormer) as timm models: train,\n'
                    'distil, compress, search, evaluate, export and run them on your own images, on a CPU or a GPU.\n'
                    '`leanvit COMMAND --help` explains each command.',
        epilog='first steps on a folder of class folders (photos/cat/*.jpg, photos/dog/*.jpg, ...):\n'
               '  leanvit train --model sret_t --data photos/ --val-split 0.2 --img-size 64 --output runs/photos\n'
               '  leanvit eval --checkpoint runs/photos/best.safetensors\n'
               '  leanvit predict --checkpoint runs/photos/best.safetensors new_photos/\n'
               '  leanvit export --checkpoint runs/photos/best.safetensors --output model.onnx')
    parser.add_argument('--version', action='version', version=f'leanvit {leanvit.__version__}')
    sub = parser.add_subparsers(dest='command', required=True)

    models = sub.add_parser('models', help='table of registered models: measured vs published params / GMACs')
    models.add_argument('--filter', default='', help="shell-style name pattern, e.g. 'sret_*'")
    models.add_argument('--format', choices=('table', 'csv', 'markdown', 'json'), default='table')
    models.add_argument('--all', action='store_true', help='include the tiny test_* configurations')
    models.set_defaults(func=cmd_models)

    profile = sub.add_parser(
        'profile', help='params, GMACs and eval throughput of one model on random input',
        description='Params, GMACs and eval throughput of a model on random input: a registered model by name, or '
                    "the model of a run's checkpoint, rebuilt as the run built it (a compressed student, a searched "
                    'GLiT).',
        epilog='examples:\n'
               '  leanvit profile --model sret_t --img-size 32\n'
               '  leanvit profile --checkpoint runs/mini/best.safetensors\n'
               '  leanvit profile --model glit_custom --arch runs/search/hierarchical/best_arch.json --img-size 32',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    profile.add_argument('--model', default=None, help="model name (default: from --checkpoint's .json)")
    profile.add_argument('name', nargs='?', default=None, metavar='MODEL',
                         help='shorthand for --model MODEL (`leanvit profile sret_t`)')
    profile.add_argument('--model-kwargs', type=json_object, default=None, metavar='JSON',
                         help="model arguments, e.g. '{\"patch_size\": 4}'; override the checkpoint's .json")
    profile.add_argument('--arch', default=None, metavar='FILE',
                         help='architecture file of a model built from one (glit_custom, a searched best_arch.json)')
    profile.add_argument('--img-size', type=positive_int, default=None,
                         help="input resolution (default: the checkpoint's, else the model's default)")
    profile.add_argument('--checkpoint', default=None, help="weights to load: a run's .safetensors (its .json names "
                                                            'the model and its arguments), or an official .pth')
    _add_trust_flag(profile)
    _add_threads_flag(profile)
    profile.add_argument('--batch-size', type=positive_int, default=16)
    profile.add_argument('--iters', type=positive_int, default=5)
    profile.set_defaults(func=cmd_profile)

    train = sub.add_parser(
        'train', help='train or distil a model (resumes from the output folder if possible)',
        description='Train or distil a model. Every option is also a recipe key (a YAML file of key: value\n'
                    'lines, given with --config); options on the command line override the recipe.',
        epilog='examples:\n'
               '  leanvit train --model sret_t --img-size 32 --epochs 5                 # the bundled digits\n'
               '  leanvit train --data photos/ --val-split 0.2 --output runs/photos   # your image folder\n'
               '  leanvit train --config recipes/digits_sret_t_kd.yaml --lr 2e-3       # a recipe, one value changed\n'
               '  leanvit train --output runs/photos                                   # resume that run',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument('--config', metavar='YAML', help='recipe; options given here override its values')
    train.add_argument('--resume-anyway', action='store_true',
                       help='resume the run in --output even if its settings differ from these (default: a '
                            'difference is an error that names it)')
    _add_config_flags(train)
    _add_hub_flag(train)
    train.set_defaults(func=cmd_train)

    compress = sub.add_parser(
        'compress', help='MiniViT: multiplex a pre-trained DeiT/ViT or Swin into a smaller student, then distil it',
        description='Build a weight-multiplexed student of --teacher (consecutive layers share one block; each layer '
                    'keeps its norms and gets identity-initialised transformations), report how close it is to the '
                    'teacher untrained, then train it with weight distillation like `leanvit train` (resumable). '
                    'docs/minivit.md explains each option.',
        epilog='example:\n'
               '  leanvit compress --teacher deit_small_patch16_224 --teacher-checkpoint deit_s.pth --share 2 \\\n'
               '      --data photos/ --val-split 0.2 --output runs/mini --kd-alpha 1',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    compress.add_argument('--config', metavar='YAML', help='recipe; options given here override its values')
    compress.add_argument('--share', type=positive_int, default=2, help='consecutive layers per shared block '
                                                                        '(default: 2)')
    compress.add_argument('--shared-init', default='first', metavar='first|mean|K',
                          help="teacher weights a shared block starts from: the first of the layers it replaces, "
                               "their mean, or layer K of each group (default: first)")
    compress.add_argument('--attn-transform', action=argparse.BooleanOptionalAction, default=True,
                          help='per-layer head mixing before and after the softmax (default: on)')
    compress.add_argument('--local-conv', action=argparse.BooleanOptionalAction, default=False,
                          help="per-layer depthwise conv before the MLP (default: off; its LayerNorm keeps the "
                               "student from starting as the teacher)")
    compress.add_argument('--rpe', action=argparse.BooleanOptionalAction, default=False,
                          help="per-layer iRPE on the keys, DeiT students only (default: off)")
    compress.add_argument('--from-scratch', action='store_true',
                          help='the baseline: train the same student from random weights on the labels alone, without '
                               'the teacher (give it its own --output)')
    compress.add_argument('--resume-anyway', action='store_true',
                          help='resume the run in --output even if its settings differ from these')
    _add_config_flags(compress, refused=COMPRESS_SETS)
    _add_hub_flag(compress)
    compress.set_defaults(func=cmd_compress)

    search = sub.add_parser(
        'search', help="GLiT: train a supernet, then search global/local architectures under a budget",
        description='Train the GLiT supernet of --space on your data (single-path, resumable like `leanvit train`),\n'
                    'then run the evolutionary search over it (hierarchical: the global/local distribution, then\n'
                    'the sizes inside the blocks; or flat), scoring each candidate on a held-out part of the\n'
                    'training split. Writes OUTPUT/STRATEGY/best_arch.json, candidates.csv and candidates.png;\n'
                    'a killed search resumes where it stopped. Training options configure the supernet run; it\n'
                    'prints what the space costs at your --img-size first, and refuses a budget outside that.\n'
                    'Small images: pass a smaller patch_size in --model-kwargs. docs/glit.md.',
        epilog='examples:\n'
               '  leanvit search --space glit_tiny --budget-macs 1.5G --data photos/ --val-split 0.2 --output runs/s\n'
               '  leanvit search ... --strategy flat        # the same options: the baseline, on the same supernet\n'
               '  leanvit train --model glit_custom --arch runs/s/hierarchical/best_arch.json \\\n'
               '      --data photos/ --val-split 0.2 --output runs/best     # retrain the winner',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    search.add_argument('--config', metavar='YAML', help='recipe; options given here override its values')
    search.add_argument('--space', default='glit_tiny', choices=('glit_tiny', 'glit_small', 'glit_base'),
                        help='GLiT space at DeiT-Ti / S / B widths (default: glit_tiny)')
    search.add_argument('--strategy', default='hierarchical', choices=('hierarchical', 'flat'),
                        help='hierarchical (GLiT) or flat over the joint space (default: hierarchical)')
    search.add_argument('--budget-macs', type=metric_amount, metavar='N', help='most MACs per image, e.g. 1.5G')
    search.add_argument('--budget-params', type=metric_amount, metavar='N', help='most parameters, e.g. 8M')
    search.add_argument('--budget-latency', type=milliseconds, metavar='T',
                        help='most time per call on this machine in --backend, e.g. 12ms: a latency table is measured '
                             'here first (OUTPUT/latency/), and the best and Pareto-front architectures are timed')
    search.add_argument('--backend', choices=LATENCY_BACKENDS,
                        help='runtime the latency budget holds in, as `leanvit export` / `leanvit quantize` write it '
                             '(default: onnx)')
    search.add_argument('--latency-batch', type=positive_int, metavar='N',
                        help='images per call the latency budget is for (default: 1)')
    search.add_argument('--random-baselines', type=non_negative_int, default=5, metavar='N',
                        help='random architectures within the latency budget scored and timed beside the searched '
                             'ones (default: 5)')
    search.add_argument('--rank-check', type=non_negative_int, default=0, metavar='N',
                        help='after the search, retrain N architectures drawn within the budget alone and report '
                             'Kendall tau / Spearman rho between the supernet\'s scores and their top-1')
    search.add_argument('--rank-check-epochs', type=positive_int, metavar='N',
                        help='epochs of each --rank-check retraining (default: --epochs)')
    search.add_argument('--sandwich', type=non_negative_int, default=0, metavar='N',
                        help='train the supernet with the sandwich rule: each step the largest path on the labels, '
                             'the smallest and N random paths distilled from it (BigNAS); 0: one random path a '
                             'step (SPOS, default)')
    search.add_argument('--population', type=positive_int, default=50, help='candidates per generation (default: 50)')
    search.add_argument('--parents', type=positive_int, default=10, help='best candidates that breed (default: 10)')
    search.add_argument('--generations', type=positive_int, default=20,
                        help='generations; hierarchical spends half on each level (default: 20)')
    search.add_argument('--mutation-prob', type=probability, default=0.1,
                        help='chance of each block of a mutated child to be drawn again (default: 0.1; in [0, 1])')
    search.add_argument('--crossover-share', type=probability, default=0.5,
                        help='share of each generation made by crossover (default: 0.5; in [0, 1])')
    search.add_argument('--calib-batches', type=non_negative_int, default=10,
                        help='training batches that recalibrate BatchNorm per candidate; 0 keeps the supernet\'s '
                             'statistics (default: 10)')
    search.add_argument('--resume-anyway', action='store_true',
                        help='resume the supernet run and the search in --output even if their settings differ')
    _add_config_flags(search, refused=SEARCH_SETS, meaning={
        'epochs': 'epochs of supernet training (the search itself is --generations)',
        'output': 'folder of the search: supernet/ and one folder per --strategy'})
    search.set_defaults(func=cmd_search)

    evaluate = sub.add_parser('eval', help='top-1 / top-5 / loss and confusion matrix of a checkpoint on the '
                                           'validation split')
    _add_checkpoint_args(evaluate, data_default="the run's own data and split, as its checkpoint records them")
    evaluate.add_argument('--batch-size', type=positive_int, default=64)
    evaluate.add_argument('--output', default=None,
                          help="folder for eval_FILE.json and confusion_matrix_FILE.png, FILE the checkpoint's name "
                               "(default: the checkpoint's folder)")
    evaluate.set_defaults(func=cmd_eval)

    predict = sub.add_parser(
        'predict', help='top-k classes of image files, with class names and probabilities',
        description='Print the most probable classes of each image (files, or folders searched recursively) with\n'
                    'their probabilities, as the model sees the images in `leanvit eval`. --checkpoint takes what\n'
                    'eval takes, exported ONNX and TorchScript files included. Class names come from the data the\n'
                    "run trained on (its checkpoint's .json, or the exported file's metadata); without that record\n"
                    'the classes are shown by index.',
        epilog='examples:\n'
               '  leanvit predict --checkpoint runs/photos/best.safetensors photos/new/\n'
               '  leanvit predict --checkpoint model.onnx cat.jpg dog.png --top-k 3 --output predictions.csv',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_argument('images', nargs='+', metavar='IMAGE',
                         help='image files, and folders whose image files (any depth) are taken in sorted order')
    _add_checkpoint_args(predict)
    predict.add_argument('--top-k', type=positive_int, default=5,
                         help="classes shown per image; at most the model's class count (default: 5)")
    predict.add_argument('--output', default=None, metavar='CSV',
                         help='also write the predictions as CSV: path, then class_i, name_i, prob_i for each ranked '
                              'class; replaced only once complete')
    predict.add_argument('--batch-size', type=positive_int, default=64)
    predict.set_defaults(func=cmd_predict)

    logits = sub.add_parser('teacher-logits', help="store a teacher's logits for the training split once, so that "
                                                   "students train with --teacher-logits instead of a live teacher")
    _add_checkpoint_args(logits, data_default="the data the run trained on, else the bundled digits")
    logits.add_argument('--val-split', type=fraction, default=None, help='as the student run will use it (in (0, 1))')
    logits.add_argument('--seed', type=non_negative_int, default=0,
                        help='as the student run will use it (val-split order)')
    logits.add_argument('--batch-size', type=positive_int, default=64)
    logits.add_argument('--output', required=True, metavar='FILE', help='output .safetensors file')
    logits.set_defaults(func=cmd_teacher_logits)

    export = sub.add_parser(
        'export', help='write a checkpoint as ONNX or TorchScript and verify the file reproduces the model',
        description='Export a trained model, run the written file (ONNX Runtime / torch.jit.load) and the PyTorch '
                    'model on seeded random inputs, and fail, leaving --output as it was, if their outputs differ by '
                    'more than --atol. TorchScript is traced (torch.jit.trace), not scripted: leanvit models do not '
                    'script, and a trace records one path through the code, so it is verified like the ONNX file; '
                    'torch deprecates TorchScript, prefer ONNX. ONNX export needs pip install "leanvit[export]".')
    _add_checkpoint_args(export)
    export.add_argument('--format', choices=(*FORMATS, 'hub'), default=None,
                        help='onnx (dynamic batch axis, verified in ONNX Runtime), torchscript (torch.jit.trace), or '
                             'hub: a timm / Hugging Face Hub model folder (config.json, model.safetensors, a model '
                             "card README.md) that timm.create_model('local-dir:FOLDER', pretrained=True) loads "
                             '(default: from --output: .onnx, or .pt for TorchScript)')
    export.add_argument('--output', required=True, metavar='PATH',
                        help='output file (a folder for --format hub); replaced only once the new one passes')
    export.add_argument('--reparam', action=argparse.BooleanOptionalAction, default=True,
                        help='re-parameterize for inference first (timm.utils.model.reparameterize_model: each '
                             "module's reparameterize()/fuse(), e.g. RIFormer's folded mixers, SReT's folded stem); "
                             'checked against the original model too (default: on)')
    export.add_argument('--img-size', type=positive_int, default=None,
                        help='input resolution (default: the one the model was built for; to build it at another, '
                             'pass img_size in --model-kwargs)')
    export.add_argument('--batch-size', type=positive_int, default=2, help='batch size of the sample inputs')
    export.add_argument('--static-batch', action='store_true',
                        help='fix the batch size to --batch-size (default: any batch size, verified at two)')
    export.add_argument('--opset', type=positive_int, default=None, help="ONNX opset (default: torch's exporter's)")
    export.add_argument('--atol', type=non_negative_float, default=DEFAULT_ATOL,
                        help='largest absolute output difference allowed (default: %(default)g)')
    export.add_argument('--quantize', choices=['int8'], default=None,
                        help='also write an INT8 file beside --output (NAME.int8.onnx), quantized by ONNX Runtime '
                             '(see --int8-method), and evaluate both on the run\'s validation split')
    export.add_argument('--int8-method', choices=['auto', 'static', 'dynamic'], default='auto',
                        help='static (activation ranges calibrated on training images), dynamic (activations '
                             'quantized per batch), or auto: both, timed on this CPU, the faster kept (default: auto)')
    export.add_argument('--calib-batches', type=positive_int, default=8,
                        help='training batches to calibrate INT8 activation ranges on (default: %(default)s)')
    export.add_argument('--calib-batch-size', type=positive_int, default=32,
                        help='images per calibration batch (default: %(default)s)')
    export.add_argument('--max-drop', type=non_negative_float, default=1.0,
                        help='refuse to write the INT8 file if its top-1 is more than this many points below the '
                             'float file\'s (default: %(default)s)')
    export.add_argument('--data', default=None,
                        help='images for --quantize (default: the data the run trained on, as its sidecar records)')
    export.set_defaults(func=cmd_export)

    bench.add_parser(sub)

    analyze = sub.add_parser('analyze', help="MiniViT's diagnostics: per-block gradient norms in training, layer CKA "
                                             'between two models')
    analyses = analyze.add_subparsers(dest='analysis', required=True)
    blocks_help = ('regular expression matching the block modules by name (default: blocks.N as in timm ViT / DeiT, '
                   'layers.S.blocks.B as in timm Swin, stages.S.blocks.B as in leanvit models)')
    grad_norms = analyses.add_parser(
        'grad-norms', help='train N steps and record the gradient l2-norm of each block (MiniViT Fig. 2)',
        description='Train a model N steps (cross-entropy, AdamW, the training data pipeline) and write the gradient '
                    'l2-norm of each block at each step: grad_norms.csv (step, layer, norm) and grad_norms.png. A '
                    'block whose weights are shared and applied several times has one gradient per parameter, so it '
                    'is one series.')
    grad_norms.add_argument('--model', default=None, help="model name (default: from --checkpoint's .json)")
    grad_norms.add_argument('--model-kwargs', type=json_object, default=None, metavar='JSON',
                            help="model arguments, e.g. '{\"img_size\": 32}'")
    grad_norms.add_argument('--checkpoint', default=None, help='weights to start from (default: a new model); a '
                                                               "classifier of another class count is replaced")
    _add_trust_flag(grad_norms)
    _add_analysis_data_args(grad_norms)
    grad_norms.add_argument('--steps', type=positive_int, default=100, help='optimisation steps (default: 100)')
    grad_norms.add_argument('--batch-size', type=positive_int, default=64)
    grad_norms.add_argument('--lr', type=non_negative_float, default=1e-3, help='AdamW learning rate (default: 1e-3)')
    grad_norms.add_argument('--weight-decay', type=non_negative_float, default=0.05,
                            help='AdamW weight decay, not on 1-D parameters (default: 0.05)')
    grad_norms.add_argument('--augment', default='light', help='training-transform preset: none, light or imagenet, '
                                                               'as in training (default: light)')
    grad_norms.add_argument('--blocks', default=None, metavar='REGEX', help=blocks_help)
    grad_norms.add_argument('--output', required=True, help='folder for grad_norms.csv and grad_norms.png')
    grad_norms.set_defaults(func=cmd_analyze)

    cka = analyses.add_parser(
        'cka', help='linear CKA between the block outputs of two models (MiniViT Fig. 3)',
        description='Linear CKA (Kornblith et al. 2019) between every block output of model A and every block output '
                    'of model B on the same images, each output mean-pooled over its tokens: cka.csv (layer_a, '
                    'layer_b, cka) and cka.png. A block applied several times (shared weights) gives one layer per '
                    'application: blocks.0#0, blocks.0#1.')
    for side in ('a', 'b'):
        cka.add_argument(f'--model-{side}', default=None, help=f"model {side.upper()}'s name (default: from "
                                                                f"--checkpoint-{side}'s .json)")
        cka.add_argument(f'--model-kwargs-{side}', type=json_object, default=None, metavar='JSON',
                         help=f'model {side.upper()}\'s arguments')
        cka.add_argument(f'--checkpoint-{side}', default=None, help=f"model {side.upper()}'s weights (default: a "
                                                                    f'new, untrained model)')
        cka.add_argument(f'--blocks-{side}', default=None, metavar='REGEX', help=blocks_help)
        cka.add_argument(f'--layout-{side}', choices=('auto', 'NLC', 'NCHW', 'NHWC'), default='auto',
                         help='layout of the block outputs: tokens or maps (default: auto, from their shapes)')
    _add_trust_flag(cka)
    _add_analysis_data_args(cka)
    cka.add_argument('--split', choices=('train', 'val'), default='val',
                     help='the images compared, without augmentation (default: val)')
    cka.add_argument('--max-images', type=positive_int, default=1000,
                     help='compare the first N images of the split (default: 1000)')
    cka.add_argument('--batch-size', type=positive_int, default=64)
    cka.add_argument('--output', required=True, help='folder for cka.csv and cka.png')
    cka.set_defaults(func=cmd_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # torch warns on every TorchScript load and save that it is deprecated; export's --help says so once.
    warnings.filterwarnings('ignore', category=FutureWarning, module=r'torch\.jit')
    try:
        return args.func(args)
    except UsageError as e:
        print(f'leanvit {args.command}: error: {e}', file=sys.stderr)
        return EXIT_USAGE
    except (LeanvitError, OSError) as e:  # bad input files and folders; anything else is a bug: its traceback shows
        print(f'leanvit {args.command}: error: {describe(e)}', file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print(f'leanvit {args.command}: interrupted', file=sys.stderr)
        return EXIT_INTERRUPTED


def describe(error: Exception) -> str:
    """One line for an error: an OSError as 'file: reason', anything else as its message."""
    if isinstance(error, OSError) and error.filename is not None:
        return f'{error.filename}: {error.strerror}'
    return ' '.join(str(error).split()) or type(error).__name__


if __name__ == '__main__':
    sys.exit(main())
