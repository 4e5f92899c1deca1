"""Importing leanvit is cheap, and registers its models with timm whichever leanvit module is imported first."""

import subprocess
import sys

import pytest


def test_importing_leanvit_still_registers_its_models_with_timm():
    script = 'import leanvit, timm\nprint(timm.is_model("sret_t"), timm.is_model("riformer_s12"))'
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ['True', 'True']
    script = 'import timm, leanvit\nprint(timm.is_model("sret_t"), type(timm.__loader__).__name__)'
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ['True', 'SourceFileLoader']


@pytest.mark.parametrize('first', ['leanvit.layers', 'leanvit.layers.mlp', 'leanvit.data', 'leanvit.models.riformer',
                                   'leanvit.train.engine'])
def test_any_leanvit_module_imported_first_registers_the_models(first):
    script = f'import {first}, timm\nprint(timm.is_model("sret_t"), timm.is_model("riformer_s12"))'
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['True', 'True']
