"""A freshly partitioned (dense) model computes exactly what the original computes."""
import pytest
import torch
import torchvision

import disco
from reference import channels_sent

MODELS = ["resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "densenet121", "resnext50_32x4d"]


@pytest.fixture(scope="module")
def models():
    return {}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("nodes", [2, 3, 4])
def test_dense_partition_equals_original(models, name, nodes):
    if name not in models:
        models[name] = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    model = models[name]
    x = torch.randn(2, 3, 64, 64)
    simulated = disco.partition(model, nodes=nodes, example_inputs=x).eval()
    with torch.no_grad():
        expected, got = model(x), simulated(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    layers = disco.disco_layers(simulated)
    assert len(layers) == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    for name, layer in layers.items():  # a fresh partition sends every channel another node's rows read
        assert channels_sent(layer, nodes) == channels_sent(layer, nodes, masked=False), name


def test_partition_leaves_the_original_untouched():
    model = torchvision.models.resnet18(num_classes=10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    simulated = disco.partition(model, nodes=2, example_inputs=torch.randn(1, 3, 32, 32))
    assert not any(isinstance(m, disco.DiscoLayer) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert simulated is not model


def test_training_mode_is_kept_and_batchnorm_statistics_untouched():
    model = torchvision.models.resnet18(num_classes=10).train()
    simulated = disco.partition(model, nodes=2, example_inputs=torch.randn(4, 3, 32, 32))
    assert simulated.training and simulated.bn1.training
    torch.testing.assert_close(simulated.bn1.running_mean, model.bn1.running_mean)
