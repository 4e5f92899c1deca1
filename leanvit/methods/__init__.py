"""Each paper's training-time method, in one place per paper (the architectures are in ``leanvit.models``).

- ``glit``: the weight-sharing supernet, its path-sampling objective and the hierarchical evolutionary search;
- ``minivit``: weight multiplexing of a pre-trained model, weight distillation, and the paper's two diagnostics;
- ``riformer``: module imitation (teacher initialisation is generic: ``leanvit.train.initialization``).
SReT's mixed-depth training is a forward behaviour of its recursive stages (``leanvit.models.sret``).

Importing this package registers the supernet with timm and each objective with the engine
(``leanvit.train.objectives.register_objective``).
"""

from leanvit.methods.glit import supernet
from leanvit.methods.minivit import weight_distillation
from leanvit.methods.riformer import imitation

__all__ = ['imitation', 'supernet', 'weight_distillation']
