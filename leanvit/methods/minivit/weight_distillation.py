"""MiniViT's weight distillation (Zhang et al., "MiniViT: Compressing Vision Transformers with Weight Multiplexing",
CVPR 2022, Sec. 3.3; official code github.com/microsoft/Cream, MiniViT/Mini-Swin ``main.py``).

Loss = prediction KD (the engine's ``kd``: ``leanvit.train.distillation``) + w_attention * L_attn + w_hidden * L_hddn:
- L_attn (`attention_relation_loss`): MiniLMv2-style self-attention relation distillation. For each paired layer the
  raw q, k, v (the ``qkv`` projection's output, before any head transformation) give nine relations
  R_ij = softmax(X_i X_jᵀ / sqrt(C / Ar)), i, j in {q, k, v}, over Ar relation heads; the student's relations match
  the teacher's by soft cross-entropy. For Swin the relations are per window, as in Mini-Swin.
- L_hddn: the blocks' output tokens, as a relation (`hidden_relation_loss`, Mini-Swin's ``--hidden_relation``: MSE of
  the N x N cosine Gram matrices) or directly (`hidden_mse`: MSE after a learned linear adapter to the teacher's
  width, the official ``fit_dense_C``).

Layers are counted as applications: a block whose weights are shared and that runs r times per forward is r layers,
numbered in the order they run (the official ``layer_id``). `WeightDistillation` hooks every block
(`leanvit.methods.features.blocks_by_stage`) and its q, k, v projection (`qkv_projection`), runs one probe forward of
each model at construction to find how many layers it applies and their shapes, so that a bad option fails before
training, and after each step's forwards gives the weighted terms. Choices where the paper is silent: the default layer
pairs outside its two recipes (`default_layer_pairs`), one adapter per (student width, teacher width) rather than per
Swin stage (the same for Swin, one shared adapter for DeiT), and the block output tokens as the hidden state of a ViT. A
timm ViT's class and register tokens are left out of both, so that a DeiT teacher pairs with a Mini-DeiT student, which
has none.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager

import timm
import torch
from torch import nn

from leanvit.errors import UsageError
from leanvit.methods.features import FeatureTaps, as_tokens, blocks_by_stage, feature_mse, qkv_projection, relation_mse
from leanvit.train.distillation import soft_cross_entropy
from leanvit.train.objectives import register_objective

HIDDEN_FORMS = ('relation', 'mse')
HIDDEN_RELATION_SCALE = 49.  # the official code multiplies the Gram MSE by 49, Swin's window size squared
# The paper's recipes (official README), in applied layers: Mini-Swin-T (12) from Swin-B (24), Mini-Swin-S/B from
# Swin-B.
PAPER_LAYER_PAIRS = {(12, 24): ([1, 3, 5, 7, 9, 11], [1, 3, 9, 15, 21, 23]),
                     (24, 24): ([1, 3, 9, 15, 21, 23], [1, 3, 9, 15, 21, 23])}
DEFAULT_PAIR_COUNT = 6  # as many pairs as the paper's recipes


def qkv_relation_logits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, relation_heads: int) -> torch.Tensor:
    """(3, 3, B, Ar, N, N) logits of the nine self-attention relations (Sec. 3.3, attention-level distillation).

    ``q``, ``k``, ``v`` are (B, N, C); their channels split into ``relation_heads`` (Ar) heads, and entry (i, j) is
    X_i X_jᵀ / sqrt(C / Ar) per head; the relation R_ij is its softmax over the last axis.
    """
    if q.shape[-1] % relation_heads:
        raise ValueError(f'relation_heads {relation_heads} does not divide the width {q.shape[-1]}')
    # (3, B, N, C) -> (3, B, Ar, N, C / Ar): the channels split head-major, as the heads of attention split them
    x = torch.stack([q, k, v]).unflatten(-1, (relation_heads, -1)).transpose(-3, -2)
    return torch.einsum('ibhnd,jbhmd->ijbhnm', x, x) / math.sqrt(x.shape[-1])


def attention_relation_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                            relation_heads: int = 1) -> torch.Tensor:
    """L_attn of one layer pair (Sec. 3.3; official ``cal_relation_loss``): the soft cross-entropy
    −Σ R_t log R_s of the nine relations, mean over the pairs of {q, k, v}, batch, heads and rows.

    ``student`` and ``teacher`` are (q, k, v) triples of (B, N, C) tensors; the widths C may differ, B and N may not.
    Soft cross-entropy, as in the official code, is the teacher's entropy when the two agree, not 0; its gradient is
    that of the KL divergence. The teacher is detached.
    """
    s, t = qkv_relation_logits(*student, relation_heads), qkv_relation_logits(*teacher, relation_heads)
    if s.shape != t.shape:
        raise ValueError(f'student relations {tuple(s.shape[2:])} and teacher relations {tuple(t.shape[2:])} '
                         '(batch, heads, N, N) differ: the paired layers need the same sequences of tokens')
    return soft_cross_entropy(s.flatten(0, -2), t.flatten(0, -2), tau=1.)


def hidden_relation_loss(student: torch.Tensor, teacher: torch.Tensor,
                         scale: float = HIDDEN_RELATION_SCALE) -> torch.Tensor:
    """L_hddn, relation form (Sec. 3.3; official ``cal_hidden_relation_loss``): ``scale`` times the MSE between the
    (B, N, N) cosine Gram matrices of (B, N, C) block outputs. Widths may differ; the teacher is detached.

    ``scale`` defaults to the official code's 49 (Swin's 7 x 7 window), which the paper does not mention.
    """
    return scale * relation_mse(student, teacher.detach(), 'NLC', 'NLC')


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, adapter: nn.Module) -> torch.Tensor:
    """L_hddn, direct form (Sec. 3.3; official ``cal_hidden_loss``): MSE between the student's (B, N, C_s) block
    output mapped by ``adapter`` to the teacher's width and the teacher's (B, N, C_t); the teacher is detached."""
    return feature_mse(adapter(student), teacher.detach())


def block_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, N, C) tokens of a block output: ViT blocks give (B, N, C), timm's Swin blocks (B, H, W, C) maps."""
    return as_tokens(x, 'NHWC' if x.ndim == 4 else 'NLC')


def default_layer_pairs(student_depth: int, teacher_depth: int) -> tuple[list[int], list[int]]:
    """(student layers, teacher layers) for the applied depths of two models, when the recipe names none.

    The paper's pairs for its two recipes (12 from 24 and 24 from 24: Mini-Swin-T, -S, -B from Swin-B); otherwise
    ``k = min(6, student depth)`` student layers evenly spaced and ending with the last (for 12 layers: 1, 3, ..., 11,
    the paper's student side), each paired with the teacher layer at the same relative depth, so the last layers pair.
    """
    if (student_depth, teacher_depth) in PAPER_LAYER_PAIRS:
        return PAPER_LAYER_PAIRS[student_depth, teacher_depth]
    count = min(DEFAULT_PAIR_COUNT, student_depth)
    student = [math.ceil((j + 1) * student_depth / count) - 1 for j in range(count)]
    return student, [math.ceil((s + 1) * teacher_depth / student_depth) - 1 for s in student]


class AppliedLayerTaps(FeatureTaps):
    """FeatureTaps that keep every application of the tapped modules, in the order they ran, not only the last.

    A block whose weights are shared fires its hooks once per application, so ``qkv[i]`` / ``hidden[i]`` belong to
    the i-th applied layer. A pre-hook on ``model`` empties both lists as each forward starts: they hold exactly
    the last forward's layers, and an evaluation forward between steps does not pile up.
    """

    def __init__(self, model: nn.Module, qkv_names: list[str], block_names: list[str]):
        # A timm ViT's class (and register) tokens lead its sequences; a MiniViT student has none, so they are left
        # out and a DeiT teacher's 197 tokens pair with Mini-DeiT's 196.
        self.prefix_tokens = getattr(model, 'num_prefix_tokens', 0)
        self.qkv_names = set(qkv_names)
        self.qkv: list[torch.Tensor] = []
        self.hidden: list[torch.Tensor] = []
        super().__init__(model, [*qkv_names, *block_names])
        self._handles.append(model.register_forward_pre_hook(lambda module, args: self.clear()))

    def _hook(self, name: str, keep_input: bool):
        applied = self.qkv if name in self.qkv_names else self.hidden
        prefix = self.prefix_tokens
        return lambda module, args, output: applied.append(output[:, prefix:] if prefix else output)

    def clear(self):
        super().clear()
        self.qkv.clear()
        self.hidden.clear()


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode without gradients, each module's own mode restored after (for the probe forward)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def example_input(model: nn.Module) -> torch.Tensor:
    """One zero image at the size ``model`` was built for: leanvit's ``model.img_size``, timm's
    ``patch_embed.img_size``, else its pretrained config's ``input_size``."""
    channels, *size = timm.data.resolve_data_config({}, model=model)['input_size']
    size = getattr(model, 'img_size', None) or getattr(getattr(model, 'patch_embed', None), 'img_size', None) or size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return torch.zeros(1, channels, *size, device=next(model.parameters()).device)


class WeightDistillation:
    """Attention-relation and hidden-state distillation between paired applied layers of a student and a teacher.

    Usage: ``wd = WeightDistillation(student, teacher)``; per step run ``student(x)`` and ``teacher(x)``, then
    ``total = kd_loss + wd.loss()``; ``wd.remove()`` detaches the hooks. With ``hidden_form='mse'`` the adapters are
    trainable: give ``wd.parameters()`` to the optimizer. Bad options raise ValueError naming the option.

    Args:
        student, teacher: Models whose blocks `blocks_by_stage` finds, each with a fused q, k, v projection that
            `qkv_projection` finds for the attention term; both take the same images.
        attention: Weight of L_attn (paper: 1.0); 0 turns it off.
        hidden: Weight of L_hddn (paper: 0.1); 0 turns it off.
        hidden_form: ``'relation'`` (Mini-Swin's, Gram matrices, any widths) or ``'mse'`` (learned width adapter).
        hidden_relation_scale: Factor of the relation form (official code: 49).
        relation_heads: Ar, the heads the q, k, v channels split into for the relations (official default 1).
        student_layers, teacher_layers: Paired applied-layer indices (0-based, in forward order), both or neither;
            None: `default_layer_pairs`.
        student_blocks, teacher_blocks: Regular expressions for the block module names, to override
            `blocks_by_stage`'s (see its ``pattern``); the blocks give the hidden states and hold the q, k, v
            projections. None: found from the model's structure.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, attention: float = 1., hidden: float = .1,
                 hidden_form: str = 'relation', hidden_relation_scale: float = HIDDEN_RELATION_SCALE,
                 relation_heads: int = 1, student_layers: list[int] | None = None,
                 teacher_layers: list[int] | None = None, student_blocks: str | None = None,
                 teacher_blocks: str | None = None):
        for option, value in (('attention', attention), ('hidden', hidden)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f'{option} must be a weight >= 0, got {value!r}')
        if not attention and not hidden:
            raise ValueError('attention and hidden are both 0; give at least one a weight > 0')
        if hidden_form not in HIDDEN_FORMS:
            raise ValueError(f'hidden_form must be one of {", ".join(HIDDEN_FORMS)}, got {hidden_form!r}')
        if isinstance(relation_heads, bool) or not isinstance(relation_heads, int) or relation_heads < 1:
            raise ValueError(f'relation_heads must be an integer >= 1, got {relation_heads!r}')
        if isinstance(hidden_relation_scale, bool) or not isinstance(hidden_relation_scale, (int, float)) \
                or hidden_relation_scale <= 0:
            raise ValueError(f'hidden_relation_scale must be a number > 0, got {hidden_relation_scale!r}')
        if (student_layers is None) != (teacher_layers is None):
            raise ValueError('give both student_layers and teacher_layers, or neither for the default pairs')
        self.weights = {'attention': attention, 'hidden': hidden}
        self.hidden_form = hidden_form
        self.hidden_relation_scale = hidden_relation_scale
        self.relation_heads = relation_heads
        self.adapters = nn.ModuleDict()
        self.student_taps = self.teacher_taps = None
        try:
            self.student_taps = self._taps(student, 'student', student_blocks)
            self.teacher_taps = self._taps(teacher, 'teacher', teacher_blocks)
            probe = example_input(student)  # the teacher sees the student's images in training, so here too
            self.student_depth = self._probe(student, 'student', self.student_taps, probe)
            self.teacher_depth = self._probe(teacher, 'teacher', self.teacher_taps, probe)
            if student_layers is None:
                student_layers, teacher_layers = default_layer_pairs(self.student_depth, self.teacher_depth)
            student_layers = self._layers('student_layers', student_layers, self.student_depth)
            teacher_layers = self._layers('teacher_layers', teacher_layers, self.teacher_depth)
            if len(student_layers) != len(teacher_layers):
                raise ValueError(f'student_layers has {len(student_layers)} layers and teacher_layers '
                                 f'{len(teacher_layers)}; they pair by position')
            self.pairs = list(zip(student_layers, teacher_layers))
            self._check_pairs_and_build_adapters()
        except ValueError:
            self.remove()
            raise
        self.student_taps.clear()  # the probe's layers
        self.teacher_taps.clear()

    def _taps(self, model: nn.Module, role: str, pattern: str | None) -> AppliedLayerTaps:
        try:
            blocks = [name for stage in blocks_by_stage(model, pattern) for name in stage]
        except ValueError as e:
            raise ValueError(f'the {role} ({role}_blocks): {e}') from None
        qkv_names = []
        if self.weights['attention']:
            qkv_names = [f'{block}.{qkv}' for block in blocks if (qkv := qkv_projection(model.get_submodule(block)))]
            if not qkv_names:
                raise ValueError(f'the attention term needs blocks with a fused q, k, v projection (a module '
                                 f'registered as qkv); the {role} ({type(model).__name__}) has none (attention: 0 '
                                 f'turns the term off)')
        return AppliedLayerTaps(model, qkv_names, blocks if self.weights['hidden'] else [])

    def _probe(self, model: nn.Module, role: str, taps: AppliedLayerTaps, probe: torch.Tensor) -> int:
        """The number of layers ``model`` applies per forward, found by one forward of ``probe``."""
        try:
            with evaluating(model):
                model(probe)
        except (RuntimeError, AssertionError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f'the probe forward of the {role} on a {tuple(probe.shape)} input (the student\'s size) '
                             f'failed: {reason}') from None
        depth = len(taps.qkv) if self.weights['attention'] else len(taps.hidden)
        if not depth:
            raise ValueError(f'the tapped modules of the {role} ({type(model).__name__}) did not run in its forward')
        if self.weights['attention'] and self.weights['hidden'] and len(taps.qkv) != len(taps.hidden):
            raise ValueError(f'the {role} ran its q, k, v projections {len(taps.qkv)} times and its blocks '
                             f'{len(taps.hidden)} times per forward; layer indices count both, so choose a '
                             f'{role}_blocks pattern that matches one block per attention')
        return depth

    @staticmethod
    def _layers(option: str, layers: list[int], depth: int) -> list[int]:
        if not isinstance(layers, (list, tuple)) or not layers or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(f'{option} must be a non-empty list of layer indices, got {layers!r}')
        if not all(0 <= i < depth for i in layers):
            raise ValueError(f'{option} {list(layers)} is out of range: the {option.split("_")[0]} applies {depth} '
                             f'layers per forward (indices 0 to {depth - 1})')
        return list(layers)

    def _check_pairs_and_build_adapters(self):
        """Checks on the probe's layers that each pair can be compared; one adapter per pair of widths for 'mse'."""
        student, teacher = self.student_taps, self.teacher_taps
        for s, t in self.pairs:
            where = f'student layer {s} and teacher layer {t}'
            if self.weights['attention']:
                (s_seqs, s_tokens, s_width), (t_seqs, t_tokens, t_width) = student.qkv[s].shape, teacher.qkv[t].shape
                if (s_seqs, s_tokens) != (t_seqs, t_tokens):
                    raise ValueError(f'{where} attend over {s_seqs} and {t_seqs} sequences (images x windows) of '
                                     f'{s_tokens} and {t_tokens} tokens; attention relations need the same: pair '
                                     f'layers of one resolution (student_layers, teacher_layers)')
                for role, width in (('student', s_width // 3), ('teacher', t_width // 3)):
                    if width % self.relation_heads:
                        raise ValueError(f'relation_heads {self.relation_heads} does not divide the {role} width '
                                         f'{width} of {where}')
            if self.weights['hidden']:
                s_hidden, t_hidden = block_tokens(student.hidden[s]), block_tokens(teacher.hidden[t])
                if s_hidden.shape[1] != t_hidden.shape[1]:
                    raise ValueError(f'{where} output {s_hidden.shape[1]} and {t_hidden.shape[1]} tokens; hidden '
                                     f'states need the same: pair layers of one resolution (student_layers, '
                                     f'teacher_layers)')
                if self.hidden_form == 'mse':
                    self._adapter(s_hidden.shape[-1], t_hidden.shape[-1], s_hidden.device)

    def _adapter(self, student_width: int, teacher_width: int, device: torch.device | None = None) -> nn.Linear:
        key = f'{student_width}_to_{teacher_width}'
        if key not in self.adapters:
            adapter = nn.Linear(student_width, teacher_width, device=device)
            nn.init.trunc_normal_(adapter.weight, std=.02)  # the official fit_dense_C initialisation
            nn.init.zeros_(adapter.bias)
            self.adapters[key] = adapter
        return self.adapters[key]

    def terms(self) -> dict[str, torch.Tensor]:
        """Each enabled term, averaged over the layer pairs, from the last student and teacher forwards.

        Computed in float32 outside autocast, as module imitation's: softmax relations and Gram matrices lose too
        much in half precision.
        """
        for role, taps, depth in (('student', self.student_taps, self.student_depth),
                                  ('teacher', self.teacher_taps, self.teacher_depth)):
            applied = len(taps.qkv) if self.weights['attention'] else len(taps.hidden)
            if applied != depth:
                raise RuntimeError(f'weight distillation needs one {role} forward before each loss(); the last '
                                   f'applied {applied} layers, the probe {depth}')
        student, teacher = self.student_taps, self.teacher_taps
        terms = {}
        with torch.autocast((student.qkv or student.hidden)[0].device.type, enabled=False):
            if self.weights['attention']:
                terms['attention'] = torch.stack([attention_relation_loss(
                    student.qkv[s].float().chunk(3, dim=-1), teacher.qkv[t].float().chunk(3, dim=-1),
                    self.relation_heads) for s, t in self.pairs]).mean()
            if self.weights['hidden']:
                terms['hidden'] = torch.stack([self._hidden_loss(
                    block_tokens(student.hidden[s]).float(), block_tokens(teacher.hidden[t]).float())
                    for s, t in self.pairs]).mean()
        return terms

    def _hidden_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.hidden_form == 'relation':
            return hidden_relation_loss(student, teacher, self.hidden_relation_scale)
        return hidden_mse(student, teacher, self._adapter(student.shape[-1], teacher.shape[-1]))

    def loss(self) -> torch.Tensor:
        """The weighted sum of `terms`; the taps are emptied, so no batch's features outlive its step."""
        loss = sum(self.weights[name] * value for name, value in self.terms().items())
        self.student_taps.clear()
        self.teacher_taps.clear()
        return loss

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trainable width adapters of ``hidden_form='mse'`` (none for the relation form)."""
        return self.adapters.parameters()

    def state_dict(self) -> dict:
        return {'adapters': self.adapters.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restores the adapters; an empty ``state`` (a checkpoint saved without this objective) keeps them new."""
        if state:
            self.adapters.load_state_dict(state['adapters'])

    def remove(self):
        for taps in (self.student_taps, self.teacher_taps):
            if taps is not None:
                taps.remove()


@register_objective('weight_distillation')
def weight_distillation(student: nn.Module, teacher: nn.Module | None, **options) -> WeightDistillation:
    """The training objective ``weight_distillation``: ``options`` are `WeightDistillation`'s keyword arguments."""
    if teacher is None:
        raise UsageError('weight_distillation needs a live teacher model (teacher: NAME), not precomputed '
                         'teacher_logits')
    try:
        return WeightDistillation(student, teacher, **options)
    except ValueError as e:  # options that do not fit the two models, blocks not found, bad block patterns
        raise UsageError(f'weight_distillation: {e}') from None
