"""Simulation-mode channel-mixing layers and the registry that maps plain layers to them.

A Disco layer *is* its plain layer (a subclass: same weights, same state-dict keys) plus three buffers:
`in_assign` (node of each input channel, -1 = replicated input), `out_assign` (node of each output
channel) and `group_mask` [nodes, in_channels]: 1 keeps communication group (c -> k), i.e. node k uses
input channel c of another node; 0 zeroes the weight slice W[a_out == k, c] so c is never sent to k.
Forward multiplies the weight by the resulting 0/1 mask, which is exactly the sum of what the nodes
compute: local (diagonal) blocks plus the kept remote columns.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from disco.errors import DiscoError
from disco.quantization import round_trip
from disco.split.plan import SplitPlan
from disco.transport import get_transport_dtype


class DiscoLayer:
    """Mixin: a conv or linear that applies its split plan (disco/split/plan.py). The plan's tensors are the
    layer's buffers, so they follow the layer across devices and state-dict loads."""

    nodes: int
    in_assign: torch.Tensor
    out_assign: torch.Tensor
    group_mask: torch.Tensor
    channel_dim: int = 1  # dim of channels in the layer's input and output (conv 1, linear -1)
    transport = "fp32"  # the dtype received channels travel in (set_transport): the simulation rounds them alike
    plain = False  # True while a graph is captured: the layer computes as the original module (plain_layers)
    intercepted = 0  # calls computed through `mixed` so far (partition() checks every graph call comes through it)

    def _attach_plan(self, plan: SplitPlan) -> None:
        device = self.weight.device
        self.nodes, self.channel_dim = plan.nodes, plan.channel_dim
        self.register_buffer("in_assign", plan.in_assign.to(device=device, dtype=torch.long))
        self.register_buffer("out_assign", plan.out_assign.to(device=device, dtype=torch.long))
        self.register_buffer("group_mask", self.plan.possible_groups().to(self.weight.dtype))

    @property
    def plan(self) -> SplitPlan:
        return SplitPlan(nodes=self.nodes, in_assign=self.in_assign, out_assign=self.out_assign,
                         conv_groups=self.conv_groups, channel_dim=self.channel_dim,
                         mask=getattr(self, "group_mask", None))

    @property
    def conv_groups(self) -> int:
        return getattr(self, "groups", 1)

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.plan.weight_mask(self.weight)

    def set_group_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (any [nodes, in_channels] 0/1 tensor); groups that do not exist stay 0."""
        if mask.shape != self.group_mask.shape:
            raise DiscoError(f"group mask must have shape {tuple(self.group_mask.shape)}, got {tuple(mask.shape)}")
        possible = self.plan.possible_groups()
        with torch.no_grad():
            self.group_mask.copy_((mask.to(self.group_mask.device) > 0) & possible)

    def mixed(self, x: torch.Tensor, weight: torch.Tensor, bias, apply: Callable) -> torch.Tensor:
        """What the nodes compute together with `weight` (the layer's weight as its forward uses it):
        `apply(x, weight, bias)` with the dropped groups' columns zeroed and received channels rounded as the
        transport dtype rounds them."""
        self.intercepted += 1
        dtype = get_transport_dtype(self.transport)
        if dtype.lossless:
            return apply(x, weight * self.plan.weight_mask(weight), bias)
        # as a node computes it: held columns on the exact input, received ones on what the network delivers
        local, remote = self.plan.weight_masks(weight)
        y = apply(x, weight * local, bias)
        received = round_trip(x, dtype, self.channel_dim, self.in_assign)
        return y + apply(received, weight * remote, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        apply = MIXING_LAYERS[self._plain_type].apply
        if self.plain:
            return apply(self, x, self.weight, self.bias)
        return self.mixed(x, self.weight, self.bias, lambda x, w, b: apply(self, x, w, b))


class DiscoConv1d(DiscoLayer, nn.Conv1d):
    _plain_type = nn.Conv1d


class DiscoConv2d(DiscoLayer, nn.Conv2d):
    _plain_type = nn.Conv2d


class DiscoLinear(DiscoLayer, nn.Linear):
    _plain_type = nn.Linear


def _conv_kwargs(conv: nn.Module) -> dict:
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode)


def _linear_kwargs(linear: nn.Module) -> dict:
    return dict(in_features=linear.in_features, out_features=linear.out_features, bias=linear.bias is not None)


def _conv_apply(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    return module._conv_forward(x, weight, bias)


def _linear_apply(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    return F.linear(x, weight, bias)


@dataclass(frozen=True)
class MixingKind:
    """A channel-mixing layer type: its Disco twin, the twin's constructor arguments, the dim of channels in
    its input/output, and `apply(module, x, weight, bias)`, the layer's computation with any weight (the
    simulation passes the masked weight, the runtime a rank's blocks)."""

    plain: type
    disco: type
    kwargs_of: Callable[[nn.Module], dict]
    channel_dim: int
    apply: Callable


MIXING_LAYERS: dict[type, MixingKind] = {kind.plain: kind for kind in (
    MixingKind(nn.Conv1d, DiscoConv1d, _conv_kwargs, 1, _conv_apply),
    MixingKind(nn.Conv2d, DiscoConv2d, _conv_kwargs, 1, _conv_apply),
    MixingKind(nn.Linear, DiscoLinear, _linear_kwargs, -1, _linear_apply),
)}


def register_mixing_layer(kind: MixingKind) -> None:
    """Teach the partitioner and the runtime a new channel-mixing layer type (its Disco twin mixes in
    DiscoLayer)."""
    MIXING_LAYERS[kind.plain] = kind


def mixing_kind(module: nn.Module) -> MixingKind | None:
    """The registry entry of a plain conv/linear type or its Disco twin (exact types: a subclass may compute
    otherwise, and is twinned by interception instead, see InterceptingLayer)."""
    for kind in MIXING_LAYERS.values():
        if type(module) is kind.plain or type(module) is kind.disco:
            return kind
    return None


# the functions a module's forward may compute a conv/linear with, and the dim of channels of each
_MIXING_FUNCTIONS = {F.conv1d: 1, F.conv2d: 1, F.conv3d: 1, F.linear: -1, torch.ops.aten.convolution.default: 1,
                     torch.ops.aten.conv2d.default: 1, torch.ops.aten.linear.default: -1}


class _Intercept(TorchFunctionMode):
    """Within one layer's forward: its conv/linear call computes with the masked weight (DiscoLayer.mixed)."""

    def __init__(self, layer: "InterceptingLayer"):
        super().__init__()
        self.layer = layer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MIXING_FUNCTIONS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(weight, torch.Tensor) and weight.shape == self.layer.weight.shape:
                x = args[0] if args else kwargs["input"]
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                rest = args[3:]
                extra = {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}
                return self.layer.mixed(x, weight, bias, lambda x, w, b: func(x, w, b, *rest, **extra))
        return func(*args, **kwargs)


class InterceptingLayer(DiscoLayer):
    """The Disco twin of any other module whose forward computes one conv/linear with its `weight` (a timm
    same-padding or weight-standardised conv, a Linear subclass...): the module's own forward runs, and its
    conv/linear call is computed by DiscoLayer.mixed with the weight exactly as the forward passes it."""

    def forward(self, *args, **kwargs):
        if self.plain:
            return self._plain_type.forward(self, *args, **kwargs)
        with _Intercept(self):
            return self._plain_type.forward(self, *args, **kwargs)


class _ForeignCalls(TorchFunctionMode):
    """Within the forward of a module that computes a child layer's conv/linear itself (timm's BEiT attention:
    `F.linear(x, self.qkv.weight, qkv_bias)`): that call, recognised by the layer's own weight tensor, is
    computed by the layer's DiscoLayer.mixed."""

    def __init__(self, layers: list["DiscoLayer"]):
        super().__init__()
        self.by_weight = {id(layer.weight): layer for layer in layers}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MIXING_FUNCTIONS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            layer = self.by_weight.get(id(weight))
            if layer is not None and not layer.plain:
                x = args[0] if args else kwargs["input"]
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                rest = args[3:]
                extra = {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}
                return layer.mixed(x, weight, bias, lambda x, w, b: func(x, w, b, *rest, **extra))
        return func(*args, **kwargs)


class CallingForLayers:
    """Mixed into the class of a module that computes its child layers' convs/linears in its own forward
    (`disco_foreign_layers`: their paths below it): those calls are masked as the layers' own are."""

    disco_foreign_layers: tuple[str, ...] = ()

    def forward(self, *args, **kwargs):
        layers = [self.get_submodule(path) for path in self.disco_foreign_layers]
        with _ForeignCalls(layers):
            return self._caller_type.forward(self, *args, **kwargs)


_TWINS: dict[type, type] = {}
_CALLERS: dict[type, type] = {}


def calling_for(module: nn.Module, layer_path: str) -> None:
    """Make `module`, in place, compute the conv/linear of its descendant `layer_path` through that layer."""
    plain = type(module)
    if not isinstance(module, CallingForLayers):
        if plain not in _CALLERS:
            _CALLERS[plain] = type(f"CallingFor{plain.__name__}", (CallingForLayers, plain), {"_caller_type": plain})
        module.__class__ = _CALLERS[plain]
    if layer_path not in module.disco_foreign_layers:
        module.disco_foreign_layers = (*module.disco_foreign_layers, layer_path)


def twin_class(module: nn.Module) -> type:
    """The Disco class of a module: the registered twin of a plain conv/linear, else an intercepting subclass."""
    kind = mixing_kind(module)
    if kind is not None:
        return kind.disco
    plain = type(module)
    if plain not in _TWINS:
        _TWINS[plain] = type(f"Disco{plain.__name__}", (InterceptingLayer, plain), {"_plain_type": plain})
    return _TWINS[plain]


def to_disco(module: nn.Module, plan: SplitPlan) -> DiscoLayer:
    """The module made its own Disco twin, in place (same parameters, plus the plan's buffers)."""
    module.__class__ = twin_class(module)
    module._attach_plan(plan)
    return module


@contextmanager
def plain_layers(model: nn.Module):
    """Within: every Disco layer computes as its original module (a graph captured then is the model's own)."""
    layers = [m for m in model.modules() if isinstance(m, DiscoLayer)]
    for layer in layers:
        layer.plain = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.plain = False
