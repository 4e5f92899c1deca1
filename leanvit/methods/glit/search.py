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
import random
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from leanvit.errors import TrainingDivergedError, UsageError
from leanvit.io.data import build_datasets
from leanvit.io.files import atomic_write, write_json
from leanvit.io.weights import load_checkpoint
from leanvit.methods.glit.evolution import Budget, Candidate, CandidateLog, EvolutionSearch, EvolutionSettings, ranked
from leanvit.methods.glit.supernet import GLiTSupernet, SuperConvModule, sample_architecture
from leanvit.models import create_model
from leanvit.models.glit import GLiT, SearchSpace
from leanvit.profiler import profile
from leanvit.train import train
from leanvit.train.config import TrainConfig
from leanvit.train.evaluation import data_config
from leanvit.train.run_directory import CheckpointManager, RunLock, read_sidecar

__all__ = ['SPACES', 'STRATEGIES', 'CostModel', 'SupernetScorer', 'search']

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
           resume_anyway: bool = False) -> dict:
    """Train the supernet of ``space`` (unless its run in ``config.output``/supernet is done) and search it with
    ``strategy``; ``config`` is the supernet's training run (its ``model`` is replaced by glit_supernet, its
    ``model_kwargs`` go on top of the space's). Returns the summary written to ``search.json``."""

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
    # Before the supernet trains: a budget that no architecture (or every one) meets at this size is a mistake that
    # should cost seconds, not the supernet's training.
    _check_budget(budget, cost, probe, space)
    train(supernet_config, resume_anyway=resume_anyway)

    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
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
        return _search_stage(folder, strategy, space, budget, settings, calib_batches, resume_anyway, tag, run_dir,
                             supernet, scorer, cost, rank, world_size)


def _search_stage(folder: Path, strategy: str, space: str, budget: Budget, settings: EvolutionSettings,
                  calib_batches: int, resume_anyway: bool, tag: str, run_dir: Path, supernet: GLiTSupernet,
                  scorer: SupernetScorer, cost: CostModel, rank: int, world_size: int) -> dict:
    settings_record = dict(dataclasses.asdict(settings), space=space, budget=dataclasses.asdict(budget),
                           calib_batches=calib_batches, supernet_checkpoint=tag)
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
        _write_outputs(folder, scored, best, budget)
        write_json(folder / 'search.json', summary)
        print(f'best of {len(scored)} candidates ({strategy}): held-out top-1 {best.score:.2f}%, '
              f'{best.macs / 1e9:.4f} GMACs, {best.params / 1e6:.3f} M params -> {folder / "best_arch.json"}',
              flush=True)
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


def _check_budget(budget: Budget, cost: CostModel, supernet: GLiTSupernet, space_name: str) -> None:
    """Print what the space costs at this input size (and how the blocks see it); refuse a budget outside that."""
    depth, num_heads, tokens = len(supernet.blocks), supernet.num_heads, supernet.patch_embed.num_patches + 1
    (macs_low, params_low), (macs_high, params_high) = cost_range(cost, supernet.space, depth, num_heads)
    size = 'x'.join(map(str, supernet.img_size))
    print(f'space      {space_name} at {size} ({tokens} tokens): {macs_low / 1e9:.4g}-{macs_high / 1e9:.4g} GMACs, '
          f'{params_low / 1e6:.4g}-{params_high / 1e6:.4g} M params per architecture; '
          + (f'budget {budget}' if budget != Budget() else 'no budget (--budget-macs, --budget-params)'), flush=True)
    widest = max(supernet.space.kernel_sizes)
    if widest > tokens:
        print(f'note       the local modules\' 1-D kernels ({min(supernet.space.kernel_sizes)}-{widest}) are wider '
              f'than '
              f'the {tokens} tokens of a {size} input at patch size {supernet.patch_embed.patch_size[0]}: for small '
              f'images, pass a smaller patch_size in --model-kwargs (docs/glit.md)', flush=True)
    for name, value, low, high, unit, scale in (('macs', budget.macs, macs_low, macs_high, 'G', 1e9),
                                                ('params', budget.params, params_low, params_high, 'M', 1e6)):
        if value is not None and not low <= value <= high:
            where = 'below the cheapest' if value < low else 'above the dearest'
            raise UsageError(f'budget-{name} {value / scale:.4g}{unit} is {where} architecture of {space_name} at '
                             f'{size}: choose one in {low / scale:.4g}{unit}..{high / scale:.4g}{unit}')


def _describe_arch(arch) -> str:
    return 'global heads ' + ' '.join(str(block.global_heads) for block in arch)


def _no_scores(unscored: list[Candidate], supernet: Path):
    raise TrainingDivergedError(
        f'every candidate of the search made non-finite outputs (NaN or infinite) on the held-out images, first '
        f'{_describe_arch(unscored[0].arch)}: the supernet {supernet} has diverged; train it again with a lower lr '
        f'in another --output')


def _img(config: TrainConfig) -> dict:
    return {'img_size': config.img_size} if config.img_size else {}


def _write_outputs(folder: Path, scored: list[Candidate], best: Candidate, budget: Budget) -> None:
    best_record = dict(blocks=[dataclasses.asdict(b) for b in best.arch], held_out_top1=best.score, macs=best.macs,
                       params=best.params, budget=str(budget))
    write_json(folder / 'best_arch.json', best_record)
    rows = sorted(scored, key=lambda c: (c.stage, c.generation))

    def write_csv(path: str):
        lines = [['stage', 'generation', 'held_out_top1', 'macs', 'params', 'global_heads', 'arch']]
        lines += [[c.stage, c.generation, f'{c.score:.3f}', int(c.macs), c.params,
                   ' '.join(str(b.global_heads) for b in c.arch),
                   json.dumps([dataclasses.asdict(b) for b in c.arch])] for c in rows]
        with open(path, 'w', newline='') as f:
            csv.writer(f).writerows(lines)
    atomic_write(folder / 'candidates.csv', write_csv)

    # A bare Figure, not pyplot: the caller's backend and figures (a notebook's) stay untouched, and the figure is
    # freed with its last reference.
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for stage in dict.fromkeys(c.stage for c in rows):
        points = [c for c in rows if c.stage == stage]
        ax.scatter([c.macs / 1e9 for c in points], [c.score for c in points], s=10, alpha=.6, label=stage)
    ax.scatter([best.macs / 1e9], [best.score], marker='*', s=150, c='k', label='best')
    if budget.macs is not None:
        ax.axvline(budget.macs / 1e9, ls='--', c='grey', lw=1)
    ax.set(xlabel='GMACs per image', ylabel='held-out top-1 (%)', title='candidates scored on the supernet')
    ax.legend()
    fig.tight_layout()
    atomic_write(folder / 'candidates.png', lambda path: fig.savefig(path, format='png', dpi=120))


def random_architectures(space: SearchSpace, depth: int, num_heads: int, cost: CostModel, budget: Budget, count: int,
                         seed: int) -> list[tuple]:
    """``count`` distinct architectures drawn uniformly (as the supernet samples them) within ``budget``: the
    random baseline of a search."""
    rng, found = random.Random(f'random:{seed}'), []
    for _ in range(1000 * count):
        arch = sample_architecture(space, depth, num_heads, rng)
        if arch not in found and budget.admits(*cost(arch)):
            found.append(arch)
            if len(found) == count:
                return found
    raise ValueError(f'found {len(found)} of {count} random architectures within {budget}')
