"""`leanvit search`: GLiT's whole search on the user's data, resumable at every step.

1. Train the supernet (`GLiTSupernet`) single-path through the training engine (objective ``path_sampling``), on the
   training split minus a held-out part (``holdout``) that no step ever trains on.
2. Search: hierarchical (the global/local distribution first, then the sizes inside the blocks for the winner) or
   flat, each candidate scored by its held-out top-1 on the supernet's weights, its BatchNorm statistics
   recalibrated for that candidate on training images first (the statistics the supernet kept are an average over
   every path it trained, Guo et al., ECCV 2020, Sec. 4).
3. Write the best architecture (``best_arch.json``, loadable by ``glit_custom(arch=...)`` and
   ``leanvit train --model glit_custom --model-kwargs '{"arch": "best_arch.json"}'``), and a CSV and a PNG of every
   candidate scored.

Output folder: ``supernet/`` (an engine run), and per strategy ``hierarchical/`` or ``flat/`` with
``candidates.jsonl`` (the resume log), ``candidates.csv``, ``candidates.png``, ``best_arch.json`` and ``search.json``.
"""

import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from leanvit.deploy.bench import pareto_front
from leanvit.errors import TrainingDivergedError, UsageError
from leanvit.io.data import build_datasets
from leanvit.io.files import atomic_write, write_json
from leanvit.io.weights import load_checkpoint
from leanvit.methods.glit.evolution import Budget, Candidate, CandidateLog, EvolutionSearch, EvolutionSettings, ranked
from leanvit.methods.glit.latency import LatencyTable, load_or_measure, measure_architectures, prediction_errors
from leanvit.methods.glit.ranking import rank_check as check_ranking
from leanvit.methods.glit.supernet import GLiTSupernet, SuperConvModule, sample_architecture
from leanvit.models import create_model
from leanvit.models.glit import GLIT_TINY, BlockArch, GLiT, SearchSpace
from leanvit.profiler import profile
from leanvit.threads import usable_cpus
from leanvit.train import train
from leanvit.train.config import TrainConfig
from leanvit.train.evaluation import data_config
from leanvit.train.run_directory import CheckpointManager, RunLock, read_sidecar
from leanvit.train.tracking import Tracker

__all__ = ['SPACES', 'STRATEGIES', 'CostModel', 'PredictedCost', 'SupernetScorer', 'glit_tiny_shaped', 'search']

# GLiT's space on DeiT-Ti / S / B widths. Only Tiny has a published searched model; Small and Base are offered as
# spaces, not as architectures.
SPACES = {'glit_tiny': dict(embed_dim=192, num_heads=3, depth=12),
          'glit_small': dict(embed_dim=384, num_heads=6, depth=12),
          'glit_base': dict(embed_dim=768, num_heads=12, depth=12)}
STRATEGIES = ('hierarchical', 'flat')
DEFAULT_HOLDOUT = 0.2


class CostModel:
    """Exact parameters and MACs of an architecture built as a `GLiT` with ``model_kwargs`` (counted by
    `leanvit.profile`), as the sum of the stem-and-head cost and each block's own, each block choice counted once."""

    def __init__(self, num_heads: int, img_size: int, **model_kwargs):
        self.kwargs = dict(model_kwargs, num_heads=num_heads, img_size=img_size)
        self.input_size = (model_kwargs.get('in_chans', 3), img_size, img_size)

    @cache
    def block(self, block) -> tuple[float, int]:
        one, two = self._whole((block,)), self._whole((block, block))
        return two[0] - one[0], two[1] - one[1]

    @cache
    def _whole(self, arch) -> tuple[float, int]:
        with torch.device('meta'):
            model = GLiT(arch=arch, **self.kwargs)
        measured = profile(model, self.input_size)
        return measured.macs, measured.params

    def __call__(self, arch) -> tuple[float, int]:
        base_macs, base_params = self._whole((arch[0],))
        first_macs, first_params = self.block(arch[0])
        costs = [self.block(block) for block in arch]
        return (base_macs - first_macs + sum(c[0] for c in costs),
                base_params - first_params + sum(c[1] for c in costs))


class PredictedCost:
    """`CostModel`'s exact MACs and parameters and a `LatencyTable`'s predicted milliseconds of an architecture:
    ``(macs, params, ms)``, what `EvolutionSearch` checks a latency budget with."""

    def __init__(self, cost: CostModel, table: LatencyTable):
        self.cost, self.table = cost, table

    def __call__(self, arch) -> tuple[float, int, float]:
        return (*self.cost(arch), self.table.predict(arch))


def glit_tiny_shaped(depth: int, num_heads: int = 3) -> tuple[BlockArch, ...]:
    """GLiT-Tiny's searched blocks (`GLIT_TINY`) at ``depth`` blocks of ``num_heads`` heads: all of them at depth 12,
    else evenly spaced ones, so that the mix of global, local and mixed blocks is GLiT-Tiny's; global heads in the
    same thirds of the heads."""
    return tuple(dataclasses.replace(GLIT_TINY[i * len(GLIT_TINY) // depth],
                                     global_heads=GLIT_TINY[i * len(GLIT_TINY) // depth].global_heads * num_heads // 3)
                 for i in range(depth))


class SupernetScorer:
    """Held-out top-1 of the supernet on one architecture, after recalibrating its local BatchNorms on
    ``calib_batches`` training batches (cumulative averages, as ``momentum=None``)."""

    def __init__(self, supernet: GLiTSupernet, held_out, calibration, calib_batches: int, batch_size: int,
                 device: torch.device):
        self.supernet, self.device, self.calib_batches = supernet.to(device), device, calib_batches
        self.held_out = DataLoader(held_out, batch_size)
        self.order = torch.Generator()
        self.calibration = DataLoader(calibration, batch_size, shuffle=True, generator=self.order)

    @torch.no_grad()
    def __call__(self, arch) -> float:
        model = self.supernet
        with model.path(arch):
            norms = [m.norm for m in model.modules() if isinstance(m, SuperConvModule)]
            if norms and self.calib_batches:
                for norm in norms:
                    norm.reset_running_stats()
                    norm.momentum = None
                model.train()
                # The same batches for every candidate: a score must not depend on which candidates came before it
                # (or on which process of a distributed search scored it).
                self.order.manual_seed(0)
                for i, (images, _) in enumerate(self.calibration):
                    if i == self.calib_batches:
                        break
                    model(images.to(self.device))
            model.eval()
            correct = total = 0
            for images, labels in self.held_out:
                logits = model(images.to(self.device))
                if not torch.isfinite(logits).all():
                    return math.nan  # no score: the search leaves the candidate out and says so
                correct += (logits.argmax(-1).cpu() == labels).sum().item()
                total += labels.numel()
        return 100. * correct / total


def _distributed_score(scorer: SupernetScorer, rank: int, world_size: int):
    """``score`` for `EvolutionSearch`: process ``rank`` scores the ``rank``-th architecture of each chunk of
    ``world_size``, and every process gets every score."""
    def score(archs: Sequence) -> list[float]:
        mine = scorer(archs[rank]) if rank < len(archs) else None
        if world_size == 1:
            return [mine]
        gathered = [None] * world_size
        dist.all_gather_object(gathered, mine)
        return gathered[:len(archs)]
    return score


def search(config: TrainConfig, space: str = 'glit_tiny', budget: Budget = Budget(), strategy: str = 'hierarchical',
           settings: EvolutionSettings = EvolutionSettings(), calib_batches: int = 10,
           resume_anyway: bool = False, backend: str = 'onnx', latency_batch: int = 1, random_baselines: int = 5,
           rank_check: int = 0, rank_check_epochs: int | None = None) -> dict:
    """Train the supernet of ``space`` (unless its run in ``config.output``/supernet is done) and search it with
    ``strategy``; ``config`` is the supernet's training run (its ``model`` is replaced by glit_supernet, its
    ``model_kwargs`` go on top of the space's). Returns the summary written to ``search.json``.

    Under a latency budget (``budget.latency_ms``), a latency table of the space is measured first in ``backend`` at
    ``latency_batch`` images per call (`leanvit.methods.glit.latency`, kept in ``OUTPUT/latency/``), and after the
    search the best candidate, the Pareto front of held-out top-1 against predicted latency, ``random_baselines``
    random architectures within the budget and the GLiT-Tiny-shaped architecture are built and timed for real.
    ``rank_check`` > 0 retrains that many architectures drawn within the budget for ``rank_check_epochs`` (default:
    the supernet's epochs) and reports how the supernet ranks them (`leanvit.methods.glit.ranking`)."""

    if space not in SPACES:
        raise UsageError(f'space (--space) must be one of {", ".join(SPACES)}, got {space!r}')
    if strategy not in STRATEGIES:
        raise UsageError(f'strategy (--strategy) must be one of {", ".join(STRATEGIES)}, got {strategy!r}')
    output = Path(config.output)
    model_kwargs = dict(SPACES[space]) | config.model_kwargs
    if 'arch' in model_kwargs:
        raise UsageError('model_kwargs: the supernet has no arch (it holds every architecture of the space)')
    objectives = dict(config.objectives)
    objectives.setdefault('path_sampling', {'seed': config.seed})
    supernet_config = dataclasses.replace(config, model='glit_supernet', model_kwargs=model_kwargs,
                                          objectives=objectives, output=str(output / 'supernet'),
                                          holdout=config.holdout or DEFAULT_HOLDOUT)
    probe = create_model('glit_supernet', **model_kwargs, **_img(config))
    data = build_datasets(config.data, data_config(probe, config.img_size), val_split=config.val_split,
                          augment='none', bad_images=config.bad_images, seed=config.seed,
                          holdout=supernet_config.holdout)
    cost_kwargs = {k: v for k, v in model_kwargs.items() if k not in ('depth', 'drop_path_rate')}
    cost = CostModel(img_size=probe.img_size[0], num_classes=data.num_classes, **cost_kwargs)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if rank_check and int(os.environ.get('WORLD_SIZE', 1)) > 1:  # torchrun's processes, before the engine joins them
        raise UsageError('rank check (--rank-check) retrains architectures one after another in one process: run it '
                         'without torchrun (the search in --output is resumed, not repeated)')
    table = None
    if budget.latency_ms is not None:
        geometry = dict(cost.kwargs, embed_dim=probe.embed_dim)
        folder = output / 'latency'
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f'{backend}-batch{latency_batch}.json'
        # Under torchrun (no process group yet: the engine starts it) one process measures, on a CPU the others
        # leave idle, and the others read its table.
        if int(os.environ.get('RANK', 0)) != 0:
            _wait_for(path)
        table = load_or_measure(path, probe.space, geometry, len(probe.blocks), backend, latency_batch,
                                config.threads or usable_cpus())
    # Before the supernet trains: a budget that no architecture (or every one) meets at this size is a mistake that
    # should cost seconds, not the supernet's training.
    _check_budget(budget, cost, probe, space, table)
    if table is not None:
        cost = PredictedCost(cost, table)
    train(supernet_config, resume_anyway=resume_anyway)

    device = torch.device(config.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda' and world_size > 1:
        device = torch.device('cuda', torch.cuda.current_device())
    run_dir = output / 'supernet'
    tag = CheckpointManager.latest_in(run_dir)
    supernet = create_model('glit_supernet', num_classes=data.num_classes, **model_kwargs, **_img(config))
    load_checkpoint(supernet, run_dir / f'{tag}.safetensors')
    scorer = SupernetScorer(supernet, data.held_out, data.train, calib_batches, config.batch_size, device)

    folder = output / strategy
    folder.mkdir(parents=True, exist_ok=True)
    with RunLock(folder) if rank == 0 else contextlib.nullcontext():  # one search per folder at a time
        summary = _search_stage(folder, strategy, space, budget, settings, calib_batches, resume_anyway, tag,
                                run_dir, supernet, scorer, cost, rank, world_size, table, random_baselines)
        if rank == 0:
            log_search(config.log, folder, f'{output.name}/{strategy}', summary)
    if rank_check:
        archs = random_architectures(supernet.space, len(supernet.blocks), supernet.num_heads, cost, budget,
                                     rank_check, seed=f'rank-check:{config.seed}')
        retrain = dataclasses.replace(config, epochs=rank_check_epochs or config.epochs,
                                      holdout=supernet_config.holdout)
        geometry = dict(cost_kwargs, num_classes=data.num_classes, **_img(config))
        check = check_ranking(retrain, archs, scorer, data.held_out, output / 'rank_check', geometry, device)
        summary['rank_check'] = {k: v for k, v in check.items() if k != 'rows'}
        if rank == 0:
            write_json(folder / 'search.json', summary)
    return summary


def log_search(log: str | None, folder: Path, name: str, summary: dict) -> None:
    """Every candidate of the search in ``folder`` (``candidates.jsonl``) to the ``--log`` backends, step ``i`` the
    ``i``-th candidate scored (held-out top-1, MACs, params, predicted and measured latency), the settings as
    parameters, the plots as images and the outputs as files. A search run again logs the same steps again, which
    the backends show once (``leanvit.train.tracking``)."""
    if not log:
        return
    scored = [c for c in CandidateLog(folder / 'candidates.jsonl', persist=False).candidates.values()
              if c.score is not None]
    timed = (summary.get('latency') or {}).get('measured', [])
    measured = {json.dumps(row['arch']): row['measured_ms'] for row in timed}
    # Step 0 holds the settings; candidates count from 1, so a rerun's TensorBoard purge keeps the settings.
    with Tracker.open(log, folder, name, purge_from=1) as tracker:
        tracker.params(read_sidecar(folder / 'search_settings.json'), (folder / 'search_settings.json').read_text())
        for step, candidate in enumerate(scored, 1):
            values = {'candidate/held_out_top1': candidate.score, 'candidate/macs': candidate.macs,
                      'candidate/params': candidate.params}
            if candidate.latency_ms is not None:
                values['candidate/predicted_latency_ms'] = candidate.latency_ms
            arch = json.dumps([dataclasses.asdict(b) for b in candidate.arch])
            if arch in measured:
                values['candidate/measured_latency_ms'] = measured[arch]
            tracker.scalars(values, step)
        best = summary['best']
        tracker.scalars({'best/held_out_top1': best['score'], 'best/macs': best['macs'], 'best/params': best['params'],
                         **({'best/predicted_latency_ms': best['latency_ms']} if best.get('latency_ms') else {})},
                        len(scored))
        for plot in ('candidates', 'pareto'):
            if (folder / f'{plot}.png').is_file():
                tracker.image(f'search/{plot}', folder / f'{plot}.png', len(scored))
        for output in ('candidates.csv', 'best_arch.json', 'search.json', 'search_settings.json'):
            if (folder / output).is_file():
                tracker.artifact(folder / output, 'search')


def _search_stage(folder: Path, strategy: str, space: str, budget: Budget, settings: EvolutionSettings,
                  calib_batches: int, resume_anyway: bool, tag: str, run_dir: Path, supernet: GLiTSupernet,
                  scorer: SupernetScorer, cost: CostModel, rank: int, world_size: int, table: LatencyTable | None,
                  random_baselines: int) -> dict:
    # Without a latency budget the record is what it was before latency budgets: older searches still resume.
    budget_record = {k: v for k, v in dataclasses.asdict(budget).items() if k != 'latency_ms' or v is not None}
    settings_record = dict(dataclasses.asdict(settings), space=space, budget=budget_record,
                           calib_batches=calib_batches, supernet_checkpoint=tag)
    if table is not None:  # predicted latencies are in the log: another runtime or batch size is another search
        settings_record.update(latency_backend=table.backend, latency_batch=table.batch_size)
    recorded = folder / 'search_settings.json'
    if recorded.exists() and read_sidecar(recorded) != settings_record and not resume_anyway:
        raise UsageError(f'{folder} holds a search with other settings ({recorded}); use another --output or '
                         f'--resume-anyway to continue it with these')
    if rank == 0:
        write_json(recorded, settings_record)
    log = CandidateLog(folder / 'candidates.jsonl', persist=rank == 0)
    depth, num_heads = len(supernet.blocks), supernet.num_heads
    total = settings.population * settings.generations
    bar = tqdm(total=total, desc=f'{strategy} search', disable=None if rank == 0 else True)
    searcher = EvolutionSearch(supernet.space, depth, num_heads, _distributed_score(scorer, rank, world_size), cost,
                               budget, settings, log, progress=bar.update, chunk=world_size)
    if strategy == 'flat':
        scored = searcher.run('flat', settings.generations)
    else:
        high = searcher.run('high', settings.generations // 2 or 1)
        if not high:
            _no_scores(searcher.unscored, run_dir / f'{tag}.safetensors')
        heads = [block.global_heads for block in high[0].arch]
        scored = ranked(high + searcher.run('low', max(settings.generations - settings.generations // 2, 1),
                                            global_heads=heads))
    bar.close()
    if not scored:
        _no_scores(searcher.unscored, run_dir / f'{tag}.safetensors')
    best, unscored = scored[0], len(searcher.unscored)
    summary = dict(strategy=strategy, space=space, budget=str(budget), candidates=len(scored),
                   unscored=unscored, best=best.to_json(), supernet=str(run_dir / f'{tag}.safetensors'))
    if rank == 0:
        if unscored:
            print(f'left out {unscored} candidate(s) whose supernet outputs were not finite (NaN or infinite), first '
                  f'{_describe_arch(searcher.unscored[0].arch)}', flush=True)
        measured = None
        if table is not None:
            measured = _measure_latency(scored, supernet, scorer, cost, budget, table, random_baselines)
            summary['latency'] = _latency_summary(measured, table, folder)
        _write_outputs(folder, scored, best, budget, measured)
        write_json(folder / 'search.json', summary)
        latency = f', {best.latency_ms:.3f} ms predicted' if best.latency_ms is not None else ''
        print(f'best of {len(scored)} candidates ({strategy}): held-out top-1 {best.score:.2f}%, '
              f'{best.macs / 1e9:.4f} GMACs, {best.params / 1e6:.3f} M params{latency} -> '
              f'{folder / "best_arch.json"}', flush=True)
    return summary


def cost_range(cost: CostModel, space: SearchSpace, depth: int, num_heads: int) -> tuple[tuple[float, int], ...]:
    """((fewest MACs, fewest params), (most MACs, most params)) over every architecture of ``space``: each block's
    cost is its own, so the extremes are ``depth`` times the cheapest and the dearest block."""
    blocks = space.all_blocks(num_heads)
    costs = [cost.block(block) for block in blocks]
    first_macs, first_params = cost.block(blocks[0])
    base_macs, base_params = cost._whole((blocks[0],))
    low = (base_macs - first_macs + depth * min(c[0] for c in costs),
           base_params - first_params + depth * min(c[1] for c in costs))
    high = (base_macs - first_macs + depth * max(c[0] for c in costs),
            base_params - first_params + depth * max(c[1] for c in costs))
    return low, high


def _check_budget(budget: Budget, cost: CostModel, supernet: GLiTSupernet, space_name: str,
                  table: LatencyTable | None = None) -> None:
    """Print what the space costs at this input size (and how the blocks see it); refuse a budget outside that."""
    depth, num_heads, tokens = len(supernet.blocks), supernet.num_heads, supernet.patch_embed.num_patches + 1
    (macs_low, params_low), (macs_high, params_high) = cost_range(cost, supernet.space, depth, num_heads)
    latency_low, latency_high = table.range(depth) if table is not None else (None, None)
    size = 'x'.join(map(str, supernet.img_size))
    latency = f', {latency_low:.4g}-{latency_high:.4g} ms ({table.backend})' if table is not None else ''
    print(f'space      {space_name} at {size} ({tokens} tokens): {macs_low / 1e9:.4g}-{macs_high / 1e9:.4g} GMACs, '
          f'{params_low / 1e6:.4g}-{params_high / 1e6:.4g} M params{latency} per architecture; '
          + (f'budget {budget}' if budget != Budget() else
             'no budget (--budget-macs, --budget-params, --budget-latency)'), flush=True)
    widest = max(supernet.space.kernel_sizes)
    if widest > tokens:
        print(f'note       the local modules\' 1-D kernels ({min(supernet.space.kernel_sizes)}-{widest}) are wider '
              f'than '
              f'the {tokens} tokens of a {size} input at patch size {supernet.patch_embed.patch_size[0]}: for small '
              f'images, pass a smaller patch_size in --model-kwargs (docs/glit.md)', flush=True)
    for name, value, low, high, unit, scale in (('macs', budget.macs, macs_low, macs_high, 'G', 1e9),
                                                ('params', budget.params, params_low, params_high, 'M', 1e6),
                                                ('latency', budget.latency_ms, latency_low, latency_high, 'ms', 1)):
        if value is not None and not low <= value <= high:
            where = 'below the cheapest' if value < low else 'above the dearest'
            raise UsageError(f'budget-{name} {value / scale:.4g}{unit} is {where} architecture of {space_name} at '
                             f'{size}: choose one in {low / scale:.4g}{unit}..{high / scale:.4g}{unit}')


def _wait_for(path: Path, timeout_s: float = 3600.) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f'{path} was not written within {timeout_s:.0f} s by the process of rank 0')
        time.sleep(1.)


def _describe_arch(arch) -> str:
    return 'global heads ' + ' '.join(str(block.global_heads) for block in arch)


def _no_scores(unscored: list[Candidate], supernet: Path):
    raise TrainingDivergedError(
        f'every candidate of the search made non-finite outputs (NaN or infinite) on the held-out images, first '
        f'{_describe_arch(unscored[0].arch)}: the supernet {supernet} has diverged; train it again with a lower lr '
        f'in another --output')


def _img(config: TrainConfig) -> dict:
    return {'img_size': config.img_size} if config.img_size else {}


def _measure_latency(scored: list[Candidate], supernet: GLiTSupernet, scorer: SupernetScorer, cost: PredictedCost,
                     budget: Budget, table: LatencyTable, random_baselines: int) -> list[dict]:
    """Build and time, in the table's runtime: the best candidate, the Pareto front of held-out top-1 against
    predicted latency, ``random_baselines`` random architectures within the budget and the GLiT-Tiny-shaped one
    (the last two scored on the supernet like candidates). One record each, best first."""
    depth, num_heads = len(supernet.blocks), supernet.num_heads
    front = set(pareto_front([(c.latency_ms, c.score) for c in scored]))
    chosen = [('best', scored[0].arch, scored[0].score)]
    chosen += [('front', c.arch, c.score) for c in scored[1:] if (c.latency_ms, c.score) in front]
    randoms = random_architectures(supernet.space, depth, num_heads, cost, budget, random_baselines, seed='baseline')
    chosen += [('random', arch, scorer(arch)) for arch in randoms]
    shaped = glit_tiny_shaped(depth, num_heads)
    chosen.append(('glit-tiny-shaped', shaped, scorer(shaped)))
    on_front = sum(role == 'front' for role, _, _ in chosen)
    print(f'latency    measuring {len(chosen)} architectures in {table.backend} (the best, {on_front} more on the '
          f'Pareto front, {len(randoms)} random, GLiT-Tiny-shaped)', flush=True)
    measured = measure_architectures([arch for _, arch, _ in chosen], table)
    records = []
    for (role, arch, score), ms in zip(chosen, measured):
        macs, params, predicted = cost(arch)
        records.append(dict(role=role, held_out_top1=score if math.isfinite(score) else None, predicted_ms=predicted,
                            measured_ms=ms, within_budget=budget.admits(macs, params, predicted), macs=macs,
                            params=params, arch=[dataclasses.asdict(b) for b in arch]))
    return records


def _latency_summary(measured: list[dict], table: LatencyTable, folder: Path) -> dict:
    """The prediction error over every measured architecture, printed and returned for ``search.json``."""
    errors = prediction_errors([r['predicted_ms'] for r in measured], [r['measured_ms'] for r in measured])
    best = measured[0]
    print(f'latency    predicted vs measured over {errors["count"]} architectures ({table.describe()}): median error '
          f'{errors["median_abs_percent"]:.1f} %, worst {errors["worst_percent"]:+.1f} %; the best candidate '
          f'{best["predicted_ms"]:.3f} ms predicted, {best["measured_ms"]:.3f} ms measured -> '
          f'{folder / "pareto.png"}', flush=True)
    return dict(backend=table.backend, batch_size=table.batch_size, machine=table.machine,
                int8_method=table.int8_method, prediction_error=errors, measured=measured)


def _write_outputs(folder: Path, scored: list[Candidate], best: Candidate, budget: Budget,
                   measured: list[dict] | None = None) -> None:
    best_record = dict(blocks=[dataclasses.asdict(b) for b in best.arch], held_out_top1=best.score, macs=best.macs,
                       params=best.params, budget=str(budget))
    if best.latency_ms is not None:
        best_record['predicted_latency_ms'] = best.latency_ms
    if measured:
        best_record['measured_latency_ms'] = measured[0]['measured_ms']
    write_json(folder / 'best_arch.json', best_record)
    rows = sorted(scored, key=lambda c: (c.stage, c.generation))
    timed = {tuple(BlockArch(**b) for b in r['arch']): r['measured_ms'] for r in measured or []}

    def write_csv(path: str):
        lines = [['stage', 'generation', 'held_out_top1', 'macs', 'params', 'predicted_latency_ms',
                  'measured_latency_ms', 'global_heads', 'arch']]
        lines += [[c.stage, c.generation, f'{c.score:.3f}', int(c.macs), c.params,
                   f'{c.latency_ms:.4f}' if c.latency_ms is not None else '',
                   f'{timed[c.arch]:.4f}' if c.arch in timed else '',
                   ' '.join(str(b.global_heads) for b in c.arch),
                   json.dumps([dataclasses.asdict(b) for b in c.arch])] for c in rows]
        with open(path, 'w', newline='') as f:
            csv.writer(f).writerows(lines)
    atomic_write(folder / 'candidates.csv', write_csv)

    # A bare Figure, not pyplot: the caller's backend and figures (a notebook's) stay untouched, and the figure is
    # freed with its last reference.
    from matplotlib.figure import Figure
    by_latency = best.latency_ms is not None
    x, bound = ((lambda c: c.latency_ms), budget.latency_ms) if by_latency else \
        ((lambda c: c.macs / 1e9), None if budget.macs is None else budget.macs / 1e9)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for stage in dict.fromkeys(c.stage for c in rows):
        points = [c for c in rows if c.stage == stage]
        ax.scatter([x(c) for c in points], [c.score for c in points], s=10, alpha=.6, label=stage)
    ax.scatter([x(best)], [best.score], marker='*', s=150, c='k', label='best')
    if bound is not None:
        ax.axvline(bound, ls='--', c='grey', lw=1)
    ax.set(xlabel='predicted ms per call' if by_latency else 'GMACs per image', ylabel='held-out top-1 (%)',
           title='candidates scored on the supernet')
    ax.legend()
    fig.tight_layout()
    atomic_write(folder / 'candidates.png', lambda path: fig.savefig(path, format='png', dpi=120))
    if measured:
        _plot_measured(folder / 'pareto.png', measured, budget)


def _plot_measured(path: Path, measured: list[dict], budget: Budget) -> None:
    """Held-out top-1 against measured latency of every measured architecture, the Pareto front of them drawn."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    styles = {'front': dict(marker='o', c='tab:blue', label='Pareto front (searched)'),
              'random': dict(marker='x', c='tab:orange', label='random, within the budget'),
              'glit-tiny-shaped': dict(marker='D', c='tab:green', label='GLiT-Tiny-shaped'),
              'best': dict(marker='*', s=150, c='k', label='searched best')}
    points = [r for r in measured if r['held_out_top1'] is not None]
    for role, style in styles.items():
        mine = [r for r in points if r['role'] == role]
        if mine:
            ax.scatter([r['measured_ms'] for r in mine], [r['held_out_top1'] for r in mine], **style)
    front = pareto_front([(r['measured_ms'], r['held_out_top1']) for r in points])
    ax.plot(*zip(*front), c='grey', lw=1, zorder=0)
    ax.axvline(budget.latency_ms, ls='--', c='grey', lw=1, label='budget')
    ax.set(xlabel='measured ms per call', ylabel='held-out top-1 on the supernet (%)',
           title='measured latency of the searched and baseline architectures')
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=120))


def random_architectures(space: SearchSpace, depth: int, num_heads: int, cost: CostModel | PredictedCost,
                         budget: Budget, count: int, seed: int | str) -> list[tuple]:
    """``count`` distinct architectures drawn uniformly (as the supernet samples them) within ``budget``: the
    random baseline of a search."""
    rng, found = random.Random(f'random:{seed}'), []
    for _ in range(1000 * count):
        arch = sample_architecture(space, depth, num_heads, rng)
        if arch not in found and budget.admits(*cost(arch)):
            found.append(arch)
            if len(found) == count:
                return found
    raise UsageError(f'only {len(found)} of {count} architectures drawn at random ({1000 * count} draws) meet the '
                     f'budget {budget}: loosen it, or ask for fewer (--random-baselines, --rank-check)')
