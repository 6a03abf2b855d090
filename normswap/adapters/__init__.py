"""Norm adapters: read every source norm class into one :class:`NormInfo`."""

from . import known as _known  # noqa: F401  (registers the built-in adapters)
from .probe import calls_norm_function
from .base import Adapter, NormInfo, Unsupported, norm_family, read_norm, register_adapter

__all__ = ["Adapter", "calls_norm_function", "NormInfo", "Unsupported", "norm_family", "read_norm", "register_adapter"]
