"""Models from installed libraries besides torchvision: `timm:NAME` and `hf:MODEL_TYPE` / `hf:FOLDER` (transformers).

Both libraries are optional (`pip install disco[timm]`, `disco[transformers]`) and imported only when such a model is
built: importing either costs seconds. Neither ever downloads anything or runs a model's own code: timm models are
built with pretrained=False; transformers models from their model type's config (random weights) or from a folder
`save_pretrained` wrote (its config and safetensors weights; a config naming remote code, `auto_map`, is refused).
"""
from __future__ import annotations

import difflib
import importlib
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from disco.errors import DiscoError
from disco.jsonfile import SMALL_JSON_BYTES, read_json

# kwargs that would make a library fetch weights or code (timm's pretrained/checkpoint_path/pretrained_cfg_overlay,
# transformers' trust_remote_code/auto_map): a model is built with random weights, and given weights by DISCO only
WEIGHT_KWARGS = ("weights", "pretrained", "checkpoint", "remote_code", "auto_map")
# config settings an hf:FOLDER's config holds that do not shape the architecture, or that DISCO sets itself: a
# deployment records the rest (disco/export/trust.py), num_labels and num_channels come from the data
HF_UNRECORDED = ("auto_map", "_name_or_path", "transformers_version", "architectures", "id2label", "label2id",
                 "torch_dtype", "dtype", "model_type", "num_labels", "num_channels")
# the modules of a transformers image classifier that hold its classifier (nearly all name it `classifier`)
HF_HEADS = ("classifier", "score", "head", "dist_head")


def weight_kwargs(kwargs: dict) -> list[str]:
    """The keys of `kwargs` that ask for weights, a checkpoint or remote code."""
    return [key for key in kwargs if any(word in str(key).lower() for word in WEIGHT_KWARGS)]


def unknown_name(kind: str, name: str, known: Iterable[str], listing: str) -> DiscoError:
    """The error for a model name `kind` does not know, with its close matches (or where to list them)."""
    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; see {listing}"
    return DiscoError(f"unknown {kind} {name!r}{hint}")


def _library(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DiscoError(f"{extra} models need the {module} package: pip install disco[{extra}]") from None


def _refuse_weight_kwargs(spec: str, kwargs: dict) -> None:
    asked = weight_kwargs(kwargs)
    if asked:
        raise DiscoError(f"{spec} is built with random weights, never downloading any nor running a model's own "
                         f"code: drop {', '.join(asked)} from the model kwargs (give weights with --weights)")


def timm_model(name: str, **kwargs) -> nn.Module:
    """`timm.create_model(name, pretrained=False, **kwargs)`."""
    timm = _library("timm", "timm")
    _refuse_weight_kwargs(f"timm:{name}", kwargs)
    if not timm.is_model(name):
        raise unknown_name("timm model", name, timm.list_models(), "timm.list_models()")
    return _built(f"timm:{name}", timm.create_model, name, pretrained=False, **kwargs)


def _built(spec: str, build, *args, **kwargs) -> nn.Module:
    """`build(*args, **kwargs)`, the library's own refusal (of a model kwarg, mostly) reported as a DiscoError."""
    try:
        return build(*args, **kwargs)
    except DiscoError:
        raise
    except Exception as error:  # TypeError, ValueError, IndexError...: a setting the architecture does not take
        text = str(error).strip().splitlines()
        raise DiscoError(f"{spec} could not be built ({type(error).__name__}: {text[0] if text else ''}); check its "
                         "model kwargs") from error


class HFClassifier(nn.Module):
    """A transformers image classifier whose forward returns the logits tensor: training calls `model(x)` and reads
    a tensor, transformers returns an ImageClassifierOutput.

    Its state-dict keys are `model.<transformers key>`, as any module that holds another: parameter names then agree
    between state_dict, named_parameters and the captured graph, which shards and checkpoints are keyed by. A
    transformers checkpoint is not loaded by key anyway: transformers 5 renames keys as it loads a file (a ViT's
    `encoder.layer.0.attention.attention.query` is `layers.0.attention.q_proj` in memory), so one starts from a
    save_pretrained folder with `hf:FOLDER`, which from_pretrained reads."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x positional: most name it pixel_values, perceiver `inputs`. [0]: the logits, whether the output is an
        # ImageClassifierOutput (no loss without labels) or a tuple (a config saved with return_dict=False)
        return self.model(x)[0]


def hf_model(name: str, **kwargs) -> HFClassifier:
    """`hf:MODEL_TYPE`: the model type's image classifier with random weights, its config made of **kwargs;
    `hf:FOLDER`: the model a `save_pretrained` folder holds, with its weights."""
    transformers = _library("transformers", "transformers")
    _refuse_weight_kwargs(f"hf:{name}", kwargs)
    folder = _folder(name, transformers)
    if folder is not None:
        return HFClassifier(_built(f"hf:{name}", _model_from_folder, folder, dict(kwargs), transformers))
    return HFClassifier(_built(f"hf:{name}", lambda: _from_config(_config(name, dict(kwargs), transformers),
                                                                  transformers)))


def _from_config(config, transformers) -> nn.Module:
    """The config's image classifier with random weights."""
    names = _classifier_types(transformers)[config.model_type]
    if not isinstance(names, str) and not getattr(config, "architectures", None):
        # levit has two classifiers (with a teacher's head or without): from_config must be told which, the plain one
        config.architectures = [names[0]]
    return transformers.AutoModelForImageClassification.from_config(config)


def _folder(name: str, transformers) -> Path | None:
    """The folder `hf:NAME` names, or None where NAME is a model type. A name that is both is refused: which the
    user meant cannot be known, and each builds another model."""
    if not Path(name).is_dir():
        return None
    if name in _classifier_types(transformers):
        raise DiscoError(f"hf:{name} names both the transformers model type {name!r} and the folder {name}; write "
                         f"hf:./{name} for the folder, or run from another directory for the model type")
    return Path(name)


def _classifier_types(transformers) -> dict[str, object]:
    return transformers.models.auto.modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES


def _check_type(model_type: str, transformers) -> None:
    if model_type not in _classifier_types(transformers):
        raise unknown_name("transformers image classification model type", model_type,
                           sorted(_classifier_types(transformers)),
                           "transformers' MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES")


def _settings_of(model_type: str, transformers) -> tuple[dict, set[str]]:
    """The model type's default config (as a dict) and every setting its config takes."""
    default = transformers.CONFIG_MAPPING[model_type]()
    values = default.to_dict()
    return values, set(values) | set(getattr(type(default), "attribute_map", {})) | {"num_labels"}


def _config(model_type: str, settings: dict, transformers):
    """The model type's config with `settings`; a setting it does not take is refused (transformers would keep a
    misspelt one silently)."""
    _check_type(model_type, transformers)
    _, known = _settings_of(model_type, transformers)
    channels = settings.get("num_channels", 3)
    if "num_channels" not in known:  # e.g. clip, siglip: their vision config reads 3-channel images
        if channels != 3:
            raise DiscoError(f"hf:{model_type} reads 3-channel images (its config has no num_channels); use 3-channel "
                             "data or another model type")
        settings.pop("num_channels", None)
    unknown = sorted(set(settings) - known)
    if unknown:
        raise DiscoError(f"hf:{model_type} has no setting {', '.join(unknown)}; see the fields of transformers' "
                         f"{transformers.CONFIG_MAPPING[model_type].__name__}")
    return transformers.AutoConfig.for_model(model_type, **settings)


def _read_folder_config(folder: Path) -> dict:
    """config.json of a save_pretrained folder, read as data before transformers sees it: remote code is refused."""
    path = folder / "config.json"
    if not path.is_file():
        raise DiscoError(f"{folder} has no config.json: hf:FOLDER takes a folder written by save_pretrained")
    raw = read_json(path, what="model configuration", max_bytes=SMALL_JSON_BYTES)
    if "auto_map" in raw:
        raise DiscoError(f"{path} names the model's own code (auto_map): DISCO never runs code that comes with a "
                         "model; save a model whose type transformers has (see transformers' model types)")
    return raw


def _folder_config(folder: Path, settings: dict, transformers):
    """The config of a save_pretrained folder with `settings` over it (num_channels left out: the folder's own)."""
    model_type = _read_folder_config(folder).get("model_type")
    _check_type(str(model_type), transformers)
    _, known = _settings_of(model_type, transformers)
    unknown = sorted(set(settings) - known - {"num_channels"})
    if unknown:
        raise DiscoError(f"hf:{folder} (a {model_type} model) has no setting {', '.join(unknown)}")
    overrides = {k: v for k, v in settings.items() if k != "num_channels"}
    return transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True,
                                                   **overrides)


def _model_from_folder(folder: Path, settings: dict, transformers) -> nn.Module:
    """The folder's model with its safetensors weights; a classifier for another number of classes (num_labels)
    is left as built, to be trained. On the meta device (rebuilding an architecture): from the config alone."""
    config = _folder_config(folder, settings, transformers)
    channels = settings.get("num_channels", getattr(config, "num_channels", 3))
    if getattr(config, "num_channels", 3) != channels:
        raise DiscoError(f"hf:{folder} reads {getattr(config, 'num_channels', 3)}-channel images, the data has "
                         f"{channels} channels; convert the data, or build hf:{config.model_type} for it")
    if torch.get_default_device().type == "meta":  # from_pretrained refuses meta: no weights to load anyway
        return _from_config(config, transformers)
    if not any(folder.glob("*.safetensors")):
        pickled = " (only pickled .bin weights, which DISCO never reads)" if any(folder.glob("*.bin")) else ""
        raise DiscoError(f"{folder} has no .safetensors weights{pickled}; save the model with transformers' "
                         "save_pretrained, which writes model.safetensors")
    model, info = transformers.AutoModelForImageClassification.from_pretrained(
        folder, config=config, use_safetensors=True, trust_remote_code=False, local_files_only=True,
        ignore_mismatched_sizes=True, output_loading_info=True)
    left = sorted(set(info["missing_keys"]) | {key for key, *_ in info["mismatched_keys"]})
    heads = hf_heads(model)
    unfit = [k for k in left if not _under(k, heads)]
    if unfit:
        raise DiscoError(f"the weights in {folder} do not fit its config's model ({', '.join(unfit[:4])}"
                         f"{' ...' if len(unfit) > 4 else ''} missing or of another shape)")
    return model.to(torch.float32).train()  # as every built model: fp32 (from_pretrained keeps the file's dtype)


def hf_recorded(name: str, settings: dict) -> tuple[str, dict] | None:
    """`hf:FOLDER` as (model type, settings) that rebuild its architecture without the folder: the settings where
    the folder's config (with `settings` over it) differs from the model type's defaults, less those in
    HF_UNRECORDED. None where `name` is a model type."""
    transformers = _library("transformers", "transformers")
    folder = _folder(name, transformers)
    if folder is None:
        return None
    config = _folder_config(folder, settings, transformers)
    defaults, known = _settings_of(config.model_type, transformers)
    recorded = {key: value for key, value in config.to_dict().items()
                if key in known and key not in HF_UNRECORDED and not key.startswith("_")
                and (key not in defaults or defaults[key] != value)}
    return config.model_type, recorded


def hf_heads(model: nn.Module) -> tuple[str, ...]:
    """The names of a transformers classifier's modules that map features to classes."""
    return tuple(name for name in HF_HEADS if isinstance(getattr(model, name, None), nn.Module))


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)


def classifier_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of the model's classifier where its source says which they are (timm's pretrained_cfg,
    a transformers classifier's head); [] for other models."""
    if isinstance(model, HFClassifier):
        prefixes = tuple(f"model.{name}" for name in hf_heads(model.model))
    else:
        cfg = getattr(model, "pretrained_cfg", None)
        head = cfg.get("classifier") if isinstance(cfg, dict) else None
        prefixes = (head,) if isinstance(head, str) else tuple(head or ())
    return [key for key in model.state_dict() if _under(key, prefixes)]


def weights_hint(model: nn.Module) -> str:
    """What to do instead when a checkpoint does not fit `model` (appended to the error)."""
    if isinstance(model, HFClassifier):
        return "; to start from a transformers checkpoint, build the model from its folder: --model hf:FOLDER"
    return ""
