"""Teacher logits computed once and stored, so that a student trains without running its teacher.

The file is a .safetensors with one tensor ``logits`` of shape (training images, classes), in the training split's
order, and metadata naming the teacher and the data. The logits are of each image under the evaluation transform:
a student that trains with augmentation sees other pixels than the stored logits describe, so the exact equivalent
of live distillation is training with ``augment='none'`` (and no Mixup/CutMix, which the engine refuses).
"""

import json
import os

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from leanvit.errors import CheckpointError
from leanvit.io.files import atomic_write
from leanvit.io.weights import read_safetensors

_EXPECTED = ('a .safetensors file written by `leanvit teacher-logits` with one tensor "logits" of shape '
             '(images, classes)')


@torch.inference_mode()
def compute_teacher_logits(teacher: nn.Module, dataset: Dataset, batch_size: int = 64,
                           device: torch.device | str = 'cpu') -> torch.Tensor:
    """Logits of ``teacher`` (in eval mode) for every sample of ``dataset``, in dataset order, as float32."""
    teacher.eval()
    return torch.cat([teacher(images.to(device)).float().cpu()
                      for images, _ in DataLoader(dataset, batch_size, shuffle=False)])


def save_teacher_logits(path: str | os.PathLike, logits: torch.Tensor, metadata: dict) -> None:
    """Write ``logits`` atomically with ``metadata`` (teacher, data description) as JSON in the file header."""
    atomic_write(path, lambda tmp: save_file({'logits': logits.contiguous()}, tmp,
                                             metadata={'leanvit': json.dumps(metadata)}))


def load_teacher_logits(path: str | os.PathLike, num_images: int, num_classes: int) -> tuple[torch.Tensor, dict]:
    """(logits, metadata) from ``path``, checked against the training split it will be used with.

    Raises:
        FileNotFoundError: nothing exists at ``path``.
        CheckpointError: ``path`` is not a readable .safetensors file, holds no 2-D float tensor ``logits``, has
            metadata 'leanvit' that is not a JSON object, or holds logits for another number of images or classes.
    """
    try:
        tensors, header = read_safetensors(path)
    except FileNotFoundError:
        raise FileNotFoundError(f'teacher logits {path} do not exist; expected {_EXPECTED}') from None
    except CheckpointError as e:
        raise CheckpointError(f'{e}; teacher logits must be {_EXPECTED}') from e
    logits = tensors.get('logits')
    if logits is None:
        names = ', '.join(sorted(tensors)[:3]) + (', ...' if len(tensors) > 3 else '')
        raise CheckpointError(f'{path} holds no tensor "logits" (its tensors: {names or "none"}); teacher logits must '
                              f'be {_EXPECTED}')
    if logits.ndim != 2 or not logits.is_floating_point():
        raise CheckpointError(f'{path} holds "logits" of shape {tuple(logits.shape)} and dtype {logits.dtype}, not 2-D '
                              f'floats; teacher logits must be {_EXPECTED}')
    if not torch.isfinite(logits).all():
        raise CheckpointError(f'{path} holds "logits" that are not all finite (NaN or infinite, '
                              f'{int((~torch.isfinite(logits)).sum())} values); teacher logits must be {_EXPECTED}')
    try:
        metadata = json.loads(header.get('leanvit', '{}'))
    except json.JSONDecodeError as e:
        raise CheckpointError(f'{path} has metadata "leanvit" that is not valid JSON ({e}); teacher logits must be '
                              f'{_EXPECTED}') from e
    if not isinstance(metadata, dict):
        raise CheckpointError(f'{path} has metadata "leanvit" that is not a JSON object; teacher logits must be '
                              f'{_EXPECTED}')
    if tuple(logits.shape) != (num_images, num_classes):
        raise CheckpointError(
            f'teacher logits {path} hold {tuple(logits.shape)} (images, classes) but the training split has '
            f'{num_images} images of {num_classes} classes; they were computed for other data '
            f'({metadata.get("data", "unknown data")})')
    return logits, metadata
