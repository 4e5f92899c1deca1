"""leanvit: parameter-efficient vision transformers as timm-native PyTorch models.

``import leanvit`` registers every leanvit model in timm's registry, so ``timm.create_model('sret_t')`` works.
"""

from timm import create_model

from leanvit import models
from leanvit.checkpoint import UnsafeCheckpointError, load_checkpoint, read_checkpoint, save_weights
from leanvit.models import list_models
from leanvit.profiler import Profile, count_params, profile

__version__ = '0.1.0'

__all__ = [
    'Profile', 'UnsafeCheckpointError', 'count_params', 'create_model', 'list_models', 'load_checkpoint', 'models',
    'profile', 'read_checkpoint', 'save_weights',
]
