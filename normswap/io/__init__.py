"""Files, safely: atomic writes (a temporary name renamed into place, never over an input, never over a folder
normswap did not write), readers that run no code (pickles only with ``weights_only=True``, safetensors
headers checked, HF folders read only inside themselves), and the progress line. Used by the checkpoints
and the fine-tuning runner."""

from .atomic import atomic_output, check_destination
from .progress import Progress
from .readers import Checkpoint, StateDictCheckpoint, TensorInfo, open_checkpoint

__all__ = ["Checkpoint", "Progress", "StateDictCheckpoint", "TensorInfo", "atomic_output", "check_destination",
           "open_checkpoint"]
