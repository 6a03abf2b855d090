"""Adapters for the norms of torch, torchvision, timm, transformers and normswap itself.

Matched by qualified class name, so none of those packages is imported here.
"""

from __future__ import annotations

import inspect
import math
import re
from functools import lru_cache

import torch
from torch import nn

from .base import NormInfo, Unsupported, register_adapter

_BN_DIMS = {"BatchNorm1d": 1, "BatchNorm2d": 2, "BatchNorm3d": 3, "SyncBatchNorm": None}


def _act_drop(m: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    act, drop = getattr(m, "act", None), getattr(m, "drop", None)
    return (None if isinstance(act, nn.Identity) else act), (None if isinstance(drop, nn.Identity) else drop)


def _read_batch(m: nn.Module, spatial_dims: int | None, variant: str = "") -> NormInfo:
    return NormInfo(
        kind="batch", num_features=m.num_features, eps=float(m.eps), channels_first=True,
        normalized_shape=(m.num_features,), weight=m.weight, bias=m.bias,
        running_mean=m.running_mean, running_var=m.running_var, momentum=m.momentum,
        track_running_stats=m.track_running_stats, spatial_dims=spatial_dims, variant=variant,
    )


@register_adapter(
    "torch.nn.modules.batchnorm.BatchNorm1d", "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.batchnorm.BatchNorm3d", "torch.nn.modules.batchnorm.SyncBatchNorm",
)
def read_batch_norm(m: nn.Module) -> NormInfo:
    base = next(c.__name__ for c in type(m).__mro__ if c.__name__ in _BN_DIMS)
    return _read_batch(m, _BN_DIMS[base])


@register_adapter(
    "timm.layers.norm_act.BatchNormAct2d", "timm.layers.norm_act.SyncBatchNormAct", name="timm_batch_norm_act"
)
def read_timm_batch_norm_act(m: nn.Module) -> NormInfo:
    info = _read_batch(m, 2 if isinstance(m, nn.BatchNorm2d) else None)
    info.act, info.drop = _act_drop(m)
    return info


@register_adapter(
    "normswap.norms.ghost_batch_norm.GhostBatchNorm1d", "normswap.norms.ghost_batch_norm.GhostBatchNorm2d",
    "normswap.norms.ghost_batch_norm.GhostBatchNorm3d",
)
def read_ghost_batch_norm(m: nn.Module) -> NormInfo:
    base = next(c.__name__ for c in type(m).__mro__ if c.__name__ in _BN_DIMS)
    return _read_batch(m, _BN_DIMS[base], variant=f"ghost:{m.virtual_batch_size}")


@register_adapter(
    "torchvision.ops.misc.FrozenBatchNorm2d", "timm.layers.norm_act.FrozenBatchNorm2d",
    "timm.layers.norm_act.FrozenBatchNormAct2d", "timm.layers.norm.FrozenBatchNorm2d",
)
def read_frozen_batch_norm(m: nn.Module) -> NormInfo:
    info = NormInfo(
        kind="batch", num_features=m.weight.shape[0], eps=float(m.eps), channels_first=True,
        normalized_shape=(m.weight.shape[0],), weight=m.weight, bias=m.bias,
        running_mean=m.running_mean, running_var=m.running_var, momentum=None,
        track_running_stats=True, frozen=True, spatial_dims=2, variant="frozen",
    )
    info.act, info.drop = _act_drop(m)
    return info


def _read_layer(m: nn.Module, channels_first: bool, variant: str = "") -> NormInfo:
    shape = tuple(m.normalized_shape)
    if channels_first and len(shape) != 1:
        raise Unsupported(f"channels-first LayerNorm over {shape} (expected one channel dim)")
    info = NormInfo(kind="layer", num_features=math.prod(shape), eps=float(m.eps), channels_first=channels_first,
                    normalized_shape=shape, weight=m.weight, bias=getattr(m, "bias", None), variant=variant)
    info.act, info.drop = _act_drop(m)
    return info


@register_adapter(
    "torch.nn.modules.normalization.LayerNorm", "timm.layers.norm.LayerNorm", "timm.layers.norm.LayerNormFp32",
    "timm.layers.norm_act.LayerNormAct", "timm.layers.norm_act.LayerNormActFp32",
)
def read_layer_norm(m: nn.Module) -> NormInfo:
    return _read_layer(m, channels_first=False)


@register_adapter(
    "timm.layers.norm.LayerNorm2d", "timm.layers.norm.LayerNorm2dFp32", "timm.layers.norm_act.LayerNormAct2d",
    "timm.layers.norm_act.LayerNormAct2dFp32", "normswap.norms.channel_layer_norm.ChannelLayerNorm",
)
def read_layer_norm_2d(m: nn.Module) -> NormInfo:
    return _read_layer(m, channels_first=True)


def _is_hf_data_format_ln(m: nn.Module) -> bool:
    return (isinstance(m, nn.LayerNorm) and type(m).__module__.startswith("transformers.")
            and getattr(m, "data_format", None) in ("channels_last", "channels_first"))


@register_adapter(predicate=_is_hf_data_format_ln, name="hf_data_format_layer_norm")
def read_hf_data_format_layer_norm(m: nn.Module) -> NormInfo:
    return _read_layer(m, channels_first=m.data_format == "channels_first")


@register_adapter("normswap.norms.bert_layer_norm.BertLayerNorm")
def read_bert_layer_norm(m: nn.Module) -> NormInfo:
    return _read_layer(m, channels_first=False, variant="bert")


@register_adapter("normswap.norms.bert_layer_norm.BertLayerNorm2d")
def read_bert_layer_norm_2d(m: nn.Module) -> NormInfo:
    return _read_layer(m, channels_first=True, variant="bert")


def _read_rms(m: nn.Module, channels_first: bool, eps: float | None, weight_offset: float = 0.0) -> NormInfo:
    weight = getattr(m, "weight", None)
    shape = tuple(getattr(m, "normalized_shape", ())) or (tuple(weight.shape) if weight is not None else ())
    if not shape:
        raise Unsupported(f"{type(m).__name__} has neither normalized_shape nor weight to read its size")
    if eps is None:  # torch's RMSNorm default: machine epsilon of the dtype it runs in; made explicit here
        ref = weight if weight is not None else torch.empty(0)
        eps = torch.finfo(ref.dtype if ref.is_floating_point() else torch.float32).eps
    info = NormInfo(kind="rms", num_features=math.prod(shape), eps=float(eps), channels_first=channels_first,
                    normalized_shape=shape, weight=weight, bias=getattr(m, "bias", None),
                    weight_offset=weight_offset)
    info.act, info.drop = _act_drop(m)
    return info


@register_adapter(
    "torch.nn.modules.normalization.RMSNorm", "timm.layers.norm.RmsNorm", "timm.layers.norm.RmsNormFp32",
    "timm.layers.norm_act.RmsNormAct", "timm.layers.norm_act.RmsNormActFp32",
    "normswap.norms.rms_norm.RMSNorm",
)
def read_rms_norm(m: nn.Module) -> NormInfo:
    return _read_rms(m, channels_first=False, eps=m.eps)


@register_adapter(
    "timm.layers.norm.RmsNorm2d", "timm.layers.norm.RmsNorm2dFp32", "timm.layers.norm_act.RmsNormAct2d",
    "timm.layers.norm_act.RmsNormAct2dFp32", "normswap.norms.rms_norm.RMSNorm2d",
)
def read_rms_norm_2d(m: nn.Module) -> NormInfo:
    return _read_rms(m, channels_first=True, eps=m.eps)


@lru_cache(maxsize=None)
def _class_source(cls: type) -> str:
    """The source of the class that defines ``forward`` (helpers such as Gemma's ``_norm`` included)."""
    owner = next((c for c in cls.__mro__ if "forward" in vars(c)), cls)
    try:
        return inspect.getsource(owner)
    except (OSError, TypeError):
        return ""


_RMS_NAME = re.compile(r"(RMSNorm|RmsNorm|T5LayerNorm)$")
_UNIT_OFFSET = re.compile(r"1(\.0)?\s*\+\s*self\.weight")


def _hf_eps(m: nn.Module) -> float | None:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(m, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _is_hf_rms(m: nn.Module) -> bool:
    cls = type(m)
    if not cls.__module__.startswith("transformers.") or not _RMS_NAME.search(cls.__name__):
        return False
    weight = getattr(m, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or _hf_eps(m) is None:
        return False
    src = _class_source(cls)
    return "sqrt" in src and ("pow(2)" in src or "**2" in src or "square" in src)


@register_adapter(predicate=_is_hf_rms, name="hf_rms_norm")
def read_hf_rms_norm(m: nn.Module) -> NormInfo:
    if getattr(m, "bias", None) is not None:
        raise Unsupported(f"{type(m).__name__} has a bias normswap does not know how it is applied")
    offset = 1.0 if _UNIT_OFFSET.search(_class_source(type(m))) else 0.0
    return _read_rms(m, channels_first=False, eps=_hf_eps(m), weight_offset=offset)


@register_adapter("normswap.norms.unsized.UnsizedNorm")
def read_unsized_norm(m: nn.Module) -> NormInfo:
    return NormInfo(kind="layer" if m.kind == "bert" else m.kind, num_features=0, eps=m.eps,
                    channels_first=m.channels_first, variant="bert" if m.kind == "bert" else "")


@register_adapter(
    "torch.nn.modules.normalization.GroupNorm", "timm.layers.norm.GroupNorm", "timm.layers.norm.GroupNorm1",
    "timm.layers.norm_act.GroupNormAct", "timm.layers.norm_act.GroupNorm1Act", "normswap.norms.group_norm.GroupNorm",
)
def read_group_norm(m: nn.Module) -> NormInfo:
    info = NormInfo(kind="group", num_features=m.num_channels, eps=float(m.eps), channels_first=True,
                    normalized_shape=(m.num_channels,), weight=m.weight, bias=m.bias, num_groups=m.num_groups)
    info.act, info.drop = _act_drop(m)
    return info


@register_adapter(
    "torch.nn.modules.instancenorm.InstanceNorm1d", "torch.nn.modules.instancenorm.InstanceNorm2d",
    "torch.nn.modules.instancenorm.InstanceNorm3d",
)
def read_instance_norm(m: nn.Module) -> NormInfo:
    return NormInfo(kind="instance", num_features=m.num_features, eps=float(m.eps), channels_first=True,
                    normalized_shape=(m.num_features,), weight=m.weight, bias=m.bias,
                    running_mean=m.running_mean, running_var=m.running_var, momentum=m.momentum,
                    track_running_stats=m.track_running_stats)
