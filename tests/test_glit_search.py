"""GLiT's search: the supernet computes each candidate as the GLiT it extracts, path sampling, the evolutionary
loop (budget, stages, resume from its log), exact candidate costs, the held-out split and the whole command."""

import json
import random
import re

import pytest
import timm
import torch

import leanvit
from leanvit.errors import RunDirectoryError, RunLockedError, UsageError
from leanvit.io.data import build_datasets
from leanvit.methods.glit.evolution import Budget, CandidateLog, EvolutionSearch, EvolutionSettings
from leanvit.methods.glit.search import CostModel, SupernetScorer, random_architectures, search
from leanvit.methods.glit.supernet import (
    GLiTSupernet,
    PathSampling,
    SlicedBatchNorm,
    SlicedConv1d,
    SlicedLinear,
    sample_architecture,
)
from leanvit.models.glit import BlockArch, GLiT, SearchSpace, load_architecture
from leanvit.train import TrainConfig
from leanvit.train.objectives import build_objectives
from leanvit.train.run_directory import RunLock

SMALL = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=48)
SPACE = SearchSpace()


def small_supernet(depth=4, **kwargs) -> GLiTSupernet:
    torch.manual_seed(0)
    model = timm.create_model('glit_supernet', depth=depth, **(SMALL | kwargs))
    for module in model.modules():  # BatchNorm statistics and affine parameters away from the identity
        if isinstance(module, (torch.nn.BatchNorm1d, SlicedBatchNorm)):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize('num_heads', [3, 6])
def test_supernet_path_is_the_extracted_glit(num_heads):
    supernet = small_supernet(num_heads=num_heads).eval()
    rng = random.Random(0)
    x = torch.randn(2, 3, 32, 32)
    kinds = set()
    for _ in range(12):
        arch = sample_architecture(SPACE, 4, num_heads, rng)
        kinds |= {SPACE.kind(block, num_heads) for block in arch}
        model = supernet.extract(arch)
        assert isinstance(model, GLiT) and model.arch == arch
        with torch.no_grad(), supernet.path(arch):
            torch.testing.assert_close(supernet(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    assert kinds == {'global', 'local', 'mixed'}


def test_supernet_trains_the_slices_of_the_extracted_glit():
    # In training mode (batch statistics, running statistics updated) the path and the extracted model agree, and
    # the gradients of the extracted model are the slices of the supernet's.
    supernet = small_supernet().train()
    arch = (BlockArch(0, expansion=4, kernel_size=17), BlockArch(1, mlp_ratio=2, expansion=1),
            BlockArch(3, qkv_ratio=0.5, mlp_ratio=6), BlockArch(2, expansion=2))
    model = supernet.extract(arch).train()
    x = torch.randn(4, 3, 32, 32)
    with supernet.path(arch):
        supernet(x).square().sum().backward()
    model(x).square().sum().backward()
    torch.testing.assert_close(supernet.extract(arch).blocks[0].mixer.local.norm.running_var,
                               model.blocks[0].mixer.local.norm.running_var)
    dw_grad = supernet.blocks[0].local.dw.weight.grad
    trim = (45 - 17) // 2
    torch.testing.assert_close(dw_grad[:4 * 48, :, trim:trim + 17], model.blocks[0].mixer.local.dw.weight.grad,
                               rtol=1e-4, atol=1e-6)
    assert dw_grad[4 * 48:].abs().sum() == 0 and dw_grad[:, :, :trim].abs().sum() == 0


def test_supernet_rejects_architectures_outside_its_space():
    supernet = small_supernet()
    default = supernet.arch
    with pytest.raises(ValueError, match='the supernet has 4 blocks, the architecture 2'):
        supernet.path([BlockArch(3)] * 2)  # refused at the call, before any context is entered
    with pytest.raises(ValueError, match=r'block 1 \(local\): kernel_size 7 is not one of \[17, 31, 45\]'):
        supernet.path([BlockArch(3), BlockArch(0, kernel_size=7)] + [BlockArch(3)] * 2)
    assert supernet.arch == default and [block.arch for block in supernet.blocks] == list(default)


def block_sizes(supernet: GLiTSupernet) -> list:
    """What every path-dependent part of the supernet computes right now."""
    return [(block.arch, block.active) + tuple(m.active for m in block.modules() if hasattr(m, 'active'))
            for block in supernet.blocks]


def test_a_path_is_restored_when_the_forward_inside_it_raises():
    supernet = small_supernet().eval()
    default, sizes = supernet.arch, block_sizes(supernet)
    arch = (BlockArch(0, expansion=4, kernel_size=17), BlockArch(1, mlp_ratio=2), BlockArch(3, qkv_ratio=2),
            BlockArch(2, expansion=1))
    with pytest.raises(ValueError, match='input'), supernet.path(arch) as running:
        assert running == arch and supernet.arch == arch
        assert [block.arch for block in supernet.blocks] == list(arch)
        supernet(torch.randn(2, 3, 16, 16))  # the wrong size: check_input_size raises inside the forward
    assert supernet.arch == default and block_sizes(supernet) == sizes
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(supernet(x), supernet.extract(default).eval()(x), rtol=1e-5, atol=1e-5)


def test_nested_paths_restore_the_outer_one():
    supernet = small_supernet().eval()
    default = supernet.arch
    outer = (BlockArch(3, qkv_ratio=0.5),) * 4
    inner = (BlockArch(0, kernel_size=45),) * 4
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), supernet.path(outer):
        outer_sizes, expected = block_sizes(supernet), supernet(x)
        with supernet.path(inner):
            assert supernet.arch == inner and all(block.active.global_dim == 0 for block in supernet.blocks)
        assert supernet.arch == outer and block_sizes(supernet) == outer_sizes
        assert torch.equal(supernet(x), expected)
        with pytest.raises(RuntimeError, match='inside'), supernet.path(inner):
            raise RuntimeError('inside')
        assert supernet.arch == outer and block_sizes(supernet) == outer_sizes
    assert supernet.arch == default


def test_sliced_layers_report_the_sizes_their_forward_computes():
    # Not nn.Linear / nn.Conv1d / nn.BatchNorm1d, whose metadata would describe the largest weights: in_features,
    # out_features, in_channels, out_channels, kernel_size, groups and num_features are those of the active path.
    supernet = small_supernet().eval()
    sliced = {name: m for name, m in supernet.named_modules() if isinstance(m, (SlicedLinear, SlicedConv1d,
                                                                                   SlicedBatchNorm))}
    assert len(sliced) == 4 * 8
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.BatchNorm1d)) for m in sliced.values())
    seen = {}
    for name, module in sliced.items():
        module.register_forward_hook(lambda m, args, out, name=name: seen.setdefault(name, []).append(
            (tuple(args[0].shape), tuple(out.shape), m)))
    rng = random.Random(5)
    archs = [sample_architecture(SPACE, 4, 3, rng) for _ in range(6)] + [(BlockArch(0, kernel_size=17),) * 4]
    x = torch.randn(2, 3, 32, 32)
    checked = 0
    for arch in archs:
        seen.clear()
        with torch.no_grad(), supernet.path(arch):
            supernet(x)
            for name, calls in seen.items():
                (inp, out, m), = calls
                weight = m.sliced()['weight']
                if isinstance(m, SlicedLinear):
                    assert (m.in_features, m.out_features) == (inp[-1], out[-1]), name
                    assert tuple(weight.shape) == (m.out_features, m.in_features), name
                elif isinstance(m, SlicedConv1d):
                    assert (m.in_channels, m.out_channels) == (inp[1], out[1]), name
                    assert out[2] == inp[2] - m.kernel_size[0] + 1, name  # the input comes padded for the kernel
                    assert tuple(weight.shape) == (m.out_channels, m.in_channels // m.groups, *m.kernel_size), name
                else:
                    assert m.num_features == inp[1] == out[1] == weight.shape[0], name
                checked += 1
    assert checked > 6 * 4 * 4
    # The repr names the largest sizes, whatever the active path.
    assert 'in_features<=48, out_features<=288' in repr(supernet.blocks[0].mlp.fc1)
    assert 'in_channels<=192, out_channels<=192, kernel_size<=45' in repr(supernet.blocks[0].local.dw)


def test_a_layer_wrapped_after_construction_still_computes_its_slice():
    supernet = small_supernet().eval()
    arch = (BlockArch(1, mlp_ratio=2, expansion=2),) * 4
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), supernet.path(arch):
        expected = supernet(x)

    class Wrapper(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x)
    supernet.blocks[0].mlp.fc1 = Wrapper(supernet.blocks[0].mlp.fc1)
    with torch.no_grad(), supernet.path(arch):
        assert torch.equal(supernet(x), expected)
        assert supernet.blocks[0].mlp.fc1.layer.out_features == 2 * 48


def test_path_sampling_draws_per_training_forward_and_resumes():
    supernet = small_supernet()
    default = supernet.arch
    objectives = build_objectives({'path_sampling': {'seed': 3}}, supernet, None)
    sampler = objectives['path_sampling']
    seen = []
    supernet.register_forward_pre_hook(lambda m, a: seen.append(m.arch))  # runs after the sampler's pre-hook
    x = torch.randn(2, 3, 32, 32)
    supernet.train()
    for _ in range(4):
        supernet(x)
    assert supernet.arch == default  # back on the default path after each training forward
    assert len(set(seen)) == 4 and default not in seen
    assert sampler.loss().item() == 0
    state = sampler.state_dict()
    supernet.eval()(x)
    assert seen[-1] == default and sampler.draws == 4  # evaluation neither draws nor leaves the default path

    resumed_model = small_supernet()
    resumed = PathSampling(resumed_model, seed=3)
    resumed.load_state_dict(dict(state, draws=2))
    again = []
    resumed_model.register_forward_pre_hook(lambda m, a: again.append(m.arch))
    resumed_model.train()
    resumed_model(x)
    resumed_model(x)
    assert again == seen[2:4]
    sampler.remove()
    resumed.remove()


def test_path_sampling_leaves_the_sampled_path_when_a_training_forward_raises():
    supernet = small_supernet()
    default = supernet.arch
    sampler = PathSampling(supernet, seed=1)
    seen = []
    supernet.register_forward_pre_hook(lambda m, a: seen.append(m.arch))
    supernet.train()
    with pytest.raises(ValueError, match='input'):
        supernet(torch.randn(2, 3, 16, 16))
    assert seen[-1] != default and sampler.draws == 1
    assert supernet.arch == default and [block.arch for block in supernet.blocks] == list(default)
    supernet(torch.randn(2, 3, 32, 32))  # the next step draws the next path
    assert sampler.draws == 2 and supernet.arch == default
    sampler.remove()


def test_path_sampling_needs_a_supernet():
    with pytest.raises(UsageError, match='path_sampling trains a GLiT supernet'):
        build_objectives({'path_sampling': {}}, timm.create_model('glit_tiny_patch16_224', **SMALL), None)


def test_path_sampling_trains_with_grad_checkpointing():
    # Backward recomputes each checkpointed block after PathSampling's forward hook has left the drawn path: the
    # recomputation must run the path of the forward, so the step succeeds and its gradients are those of the same
    # draw without checkpointing. Drop path is on, so that the recomputation also replays the forward's random masks.
    x = torch.randn(4, 3, 32, 32)
    steps = []
    for checkpointing in (False, True):
        supernet = small_supernet(drop_path_rate=0.2).train()
        supernet.set_grad_checkpointing(checkpointing)
        sampler = PathSampling(supernet, seed=2)
        drawn = []
        supernet.register_forward_pre_hook(lambda m, a, drawn=drawn: drawn.append(m.arch))
        torch.manual_seed(1)
        supernet(x).square().sum().backward()
        sampler.remove()
        assert len(drawn) == 1 and drawn[0] != supernet.arch  # the step ran a drawn path, not the default one
        steps.append((drawn[0], {name: p.grad for name, p in supernet.named_parameters()}))
    (path, grads), (checkpointed_path, checkpointed_grads) = steps
    assert checkpointed_path == path and checkpointed_grads.keys() == grads.keys()
    assert sum(grad is not None for grad in grads.values()) > 4 * 10
    for name, grad in grads.items():
        if grad is None:  # a part the path does not use (a block without global heads has no attention)
            assert checkpointed_grads[name] is None, name
        else:
            torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_seed_gives_one_supernet_whose_sliced_linears_have_glit_s_init():
    # The sliced linears are initialised by GLiT's own _init_weights, as its nn.Linear layers (truncated normal, std
    # 0.02, zero bias); before it they draw PyTorch's nn.Linear default, so the generator runs as it did when they
    # were nn.Linear subclasses and a seed gives the weights it gave then.
    def build():
        torch.manual_seed(0)
        return timm.create_model('glit_supernet', depth=4, **SMALL)
    first, second = build().state_dict(), build().state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    linears = [m for m in build().modules() if isinstance(m, SlicedLinear)]
    assert len(linears) == 4 * 4
    for layer in linears:
        assert layer.bias.abs().max() == 0
        assert 0.018 < layer.weight.std().item() < 0.022  # PyTorch's default would be 0.034 or more here
    # Built alone, a sliced linear draws what an nn.Linear draws and leaves the generator where it does.
    layers, next_draws = [], []
    for cls in (SlicedLinear, torch.nn.Linear):
        torch.manual_seed(3)
        layers.append(cls(48, 96))
        next_draws.append(torch.rand(8))
    assert torch.equal(layers[0].weight, layers[1].weight) and torch.equal(layers[0].bias, layers[1].bias)
    assert torch.equal(*next_draws)


def test_cost_model_is_the_profile_of_the_built_model():
    cost = CostModel(num_heads=3, **SMALL)
    rng = random.Random(1)
    for _ in range(4):
        arch = sample_architecture(SPACE, 3, 3, rng)
        measured = leanvit.profile(GLiT(arch=arch, num_heads=3, **SMALL), (3, 32, 32))
        assert cost(arch) == (measured.macs, measured.params)


def toy_search(tmp_path, score, budget=Budget(), chunk=1, name='log.jsonl', **settings):
    # Cost: MACs = global heads in all blocks (so a MAC budget bounds the total of global heads).
    settings = EvolutionSettings(**(dict(population=8, parents=3, generations=4) | settings))
    return EvolutionSearch(SPACE, 6, 3, score, lambda arch: (float(sum(b.global_heads for b in arch)), 0), budget,
                           settings, CandidateLog(tmp_path / name), chunk=chunk)


def reward(arch) -> float:  # best: global heads alternate 3, 0, ... and the largest MLPs
    return sum((b.global_heads == (3 if i % 2 == 0 else 0)) + b.mlp_ratio / 6 for i, b in enumerate(arch))


def test_evolution_beats_its_random_start_and_keeps_the_budget(tmp_path):
    calls = []

    def score(archs):
        calls.extend(archs)
        return [reward(a) for a in archs]
    search_ = toy_search(tmp_path, score, budget=Budget(macs=10), generations=8)
    ranked = search_.run('flat', 8)
    assert len(ranked) == len(calls) == len(set(calls)) == 8 * 8  # every candidate new, scored once
    assert all(sum(b.global_heads for b in c.arch) <= 10 for c in ranked)
    first = max(reward(a) for a in calls[:8])
    assert ranked[0].score > first
    assert [c.score for c in ranked] == sorted((c.score for c in ranked), reverse=True)


def test_hierarchical_stages_search_what_they_should(tmp_path):
    search_ = toy_search(tmp_path, lambda archs: [reward(a) for a in archs])
    high = search_.run('high', 3)
    assert all(b == SPACE.default_block(b.global_heads, 3) for c in high for b in c.arch)
    heads = [b.global_heads for b in high[0].arch]
    low = search_.run('low', 3, global_heads=heads)
    assert all([b.global_heads for b in c.arch] == heads for c in low)
    assert len({c.arch for c in low}) > 1
    with pytest.raises(ValueError, match='the low-level stage, and only it'):
        search_.run('high', 1, global_heads=heads)


def test_a_killed_search_resumes_to_the_uninterrupted_result(tmp_path):
    whole = toy_search(tmp_path, lambda archs: [reward(a) for a in archs], name='whole.jsonl').run('flat', 4)

    calls = []

    def dies_after_13(archs):
        if len(calls) >= 13:
            raise KeyboardInterrupt
        calls.extend(archs)
        return [reward(a) for a in archs]
    with pytest.raises(KeyboardInterrupt):  # in the second generation
        toy_search(tmp_path, dies_after_13).run('flat', 4)
    with open(tmp_path / 'log.jsonl', 'a') as f:
        f.write('{"arch": [{"glob')  # the write the kill cut short
    rescored = []
    resumed = toy_search(tmp_path, lambda archs: rescored.extend(archs) or [reward(a) for a in archs]).run('flat', 4)
    assert [(c.arch, c.score) for c in resumed] == [(c.arch, c.score) for c in whole]
    assert len(rescored) == 32 - 13 and not set(rescored) & set(calls)


def test_candidate_log_refuses_a_damaged_line_before_the_last(tmp_path):
    path = tmp_path / 'log.jsonl'
    path.write_text('not json\n{}\n')
    with pytest.raises(RunDirectoryError, match='line 1 is not a candidate record'):
        CandidateLog(path)


def test_an_impossible_budget_is_named(tmp_path):
    search_ = toy_search(tmp_path, lambda archs: [0.] * len(archs), budget=Budget(macs=-1), max_draws=5)
    with pytest.raises(UsageError, match='no new architecture within'):
        search_.run('flat', 1)


def test_settings_are_checked():
    with pytest.raises(ValueError, match='population must be at least 1'):
        EvolutionSettings(population=0)
    with pytest.raises(ValueError, match=r'mutation_prob must be in \[0, 1\]'):
        EvolutionSettings(mutation_prob=2)


def test_holdout_is_a_stratified_part_of_train_with_the_eval_transform():
    cfg = timm.create_model('glit_tiny_patch16_224', **SMALL).pretrained_cfg | {'input_size': (3, 32, 32)}
    whole = build_datasets('digits', cfg)
    split = build_datasets('digits', cfg, holdout=0.25, seed=1)
    assert len(split.train) + len(split.held_out) == len(whole.train)
    assert len(split.val) == len(whole.val)
    held = set(map(id, split.held_out.images))
    assert not held & set(map(id, split.train.images))
    counts = torch.bincount(torch.tensor(split.held_out.labels), minlength=10)
    assert counts.min() >= 0.2 * len(split.held_out) / 10
    assert split.held_out.transform is split.val.transform
    assert build_datasets('digits', cfg, holdout=0.25, seed=1).held_out.labels == split.held_out.labels
    with pytest.raises(UsageError, match=r'holdout must be a fraction in \[0, 1\), got 1'):
        build_datasets('digits', cfg, holdout=1)


def test_random_architectures_are_distinct_and_within_budget():
    cost = CostModel(num_heads=3, **SMALL)
    budget = Budget(params=cost((SPACE.default_block(1, 3),) * 3)[1])
    found = random_architectures(SPACE, 3, 3, cost, budget, 5, seed=0)
    assert len(set(found)) == 5 and all(cost(a)[1] <= budget.params for a in found)
    cheapest = min(cost((block,) * 3)[1] for block in SPACE.all_blocks(3))
    with pytest.raises(UsageError, match=r'only [01] of 2 architectures drawn at random .2000 draws. meet the budget'):
        random_architectures(SPACE, 3, 3, cost, Budget(params=cheapest), 2, seed=0)


def test_search_end_to_end_resumes_and_retrains(tmp_path):
    config = TrainConfig(img_size=32, output=str(tmp_path / 'search'), epochs=1, batch_size=128, progress=False,
                         model_kwargs=dict(patch_size=8, embed_dim=48, depth=3))
    settings = EvolutionSettings(population=3, parents=2, generations=2)
    summary = search(config, budget=Budget(params=100_000), settings=settings, calib_batches=1)
    folder = tmp_path / 'search' / 'hierarchical'
    for name in ('best_arch.json', 'candidates.csv', 'candidates.png', 'candidates.jsonl', 'search.json'):
        assert (folder / name).stat().st_size > 0, name
    lines = (folder / 'candidates.csv').read_text().splitlines()
    assert len(lines) == 1 + summary['candidates'] == 1 + 6
    best = load_architecture(folder / 'best_arch.json')
    assert [dict(b.__dict__) for b in best] == summary['best']['arch']
    built = timm.create_model('glit_custom', arch=str(folder / 'best_arch.json'), **SMALL)
    assert leanvit.count_params(built) == summary['best']['params'] <= 100_000

    # Run again: the supernet run is done and every candidate is in the log, so nothing is trained or scored.
    log_before = (folder / 'candidates.jsonl').read_text()
    assert search(config, budget=Budget(params=100_000), settings=settings, calib_batches=1) == summary
    assert (folder / 'candidates.jsonl').read_text() == log_before
    with pytest.raises(UsageError, match='holds a search with other settings'):
        search(config, budget=Budget(params=90_000), settings=settings, calib_batches=1)
    with RunLock(folder), pytest.raises(RunLockedError):  # another process searching in this folder
        search(config, budget=Budget(params=100_000), settings=settings, calib_batches=1)

    # Retraining the winner records the architecture itself, not the file's path.
    from leanvit.train import train
    retrain = TrainConfig(model='glit_custom', arch=str(folder / 'best_arch.json'), img_size=32, epochs=1,
                          batch_size=128, progress=False, output=str(tmp_path / 'retrain'),
                          model_kwargs=dict(patch_size=8, embed_dim=48))
    train(retrain)
    meta = json.loads((tmp_path / 'retrain' / 'latest.json').read_text())
    recorded = json.loads((tmp_path / 'retrain' / f'{meta["tag"]}.json').read_text())
    assert load_architecture(recorded['model_kwargs']['arch']) == best


def test_search_command_errors_are_one_line(tmp_path, capsys):
    from leanvit.cli import main
    for argv, message in [(['--model', 'sret_t'], '--model does not apply to leanvit search: it trains the GLiT'),
                          (['--teacher', 'sret_t'], '--teacher does not apply to leanvit search'),
                          (['--budget-macs', '1.5X'], "expected a number with an optional k/M/G suffix"),
                          (['--population', '0'], 'population'),
                          (['--budget-params', 'nan'], 'must be a positive finite number, got nan'),
                          (['--calib-batches', '-1'], 'must be an integer >= 0, got -1'),
                          (['--space', 'glit_huge'], "invalid choice: 'glit_huge'")]:
        try:
            code = main(['search', '--output', str(tmp_path / 's'), *argv])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and 'Traceback' not in err and err.count('\n') == 1, (argv, err)
    assert not (tmp_path / 's').exists()


def digits_scorer(supernet, calib_batches: int, batch_size: int) -> SupernetScorer:
    data = build_datasets('digits', supernet.pretrained_cfg | {'input_size': (3, 32, 32)}, augment='none',
                          holdout=0.2)
    return SupernetScorer(supernet, data.held_out, data.train, calib_batches, batch_size, torch.device('cpu'))


def test_a_score_does_not_depend_on_what_was_scored_before():
    # Distributed scoring and resume rely on it: the BatchNorm recalibration sees the same batches every time.
    supernet = small_supernet(depth=2)
    scorer = digits_scorer(supernet, calib_batches=2, batch_size=32)
    first, second = (BlockArch(0, expansion=4, kernel_size=45),) * 2, (BlockArch(1, expansion=1),) * 2
    score = scorer(first)
    scorer(second)
    assert scorer(first) == score
    assert supernet.blocks[0].local.norm.momentum is None  # recalibrated as a cumulative average


def test_search_output_default_yields_to_a_recipe_and_a_flag(tmp_path):
    from leanvit.cli import build_parser, train_config
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text('output: runs/from_recipe\n')
    parse = build_parser().parse_args
    assert train_config(parse(['search']), output='runs/search').output == 'runs/search'
    assert train_config(parse(['search', '--config', str(recipe)]), output='runs/search').output == 'runs/from_recipe'
    assert train_config(parse(['search', '--config', str(recipe), '--output', 'x']), output='runs/search').output == 'x'


def test_a_log_cut_short_by_a_kill_stays_resumable_for_every_later_run(tmp_path, capsys):
    whole = toy_search(tmp_path, lambda archs: [reward(a) for a in archs], name='whole.jsonl').run('flat', 3)
    first = toy_search(tmp_path, lambda archs: [reward(a) for a in archs], name='log.jsonl').run('flat', 2)
    path = tmp_path / 'log.jsonl'
    lines = path.read_text().splitlines()
    path.write_text('\n'.join(lines[:-1]) + '\n' + lines[-1][:25])  # the kill cut the last record short
    resumed = toy_search(tmp_path, lambda archs: [reward(a) for a in archs]).run('flat', 3)
    out = capsys.readouterr().out
    assert f'{path}: dropped its last line, a record cut short by a kill' in out and out.count('\n') == 1
    assert [(c.arch, c.score) for c in resumed] == [(c.arch, c.score) for c in whole]
    # Every later run reads the log as it is: one record per line, nothing dropped again.
    text = path.read_text()
    assert text.endswith('\n') and len(text.splitlines()) == len(set(c.arch for c in whole)) > len(first)
    again = toy_search(tmp_path, lambda archs: pytest.fail('nothing left to score')).run('flat', 3)
    assert [(c.arch, c.score) for c in again] == [(c.arch, c.score) for c in whole]
    assert capsys.readouterr().out == '' and path.read_text() == text


@pytest.mark.parametrize('field, value, message', [
    ('arch', [{'global_heads': [1]}], 'arch block 0: global_heads must be an integer, got [1] (list)'),
    ('arch', [{'global_heads': '1'}], "arch block 0: global_heads must be an integer, got '1' (str)"),
    ('arch', [{'global_heads': 1, 'mlp_ratio': None}], 'arch block 0: mlp_ratio must be a number, got None'),
    ('arch', [{'global_heads': 1, 'colour': 2}], 'arch block 0 must be a mapping with global_heads'),
    ('arch', [], 'field "arch" must be a non-empty list of blocks'),
    ('score', 'high', 'field "score" must be a finite number or null'),
    ('macs', -1, 'field "macs" must be a finite number >= 0'),
    ('params', 1.5, 'field "params" must be an integer >= 0'),
    ('params', 10 ** 400, 'field "params" must be an integer >= 0'),
    ('arch', [{'global_heads': 1, 'mlp_ratio': 10 ** 400}], 'arch block 0: mlp_ratio must be a number'),
    ('generation', True, 'field "generation" must be an integer >= 0'),
    ('stage', 'middle', "field \"stage\" must be one of ['high', 'low', 'flat']"),
])
def test_every_field_of_every_record_is_validated(tmp_path, field, value, message):
    good = dict(arch=[{'global_heads': 1}], score=50.0, macs=1e6, params=1000, stage='flat', generation=0)
    path = tmp_path / 'log.jsonl'
    path.write_text(json.dumps(good) + '\n' + json.dumps(dict(good, **{field: value})) + '\n')
    with pytest.raises(RunDirectoryError) as error:
        CandidateLog(path)
    assert f'{path} line 2: {message}' in str(error.value) and '\n' not in str(error.value)


def test_a_record_with_missing_or_extra_fields_is_named(tmp_path):
    path = tmp_path / 'log.jsonl'
    path.write_text('{"arch": [{"global_heads": 1}], "score": 1}\n{}\n')
    with pytest.raises(RunDirectoryError, match=r'line 1 must be a JSON object with the fields'):
        CandidateLog(path)


def test_non_finite_scores_are_left_out_counted_and_never_written_as_nan(tmp_path):
    def score(archs):  # a first block of one global head overflows
        return [float('nan') if a[0].global_heads == 1 else reward(a) for a in archs]
    search_ = toy_search(tmp_path, score, generations=3)
    ranked = search_.run('high', 3)
    assert search_.unscored and all(c.score is not None for c in ranked)
    text = (tmp_path / 'log.jsonl').read_text()
    assert 'NaN' not in text and '"score": null' in text
    for line in text.splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f'{name} in the log'))
    # A resume reads the unscored candidates back and does not score them again.
    resumed = toy_search(tmp_path, lambda archs: pytest.fail('scored again'), generations=3)
    assert resumed.run('high', 3) == ranked and len(resumed.unscored) == len(search_.unscored)


def test_ties_go_to_the_cheaper_candidate(tmp_path):
    search_ = toy_search(tmp_path, lambda archs: [1.0] * len(archs))
    ranked = search_.run('flat', 2)
    assert [(c.macs, c.params) for c in ranked] == sorted((c.macs, c.params) for c in ranked)


def test_write_json_refuses_non_finite_numbers(tmp_path):
    from leanvit.io.files import write_json
    with pytest.raises(ValueError, match=r'field metrics.1.loss is not a finite number'):
        write_json(tmp_path / 'x.json', {'metrics': [{'loss': 1.0}, {'loss': float('inf')}]})
    assert not (tmp_path / 'x.json').exists()


def test_a_supernet_with_non_finite_outputs_gives_no_score():
    supernet = small_supernet(depth=2)
    scorer = digits_scorer(supernet, calib_batches=0, batch_size=64)
    arch = (BlockArch(1, expansion=1),) * 2
    assert 0 <= scorer(arch) <= 100
    with torch.no_grad():
        supernet.head.weight[0, 0] = float('nan')
    assert scorer(arch) != scorer(arch)  # NaN


def test_a_search_whose_every_score_is_nan_fails_naming_a_candidate_and_writes_no_nan(tmp_path, capsys,
                                                                                       monkeypatch):
    from leanvit.cli import main
    monkeypatch.setattr(SupernetScorer, '__call__', lambda self, arch: float('nan'))
    code = main(['search', '--output', str(tmp_path / 's'), '--img-size', '32', '--epochs', '1', '--batch-size',
                 '128', '--no-progress', '--model-kwargs', '{"patch_size": 8, "embed_dim": 48, "depth": 2}',
                 '--population', '3', '--parents', '2', '--generations', '2', '--calib-batches', '0'])
    err = capsys.readouterr().err
    assert code == 1 and 'Traceback' not in err and err.count('\n') == 1
    assert 'every candidate of the search made non-finite outputs' in err and 'first global heads' in err
    folder = tmp_path / 's' / 'hierarchical'
    assert not (folder / 'best_arch.json').exists() and not (folder / 'search.json').exists()
    assert 'NaN' not in (folder / 'candidates.jsonl').read_text()


def test_cost_range_is_the_cost_of_the_cheapest_and_dearest_architectures():
    from leanvit.methods.glit.search import cost_range
    cost = CostModel(num_heads=3, **SMALL)
    blocks = SPACE.all_blocks(3)
    assert len(blocks) == len(set(blocks)) == 4 * 9
    (macs_low, params_low), (macs_high, params_high) = cost_range(cost, SPACE, 3, 3)
    costs = {block: cost((block,) * 3) for block in blocks}  # each the cost of a whole 3-block architecture
    assert macs_low == min(c[0] for c in costs.values()) and params_low == min(c[1] for c in costs.values())
    assert macs_high == max(c[0] for c in costs.values()) and params_high == max(c[1] for c in costs.values())
    rng = random.Random(2)
    for _ in range(5):
        macs, params = cost(sample_architecture(SPACE, 3, 3, rng))
        assert macs_low <= macs <= macs_high and params_low <= params <= params_high


def test_a_budget_outside_the_space_at_this_size_is_refused_before_training(tmp_path, capsys):
    from leanvit.cli import main
    code = main(['search', '--output', str(tmp_path / 's'), '--img-size', '32', '--budget-macs', '1.5G'])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.count('\n') == 1
    assert re.search(r'budget-macs 1\.5G is above the dearest architecture of glit_tiny at 32x32: choose one in '
                     r'[\d.]+G\.\.[\d.]+G', captured.err), captured.err
    assert 'space      glit_tiny at 32x32 (5 tokens)' in captured.out
    assert "the local modules' 1-D kernels (17-45) are wider than the 5 tokens" in captured.out
    assert not (tmp_path / 's' / 'supernet').exists()


def test_search_help_shows_only_what_applies(capsys):
    from leanvit.cli import main
    with pytest.raises(SystemExit):
        main(['search', '--help'])
    out = capsys.readouterr().out
    options = set(re.findall(r'^  (--[\w-]+)', out, flags=re.MULTILINE))
    assert {'--budget-macs', '--epochs', '--img-size', '--holdout', '--threads'} <= options
    assert not options & {'--teacher', '--kd', '--kd-alpha', '--arch', '--init-from-teacher', '--model'}
    assert 'epochs of supernet training' in out


def test_a_record_nested_past_the_parser_is_named(tmp_path):
    path = tmp_path / 'log.jsonl'
    path.write_text('[' * 100_000 + ']' * 100_000 + '\n{}\n')
    with pytest.raises(RunDirectoryError, match='line 1 nests deeper than a candidate record'):
        CandidateLog(path)


def test_a_recipe_cannot_set_what_search_sets_itself(tmp_path, capsys):
    from leanvit.cli import main
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('teacher: deit_tiny_patch16_224\nepochs: 1\n')
    code = main(['search', '--config', str(recipe), '--output', str(tmp_path / 's')])
    err = capsys.readouterr().err
    assert code == 2 and f'recipe {recipe}: teacher does not apply to leanvit search' in err
    assert not (tmp_path / 's').exists()


def test_the_candidates_plot_leaves_pyplot_and_its_backend_alone(tmp_path):
    import sys

    from leanvit.methods.glit.evolution import Candidate
    from leanvit.methods.glit.search import _write_outputs
    pyplot = sys.modules.get('matplotlib.pyplot')
    figures = pyplot.get_fignums() if pyplot else None
    scored = [Candidate((BlockArch(1),) * 2, 50.0, 1e6, 1000, 'flat', 0)]
    _write_outputs(tmp_path, scored, scored[0], Budget(macs=2e6))
    assert (tmp_path / 'candidates.png').read_bytes().startswith(b'\x89PNG')
    if pyplot is None:  # never imported, so no backend was chosen or set
        assert 'matplotlib.pyplot' not in sys.modules
    else:
        assert pyplot.get_fignums() == figures
