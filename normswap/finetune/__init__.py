"""Fine-tuning recipes: ``normswap finetune RECIPE [key=value ...]`` (see ``recipes/``).

Example:
    >>> from normswap.finetune import finetune
    >>> result = finetune("recipes/gn_ws_resnet_microbatch.yaml", ["data=builtin", "max_steps=20"])  # doctest: +SKIP
"""

from .components import register_component
from .recipe import RecipeError, validate
from .runner import RunResult, finetune, load_config

__all__ = ["RecipeError", "RunResult", "finetune", "load_config", "register_component", "validate"]
