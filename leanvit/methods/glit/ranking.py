"""How well the supernet ranks architectures: the check a weight-sharing search owes its user.

A search ranks candidates by their held-out top-1 on the supernet's shared weights, a proxy for what each would reach
trained alone. Where the proxy ranks them as stand-alone training does, the search finds good architectures; where it
does not (a rank correlation near zero), its winner is a random pick among the candidates (Yu et al., "Evaluating the
Search Phase of Neural Architecture Search", ICLR 2020). `rank_check` measures it: it retrains sampled architectures
alone with one recipe, scores them on the images the supernet scored them on, and reports Kendall's tau and
Spearman's rho between the two with their p-values.

Each retraining is an engine run in ``FOLDER/arch{i}``: a killed check resumes where it stopped, and the architectures
are a function of the seed, so a resumed check retrains the same ones.
"""

import dataclasses
import statistics
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from scipy.stats import kendalltau, spearmanr
from torch.utils.data import DataLoader

from leanvit.io.files import write_json
from leanvit.io.weights import load_checkpoint
from leanvit.models import create_model
from leanvit.models.glit import BlockArch
from leanvit.train import train
from leanvit.train.config import TrainConfig
from leanvit.train.evaluation import evaluate_model
from leanvit.train.run_directory import CheckpointManager

__all__ = ['rank_check', 'rank_correlation']


def rank_correlation(proxy: Sequence[float], truth: Sequence[float]) -> dict:
    """Kendall's tau and Spearman's rho (with two-sided p-values) between ``proxy`` and ``truth``; NaN-free: a
    constant side (no ranking to compare) gives 0 with p-value 1."""
    def finite(value: float, fallback: float) -> float:
        return float(value) if value == value else fallback  # NaN where a side is constant

    with warnings.catch_warnings():  # a constant side is answered below, not warned about
        warnings.simplefilter('ignore')
        tau, rho = kendalltau(proxy, truth), spearmanr(proxy, truth)
    return dict(architectures=len(proxy), kendall_tau=finite(tau.statistic, 0.), kendall_p=finite(tau.pvalue, 1.),
                spearman_rho=finite(rho.statistic, 0.), spearman_p=finite(rho.pvalue, 1.))


def rank_check(config: TrainConfig, archs: Sequence[Sequence[BlockArch]], score: Callable[[Sequence[BlockArch]], float],
               held_out, folder: Path, geometry: dict, device: torch.device) -> dict:
    """Retrain each of ``archs`` alone (``config``'s recipe: data, holdout, epochs, seed) as ``glit_custom`` with
    ``geometry``, measure its top-1 on ``held_out``, and correlate it with ``score`` (the supernet's held-out top-1).

    Writes ``folder/rank_check.json`` and returns it: each architecture with both numbers, and `rank_correlation`.
    """
    rows = []
    for i, arch in enumerate(archs):
        blocks = [dataclasses.asdict(block) for block in arch]
        run = folder / f'arch{i}'
        # The run gets the classes from the data and the image size from the recipe, as any run does.
        own = {k: v for k, v in geometry.items() if k not in ('num_classes', 'img_size')}
        retrain = dataclasses.replace(config, model='glit_custom', model_kwargs=dict(own, arch=blocks),
                                      objectives={}, output=str(run))
        print(f'rank check {i + 1}/{len(archs)}: retraining {run}', flush=True)
        train(retrain)
        model = create_model('glit_custom', **dict(geometry, arch=blocks))
        load_checkpoint(model, run / f'{CheckpointManager.latest_in(run)}.safetensors')
        top1 = evaluate_model(model.to(device), DataLoader(held_out, config.batch_size), device).top1
        rows.append(dict(arch=blocks, supernet_top1=score(arch), retrained_top1=top1))
    summary = dict(rank_correlation([r['supernet_top1'] for r in rows], [r['retrained_top1'] for r in rows]),
                   epochs=config.epochs, retrained_mean=statistics.mean(r['retrained_top1'] for r in rows),
                   rows=rows)
    write_json(folder / 'rank_check.json', summary)
    print(f'rank check: Kendall tau {summary["kendall_tau"]:.2f} (p = {summary["kendall_p"]:.2g}), Spearman rho '
          f'{summary["spearman_rho"]:.2f} (p = {summary["spearman_p"]:.2g}) between the supernet\'s held-out top-1 '
          f'and the top-1 of {len(rows)} architectures retrained alone for {config.epochs} epochs '
          f'-> {folder / "rank_check.json"}', flush=True)
    return summary

