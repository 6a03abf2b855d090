"""Specs: what each conversion builds, by name."""

from . import builtin as _builtin  # noqa: F401  (registers the shipped specs)
from . import weight_norm as _weight_norm  # noqa: F401  (registers ``wn``)
from .base import Spec, WeightTransform, WSConfig, get_spec, list_specs, register_spec, unregister_spec
from .groups import choose_groups
from .options import Range

__all__ = [
    "Range", "Spec", "WSConfig", "WeightTransform", "choose_groups", "get_spec", "list_specs", "register_spec",
    "unregister_spec",
]
