"""Checkpoints: read any format safely, map keys across a conversion, write atomically, stream large files.

Public entry points (also at the top level): :func:`convert_checkpoint`, :func:`save`, :func:`load`,
:func:`load_state_dict`.
"""

from .convert import ConvertedCheckpoint, convert_checkpoint
from .persist import LoadReport, load, load_state_dict, save
from .sources import Checkpoint, open_checkpoint

__all__ = ["Checkpoint", "ConvertedCheckpoint", "LoadReport", "convert_checkpoint", "load", "load_state_dict",
           "open_checkpoint", "save"]
