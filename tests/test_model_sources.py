"""timm:NAME and hf:MODEL_TYPE / hf:FOLDER models: built for the data, never downloading weights or running a
model's own code, recorded in deployments without the folder, and loading their libraries' checkpoints."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from disco.errors import DiscoError
from disco.export.manifest import ModelSpec
from disco.export.trust import build_deployed_model, deployable_model
from disco.models import build_for_data, build_model, load_pretrained, load_weights

pytest.importorskip("timm")
pytest.importorskip("transformers")

TINY_VIT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
                patch_size=7)


def _shapes(model: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture
def vit_folder(tmp_path):
    """A tiny transformers ViT for 1-channel 28x28 images and 5 classes, saved with save_pretrained."""
    from transformers import AutoConfig, AutoModelForImageClassification

    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(
        AutoConfig.for_model("vit", num_labels=5, num_channels=1, **TINY_VIT)).eval()
    folder = tmp_path / "tiny_vit"
    model.save_pretrained(folder)
    return folder, model


def test_timm_model_built_for_the_data():
    model = build_for_data("timm:resnet18", channels=1, classes=7)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_timm_unknown_name_suggests_close_ones():
    with pytest.raises(DiscoError, match="unknown timm model 'resnet_18'; did you mean resnet18"):
        build_model("timm:resnet_18")


@pytest.mark.parametrize("kwargs", [{"pretrained": True}, {"checkpoint_path": "x.pth"},
                                    {"pretrained_cfg_overlay": {"file": "x"}}])
def test_timm_never_downloads(kwargs):
    with pytest.raises(DiscoError, match="never downloading any"):
        build_for_data("timm:resnet18", channels=3, classes=10, **kwargs)


def test_timm_and_hf_take_no_stem_stride():
    with pytest.raises(DiscoError, match="takes no --stem-stride"):
        build_for_data("timm:resnet18", channels=1, classes=10, stem_stride=1)


def test_hf_model_type_returns_logits():
    model = build_for_data("hf:vit", channels=1, classes=10, **TINY_VIT)
    out = model(torch.randn(3, 1, 28, 28))
    assert isinstance(out, torch.Tensor) and out.shape == (3, 10)
    assert next(iter(model.state_dict())).startswith("model.vit.")


def test_hf_refuses_unknown_types_and_settings():
    with pytest.raises(DiscoError, match="did you mean vit"):
        build_model("hf:vitt")
    with pytest.raises(DiscoError, match="no setting hiden_size"):
        build_for_data("hf:vit", channels=3, classes=10, hiden_size=32)
    with pytest.raises(DiscoError, match="nor running a model's own code: drop trust_remote_code"):
        build_for_data("hf:vit", channels=3, classes=10, trust_remote_code=True)


def test_hf_folder_round_trip(vit_folder):
    folder, saved = vit_folder
    model = build_for_data(f"hf:{folder}", channels=1, classes=5).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), saved(x).logits)


def test_hf_folder_for_other_classes_keeps_all_but_classifier(vit_folder):
    folder, saved = vit_folder
    model = build_for_data(f"hf:{folder}", channels=1, classes=3)
    assert model.model.classifier.out_features == 3
    assert torch.equal(model.model.vit.embeddings.cls_token, saved.vit.embeddings.cls_token)
    with pytest.raises(DiscoError, match="1-channel images, the data has 3"):
        build_for_data(f"hf:{folder}", channels=3, classes=5)


def test_hf_folder_deploys_as_model_type(vit_folder):
    folder, _ = vit_folder
    spec = ModelSpec(model=f"hf:{folder}", channels=1, classes=5)
    recorded = deployable_model(spec)
    assert recorded.model == "hf:vit" and recorded.code_sha256 is None
    assert {"hidden_size", "image_size", "patch_size"} <= set(recorded.kwargs)
    assert not {"architectures", "id2label", "transformers_version", "num_channels"} & set(recorded.kwargs)
    recorded = ModelSpec(**json.loads(json.dumps(vars(recorded))))  # as a manifest carries it
    recorded.validate()
    with torch.device("meta"):
        rebuilt = build_deployed_model(recorded, None)
        original = build_for_data(spec.model, channels=1, classes=5)  # the folder's architecture, on meta too
    assert _shapes(rebuilt) == _shapes(original)


def test_hf_folder_refuses_remote_code(vit_folder):
    folder, _ = vit_folder
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "evil.Model"}}))
    with pytest.raises(DiscoError, match="auto_map"):
        build_for_data(f"hf:{folder}", channels=1, classes=5)


def test_hf_folder_refuses_pickled_weights(vit_folder):
    folder, saved = vit_folder
    (folder / "model.safetensors").unlink()
    torch.save(saved.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(DiscoError, match="no .safetensors weights .only pickled .bin"):
        build_for_data(f"hf:{folder}", channels=1, classes=5)


def test_model_spec_accepts_timm_and_hf_never_weights():
    ModelSpec(model="timm:resnet18", channels=3, classes=10).validate()
    ModelSpec(model="hf:data2vec-vision", channels=3, classes=10, kwargs={"hidden_size": 32}).validate()
    for kwargs in ({"pretrained": True}, {"checkpoint_path": "x"}, {"trust_remote_code": True}):
        with pytest.raises(DiscoError, match="may not ask for weights"):
            ModelSpec(model="timm:resnet18", channels=3, classes=10, kwargs=kwargs).validate()
    with pytest.raises(DiscoError, match="never names a folder"):
        ModelSpec(model="hf:/tmp/my_vit", channels=3, classes=10).validate()


def test_timm_checkpoint_for_other_classes_loads_all_but_classifier(tmp_path):
    imagenet = build_for_data("timm:resnet18", channels=3, classes=1000)
    path = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(imagenet.state_dict(), str(path))
    model = build_for_data("timm:resnet18", channels=3, classes=10)
    classifier = model.fc.weight.clone()
    assert not load_pretrained(model, path)
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight) and torch.equal(model.fc.weight, classifier)
    with pytest.raises(DiscoError, match="wrong shape: fc.weight"):  # load_weights stays strict
        load_weights(model, path)
    torch.save(imagenet.state_dict(), tmp_path / "resnet18.pth")  # timm's .pth: read with weights_only=True
    same = build_for_data("timm:resnet18", channels=3, classes=1000)
    assert load_pretrained(same, tmp_path / "resnet18.pth") and torch.equal(same.fc.weight, imagenet.fc.weight)


def test_hf_weights_of_another_class_count_load_all_but_classifier(tmp_path, vit_folder):
    folder, _ = vit_folder
    trained = build_for_data(f"hf:{folder}", channels=1, classes=5)  # as a run's dense.safetensors holds it
    path = tmp_path / "dense.safetensors"
    safetensors.torch.save_file(trained.state_dict(), str(path))
    model = build_for_data("hf:vit", channels=1, classes=3, **TINY_VIT)
    assert not load_pretrained(model, path) and model.model.classifier.out_features == 3
    assert torch.equal(model.model.vit.embeddings.cls_token, trained.model.vit.embeddings.cls_token)
    with pytest.raises(DiscoError, match="--model hf:FOLDER"):  # transformers' own files: through hf:FOLDER
        load_weights(model, folder / "model.safetensors")


def test_libraries_imported_only_when_such_a_model_is_built():
    code = ("import sys, disco.models, disco.export.trust; "
            "print('timm' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
