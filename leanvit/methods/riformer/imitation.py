"""RIFormer's module imitation (paper Sec. 3.4): the student's blocks imitate a teacher's with a token mixer.

Total loss = L_soft + w_block * L'_in + w_mixer * L_out + w_relation * L_rel (docs/riformer.md, "Module imitation"):
- L'_in (`feature_mse` on block outputs): the student's block outputs match the teacher's. The paper matches the
  token mixers' inputs and relaxes that to the block outputs, which are the next block's input;
- L_out (`mixer_output_mse`): fed the teacher's normalised input, the student's affine mixer reproduces the teacher's
  token-mixer output (the affine learns what pooling or attention did);
- L_rel (`relation_mse`): the token-to-token similarity (Gram) matrices of block outputs match. The paper does not
  define the relation matrix; our reading is the cosine similarity between the tokens of one image, which needs no
  equal channel counts, so it also works for a teacher of other widths (GFNet-H-B beside RIFormer-S12).
No code was released and the weights, the temperature and the pairing of layers are unpublished: each term has its
own weight (0 turns it off), each model's blocks are found by `blocks_by_stage` (or a name pattern), and stages pair
by order (same resolution). Inside a stage of another depth, student block j of d_s pairs with teacher block
ceil((j + 1) * d_t / d_s) - 1, so the last blocks of each stage always pair.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from leanvit.errors import UsageError
from leanvit.methods.features import LAYOUTS, FeatureTaps, as_tokens, blocks_by_stage, feature_mse, relation_mse
from leanvit.train.objectives import register_objective


def mixer_output_mse(student_mixer: nn.Module, teacher_input: torch.Tensor,
                     teacher_output: torch.Tensor) -> torch.Tensor:
    """L_out: the student's token mixer applied to the teacher mixer's input, against the teacher mixer's output."""
    return feature_mse(student_mixer(teacher_input.detach().float()), teacher_output.detach())


def pair_blocks(student: list[list[str]], teacher: list[list[str]]) -> list[tuple[str, str]]:
    """(student block, teacher block) pairs: stage by stage, proportionally by depth inside a stage."""
    if len(student) != len(teacher):
        raise ValueError(f'the student has {len(student)} stages and the teacher {len(teacher)}; module imitation '
                         'pairs blocks stage by stage')
    pairs = []
    for s_blocks, t_blocks in zip(student, teacher):
        for j, name in enumerate(s_blocks):
            pairs.append((name, t_blocks[math.ceil((j + 1) * len(t_blocks) / len(s_blocks)) - 1]))
    return pairs


def _token_mixer(model: nn.Module, block: str) -> nn.Module:
    try:
        return model.get_submodule(block + '.token_mixer')
    except AttributeError:
        raise ValueError(f'the mixer-output term (L_out) needs MetaFormer blocks with a token_mixer module; '
                         f'{type(model).__name__} block {block} has none') from None


@dataclass(frozen=True)
class ImitationWeights:
    block_output: float = 0.
    mixer_output: float = 0.
    relation: float = 0.

    def __bool__(self) -> bool:
        return any((self.block_output, self.mixer_output, self.relation))


class ModuleImitation:
    """Taps the paired blocks of a student and a teacher; `loss` after both forwards gives the weighted terms.

    Usage: ``imitation = ModuleImitation(student, teacher, weights)``; per step run ``student(x)`` and ``teacher(x)``,
    then ``total = kd_loss + imitation.loss()``. ``imitation.remove()`` detaches the hooks. Block outputs are read in
    each model's layout (``'NCHW'`` for RIFormer and PoolFormer, ``'NHWC'`` for GFNet's blocks).

    ``student_blocks`` / ``teacher_blocks`` override where a model's blocks are found: a regular expression for their
    names, its first group naming the stage (see `blocks_by_stage`); None finds them from the model's structure.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, weights: ImitationWeights,
                 student_blocks: str | None = None, teacher_blocks: str | None = None,
                 student_layout: str = 'NCHW', teacher_layout: str = 'NCHW'):
        self.weights = weights
        self.layouts = (student_layout, teacher_layout)
        self.pairs = pair_blocks(blocks_by_stage(student, student_blocks), blocks_by_stage(teacher, teacher_blocks))
        if min(weights.block_output, weights.mixer_output, weights.relation) < 0:
            raise ValueError(f'imitation weights must be >= 0, got {weights}')
        self.student_mixers = {}
        if weights.mixer_output:
            self.student_mixers = {s: _token_mixer(student, s) for s, _ in self.pairs}
            for _, t in self.pairs:
                _token_mixer(teacher, t)
        self.student_taps = FeatureTaps(student, [s for s, _ in self.pairs])
        self.teacher_taps = FeatureTaps(teacher, [t for _, t in self.pairs])
        self.teacher_mixer_taps = FeatureTaps(teacher, [t + '.token_mixer' for _, t in self.pairs], inputs=True) \
            if weights.mixer_output else None

    def terms(self) -> dict[str, torch.Tensor]:
        """Each enabled term, averaged over the block pairs, from the last student and teacher forwards.

        Computed in float32 outside autocast: a Gram matrix of thousands of tokens loses too much in half precision.
        """
        student, teacher = self.student_taps.outputs, self.teacher_taps.outputs
        if not student or not teacher:
            raise RuntimeError('module imitation needs one student and one teacher forward before each loss()')
        with torch.autocast(next(iter(student.values())).device.type, enabled=False):
            return self._terms(student, teacher)

    def _terms(self, student: dict, teacher: dict) -> dict[str, torch.Tensor]:
        terms = {}
        sl, tl = self.layouts
        if self.weights.block_output:
            terms['block_output'] = torch.stack([
                feature_mse(as_tokens(student[s], sl), as_tokens(teacher[t], tl)) for s, t in self.pairs]).mean()
        if self.weights.relation:
            terms['relation'] = torch.stack([
                relation_mse(student[s], teacher[t], sl, tl) for s, t in self.pairs]).mean()
        if self.weights.mixer_output:
            inputs, outputs = self.teacher_mixer_taps.inputs, self.teacher_mixer_taps.outputs
            terms['mixer_output'] = torch.stack([
                mixer_output_mse(self.student_mixers[s], inputs[t + '.token_mixer'], outputs[t + '.token_mixer'])
                for s, t in self.pairs]).mean()
        return terms

    def loss(self) -> torch.Tensor:
        """The weighted sum of `terms`; the taps are emptied, so no batch's features outlive its step."""
        loss = sum(getattr(self.weights, name) * value for name, value in self.terms().items())
        for taps in (self.student_taps, self.teacher_taps, self.teacher_mixer_taps):
            if taps is not None:
                taps.clear()
        return loss

    def state_dict(self) -> dict:
        """Nothing to save: the terms depend only on the two models (the auxiliary-objective protocol asks)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def remove(self):
        for taps in (self.student_taps, self.teacher_taps, self.teacher_mixer_taps):
            if taps is not None:
                taps.remove()


@register_objective('module_imitation')
def module_imitation(student: nn.Module, teacher: nn.Module | None, *, block_output: float = 0.,
                     mixer_output: float = 0., relation: float = 0., student_blocks: str | None = None,
                     teacher_blocks: str | None = None, teacher_layout: str = 'NCHW') -> ModuleImitation:
    """The training objective ``module_imitation``: one weight per term, 0 turns it off."""
    if teacher is None:
        raise UsageError('module_imitation needs a live teacher model (teacher: NAME), not precomputed '
                         'teacher_logits')
    weights = ImitationWeights(block_output, mixer_output, relation)
    if not weights:
        raise UsageError('module_imitation needs a weight > 0 for at least one of block_output, mixer_output and '
                         'relation')
    if teacher_layout not in LAYOUTS:
        raise UsageError(f'module_imitation: teacher_layout must be one of {", ".join(LAYOUTS)}, '
                         f'got {teacher_layout!r}')
    try:
        return ModuleImitation(student, teacher, weights, student_blocks, teacher_blocks,
                               teacher_layout=teacher_layout)
    except ValueError as e:  # blocks not found, bad block patterns, stages that do not pair
        raise UsageError(f'module_imitation: {e}') from None
