"""Norm adapters: read every source norm class into one :class:`NormInfo`."""

from . import known as _known  # noqa: F401  (registers the built-in adapters)
from .base import Adapter, NormInfo, Unsupported, read_norm, register_adapter

__all__ = ["Adapter", "NormInfo", "Unsupported", "read_norm", "register_adapter"]
