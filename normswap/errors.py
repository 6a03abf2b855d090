"""One error hierarchy for everything normswap raises on bad input.

Every error is a ``ValueError`` (through :class:`NormSwapError`), so code that already guards against
``ValueError`` keeps working, and every message names the module path, option or file at fault and says
what to do instead.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class NormSwapError(ValueError):
    """Base class of every error normswap raises on bad input."""


class UnknownSpecError(NormSwapError):
    """Raised when a spec name is not registered; the message lists the known specs and the closest one."""


class OptionError(NormSwapError):
    """Raised when a conversion option is unknown, has the wrong type, or an invalid value."""


class ConversionError(NormSwapError):
    """Raised when a module cannot be converted as asked (the message names its path)."""


class RegistrationError(NormSwapError):
    """Raised when a spec or adapter registration is malformed or clashes with an existing name."""


class CheckpointError(NormSwapError):
    """Raised when a checkpoint cannot be read (truncated, corrupt, not a checkpoint) or does not fit the
    model (missing or unexpected keys, shape mismatches); the message names the file and the first keys."""


class CheckpointNotFoundError(CheckpointError):
    """Raised when a checkpoint path does not exist or holds no weights file normswap can read."""


class UnsafeCheckpointError(CheckpointError):
    """Raised when a pickle checkpoint (``.pt``/``.bin``) would import or call code to load; nothing is run."""


class DestinationExistsError(NormSwapError):
    """Raised when an output path exists and overwriting was not asked for, or would overwrite an input."""


def closest(name: str, known: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest known name, or ``""`` when nothing is close."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""
