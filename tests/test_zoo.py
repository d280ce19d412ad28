"""Models from the zoos users bring (timm, transformers), at small configurations: split, exported and run by the
in-process runtime at 2 and 3 nodes, outputs equal to the original model's and every byte as the cost report says.
The full sample (30+ timm families, 10+ transformers architectures, all of torchvision) is bench/models.py."""
from __future__ import annotations

from pathlib import Path
from tempfile import TemporaryDirectory

import pytest
import torch

from disco.data.datasets import DEBIAN_FASHION_MNIST
from disco.errors import DiscoError
from disco.export import ModelSpec
from disco.export.shards import PLAN_BUFFERS, check_spec
from disco.models import build_for_data
from disco.runtime.inprocess import run_in_process
from disco.training import pipeline
from disco.training.config import TrainConfig
from disco.training.export_run import export_run
from runtime_helpers import make_deployment

pytest.importorskip("timm")
pytest.importorskip("transformers")

# each exercises rules torchvision's models do not: (spec, input size, kwargs)
ZOO = {
    # heads of 64 channels over 3 nodes of 64: whole heads by re-assigning qkv; class token; LayerNorm sums
    "vit": ("timm:vit_tiny_patch16_224", 32, {"img_size": 32, "patch_size": 8, "depth": 2}),
    # LayerNorm over channels-last after a permute, and over channels-first (LayerNorm2d)
    "convnext": ("timm:convnext_atto", 32, {}),
    # split attention: channels reshaped to (radix, C / radix), softmax and a sum over radix
    "resnest": ("timm:resnest14d", 32, {}),
    # GroupNorm with one group over every channel: partial sums
    "poolformer": ("timm:poolformer_s12", 32, {}),
    # token-mixing linears: local per channel
    "mixer": ("timm:mixer_s32_224", 64, {"img_size": 64}),
    # transformers: windows, shifted masks, relative position bias from a table, patch merging
    "hf-swin": ("hf:swin", 32, {"image_size": 32, "patch_size": 2, "embed_dim": 24, "depths": [1, 1],
                                "num_heads": [2, 4], "window_size": 4}),
    "hf-vit": ("hf:vit", 28, {"image_size": 28, "patch_size": 7, "hidden_size": 48, "num_hidden_layers": 2,
                              "num_attention_heads": 3, "intermediate_size": 64}),
    # the attention computes its qkv linear itself, with a bias concatenated from q and v biases
    "beit": ("timm:beit_base_patch16_224", 32, {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 64,
                                                "num_heads": 2}),
    # a linear over tokens reading half the channels (a chunk): a node may hold none of its input
    "gmlp": ("timm:gmlp_ti16_224", 32, {"img_size": 32}),
    # GroupNorm of 8 groups over channels split between nodes along group boundaries
    "hf-bit": ("hf:bit", 32, {"embedding_size": 16, "hidden_sizes": [32, 64], "depths": [1, 1], "num_groups": 8}),
}


def _randomised(model):
    with torch.no_grad():  # zero-initialised heads and scales would make every output equal
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


@pytest.mark.parametrize("nodes", [2, 3])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_runs_split_equal_to_the_original(tmp_path, name, nodes):
    spec, size, kwargs = ZOO[name]
    deployment = make_deployment(tmp_path, spec, nodes, keep=1.0, size=size, images=2, kwargs=kwargs)
    output, sent = run_in_process(tmp_path, deployment.inputs)
    with torch.no_grad():
        original = deployment.simulated(deployment.inputs)  # every group kept: the original model's function
    torch.testing.assert_close(output, original, atol=1e-4, rtol=1e-4)
    images, costs = len(deployment.inputs), deployment.costs
    for category, key in (("activations", "bytes_matrix"), ("norm", "norm_bytes_matrix"),
                          ("fallback", "fallback_bytes_matrix")):
        assert sent[category] == [[value * images for value in row] for row in getattr(costs.traffic, key)], category


def test_a_layer_computed_by_its_parent_is_masked_there():
    """BEiT's attention calls F.linear with its qkv child's weight: with random groups dropped, the simulation
    masks that call as the runtime does (an unmasked call would differ from the deployment's output)."""
    spec, size, kwargs = ZOO["beit"]
    with TemporaryDirectory() as folder:
        deployment = make_deployment(Path(folder), spec, 2, keep=0.3, size=size, images=2, kwargs=kwargs)
        output, _ = run_in_process(folder, deployment.inputs)
    with torch.no_grad():
        simulated = deployment.simulated(deployment.inputs)
        dense = build_for_data(spec, channels=3, classes=10, **kwargs).eval()
        dense.load_state_dict({k: v for k, v in deployment.simulated.state_dict().items()
                               if k.rpartition(".")[2] not in PLAN_BUFFERS})
        unmasked = dense(deployment.inputs)
    torch.testing.assert_close(output, simulated, atol=1e-6 * float(simulated.abs().max()), rtol=1e-4)
    assert float((simulated - unmasked).abs().max()) > 0.05 * float(unmasked.abs().max())  # the masks do change it


@pytest.mark.parametrize("spec", ["torchvision:regnet_x_400mf", "torchvision:swin_v2_t"])
def test_models_that_compute_while_built_are_checked_without_weights(spec):
    """RegNet computes its widths with tensors while it is built: the export's spec check builds it without
    weights all the same (and Swin V2's attention, left to the captured graph's rules, rebuilds as it was)."""
    model = build_for_data(spec, channels=3, classes=10)
    check_spec(model, ModelSpec(model=spec, channels=3, classes=10))
    with pytest.raises(DiscoError, match="does not rebuild"):
        check_spec(model, ModelSpec(model=spec, channels=3, classes=7))


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Fashion-MNIST not installed (make test installs it "
                    "as root: apt-get install dataset-fashion-mnist)")
def test_timm_model_trains_to_a_budget_and_runs_as_it_scored(tmp_path):
    """disco train --model timm:... on Fashion-MNIST at budget 0.1, 2 nodes: the budget is met, and the exported
    deployment classifies the test images exactly as the run's report scored them."""
    config = TrainConfig(model="timm:resnet10t", dataset="fashion-mnist", out=str(tmp_path / "run"), nodes=2,
                         budget=0.1, dense_epochs=1, sparsify_epochs=1, finetune_epochs=1, batch_size=64,
                         train_subset=256, test_subset=64, min_phase_steps=4)
    report = pipeline.train(config)
    assert report["ratio"] <= 0.1 + 1e-9
    export_run(tmp_path / "run", tmp_path / "deploy")
    data = TrainConfig.load(tmp_path / "run" / "config.json").load_data()
    images = torch.stack([data.test[i][0] for i in range(len(data.test))])
    labels = torch.tensor([data.test[i][1] for i in range(len(data.test))])
    output, _ = run_in_process(tmp_path / "deploy", images, batch_size=32)
    accuracy = (output.argmax(1) == labels).float().mean().item()
    assert accuracy == pytest.approx(report["disco_accuracy"], abs=1e-9)
