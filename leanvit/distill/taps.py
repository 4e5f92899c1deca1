"""Feature taps: read any module's input and output by its name, without editing model code."""

import difflib

import torch
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
