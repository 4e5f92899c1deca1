"""leanvit model families; importing this package registers every model in timm's registry."""

from leanvit.models import gfnet, glit, minivit, riformer, sret
from leanvit.models._registry import PaperCfg, converter_for, create_model, list_models, register_converter

__all__ = ['PaperCfg', 'converter_for', 'create_model', 'gfnet', 'glit', 'list_models', 'minivit', 'register_converter',
           'riformer', 'sret']

from leanvit.search import supernet  # noqa: E402, F401 - registers glit_supernet, built on leanvit.models.glit
