"""Lightning integration: a ``Callback`` that runs :class:`~normswap.regularizers.RegularizedStep`.

Lightning calls ``on_before_optimizer_step`` after the backward pass (gradients already unscaled under
mixed precision) and before its own clipping (``Trainer(gradient_clip_val=...)``, leave it unset to clip with
normswap alone). Needs the optional ``lightning`` package (``pip install "normswap[lightning]"``).

Example::

    from normswap.regularizers import OrthogonalRegularizer
    from normswap.regularizers.lightning import RegularizerCallback

    reg = OrthogonalRegularizer(module.model, strength=1e-4)
    trainer = lightning.Trainer(callbacks=[RegularizerCallback(module.model, orthogonal=reg,
                                                               clip={"mode": "norm", "max_norm": 1.0})])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.callbacks import Callback
from torch import nn

from .orthogonal import OrthogonalRegularizer
from .step import RegularizedStep

__all__ = ["RegularizerCallback"]


class RegularizerCallback(Callback):
    """Orthogonal gradient and clipping before every optimizer step of a Lightning ``Trainer``.

    Takes the arguments of :class:`~normswap.regularizers.RegularizedStep`; logs ``grad_norm_pre``,
    ``orthogonal_penalty`` and ``steps_skipped`` through the LightningModule.
    """

    def __init__(self, model: nn.Module, orthogonal: OrthogonalRegularizer | None = None,
                 clip: Mapping[str, Any] | None = None) -> None:
        self.step = RegularizedStep(model, orthogonal, clip)
        self.last: dict[str, float | bool] = {}
        self.skipped = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.last = self.step()
        self.skipped += int(self.last["skipped"])
        logs = {"grad_norm_pre": self.last["grad_norm"], "steps_skipped": float(self.skipped)}
        if not math.isnan(self.last["orthogonal_penalty"]):
            logs["orthogonal_penalty"] = self.last["orthogonal_penalty"]
        pl_module.log_dict(logs, on_step=True, on_epoch=False)
