"""leanvit's architecture families, one file each; importing this package registers every model in timm's registry."""

from leanvit.models import gfnet, glit, minivit, riformer, sret
from leanvit.models._registry import PaperCfg, create_model, list_models

__all__ = ['PaperCfg', 'create_model', 'gfnet', 'glit', 'list_models', 'minivit', 'riformer', 'sret']
