"""leanvit: parameter-efficient vision transformers as timm-native PyTorch models.

``import leanvit`` registers every leanvit model in timm's registry, so ``timm.create_model('sret_t')`` works, and
each method's training objectives with the training engine.

The package, bottom to top: ``layers`` (building blocks) and ``io`` (weights, data, exported files) at the bottom;
``models`` (one file per architecture family); ``train`` (the paper-agnostic engine); ``methods`` (each paper's
training-time method: GLiT's supernet and search, MiniViT's multiplexing and weight distillation, RIFormer's module
imitation); ``deploy`` (export, INT8, bench, predict); and the command line on top.
"""

from leanvit import methods, models  # noqa: F401 (registers the models with timm, the objectives with the engine)
from leanvit.errors import UnsafeCheckpointError
from leanvit.io.weights import load_checkpoint, read_checkpoint, save_weights
from leanvit.methods.minivit.multiplex import multiplex
from leanvit.models import create_model, list_models
from leanvit.profiler import Profile, count_params, profile

__version__ = '0.1.0'

__all__ = ['Profile', 'UnsafeCheckpointError', 'count_params', 'create_model', 'list_models', 'load_checkpoint',
           'methods', 'models', 'multiplex', 'profile', 'read_checkpoint', 'save_weights']
