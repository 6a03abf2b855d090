"""Specs: what each conversion builds, by name."""

from . import builtin as _builtin  # noqa: F401  (registers the shipped specs)
from .base import Spec, WSConfig, get_spec, list_specs, register_spec, unregister_spec
from .groups import choose_groups

__all__ = ["Spec", "WSConfig", "choose_groups", "get_spec", "list_specs", "register_spec", "unregister_spec"]
