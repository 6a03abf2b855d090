"""Checkpoints: map keys across a conversion, carry the conversion record, stream large files, load back.

Public entry points (also at the top level): :func:`convert_checkpoint`, :func:`save`, :func:`load`,
:func:`load_state_dict`. Files are read and written through :mod:`normswap.io`.
"""

from ..io.readers import Checkpoint
from .convert_file import ConvertedCheckpoint, convert_checkpoint
from .record import open_checkpoint
from .save_load import LoadReport, load, load_state_dict, save

__all__ = ["Checkpoint", "ConvertedCheckpoint", "LoadReport", "convert_checkpoint", "load", "load_state_dict",
           "open_checkpoint", "save"]
