"""Training recipes (``recipes/*.yaml``): every file loads, each value says where it comes from, overrides win.

The published ImageNet recipes are only parsed here, never built (they need ImageNet and days of GPU time).
"""

import dataclasses
import random
import re
from pathlib import Path

import pytest
import yaml

import leanvit
import leanvit.train
from leanvit.cli import main
from leanvit.io.data import build_datasets
from leanvit.train import TrainConfig

RECIPES = Path(__file__).resolve().parent.parent / 'recipes'
ALL = sorted(RECIPES.glob('*.yaml'))
DIGITS = sorted(RECIPES.glob('digits_*.yaml'))
AUTO_AUGMENTS = sorted({TrainConfig.from_yaml(str(p)).auto_augment for p in ALL} - {None})


def test_the_recipes_folder_holds_the_published_and_the_digits_recipes():
    names = {path.stem for path in ALL}
    assert {'sret_t_in1k', 'sret_t_distill_in1k', 'riformer_s12_in1k', 'digits_teacher', 'digits_sret_t_kd'} <= names


@pytest.mark.parametrize('path', ALL, ids=lambda p: p.name)
def test_recipe_loads_into_a_train_config(path):
    config = TrainConfig.from_yaml(str(path))
    values = yaml.safe_load(path.read_text())
    assert {key: getattr(config, key) for key in values} == values
    assert config.epochs > 0 and config.batch_size > 0 and config.lr > 0


@pytest.mark.parametrize('path', ALL, ids=lambda p: p.name)
def test_every_recipe_value_carries_a_comment(path):
    """A value without a comment has no stated source (a paper section, an official README, a DeiT default)."""
    bare = [line for line in path.read_text().splitlines() if re.match(r'^\w+:', line) and '#' not in line]
    assert not bare, f'{path.name}: values without a comment: {bare}'


@pytest.mark.parametrize('path', DIGITS, ids=lambda p: p.name)
def test_digits_recipes_name_registered_models(path):
    config = TrainConfig.from_yaml(str(path))
    registered = leanvit.list_models()
    assert config.data is None
    assert config.model in registered
    assert config.teacher is None or config.teacher in registered


def test_digits_student_distils_the_teacher_recipe_output():
    teacher = TrainConfig.from_yaml(str(RECIPES / 'digits_teacher.yaml'))
    student = TrainConfig.from_yaml(str(RECIPES / 'digits_sret_t_kd.yaml'))
    assert student.teacher == teacher.model and student.img_size == teacher.img_size
    assert Path(student.teacher_checkpoint) == Path(teacher.output) / 'best.safetensors'
    assert student.epochs < teacher.epochs


def test_unknown_recipe_key_is_rejected_by_name(tmp_path):
    recipe = tmp_path / 'typo.yaml'
    recipe.write_text('model: sret_t\nlearning_rate: 0.1\nrepeated_aug: 3\n')
    with pytest.raises(ValueError, match=r"typo\.yaml: unknown keys \['learning_rate', 'repeated_aug'\]"):
        TrainConfig.from_yaml(str(recipe))


def test_overrides_win_over_recipe_values():
    path = RECIPES / 'sret_t_in1k.yaml'
    config = TrainConfig.from_yaml(str(path), lr=0.5, epochs=1, data=None)
    assert (config.lr, config.epochs, config.data) == (0.5, 1, None)
    assert config.warmup_epochs == yaml.safe_load(path.read_text())['warmup_epochs']  # untouched values stay


def test_command_line_flags_override_the_recipe(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(leanvit.cli, 'train', lambda config, resume_anyway: seen.append(config) or {})
    recipe = RECIPES / 'digits_sret_t_kd.yaml'
    assert main(['train', '--config', str(recipe), '--lr', '0.25', '--epochs', '1', '--teacher-checkpoint',
                 '/tmp/t.safetensors', '--no-progress']) == 0
    capsys.readouterr()
    (config,) = seen
    expected = dataclasses.replace(TrainConfig.from_yaml(str(recipe)), lr=0.25, epochs=1,
                                   teacher_checkpoint='/tmp/t.safetensors', progress=False)
    assert config == expected


def test_a_recipe_value_is_held_to_the_range_of_its_flag(tmp_path, capsys):
    # The flag is checked as it is parsed, the recipe value when TrainConfig is made: the same interval either way.
    recipe = tmp_path / 'split.yaml'
    recipe.write_text('val_split: 1.5\n')
    assert main(['train', '--config', str(recipe), '--output', str(tmp_path / 'run')]) == 2
    from_recipe = capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(['train', '--val-split', '1.5', '--output', str(tmp_path / 'run')])
    from_flag = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f'recipe {recipe}: val_split (--val-split) must be a number in (0, 1)' in from_recipe
    assert 'argument --val-split: must be a number in (0, 1), got 1.5' in from_flag
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('command, line', [('compress', 'init_checkpoint: x.safetensors'),
                                           ('compress', 'model_kwargs: {depth: 2}'), ('search', 'kd_alpha: 0.9')])
def test_a_recipe_cannot_set_what_the_command_sets_itself(tmp_path, capsys, command, line):
    # The command has no flag for it; a recipe written for `leanvit train` may still hold it.
    recipe = tmp_path / 'r.yaml'
    recipe.write_text(line + '\n')
    assert main([command, '--config', str(recipe), '--output', str(tmp_path / 'out')]) == 2
    key = line.split(':')[0]
    assert f'recipe {recipe}: {key} does not apply to leanvit {command}' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('auto_augment', AUTO_AUGMENTS)
def test_recipe_randaugment_runs_for_a_few_thousand_images(auto_augment):
    # timm 1.0.31's increasing posterize ('inc1') keeps 0 bits at magnitude 10, which Pillow 13 rejects (Pillow 12
    # returns a black image, as DeiT trained with): pyproject pins pillow < 13 until timm handles it.
    cfg = dict(input_size=(3, 32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
               interpolation='bicubic', crop_pct=0.875)
    train = build_datasets(None, cfg, auto_augment=auto_augment, re_prob=0.25).train
    random.seed(0)  # timm's RandAugment draws from Python's random
    for i in range(3 * len(train)):
        train[i % len(train)]
