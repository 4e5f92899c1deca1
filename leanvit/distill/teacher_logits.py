"""Teacher logits computed once and stored, so that a student trains without running its teacher.

The file is a .safetensors with one tensor ``logits`` of shape (training images, classes), in the training split's
order, and metadata naming the teacher and the data. The logits are of each image under the evaluation transform:
a student that trains with augmentation sees other pixels than the stored logits describe, so the exact equivalent
of live distillation is training with ``augment=False`` (and no Mixup/CutMix, which the engine refuses).
"""

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from leanvit.checkpoint import atomic_write


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
    """(logits, metadata) from ``path``, checked against the training split it will be used with."""
    with safe_open(path, framework='pt') as f:
        logits = f.get_tensor('logits')
        metadata = json.loads((f.metadata() or {}).get('leanvit', '{}'))
    if tuple(logits.shape) != (num_images, num_classes):
        raise ValueError(
            f'teacher logits {path} hold {tuple(logits.shape)} (images, classes) but the training split has '
            f'{num_images} images of {num_classes} classes; they were computed for other data '
            f'({metadata.get("data", "unknown data")})')
    return logits, metadata
