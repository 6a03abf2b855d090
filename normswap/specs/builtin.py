"""The specs normswap ships. Each says what it matches, whether it preserves computation, and which
checkpoint keys change (also shown by ``normswap list --verbose``)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.base import NormInfo
from ..errors import OptionError
from ..norms.channel_layer_norm import ChannelLayerNorm
from ..norms.group_norm import GroupNorm, group_norm
from ..norms.unsized import UnsizedNorm
from .base import WSConfig, register_spec
from .options import Range
from .groups import choose_groups

Groups = Annotated[int | None, Range(1)]
Eps = Annotated[float | None, Range(0)]
BN_STATS_DROPPED = "running_mean, running_var, num_batches_tracked are removed; weight and bias keep their keys"


def _eps(call_eps: float | None, spec_options: dict[str, Any]) -> float | None:
    """The ``eps=`` option when given, else the eps the functional call passed."""
    return call_eps if spec_options.get("eps") is None else spec_options["eps"]


def _gn_functional(x, running_mean=None, running_var=None, weight=None, bias=None, training=False, momentum=0.1,
                   eps=1e-5, *, spec_options):
    """A functional ``F.batch_norm`` call rewritten to GroupNorm, the group count chosen from x's channels."""
    groups, _ = choose_groups(x.shape[1], spec_options.get("groups"), spec_options.get("group_size"))
    return group_norm(x, groups, weight, bias, _eps(eps, spec_options))


def _in_functional(x, running_mean=None, running_var=None, weight=None, bias=None, training=False, momentum=0.1,
                   eps=1e-5, *, spec_options):
    if math.prod(x.shape[2:]) == 1:  # one value per channel: GroupNorm(C, C) would return the bias, silently
        raise ValueError(f"InstanceNorm needs more than 1 spatial element per channel, got input size {x.size()}: "
                         "a functional batch_norm call that normswap's 'in' spec rewrote; keep it a BatchNorm by "
                         "excluding its module (exclude=[...])")
    return group_norm(x, x.shape[1], weight, bias, _eps(eps, spec_options))


def _ln_from_bn_functional(x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
                           momentum=0.1, eps=1e-5, *, spec_options):
    y = F.layer_norm(x.movedim(1, -1), (x.shape[1],), weight, bias, _eps(eps, spec_options))
    return y.movedim(-1, 1)


def _ln_from_rms_functional(x, normalized_shape, weight=None, eps=None, *, spec_options):
    eps = _eps(eps, spec_options)
    return F.layer_norm(x, normalized_shape, weight, None, torch.finfo(x.dtype).eps if eps is None else eps)


def _group_norm(info: NormInfo, groups: int | None, group_size: int | None, eps: float | None) -> nn.Module:
    num_groups, note = choose_groups(info.num_features, groups, group_size)
    gn = GroupNorm(num_groups, info.num_features, eps=info.eps if eps is None else eps, affine=info.weight is not None)
    if note:
        info.notes.append(note)
    return gn


def _ws(options: dict[str, Any]) -> WSConfig:
    return WSConfig(convs=options["ws_convs"], eps=options["ws_eps"], mode=options["ws_eps_mode"])


@register_spec(
    "gn_ws", sources=("batch",), weight_standardization=_ws, changed_keys=BN_STATS_DROPPED,
    functional={"batch_norm": _gn_functional},
    description="BatchNorm -> GroupNorm + Weight Standardization on the convs feeding it (BiT)",
)
def gn_ws(info: NormInfo, *, groups: Groups = 32, group_size: Groups = None, eps: Eps = None,
          ws_eps: Annotated[float, Range(0)] = 1e-6, ws_eps_mode: Literal["inside", "outside"] = "inside",
          ws_convs: Literal["fed", "all"] = "fed") -> nn.Module:
    """GroupNorm (Wu & He 2018) with Weight Standardization (Qiao et al. 2019; Kolesnikov et al. 2020).

    Matches every BatchNorm (1d/2d/3d, Sync, timm norm-act, frozen). Does not preserve computation.
    ``eps`` defaults to the BatchNorm's. ``ws_eps_mode="inside"`` is timm/BiT's ``sqrt(var + eps)``,
    ``"outside"`` the paper's ``std + eps``; ``ws_convs="all"`` standardizes every conv, as BiT does.
    """
    return _group_norm(info, groups, group_size, eps)


@register_spec("gn", sources=("batch",), changed_keys=BN_STATS_DROPPED, functional={"batch_norm": _gn_functional},
               description="BatchNorm -> GroupNorm (Wu & He 2018)")
def gn(info: NormInfo, *, groups: Groups = 32, group_size: Groups = None, eps: Eps = None) -> nn.Module:
    """GroupNorm; the group count follows :func:`~normswap.specs.groups.choose_groups`."""
    return _group_norm(info, groups, group_size, eps)


def _instance_accepts(info: NormInfo, options: dict[str, Any]) -> str | None:
    if info.spatial_dims == 1:
        return ("BatchNorm1d may see [N, C] inputs, where InstanceNorm has a single value to normalize; "
                "left as it is")
    if info.pooled:
        return ("its input is a global pool's output (one position per channel, as in a squeeze-excite gate), "
                "where InstanceNorm has a single value to normalize; left as it is")
    return None


@register_spec("in", sources=("batch",), accepts=_instance_accepts, changed_keys=BN_STATS_DROPPED,
               functional={"batch_norm": _in_functional},
               description="BatchNorm2d/3d -> InstanceNorm with affine (Ulyanov et al. 2016)")
def instance_norm(info: NormInfo, *, eps: Eps = None) -> nn.Module:
    """InstanceNorm with affine and no running stats; a SyncBatchNorm of unknown rank gets GroupNorm(C, C)."""
    eps = info.eps if eps is None else eps
    affine = info.weight is not None
    cls = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}.get(info.spatial_dims or 0)
    if cls is None:
        info.notes.append("instance norm written as GroupNorm(C, C), which works for any spatial rank")
        return GroupNorm(info.num_features, info.num_features, eps=eps, affine=affine)
    return cls(info.num_features, eps=eps, affine=affine, track_running_stats=False)


@register_spec(
    "ln", sources=("batch", "rms"),
    functional={"batch_norm": _ln_from_bn_functional, "rms_norm": _ln_from_rms_functional},
    changed_keys="from BatchNorm: " + BN_STATS_DROPPED + "; from RMSNorm: none (no bias is added)",
    description="BatchNorm -> LayerNorm over channels; RMSNorm -> LayerNorm (Ba et al. 2016)",
)
def layer_norm(info: NormInfo, *, eps: Eps = None) -> nn.Module:
    """LayerNorm: over the channels at each position for BatchNorm sources, over the same dims as the
    RMSNorm it replaces otherwise (with a bias only where the RMSNorm had one)."""
    eps = info.eps if eps is None else eps
    affine = info.weight is not None
    if not info.normalized_shape:  # no parameters and no recorded size: normalize whatever size comes in
        return UnsizedNorm("layer", eps, channels_first=info.channels_first)
    if info.kind == "batch" or info.channels_first:
        return ChannelLayerNorm(info.num_features, eps=eps, affine=affine,
                                bias=info.kind == "batch" or info.bias is not None)
    return nn.LayerNorm(info.normalized_shape, eps=eps, elementwise_affine=affine, bias=info.bias is not None)


def _ghost_accepts(info: NormInfo, options: dict[str, Any]) -> str | None:
    if info.frozen:
        return "frozen BatchNorm uses fixed statistics; ghost batches would change nothing"
    if info.spatial_dims is None:
        return "SyncBatchNorm already normalizes over the global batch; ghost batches do not apply"
    if info.variant == f"ghost:{options['virtual_batch']}":
        return "already GhostBatchNorm with this virtual batch"
    return None


@register_spec(
    "ghost_bn", sources=("batch",), accepts=_ghost_accepts, preserves="eval",
    changed_keys="none (GhostBatchNorm is a BatchNorm subclass with the same buffers)",
    description="BatchNorm -> GhostBatchNorm: statistics per virtual batch (Hoffer et al. 2017)",
)
def ghost_bn(info: NormInfo, *, virtual_batch: Annotated[int, Range(1)] = 32) -> nn.Module:
    """GhostBatchNorm; identical to BatchNorm in eval mode, running stats updated as one BatchNorm would."""
    from ..norms.ghost_batch_norm import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d

    if virtual_batch < 1:
        raise OptionError(f"option 'virtual_batch' must be >= 1, got {virtual_batch}")
    cls = {1: GhostBatchNorm1d, 2: GhostBatchNorm2d, 3: GhostBatchNorm3d}[info.spatial_dims]
    return cls(info.num_features, eps=info.eps, momentum=info.momentum, affine=info.weight is not None,
               track_running_stats=info.track_running_stats, virtual_batch_size=virtual_batch)


def _rms_functional(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, spec_options):
    from ..norms.rms_norm import rms_norm

    return rms_norm(x, normalized_shape, weight, bias if spec_options["bias"] else None, _eps(eps, spec_options))


@register_spec(
    "rms", sources=("layer",), functional={"layer_norm": _rms_functional}, exact=True,
    changed_keys="none with bias=True (the default keeps the LayerNorm's bias); with bias=False 'bias' is removed",
    description="LayerNorm -> RMSNorm, eps carried over (Zhang & Sennrich 2019)",
)
def rms(info: NormInfo, *, eps: Eps = None, bias: bool = True) -> nn.Module:
    """RMSNorm over the same dims as the LayerNorm; ``eps`` is the LayerNorm's unless given."""
    from ..norms.rms_norm import RMSNorm, RMSNorm2d

    eps = info.eps if eps is None else eps
    keep_bias = bias and info.bias is not None
    affine = info.weight is not None
    if not info.normalized_shape:
        return UnsizedNorm("rms", eps, channels_first=info.channels_first)
    if info.channels_first:
        return RMSNorm2d(info.num_features, eps=eps, elementwise_affine=affine, bias=keep_bias)
    return RMSNorm(info.normalized_shape, eps=eps, elementwise_affine=affine, bias=keep_bias)


def _bert_accepts(info: NormInfo, options: dict[str, Any]) -> str | None:
    if info.normalized_shape and info.num_features < 2:
        return "normalizes a single value: the unbiased std of one value is undefined"
    return "already a BERT LayerNorm" if info.variant == "bert" else None


def _bert_functional(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, spec_options):
    """A functional ``F.layer_norm`` call as a BERT LayerNorm; over a single value (where the unbiased std is
    undefined; a shape computed at run time could not be judged when planning) the call stays as it was."""
    from ..norms.bert_layer_norm import bert_layer_norm

    size = math.prod((normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape)
    if size < 2:
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    return bert_layer_norm(x, normalized_shape, weight, bias, spec_options["eps"])


@register_spec(
    "bert_ln", sources=("layer",), accepts=_bert_accepts, functional={"layer_norm": _bert_functional},
    changed_keys="none",
    description="LayerNorm -> BERT LayerNorm: a*(x-mean)/(std_unbiased+eps)+b, eps 1e-6 (Annotated Transformer)",
)
def bert_ln(info: NormInfo, *, eps: Annotated[float, Range(0)] = 1e-6) -> nn.Module:
    """The python-ops BERT LayerNorm; eps is added to the unbiased std, so the source's eps (added to
    the variance) is not carried: the default is the Annotated Transformer's 1e-6."""
    from ..norms.bert_layer_norm import BertLayerNorm, BertLayerNorm2d

    affine = info.weight is not None
    if not info.normalized_shape:
        return UnsizedNorm("bert", eps, channels_first=info.channels_first)
    if info.channels_first:
        return BertLayerNorm2d(info.num_features, eps=eps, elementwise_affine=affine, bias=info.bias is not None)
    return BertLayerNorm(info.normalized_shape, eps=eps, elementwise_affine=affine, bias=info.bias is not None)
