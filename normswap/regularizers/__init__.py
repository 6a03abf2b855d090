"""Training-side tools for a converted model: orthogonal regularization and gradient clipping.

Usable in any training loop (plain PyTorch, HF ``Trainer``, Lightning):

* :class:`OrthogonalRegularizer`: BigGAN off-diagonal, full and SRIP penalties, as a loss term or as a
  closed-form gradient added after ``backward``;
* :func:`clip_gradients`: by norm, by value, or adaptive (AGC), reporting non-finite gradients;
* :class:`RegularizedStep`: both, after each ``backward()`` of a plain loop; the HF ``TrainerCallback`` in
  :mod:`normswap.regularizers.hf` and the Lightning ``Callback`` in :mod:`normswap.regularizers.lightning`
  run the same step.
"""

from .clipping import MODES, NonFiniteGradientWarning, clip_gradients, grad_norm
from .orthogonal import FORMS, OrthogonalRegularizer
from .step import RegularizedStep

__all__ = [
    "FORMS", "MODES", "NonFiniteGradientWarning", "OrthogonalRegularizer", "RegularizedStep", "clip_gradients",
    "grad_norm",
]
