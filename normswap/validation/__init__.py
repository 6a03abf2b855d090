"""``normswap.validate``: check what a conversion produced, and ``normswap validate`` from the command line.

Example:
    >>> import torch, normswap
    >>> original = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> report = normswap.validate(original, normswap.convert(original, "gn_ws", groups=2),
    ...                            torch.randn(2, 3, 8, 8), checks=["finite", "gradients", "batch_independence"])
    >>> report.passed
    True
"""

from . import checks as _checks  # noqa: F401  (registers the built-in checks)
from .registry import Context, check, registered, unregister
from .report import CheckRow, ValidationReport
from ..inputs import example_inputs
from .run import validate

__all__ = ["CheckRow", "Context", "ValidationReport", "check", "example_inputs", "registered", "unregister",
           "validate"]
