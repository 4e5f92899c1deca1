"""The ``leanvit`` command line: model table formats, profiling, errors, and the README's generated table."""

import argparse
import csv
import io
import json
import os
import re
import subprocess
import sys

import pytest

import leanvit
from leanvit.cli import main

README = os.path.join(os.path.dirname(__file__), '..', 'README.md')


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_models_json_reports_measured_and_published_figures(capsys):
    code, out, _ = run_cli(capsys, 'models', '--filter', 'sret_t', '--format', 'json')
    assert code == 0
    rows = json.loads(out)
    assert [row['model'] for row in rows] == ['sret_t.in1k', 'sret_t.distill_in1k']  # one row per pretrained tag
    for row in rows:
        model = leanvit.create_model(row['model'])
        assert row['params'] == leanvit.count_params(model) == row['paper_params']
        assert row['gmacs'] == pytest.approx(row['paper_gmacs'], rel=0.02)
        assert row['paper_top1'] == model.pretrained_cfg['paper_top1']
    assert [row['paper_top1'] for row in rows] == [76.0, 77.6]


def test_models_measures_each_tag_at_its_input_size(capsys):
    code, out, _ = run_cli(capsys, 'models', '--filter', 'riformer_s12.in1k_384', '--format', 'json')
    assert code == 0
    (row,) = json.loads(out)
    assert row['input'] == 384 and row['paper_top1'] == 78.29
    assert row['gmacs'] == pytest.approx(row['paper_gmacs'], rel=0.007)


def test_models_csv_lists_every_matching_model(capsys):
    code, out, _ = run_cli(capsys, 'models', '--filter', 'sret_lt*', '--format', 'csv')
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0
    assert [r['model'] for r in rows] == ['sret_lt.in1k', 'sret_lt.distill_in1k', 'sret_lt_unsliced.in1k',
                                          'sret_lt_unsliced.distill_in1k']


def test_models_hides_test_configurations_unless_asked(capsys):
    _, out, _ = run_cli(capsys, 'models', '--filter', 'test_*', '--format', 'json', '--all')
    assert [r['model'] for r in json.loads(out)] == leanvit.list_models('test_*')
    code, _, err = run_cli(capsys, 'models', '--filter', 'test_*')
    assert code == 1 and "no leanvit model matches 'test_*'" in err


def test_profile_prints_params_macs_and_throughput(capsys):
    code, out, _ = run_cli(capsys, 'profile', '--model', 'test_sret', '--batch-size', '2', '--iters', '1')
    measured = leanvit.profile(leanvit.create_model('test_sret'), (3, 64, 64))
    assert code == 0
    assert f'params     {measured.params:,}' in out
    assert f'GMACs      {measured.gmacs:.4g}' in out
    assert re.search(r'images/s   \d+\.\d+  \(eval, re-parameterized, batch 2, \d+ threads: ', out)


def test_profile_rebuilds_a_runs_model_from_its_checkpoint(tmp_path, capsys):
    # A timm DeiT trained at 32 px with 4-pixel patches: the sidecar alone says how to build it.
    kwargs = dict(img_size=32, patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=10)
    model = leanvit.create_model('deit_tiny_patch16_224', **kwargs)
    leanvit.save_weights(model, tmp_path / 'best.safetensors')
    (tmp_path / 'best.json').write_text(json.dumps(dict(model='deit_tiny_patch16_224', model_kwargs=kwargs)))
    code, out, err = run_cli(capsys, 'profile', '--checkpoint', tmp_path / 'best.safetensors', '--batch-size', '2',
                             '--iters', '1', '--threads', '1')
    assert code == 0, err
    measured = leanvit.profile(model, (3, 32, 32))
    assert f'model      deit_tiny_patch16_224 (3x32x32) from {tmp_path / "best.safetensors"}' in out
    assert f'params     {measured.params:,}' in out and f'GMACs      {measured.gmacs:.4g}' in out
    assert '1 threads: --threads' in out


def test_profile_builds_an_architecture_file(tmp_path, capsys):
    arch = tmp_path / 'arch.json'
    arch.write_text(json.dumps({'blocks': [{'global_heads': 3}, {'global_heads': 0, 'kernel_size': 17}]}))
    # The positional name is a shorthand for --model.
    code, out, err = run_cli(capsys, 'profile', 'glit_custom', '--arch', arch, '--img-size', '32', '--model-kwargs',
                             '{"patch_size": 8}', '--batch-size', '1', '--iters', '1')
    assert code == 0, err
    expected = leanvit.profile(leanvit.create_model('glit_custom', arch=str(arch), img_size=32, patch_size=8),
                               (3, 32, 32))
    assert f'params     {expected.params:,}' in out
    code, _, err = run_cli(capsys, 'profile')
    assert code == 2 and "profile needs --model NAME (e.g. --model sret_t) or a run's --checkpoint" in err


def test_unknown_model_is_a_clear_error(capsys):
    code, _, err = run_cli(capsys, 'profile', '--model', 'sret_xl')
    assert code == 2 and err.startswith("leanvit profile: error: unknown model 'sret_xl' (did you mean sret_")


def test_console_script_is_installed():
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), 'leanvit'), '--version'],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f'leanvit {leanvit.__version__}'


def test_readme_model_table_is_the_generated_one(capsys):
    _, out, _ = run_cli(capsys, 'models', '--format', 'markdown')
    readme = open(README).read()
    table = readme.split('<!-- models:start -->', 1)[1].split('<!-- models:end -->', 1)[0]
    assert table.strip() == out.strip(), 'README model table is stale: run `make readme`'


def test_every_train_option_has_a_help_line_with_its_default_under_a_topic():
    import dataclasses

    from leanvit.cli import build_parser
    from leanvit.train.config import GROUPS, TrainConfig

    train = build_parser()._subparsers._group_actions[0].choices['train']
    by_flag = {action.option_strings[0]: action for action in train._actions if action.option_strings}
    topics = {group.title: [a.option_strings[0] for a in group._group_actions] for group in train._action_groups}
    for field in dataclasses.fields(TrainConfig):
        option = '--' + field.name.replace('_', '-')
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        shown = 'none' if default is None else json.dumps(default) if isinstance(default, dict) else str(default)
        assert f'(default: {shown}' in by_flag[option].help, option
        assert option in topics[GROUPS[field.metadata['group']]], option
    assert list(topics)[-len(GROUPS):] == list(GROUPS.values())


def subcommands(parser=None) -> dict:
    """Every (sub)command's parser by its prog, e.g. 'leanvit analyze cka'."""
    from leanvit.cli import build_parser

    parser = parser or build_parser()
    found = {parser.prog: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found.update(subcommands(child))
    return found


def test_every_command_that_writes_files_names_them_with_output():
    options = {prog: set(parser._option_string_actions) for prog, parser in subcommands().items()}
    writers = {prog for prog, names in options.items() if '--output' in names}
    assert writers == {f'leanvit {c}' for c in ('train', 'compress', 'search', 'eval', 'predict', 'teacher-logits',
                                                'export', 'bench', 'analyze grad-norms', 'analyze cka')}
    assert not any('--out' in names for names in options.values())  # the old name is an alias, not an option


@pytest.mark.parametrize('command', ['export --checkpoint c.safetensors', 'predict --checkpoint c.onnx a.png',
                                     'teacher-logits --checkpoint c.safetensors', 'train', 'bench'])
def test_out_is_a_deprecated_alias_of_output(command, capsys):
    from leanvit.cli import build_parser

    parse = build_parser().parse_args
    assert parse([*command.split(), '--out', 'x.onnx']).output == 'x.onnx'
    prog = 'leanvit ' + command.split()[0]
    assert capsys.readouterr().err == f'{prog}: warning: --out is deprecated; use --output\n'
    assert parse([*command.split(), '--out=y.onnx', '--out', 'z.onnx']).output == 'z.onnx'
    assert capsys.readouterr().err.count('\n') == 1  # one warning per command line
    assert parse([*command.split(), '--output', 'w.onnx']).output == 'w.onnx'
    assert capsys.readouterr().err == ''
    with pytest.raises(SystemExit):
        parse([command.split()[0], '--help'])
    assert '--out ' not in capsys.readouterr().out


def test_profile_takes_model_as_every_command_does(capsys):
    from leanvit.cli import build_parser

    parse = build_parser().parse_args
    assert parse(['profile', '--model', 'sret_t']).model == 'sret_t'
    args = parse(['profile', 'sret_t'])
    assert (args.model, args.name) == (None, 'sret_t')
    code, out, err = run_cli(capsys, 'profile', 'test_sret', '--model', 'test_sret', '--batch-size', '1', '--iters',
                             '1')
    assert code == 0 and out.startswith('model      test_sret'), err  # the same name twice is no conflict


@pytest.mark.parametrize('command, refused', [
    ('compress', ['--model', '--model-kwargs', '--arch', '--init-checkpoint', '--init-from-teacher',
                  '--no-init-from-teacher', '--teacher-logits']),
    ('search', ['--model', '--arch', '--teacher', '--teacher-checkpoint', '--teacher-kwargs', '--kd', '--kd-alpha',
                '--kd-tau', '--trust-teacher-checkpoint', '--init-from-teacher', '--teacher-logits']),
])
def test_compress_and_search_have_no_flag_for_what_they_set_themselves(command, refused, capsys):
    from leanvit.cli import build_parser

    parser = subcommands()[f'leanvit {command}']
    with pytest.raises(SystemExit):
        parser.parse_args(['--help'])
    listed = set(re.findall(r'^  (--[\w-]+)', capsys.readouterr().out, flags=re.MULTILINE))
    assert '--epochs' in listed and not listed & set(refused)
    for option in refused:  # refused by the parser, before anything loads, naming the option
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([command, option, '1'])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count('\n') == 1, err
        assert err.startswith(f'leanvit {command}: error: {option} does not apply to leanvit {command}'), err
    # What follows -- is no option: neither refused nor renamed.
    assert build_parser().parse_args(['predict', '--checkpoint', 'c.onnx', '--', '--out']).images == ['--out']
    assert capsys.readouterr().err == ''


def test_every_float_option_is_range_checked_when_parsed(capsys):
    """A number given on the command line is checked as it is parsed; a bare float type would take nan, inf, -1."""
    from leanvit.cli import build_parser

    unchecked = [f'{prog} {action.option_strings[0]}' for prog, parser in subcommands(build_parser()).items()
                 for action in parser._actions if action.type in (float, int)]
    assert not unchecked
