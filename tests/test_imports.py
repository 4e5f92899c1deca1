"""``import leanvit`` registers its models with timm and its objectives with the engine, with plain imports: nothing
is added to the import system, and timm imported alone loads nothing of leanvit."""

import subprocess
import sys

import pytest


def run(script: str) -> list[str]:
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_importing_leanvit_registers_its_models_and_objectives_without_an_import_hook():
    script = ('import sys\nfinders = list(sys.meta_path)\nimport leanvit, timm\n'
              'from leanvit.train.objectives import OBJECTIVES\n'
              'print(timm.is_model("sret_t"), timm.is_model("riformer_s12"), timm.is_model("glit_supernet"),'
              ' sorted(OBJECTIVES) == ["module_imitation", "path_sampling", "weight_distillation"],'
              ' sys.meta_path == finders)')
    assert run(script) == ['True'] * 5


def test_importing_timm_alone_loads_nothing_of_leanvit():
    script = 'import sys, timm\nprint(timm.is_model("sret_t"), [m for m in sys.modules if m.startswith("leanvit")])'
    assert run(script) == ['False', '[]']


@pytest.mark.parametrize('first', ['leanvit.layers.mlp', 'leanvit.io.data', 'leanvit.models.riformer',
                                   'leanvit.train.engine', 'leanvit.methods.glit.search'])
def test_any_leanvit_module_imported_first_registers_the_models(first):
    script = f'import {first}, timm\nprint(timm.is_model("sret_t"), timm.is_model("glit_supernet"))'
    assert run(script) == ['True', 'True']


def test_every_module_and_the_help_work_without_the_optional_export_packages():
    script = ('import pkgutil, sys\n'
              'for name in ("onnx", "onnxruntime", "onnxscript", "onnx_ir"):\n'
              '    sys.modules[name] = None  # as if not installed: importing it raises ImportError\n'
              'import leanvit\n'
              'for module in pkgutil.walk_packages(leanvit.__path__, "leanvit."):\n'
              '    __import__(module.name)\n'
              'from leanvit.cli import main\n'
              'try:\n    main(["export", "--help"])\nexcept SystemExit as e:\n    print("exit", e.code)')
    assert run(script)[-2:] == ['exit', '0']
