"""normswap: swap the normalization layers of timm and HuggingFace models in place.

Example:
    >>> import timm, normswap  # doctest: +SKIP
    >>> model = normswap.convert(timm.create_model("resnet50", pretrained=False), "gn_ws")  # doctest: +SKIP
"""

from . import regularizers
from .adapters import NormInfo, register_adapter
from .engine import NothingToConvertWarning, convert, last_plan, plan
from .errors import ConversionError, NormSwapError, OptionError, RegistrationError, UnknownSpecError
from .report import Change, Plan
from .specs import Spec, WeightTransform, get_spec, list_specs, register_spec, unregister_spec
from .specs.weight_norm import remove_weight_norm

__version__ = "0.1.0"

__all__ = [
    "Change", "ConversionError", "NormInfo", "NormSwapError", "NothingToConvertWarning", "OptionError", "Plan",
    "RegistrationError", "Spec", "UnknownSpecError", "WeightTransform", "convert", "get_spec", "last_plan",
    "list_specs", "plan", "regularizers", "register_adapter", "register_spec", "remove_weight_norm",
    "unregister_spec",
]
