"""Build a model from a command-line spec: `torchvision:NAME`, `timm:NAME`, `hf:MODEL_TYPE` or `hf:FOLDER`
(transformers; disco/model_sources.py), `disco:NAME` or `path/to/file.py:factory`."""
from __future__ import annotations

import inspect
import importlib.util
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.modules.module import (register_module_buffer_registration_hook,
                                     register_module_parameter_registration_hook)

from disco.errors import DiscoError
from disco.model_sources import classifier_keys, hf_model, timm_model, unknown_name, weights_hint
from disco.split.modules import replace_submodule


def without_weights(build: Callable[[], nn.Module]) -> nn.Module:
    """The model `build()` makes with its parameters and buffers on the meta device (no memory, no data).

    Built under `torch.device("meta")`; a constructor that reads back a value it computed with torch (torchvision's
    RegNets derive their widths with torch ops) cannot run there, so it is built on the CPU instead with every
    parameter and buffer moved to meta as it is registered (one tensor in memory at a time)."""
    try:
        with torch.device("meta"):
            return build()
    except NotImplementedError as error:  # "Cannot copy out of meta tensor; no data!"
        if "meta" not in str(error):
            raise
    hooks = [register_module_parameter_registration_hook(_on_meta), register_module_buffer_registration_hook(_on_meta)]
    try:
        return build()
    finally:
        for hook in hooks:
            hook.remove()


def _on_meta(module: nn.Module, name: str, tensor: torch.Tensor | None):
    if tensor is None or tensor.device.type == "meta":
        return None
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(tensor.to("meta"), requires_grad=tensor.requires_grad)
    return tensor.to("meta")


def _torchvision_model(name: str, **kwargs) -> nn.Module:
    import torchvision  # seconds to import: only when a torchvision model is built (not to read a manifest)

    known = torchvision.models.list_models()
    if name not in known:
        raise unknown_name("torchvision model", name, known, "torchvision.models.list_models()")
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _factory_model(path: str, factory: str, **kwargs) -> nn.Module:
    file = Path(path)
    if not file.is_file():
        raise DiscoError(f"model file not found: {file}")
    spec = importlib.util.spec_from_file_location(f"disco_user_model_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # the user's file: report what failed in it
        raise DiscoError(f"could not import {file}: {type(error).__name__}: {error}") from error
    builder = getattr(module, factory, None)
    if not callable(builder):
        raise DiscoError(f"{file} has no function named {factory!r}")
    accepted = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    model = builder(**{k: v for k, v in kwargs.items() if takes_any or k in accepted})
    if not isinstance(model, nn.Module):
        raise DiscoError(f"{file}:{factory}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def builtin_models() -> dict[str, Callable[..., nn.Module]]:
    """`disco:NAME` -> factory: the models the registered tasks bring (disco.tasks), such as small
    configurations of torchvision architectures that have no torchvision name (vit_small) and the
    dense-prediction models (those take `in_channels` themselves)."""
    from disco.tasks.registry import get_task, resolved, task_names  # here: the task modules are heavier

    return {name: resolved(factory) for task in task_names() for name, factory in get_task(task).models.items()}


REGISTERED_SOURCES = ("torchvision", "timm", "hf", "disco")  # models built from installed code, not a user's file
# the keyword arguments timm and transformers models take the data's channels and classes by
DATA_KWARGS = {"timm": ("in_chans", "num_classes"), "hf": ("num_channels", "num_labels")}


def split_spec(spec: str) -> tuple[str, str]:
    """'torchvision:resnet50' -> ('torchvision', 'resnet50'); 'path/to/file.py:factory' -> ('path/to/file.py',
    'factory'). A registered source ends at the first colon (`hf:FOLDER` may hold colons), a file at the last."""
    text = spec if isinstance(spec, str) else ""
    source, sep, name = text.partition(":") if text.partition(":")[0] in REGISTERED_SOURCES else text.rpartition(":")
    if not sep or not source or not name:
        raise DiscoError(f"model spec {spec!r} must look like 'torchvision:resnet50' or 'path/to/file.py:factory'")
    return source, name


def build_model(spec: str, **kwargs) -> nn.Module:
    """`torchvision:resnet50`, `timm:resnet18`, `hf:vit` (random weights), `hf:FOLDER` (a save_pretrained folder,
    its weights), `disco:vit_small` (see builtin_models) or `my_models.py:make_net` (called with the **kwargs it
    accepts)."""
    source, name = split_spec(spec)
    if source == "torchvision":
        return _torchvision_model(name, **kwargs)
    if source == "timm":
        return timm_model(name, **kwargs)
    if source == "hf":
        return hf_model(name, **kwargs)
    if source == "disco":
        builtin = builtin_models()
        if name not in builtin:
            raise DiscoError(f"unknown built-in model {name!r}; known: {', '.join(builtin)}")
        return builtin[name](**kwargs)
    return _factory_model(source, name, **kwargs)


def parse_input_size(text: str) -> tuple[int, ...]:
    """'3,224,224' -> (3, 224, 224): the shape of one input, without the batch dimension."""
    try:
        size = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise DiscoError(f"input size {text!r} must be comma-separated integers such as 3,224,224") from None
    if not 1 <= len(size) <= 4 or any(s <= 0 for s in size):
        raise DiscoError(f"input size {text!r} must be 1 to 4 positive integers such as 3,224,224")
    return size


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def adapt_stem(model: nn.Module, channels: int, stride: int | None = None) -> nn.Module:
    """Give the first conv `channels` inputs (and optionally a new stride, e.g. 1 for 28x28 images)."""
    found = _first_conv(model)
    if found is None:
        return model
    name, conv = found
    if conv.in_channels == channels and (stride is None or conv.stride == (stride, stride)):
        return model
    new = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, stride=stride or conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=1, bias=conv.bias is not None)
    replace_submodule(model, name, new)
    return model


def build_for_data(spec: str, *, channels: int, classes: int, stem_stride: int | None = None,
                   **kwargs) -> nn.Module:
    """A model for data with `channels` inputs and `classes` outputs. torchvision models are built with
    num_classes and get their first conv adapted; timm and transformers models are built for the data (num_classes
    and in_chans, num_labels and num_channels); a user's factory receives **kwargs unchanged."""
    source, name = split_spec(spec)
    builtin = builtin_models().get(name) if source == "disco" else None
    accepted = inspect.signature(builtin).parameters if builtin is not None else {}
    if "in_channels" in accepted:  # built for the data directly: no first layer to swap
        if stem_stride is not None and "stem_stride" not in accepted:
            raise DiscoError(f"disco:{name} has no stem stride to set")
        stem = {} if stem_stride is None else {"stem_stride": stem_stride}
        return build_model(spec, num_classes=classes, in_channels=channels, **stem, **kwargs)
    if source in ("timm", "hf"):
        return build_model(spec, **_data_kwargs(spec, source, channels, classes, stem_stride, kwargs), **kwargs)
    if source in ("torchvision", "disco"):
        return adapt_stem(build_model(spec, num_classes=classes, **kwargs), channels, stem_stride)
    return build_model(spec, **{"num_classes": classes, "in_channels": channels, **kwargs})


def _data_kwargs(spec: str, source: str, channels: int, classes: int, stem_stride: int | None,
                 kwargs: dict) -> dict:
    """The keywords that build a timm or transformers model for the data."""
    if stem_stride is not None:  # their first conv is no general stem: a ViT's patch embedding strides by its patches
        raise DiscoError(f"{spec} takes no --stem-stride: set its stem or input size with --model-kwargs instead "
                         "(e.g. timm img_size, hf image_size or patch_size)")
    channels_key, classes_key = DATA_KWARGS[source]
    given = [key for key in (channels_key, classes_key) if key in kwargs]
    if given:
        raise DiscoError(f"drop {', '.join(given)} from the kwargs of {spec}: channels and classes come from the data")
    return {channels_key: channels, classes_key: classes}


def read_weights(path: str | Path) -> dict:
    """A safetensors file (or a torch file with weights_only=True: never an arbitrary pickle) as a state dict."""
    import safetensors.torch
    import torch

    path = Path(path)
    if not path.is_file():
        raise DiscoError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a non-weights pickle is refused here by design
        raise DiscoError(f"{path} is not a weights-only torch file ({error}); use safetensors") from error


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> nn.Module:
    """Load a safetensors file (or a torch file with weights_only=True: never an arbitrary pickle)."""
    state = read_weights(path)
    _check_fit(model, state, path, strict=strict)
    model.load_state_dict(state, strict=strict)
    return model


def load_pretrained(model: nn.Module, path: str | Path) -> bool:
    """Load weights to train from (`disco train --weights`): as load_weights, except that where the model's source
    names its classifier (timm, transformers) a checkpoint whose classifier is for another number of classes (an
    ImageNet checkpoint for 10-class data) loads all but it, and the model's classifier is left as built. True when
    the classifier was loaded too: the model is then the trained dense model."""
    state = read_weights(path)
    expected, head = model.state_dict(), classifier_keys(model)
    if all(k in state and state[k].shape == expected[k].shape for k in head):
        _check_fit(model, state, path, strict=True)
        model.load_state_dict(state)
        return True
    state = {k: v for k, v in state.items() if k not in head}
    _check_fit(model, {**{k: expected[k] for k in head}, **state}, path, strict=True)  # all else must fit
    model.load_state_dict(state, strict=False)
    return False


def _check_fit(model: nn.Module, state: dict, path: str | Path, *, strict: bool) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if (strict and (missing or unexpected)) or wrong:
        detail = "; ".join(f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                           for label, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("wrong shape", wrong)) if keys)
        raise DiscoError(f"weights in {path} do not fit the model ({detail}){weights_hint(model)}")
