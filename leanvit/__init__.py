"""leanvit: parameter-efficient vision transformers as timm-native PyTorch models.

``import leanvit`` registers every leanvit model in timm's registry, so ``timm.create_model('sret_t')`` works.

Importing leanvit is cheap (the command line's help and argument errors must not wait seconds for torch): the
names below load their modules on first use, and the models register themselves with timm as soon as timm is
imported, by anyone: at once if it already is, otherwise right after its own import finishes.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = '0.1.0'

_LAZY = {
    'create_model': 'leanvit.models', 'list_models': 'leanvit.models', 'load_checkpoint': 'leanvit.checkpoint',
    'read_checkpoint': 'leanvit.checkpoint', 'save_weights': 'leanvit.checkpoint', 'Profile': 'leanvit.profiler',
    'count_params': 'leanvit.profiler', 'profile': 'leanvit.profiler', 'UnsafeCheckpointError': 'leanvit.errors',
    'multiplex': 'leanvit.compress',
}

__all__ = sorted([*_LAZY, 'models'])


def __getattr__(name: str):
    if name == 'models':
        return importlib.import_module('leanvit.models')
    if name not in _LAZY:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(importlib.import_module(_LAZY[name]), name)


class _RegisterAfterTimm(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds timm as usual, and once timm's module has run, imports ``leanvit.models`` (which registers them)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != 'timm':
            return None
        sys.meta_path.remove(self)  # one import of timm; the lookup below must not find this finder again
        spec = importlib.util.find_spec('timm')
        if spec is not None:
            self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        # timm's own loader goes back in place, so resource lookups and reloads see nothing of this hook.
        module.__loader__ = module.__spec__.loader = self._loader
        importlib.import_module('leanvit.models')


if 'timm' in sys.modules:
    importlib.import_module('leanvit.models')
else:
    sys.meta_path.insert(0, _RegisterAfterTimm())
