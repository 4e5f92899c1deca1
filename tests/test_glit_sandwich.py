"""GLiT's supernet trained by the sandwich rule with in-place distillation (objective ``path_sampling`` with
``sandwich``): which paths are the largest and smallest, what a step runs and returns, the draws, the option's checks
and a whole training run that resumes."""

import json
import math
import random

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from leanvit.errors import UsageError
from leanvit.methods.glit import supernet as supernet_module
from leanvit.methods.glit.supernet import GLiTSupernet, PathSampling, extreme_architectures, sample_architecture
from leanvit.models.glit import SearchSpace
from leanvit.train import TrainConfig, train
from leanvit.train.objectives import build_objectives

SMALL = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=48)
SPACE = SearchSpace()
DEPTH = 3


def small_supernet(**kwargs) -> GLiTSupernet:
    torch.manual_seed(0)
    return timm.create_model('glit_supernet', depth=DEPTH, **(SMALL | kwargs))


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def plain_draws(seed: int, first: int, count: int) -> list:
    """The paths plain sampling (sandwich=0) draws as its draws ``first`` .. ``first + count - 1``."""
    return [sample_architecture(SPACE, DEPTH, 3, random.Random(f'{seed}:{k}')) for k in range(first, first + count)]


def record_arch(supernet: GLiTSupernet) -> list:
    """The architecture of every forward of ``supernet`` from now on, as its forward sees it."""
    seen = []
    supernet.register_forward_pre_hook(lambda m, a: seen.append(m.arch))  # runs after the objective's pre-hook
    return seen


@pytest.mark.parametrize('num_heads', [3, 6])
def test_extremes_are_the_blocks_with_fewest_and_most_parameters(num_heads):
    supernet = small_supernet(num_heads=num_heads)
    # Counted independently: each single-block choice repeated over the whole depth, extracted as a GLiT.
    counts = {block: param_count(supernet.extract((block,) * DEPTH)) for block in SPACE.all_blocks(num_heads)}
    smallest, largest = extreme_architectures(SPACE, DEPTH, 48, num_heads)
    assert len(smallest) == len(largest) == DEPTH and len(set(smallest)) == len(set(largest)) == 1
    assert counts[smallest[0]] == min(counts.values()) and counts[largest[0]] == max(counts.values())
    # Ties go to the first choice in all_blocks order.
    assert smallest[0] == next(b for b in SPACE.all_blocks(num_heads) if counts[b] == min(counts.values()))
    assert largest[0] == next(b for b in SPACE.all_blocks(num_heads) if counts[b] == max(counts.values()))
    assert extreme_architectures(SPACE, DEPTH, 48, num_heads) is extreme_architectures(SPACE, DEPTH, 48, num_heads)


def test_a_sandwich_step_trains_the_largest_on_labels_and_distils_the_others():
    supernet = small_supernet().train()
    default = supernet.arch
    smallest, largest = extreme_architectures(SPACE, DEPTH, 48, 3)
    # At this width the largest block is all local and the smallest all global: the attention is in no forward
    # the engine sees, so its gradients can come only from loss()'s forwards.
    assert {b.global_heads for b in largest} == {0} and {b.global_heads for b in smallest} == {3}
    sampler = build_objectives({'path_sampling': {'sandwich': 2, 'seed': 4}}, supernet, None)['path_sampling']
    seen = record_arch(supernet)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])

    label_loss = F.cross_entropy(supernet(x), y)
    assert seen == [largest] and supernet.arch == default
    label_loss.backward(retain_graph=True)
    attention = [block.attn.qkv.weight for block in supernet.blocks]
    assert all(p.grad is None for p in attention)  # the label loss alone does not reach the attention
    supernet.zero_grad(set_to_none=True)

    loss = sampler.loss()
    assert loss.ndim == 0 and loss.requires_grad and torch.isfinite(loss) and loss.item() > 0
    assert seen[1:] == [smallest, *plain_draws(4, 0, 2)] and sampler.draws == 2
    assert supernet.arch == default and [block.arch for block in supernet.blocks] == list(default)
    (label_loss + loss).backward()
    for p in attention:  # used by the smallest path only (and maybe the drawn ones)
        assert p.grad is not None and p.grad.abs().sum() > 0
    for block in supernet.blocks:  # the largest path's local module and MLP
        for p in (block.local.pw1.weight, block.local.dw.weight, block.mlp.fc1.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0

    assert sampler.loss().item() == 0  # called twice: nothing left to distil
    supernet(x)
    supernet.eval()(x)
    assert sampler.loss().item() == 0 and seen[-1] == default  # an evaluation forward keeps nothing
    assert sampler.draws == 2
    sampler.remove()


def test_loss_is_the_soft_cross_entropy_of_the_smallest_and_drawn_paths_to_the_largest():
    supernet = small_supernet().train()
    sampler = PathSampling(supernet, seed=7, sandwich=2)
    x = torch.randn(4, 3, 32, 32)
    supernet(x)
    supernet(x)  # a second step: its draws are plain sampling's draws 2 and 3
    loss = sampler.loss()
    assert sampler.draws == 2
    sampler.remove()
    loss.backward()
    grads = {name: p.grad for name, p in supernet.named_parameters()}
    supernet.zero_grad(set_to_none=True)

    # BatchNorm normalises by the batch in training, so these forwards compute what the sampler's did.
    smallest, largest = extreme_architectures(SPACE, DEPTH, 48, 3)
    with torch.no_grad(), supernet.path(largest):
        soft_targets = supernet(x).softmax(-1)
    expected = 0
    for arch in [smallest, *plain_draws(7, 0, 2)]:
        with supernet.path(arch):
            log_probs = supernet(x).log_softmax(-1)
        expected = expected + (-(soft_targets * log_probs).sum(-1)).mean()
    torch.testing.assert_close(loss, expected)
    # The same gradients too: none flows through the largest path's predictions, which are targets only.
    expected.backward()
    for name, p in supernet.named_parameters():
        if p.grad is None:
            assert grads[name] is None, name
        else:
            torch.testing.assert_close(grads[name], p.grad, msg=name)


def test_without_sandwich_there_is_no_loss_and_the_draws_are_unchanged():
    supernet = small_supernet().train()
    sampler = build_objectives({'path_sampling': {'seed': 3}}, supernet, None)['path_sampling']
    seen = record_arch(supernet)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(3):
        supernet(x)
        loss = sampler.loss()
        assert loss.item() == 0 and not loss.requires_grad
    assert seen == plain_draws(3, 0, 3)
    assert sampler.state_dict() == {'draws': 3, 'seed': 3}
    sampler.remove()


def test_sandwich_draws_resume_from_a_state_without_the_option():
    x = torch.randn(2, 3, 32, 32)
    supernet = small_supernet().train()
    sampler = PathSampling(supernet, seed=1, sandwich=2)
    seen = record_arch(supernet)
    for _ in range(2):
        supernet(x)
        sampler.loss()
    # Per step: the largest, the smallest, then the next two paths of plain sampling.
    assert [seen[2], seen[3], seen[6], seen[7]] == plain_draws(1, 0, 4)
    state = sampler.state_dict()
    assert state == {'draws': 4, 'seed': 1}
    sampler.remove()

    resumed_model = small_supernet().train()
    resumed = PathSampling(resumed_model, seed=1, sandwich=2)
    resumed.load_state_dict({'draws': 2})  # as a checkpoint of step 1 of this run, or of plain sampling
    again = record_arch(resumed_model)
    resumed_model(x)
    resumed.loss()
    assert again[2:] == seen[6:]
    resumed.remove()


@pytest.mark.parametrize('value', [-1, True, 'two', 1.5])
def test_a_bad_sandwich_value_is_named(value):
    with pytest.raises(UsageError, match=rf'path_sampling\.sandwich must be an integer >= 0.*got {value!r}'):
        build_objectives({'path_sampling': {'sandwich': value}}, small_supernet(), None)
    with pytest.raises(ValueError, match='sandwich must be an integer'):
        PathSampling(small_supernet(), sandwich=value)


def test_sandwich_is_refused_under_several_processes(monkeypatch):
    monkeypatch.setattr(supernet_module.dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(supernet_module.dist, 'get_world_size', lambda *args: 2)
    with pytest.raises(UsageError, match='path_sampling: sandwich=2 .* would not be averaged across the 2 processes'):
        build_objectives({'path_sampling': {'sandwich': 2}}, small_supernet(), None)
    build_objectives({'path_sampling': {'sandwich': 0}}, small_supernet(), None)['path_sampling'].remove()
    monkeypatch.setattr(supernet_module.dist, 'get_world_size', lambda *args: 1)
    build_objectives({'path_sampling': {'sandwich': 2}}, small_supernet(), None)['path_sampling'].remove()


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_sandwich_training_runs_and_resumes_to_the_same_weights(tmp_path, monkeypatch, restore_threads):
    common = dict(model='glit_supernet', img_size=32, batch_size=128, epochs=1, lr=1e-3, progress=False,
                  num_workers=0, threads=1, save_every_steps=4, drop_path=0.1,
                  model_kwargs=dict(patch_size=8, embed_dim=48, depth=2),
                  objectives={'path_sampling': {'sandwich': 1}})
    loss, distilled = PathSampling.loss, []

    def recorded(self):
        term = loss(self)
        distilled.append(term.item())
        return term

    with monkeypatch.context() as patch:
        patch.setattr(PathSampling, 'loss', recorded)
        final = train(TrainConfig(**common, output=str(tmp_path / 'reference')))
    assert math.isfinite(final['train_loss']) and math.isfinite(final['val_loss'])
    # One distillation term per step, each from a training forward (none is the zero of "nothing kept").
    assert len(distilled) > 6 and all(math.isfinite(term) and term > 0 for term in distilled)

    calls = {'n': 0}

    def interrupt_at_step_6(self):
        calls['n'] += 1
        if calls['n'] == 6:
            raise KeyboardInterrupt
        return loss(self)

    interrupted = TrainConfig(**common, output=str(tmp_path / 'interrupted'))
    with monkeypatch.context() as patch:
        patch.setattr(PathSampling, 'loss', interrupt_at_step_6)
        with pytest.raises(KeyboardInterrupt):
            train(interrupted)
    assert json.loads((tmp_path / 'interrupted' / 'latest.json').read_text())['tag'] == 'step-0000004'
    train(interrupted)
    tags = [json.loads((tmp_path / run / 'latest.json').read_text())['tag'] for run in ('reference', 'interrupted')]
    assert tags[0] == tags[1]
    expected, got = (load_file(tmp_path / run / f'{tags[0]}.safetensors') for run in ('reference', 'interrupted'))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
