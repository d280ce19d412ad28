"""Models from the zoos users bring (timm, transformers), at small configurations: split, exported and run by the
in-process runtime at 2 and 3 nodes, outputs equal to the original model's and every byte as the cost report says.
The full sample (30+ timm families, 10+ transformers architectures, all of torchvision) is bench/models.py."""
from __future__ import annotations

import pytest
import torch

from disco.runtime.inprocess import run_in_process
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
        assert sent[category] == [[value * images for value in row] for row in costs[key]], category
