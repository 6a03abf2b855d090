"""Build a model from a command-line name: ``timm:NAME`` or a HuggingFace config folder (offline)."""

from __future__ import annotations

import pathlib

from torch import nn

from .errors import NormSwapError, OptionError, closest


def build_model(spec: str) -> nn.Module:
    """Build ``timm:NAME`` with ``pretrained=False``, or an HF model from a folder holding config.json.

    Example:
        >>> model = build_model("timm:resnet18")  # doctest: +SKIP
    """
    if spec.startswith("timm:"):
        name = spec[len("timm:"):]
        try:
            import timm
        except ImportError as exc:
            raise NormSwapError("timm is not installed: pip install 'normswap[timm]'") from exc
        if name not in timm.list_models():
            raise OptionError(f"timm does not know the model {name!r}.{closest(name, timm.list_models())}")
        return timm.create_model(name, pretrained=False)
    path = pathlib.Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        try:
            import transformers
        except ImportError as exc:
            raise NormSwapError("transformers is not installed: pip install 'normswap[hf]'") from exc
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        try:
            return transformers.AutoModel.from_config(config)
        except ValueError as exc:
            raise NormSwapError(f"{path}: no transformers model class for model_type {config.model_type!r}") from exc
    raise OptionError(f"model {spec!r}: expected 'timm:NAME' or a folder holding config.json")
