"""normswap: swap the normalization layers of timm and HuggingFace models in place.

Example:
    >>> import timm, normswap  # doctest: +SKIP
    >>> model = normswap.convert(timm.create_model("resnet50", pretrained=False), "gn_ws")  # doctest: +SKIP
"""

from . import regularizers
from .calibration import Agreement, CalibrationReport, calibrate
from .adapters import NormInfo, register_adapter
from .checkpoints import ConvertedCheckpoint, LoadReport, convert_checkpoint, load, load_state_dict, save
from .core.convert import NothingToConvertWarning, convert, plan
from .errors import (CheckpointError, CheckpointNotFoundError, ConversionError, DestinationExistsError, NormSwapError,
                     OptionError, RegistrationError, UnknownSpecError, UnsafeCheckpointError)
from .inspection import Inspection, inspect
from .core.state import conversions_of, last_plan
from .validation import ValidationReport, validate
from .core.plan import Change, Plan
from .specs import Spec, WeightTransform, get_spec, list_specs, register_spec, unregister_spec
from .specs.weight_norm import remove_weight_norm

__version__ = "0.1.0"

__all__ = [
    "Agreement", "CalibrationReport", "calibrate", "Change", "CheckpointError", "CheckpointNotFoundError", "ConversionError", "ConvertedCheckpoint",
    "DestinationExistsError", "Inspection", "LoadReport", "NormInfo", "NormSwapError", "NothingToConvertWarning",
    "OptionError", "Plan", "RegistrationError", "Spec", "UnknownSpecError", "UnsafeCheckpointError",
    "WeightTransform", "conversions_of", "convert", "convert_checkpoint", "get_spec", "inspect", "last_plan", "list_specs", "load",
    "load_state_dict", "plan", "regularizers", "register_adapter", "register_spec", "remove_weight_norm", "save",
    "unregister_spec", "validate", "ValidationReport",
]
