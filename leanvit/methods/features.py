"""The features of a model's blocks, as the methods that distil or analyse them read them: taps that record any
module's input and output by its name without editing model code, the layouts a block output comes in, and the
feature losses on them."""

import difflib

import torch
import torch.nn.functional as F
from torch import nn


class FeatureTaps:
    """Forward hooks that keep the latest output (and optionally first input) of the named modules of ``model``.

    ``taps.outputs[name]`` / ``taps.inputs[name]`` hold the tensors of the last forward, with their autograd graph,
    so a loss on them trains the model. Use as a context manager, or call `remove` when done. A name that is not a
    module of ``model`` is an error that lists the closest names.
    """

    def __init__(self, model: nn.Module, names: list[str], inputs: bool = False):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            hints = {n: difflib.get_close_matches(n, modules, n=3) for n in missing}
            raise KeyError(f'{type(model).__name__} has no module named {missing}; closest names: {hints}')
        self.outputs: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n, inputs)) for n in names]

    def _hook(self, name: str, keep_input: bool):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor):
            self.outputs[name] = output
            if keep_input and args:  # a module called with keyword arguments only has no positional input to keep
                self.inputs[name] = args[0]
        return hook

    def clear(self):
        self.outputs.clear()
        self.inputs.clear()

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> 'FeatureTaps':
        return self

    def __exit__(self, *exc):
        self.remove()


LAYOUTS = ('NCHW', 'NHWC', 'NLC')


def as_tokens(x: torch.Tensor, layout: str = 'NCHW') -> torch.Tensor:
    """(B, N, C) tokens of a feature in ``layout``: NCHW maps (RIFormer, PoolFormer), NHWC (GFNet) or NLC tokens."""
    if layout not in LAYOUTS:
        raise ValueError(f'feature layout must be one of {LAYOUTS}, got {layout!r}')
    expected_ndim = 3 if layout == 'NLC' else 4
    if x.ndim != expected_ndim:
        raise ValueError(f'a {layout} feature has {expected_ndim} dimensions, got shape {tuple(x.shape)}')
    if layout == 'NCHW':
        return x.flatten(2).transpose(1, 2)
    return x.flatten(1, 2) if layout == 'NHWC' else x


def feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between two features of one shape (L'_in on block outputs, L_out on mixer outputs)."""
    if student.shape != teacher.shape:
        raise ValueError(f'student feature {tuple(student.shape)} and teacher feature {tuple(teacher.shape)} differ; '
                         'feature matching needs equal shapes (use the relation term for teachers of other widths)')
    return F.mse_loss(student.float(), teacher.float())


def relation_matrix(x: torch.Tensor, layout: str = 'NCHW') -> torch.Tensor:
    """(B, N, N) cosine similarities between the tokens of each image."""
    tokens = F.normalize(as_tokens(x, layout).float(), dim=-1)
    return tokens @ tokens.transpose(1, 2)


def relation_mse(student: torch.Tensor, teacher: torch.Tensor, student_layout: str = 'NCHW',
                 teacher_layout: str = 'NCHW') -> torch.Tensor:
    """L_rel: mean squared error between the token relation matrices of two features of one resolution."""
    s, t = relation_matrix(student, student_layout), relation_matrix(teacher, teacher_layout)
    if s.shape != t.shape:
        raise ValueError(f'relation matrices {tuple(s.shape)} and {tuple(t.shape)} differ: the paired features need '
                         'the same number of tokens')
    return F.mse_loss(s, t)
