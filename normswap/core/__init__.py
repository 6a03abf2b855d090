"""The conversion pipeline: adapters read the norms, torch.fx relates them, the spec builds each
replacement, the surgery swaps it in place, the plan reports it. Its public face: :func:`convert`,
:func:`plan`, :func:`last_plan`, :func:`conversions_of`, :class:`Plan`, :class:`Change`."""

from .convert import NothingToConvertWarning, after_convert, convert, plan
from .plan import Change, Plan
from .state import conversions_of, last_plan

__all__ = ["Change", "NothingToConvertWarning", "Plan", "after_convert", "conversions_of", "convert", "last_plan",
           "plan"]
