"""HF ``Trainer`` integration: a ``TrainerCallback`` that runs :class:`~normswap.regularizers.RegularizedStep`.

The Trainer calls ``on_pre_optimizer_step`` after its own gradient clipping (``max_grad_norm``) and before
``optimizer.step()``; the callback adds the orthogonal gradient and clips there, and puts the step's numbers
into the Trainer's logs. To clip with normswap alone, set ``max_grad_norm=0`` in ``TrainingArguments``.

Example::

    from normswap.regularizers import OrthogonalRegularizer
    from normswap.regularizers.hf import RegularizerCallback

    reg = OrthogonalRegularizer(model, strength=1e-4)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[RegularizerCallback(model, orthogonal=reg, clip={"mode": "agc"})])
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers import TrainerCallback

from .orthogonal import OrthogonalRegularizer
from .step import RegularizedStep

__all__ = ["RegularizerCallback"]


class RegularizerCallback(TrainerCallback):
    """Orthogonal gradient and clipping before every optimizer step of an HF ``Trainer``.

    Takes the arguments of :class:`~normswap.regularizers.RegularizedStep`. Logged keys: ``grad_norm_pre``
    (before normswap's clipping), ``orthogonal_penalty``, ``steps_skipped`` (non-finite gradients dropped).
    """

    def __init__(self, model: nn.Module, orthogonal: OrthogonalRegularizer | None = None,
                 clip: Mapping[str, Any] | None = None) -> None:
        self.step = RegularizedStep(model, orthogonal, clip)
        self.last: dict[str, float | bool] = {}
        self.skipped = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if self.step.clip and getattr(args, "max_grad_norm", 0) and args.max_grad_norm > 0:
            warnings.warn(f"RegularizerCallback: the Trainer clips to max_grad_norm={args.max_grad_norm} before "
                          "normswap clips too; set max_grad_norm=0 in TrainingArguments to clip once.",
                          UserWarning, stacklevel=2)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.last = self.step()
        self.skipped += int(self.last["skipped"])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.last:
            logs["grad_norm_pre"] = self.last["grad_norm"]
            if not math.isnan(self.last["orthogonal_penalty"]):
                logs["orthogonal_penalty"] = self.last["orthogonal_penalty"]
            logs["steps_skipped"] = self.skipped
