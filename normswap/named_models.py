"""Build a model from a command-line name (``timm:NAME`` or a HuggingFace folder holding config.json),
and describe a model's base so a checkpoint can rebuild it offline.

A *base description* is a small JSON-able dict: ``{"timm": NAME, "kwargs": {...}}`` for a timm model,
``{"hf": CLASS_NAME, "config": {...}}`` for a transformers model. Nothing here downloads weights.
"""

from __future__ import annotations

import contextlib
import importlib
import pathlib
from typing import Any

import torch
from torch import nn

from .errors import NormSwapError, OptionError, closest

BASE_KEY = "_normswap_base"
RECORD_KEY = "normswap"  # where a converted HF model's config keeps its conversions
RECORD_FORMAT = 1


# create_model arguments that make timm read a file or the network
_FILE_ARGS = ("path", "file", "dir", "url", "pretrained", "cache", "hub", "checkpoint")


def file_reading_arguments(kwargs: dict[str, Any]) -> list[str]:
    """The arguments among ``kwargs`` that would make timm read a file or the network (``checkpoint_path``,
    ``pretrained``, ...): never passed from a record, refused in recipes (``init_from=`` loads weights safely).

    Example:
        >>> file_reading_arguments({"num_classes": 10, "checkpoint_path": "x.pth"})
        ['checkpoint_path']
    """
    return [k for k in kwargs if isinstance(k, str) and any(w in k.lower() for w in _FILE_ARGS)]


def device_context(device: str | torch.device | None):
    """``with device_context("meta"):`` builds modules there; ``None`` leaves torch's default."""
    return torch.device(device) if device is not None else contextlib.nullcontext()


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise NormSwapError("timm is not installed: pip install 'normswap[timm]'") from exc
    return timm


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise NormSwapError("transformers is not installed: pip install 'normswap[hf]'") from exc
    return transformers


def build_model(spec: str, *, device: str | torch.device | None = None, **kwargs: Any) -> nn.Module:
    """Build ``timm:NAME`` with ``pretrained=False`` (``kwargs`` go to ``timm.create_model``), or the HF model
    a folder's config.json describes (the class in its ``architectures``, else ``AutoModel``).

    ``device="meta"`` builds a skeleton that holds no memory. Nothing is downloaded.

    Example:
        >>> model = build_model("timm:resnet18", num_classes=10)  # doctest: +SKIP
    """
    if spec.startswith("timm:"):
        return build_base({"timm": spec[len("timm:"):], "kwargs": kwargs}, device=device)
    path = pathlib.Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        if kwargs:
            raise OptionError(f"model arguments {sorted(kwargs)} apply to timm models; an HF model takes its "
                              f"settings from {path / 'config.json'}")
        config = read_hf_config(path)
        return _build_hf(config, device, where=str(path))
    raise OptionError(f"model {spec!r}: expected 'timm:NAME' or a folder holding config.json")


def read_hf_config(folder: str | pathlib.Path) -> Any:
    """The transformers config of an HF folder, never running code from it (``trust_remote_code=False``: a
    config whose ``auto_map`` names the folder's own Python files is read with the library's class for its
    ``model_type``, or refused), and never asking on the terminal.

    Example:
        >>> config = read_hf_config("./bert-base/")  # doctest: +SKIP
    """
    try:
        return _transformers().AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        raise NormSwapError(f"{folder}: transformers cannot read its config.json without running code from the "
                            f"folder, which normswap never does ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                            ) from None


def build_base(base: dict, *, device: str | torch.device | None = None) -> nn.Module:
    """Build the model a base description (see :func:`describe_base`) names, with random weights.

    Example:
        >>> model = build_base({"timm": "resnet18", "kwargs": {"num_classes": 10}})  # doctest: +SKIP
    """
    if "timm" in base:
        timm = _timm()
        name, kwargs = base["timm"], dict(base.get("kwargs") or {})
        if name not in timm.list_models():
            raise OptionError(f"timm does not know the model {name!r}.{closest(name, timm.list_models())}")
        with device_context(device):
            try:
                model = timm.create_model(name, pretrained=False, **kwargs)
            except TypeError as exc:
                raise OptionError(f"timm model {name!r} does not take these arguments {kwargs}: {exc}") from None
            except (ValueError, AssertionError, KeyError, IndexError, RuntimeError) as exc:
                if device is not None and torch.device(device).type == "meta":
                    raise  # the caller builds in memory instead
                raise NormSwapError(f"timm model {name!r} does not build with {kwargs} ({type(exc).__name__}: "
                                    f"{str(exc)[:200]})") from None
        model.__dict__[BASE_KEY] = {"timm": name, "kwargs": kwargs}
        return model
    if "hf" in base:
        transformers = _transformers()
        config = dict(base.get("config") or {})
        model_type = config.pop("model_type", None)
        if model_type is None:
            raise NormSwapError("the recorded HF config has no model_type; pass the model folder instead")
        config.pop(RECORD_KEY, None)
        config["architectures"] = [base["hf"]]
        try:
            hf_config = transformers.AutoConfig.for_model(model_type, **config)
        except (ValueError, TypeError, KeyError) as exc:
            raise NormSwapError(f"the recorded HF config (model_type {model_type!r}) is not one transformers builds "
                                f"({type(exc).__name__}: {str(exc)[:200]})") from None
        return _build_hf(hf_config, device, where=base["hf"])
    raise NormSwapError(f"unknown base description {sorted(base)}: expected a 'timm' or 'hf' entry")


def _hf_class(config: Any, name: str) -> type | None:
    """The transformers class ``name`` from the library itself: its top level, or the modeling module of the
    config's own model package (sub-models such as a CLIP text tower are not exported at the top level).
    Never a class from a folder's own code."""
    transformers = _transformers()
    cls = getattr(transformers, name, None)
    if cls is None:
        package, _, stem = type(config).__module__.rpartition(".configuration_")
        if package.startswith("transformers.models."):
            try:
                cls = getattr(importlib.import_module(f"{package}.modeling_{stem}"), name, None)
            except ImportError:
                cls = None
    return cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else None


def _build_hf(config: Any, device: str | torch.device | None, where: str) -> nn.Module:
    transformers = _transformers()
    classes = [c for c in (_hf_class(config, n) for n in getattr(config, "architectures", None) or []) if c]
    if hasattr(config, RECORD_KEY):
        config = config.__class__.from_dict({k: v for k, v in config.to_dict().items() if k != RECORD_KEY})
    with device_context(device):
        try:
            if classes:
                cls = classes[0]
                return cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
            return transformers.AutoModel.from_config(config, trust_remote_code=False)
        except ValueError as exc:
            raise NormSwapError(f"{where}: no transformers model class for model_type "
                                f"{config.model_type!r} ({exc})") from None


def describe_base(model: nn.Module) -> dict | None:
    """A base description that rebuilds ``model``'s architecture, or ``None`` when it cannot be told.

    timm models are named by their ``pretrained_cfg["architecture"]`` with the ``create_model`` arguments
    normswap saw (or ``num_classes``); transformers models by class and config.

    Example:
        >>> describe_base(build_model("timm:resnet18", num_classes=10))  # doctest: +SKIP
        {'timm': 'resnet18', 'kwargs': {'num_classes': 10}}
    """
    if BASE_KEY in model.__dict__:
        return dict(model.__dict__[BASE_KEY])
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and type(model).__module__.startswith("transformers."):
        cfg = {k: v for k, v in config.to_dict().items() if k != RECORD_KEY}
        return {"hf": type(model).__name__, "config": cfg}
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if arch and type(model).__module__.startswith("timm."):
        kwargs = {"num_classes": model.num_classes} if hasattr(model, "num_classes") else {}
        return {"timm": arch, "kwargs": kwargs}
    return None
