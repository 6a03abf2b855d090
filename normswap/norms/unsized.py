"""A norm without parameters that takes the size it normalizes from its input.

Some models hold norms with no weight and no recorded size (nanochat's RMSNorm, Llama 4's QK norm,
OLMo's LayerNorm written as a module with only a shape): any replacement must work, like them, on
whatever last dim (or dim 1, channels first) the input has. :class:`UnsizedNorm` computes LayerNorm
(Ba et al. 2016), RMSNorm (Zhang & Sennrich 2019) or the BERT LayerNorm (eps outside the unbiased std)
over that dim, through the same functional forms as the sized layers.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bert_layer_norm import bert_layer_norm
from .rms_norm import rms_norm
from .scripted import channels_first, rows

Kind = Literal["layer", "rms", "bert"]


class UnsizedNorm(nn.Module):
    """Normalization with no parameters over the last dim of the input (dim 1 with ``channels_first``).

    Example:
        >>> norm = UnsizedNorm("rms", eps=1e-6)
        >>> norm(torch.randn(2, 5, 8)).shape, norm(torch.randn(3, 16)).shape
        (torch.Size([2, 5, 8]), torch.Size([3, 16]))
    """

    def __init__(self, kind: Kind, eps: float = 1e-5, *, channels_first: bool = False) -> None:
        super().__init__()
        if kind not in ("layer", "rms", "bert"):
            raise ValueError(f"UnsizedNorm: kind must be 'layer', 'rms' or 'bert', got {kind!r}")
        self.kind, self.eps, self.channels_first = kind, float(eps), bool(channels_first)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # a static branch: TorchScript compiles only this side
            if self.channels_first:
                return channels_first(self.kind, x, None, None, self.eps)
            return rows(self.kind, x, 1, None, None, self.eps)
        if self.channels_first:
            x = x.movedim(1, -1)
        shape = (x.shape[-1],)
        if self.kind == "layer":
            y = F.layer_norm(x, shape, None, None, self.eps)
        elif self.kind == "rms":
            y = rms_norm(x, shape, None, None, self.eps)
        else:
            y = bert_layer_norm(x, shape, None, None, self.eps)
        return y.movedim(-1, 1) if self.channels_first else y

    def extra_repr(self) -> str:
        return f"{self.kind}, eps={self.eps}" + (", channels_first=True" if self.channels_first else "")
