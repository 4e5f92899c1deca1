"""leanvit model families; importing this package registers every model in timm's registry."""

from leanvit.models import gfnet, riformer, sret
from leanvit.models._registry import PaperCfg, create_model, list_models

__all__ = ['PaperCfg', 'create_model', 'gfnet', 'list_models', 'riformer', 'sret']
