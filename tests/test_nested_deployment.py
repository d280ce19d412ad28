"""One deployment carrying several nested budgets (disco/export/budgets.py, disco/runtime/levels.py): at every
budget the runtime gives the simulation's outputs at that budget (its masks, its BatchNorm statistics) and sends
the bytes an independent count by forward hooks gives; batches switch budget one after another; a budget the
deployment lacks, or a nested table that does not fit the plans, is refused."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

import disco
from disco.errors import DiscoError
from disco.export import ModelSpec, export
from disco.export.budgets import NestedExport
from disco.export.manifest import Manifest
from disco.runtime.inprocess import run_in_process
from disco.split.modules import load_norm_statistics, norm_statistics
from disco.split.attention import replace_attention
from reference import hook_count
from test_runtime_inprocess import MODELS, _randomised, model_code

BUDGETS = [0.5, 0.2, 0.05]


def _nested_levels(simulated, seed: int) -> dict[str, torch.Tensor]:
    """Random nested masks: each group draws a level 0..3; budget k keeps the groups whose level is > k."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.multinomial(torch.tensor([0.3, 0.3, 0.2, 0.2]), layer.group_mask.numel(), True,
                                    generator=generator).reshape(layer.group_mask.shape).to(torch.uint8)
            for name, layer in disco.disco_layers(simulated).items()}


def _statistics_per_budget(simulated, seed: int) -> list[dict[str, torch.Tensor]]:
    """Each budget its own BatchNorm statistics (as nested fine-tuning measures them)."""
    generator = torch.Generator().manual_seed(seed)
    base = norm_statistics(simulated)
    return [{name: value * (1 + 0.3 * torch.rand(value.shape, generator=generator)) for name, value in base.items()}
            for _ in BUDGETS]


def _at_level(simulated, levels, norms, level: int):
    at = copy.deepcopy(simulated)
    for name, layer in disco.disco_layers(at).items():
        layer.set_group_mask(levels[name] > level)
    load_norm_statistics(at, norms[level])
    return at


def _deploy_nested(folder, name: str, nodes: int):
    spec, channels, classes, size, kwargs = MODELS[name]
    original = _randomised(spec, channels, classes, kwargs)
    x = torch.randn(2, channels, size, size)
    simulated = disco.partition(original, nodes=nodes, example_inputs=x[:1]).eval()
    levels, norms = _nested_levels(simulated, nodes), _statistics_per_budget(simulated, nodes)
    nested = NestedExport(budgets=BUDGETS, group_levels=levels, norms=norms,
                          reference=[{"accuracy": 0.9 - 0.1 * k} for k in range(3)], default=1)
    export(copy.deepcopy(simulated), folder, example_inputs=x[:1], nested=nested,
           spec=ModelSpec(model=spec, channels=channels, classes=classes, kwargs=kwargs))
    return original, simulated, levels, norms, x


@pytest.mark.parametrize("name, nodes", [("mobilenet_v2", 3), ("vit_small", 4)])  # resnet18: the tests below
def test_every_budget_of_one_deployment_equals_its_simulation_and_hook_count(tmp_path, name, nodes):
    original, simulated, levels, norms, x = _deploy_nested(tmp_path, name, nodes)
    manifest = Manifest.load(tmp_path)
    assert manifest.budgets().budgets == BUDGETS and manifest.level_of(None) == 1
    reference = replace_attention(copy.deepcopy(original))
    for level, budget in enumerate(BUDGETS):
        at = _at_level(simulated, levels, norms, level)
        output, sent = run_in_process(tmp_path, x, model_code=model_code(name), budget=budget)
        with torch.no_grad():
            expected = at(x)
        for actual, wanted in zip(tree_leaves(output), tree_leaves(expected), strict=True):
            torch.testing.assert_close(actual, wanted, atol=1e-4, rtol=1e-4)
        hooks = hook_count(reference, at, x[:1], 4)
        assert sent["activations"] == [[b * len(x) for b in row] for row in hooks]
        assert manifest.expected_at(level).bytes_matrix == hooks
    assert manifest.reference_at(2) == {"accuracy": pytest.approx(0.7)}


def test_batches_switch_budget_one_after_another(tmp_path):
    """Budgets per batch in one run (as `disco serve` does per request), lanes in flight too: each batch gets its
    own budget's outputs, and the bytes are the sum of each batch's budget's."""
    original, simulated, levels, norms, x = _deploy_nested(tmp_path, "resnet18", 3)
    x = torch.randn(4, *x.shape[1:])
    order = [0.05, 0.5, 0.2, 0.05]
    output, sent = run_in_process(tmp_path, x, batch_size=1, budgets=order, inflight=2)
    manifest = Manifest.load(tmp_path)
    total = 0
    for index, budget in enumerate(order):
        level = BUDGETS.index(budget)
        with torch.no_grad():
            torch.testing.assert_close(output[index:index + 1], _at_level(simulated, levels, norms, level)(x[index:index + 1]),
                                       atol=1e-4, rtol=1e-4)
        total += manifest.expected_at(level).bytes
    assert sum(map(sum, sent["activations"])) == total


def test_budgets_the_deployment_lacks_are_refused(tmp_path):
    _deploy_nested(tmp_path, "resnet18", 2)
    with pytest.raises(DiscoError, match="carries the budgets 0.5, 0.2, 0.05"):
        run_in_process(tmp_path, torch.randn(1, 3, 32, 32), budget=0.1)
    single = tmp_path / "single"
    spec, channels, classes, size, kwargs = MODELS["tiny"]
    model = _randomised(spec, channels, classes, kwargs)
    x = torch.randn(1, channels, size, size)
    export(disco.partition(model, nodes=2, example_inputs=x), single, example_inputs=x,
           spec=ModelSpec(model=spec, channels=channels, classes=classes, kwargs=kwargs))
    with pytest.raises(DiscoError, match="carries one budget"):
        Manifest.load(single).level_of(0.05)
    assert Manifest.load(single).level_of(None) == 0


def test_disco_run_runs_at_the_budget_asked_on_real_processes(tmp_path):
    """`disco run --budget B` (torchrun, 2 ranks): the in-process runtime's outputs at B, that budget's bytes in the
    summary; a budget the deployment lacks is refused before any rank starts."""
    import safetensors.torch

    from runtime_helpers import disco_cli

    _, _, _, _, x = _deploy_nested(tmp_path, "resnet18", 2)
    safetensors.torch.save_file({"input": x}, str(tmp_path / "inputs.safetensors"))
    result = disco_cli("run", str(tmp_path), "--input", str(tmp_path / "inputs.safetensors"), "--budget", "0.05",
                       "--batch-size", "2", "--save-output", str(tmp_path / "out.safetensors"),
                       "--summary", str(tmp_path / "summary.json"))
    assert result.returncode == 0, result.stderr
    expected, _ = run_in_process(tmp_path, x, budget=0.05)
    torch.testing.assert_close(safetensors.torch.load_file(str(tmp_path / "out.safetensors"))["output"], expected,
                               atol=1e-4, rtol=1e-4)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["budget"] == 0.05
    assert summary["bytes_per_image"]["activations"] == Manifest.load(tmp_path).expected_at(2).bytes
    refused = disco_cli("run", str(tmp_path), "--input", str(tmp_path / "inputs.safetensors"), "--budget", "0.1")
    assert refused.returncode == 2 and "carries the budgets 0.5, 0.2, 0.05" in refused.stderr


def test_a_nested_table_that_does_not_fit_the_plans_is_refused(tmp_path):
    """Levels are checked against the plans' sends when the manifest is read (an edited table: refused, before
    the shards' digests would say so)."""
    _deploy_nested(tmp_path, "resnet18", 2)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    layer = next(name for name, table in raw["nested"]["levels"].items() if table[0][1])
    for bad, message in ((lambda t: t[0][1].append(1), "do not match"), (lambda t: t[0][1].__setitem__(0, 7), "1..3")):
        edited = copy.deepcopy(raw)
        bad(edited["nested"]["levels"][layer])
        (tmp_path / "manifest.json").write_text(json.dumps(edited))
        with pytest.raises(DiscoError, match=message):
            Manifest.load(tmp_path)


def test_disco_serve_runs_each_request_at_the_budget_it_asks(tmp_path):
    """Over real HTTP: ?budget=B answers as the in-process runtime at B; no budget: the default; a budget the
    deployment lacks: 422 naming the ones it carries; /v1/model lists them; /metrics counts images per budget."""
    import io

    import numpy as np
    from PIL import Image

    from disco.runtime.inputs import image_tensor
    from serve_helpers import Served

    spec, channels, classes, size, kwargs = MODELS["mobilenet_v2"]
    original = _randomised(spec, channels, classes, kwargs)
    x = torch.randn(1, channels, size, size)
    simulated = disco.partition(original, nodes=2, example_inputs=x).eval()
    levels, norms = _nested_levels(simulated, 2), _statistics_per_budget(simulated, 2)
    export(simulated, tmp_path / "deploy", example_inputs=x, class_names=[f"c{i}" for i in range(classes)],
           preprocess={"channels": 3, "size": [size, size], "mean": [0.5] * 3, "std": [0.25] * 3},
           spec=ModelSpec(model=spec, channels=channels, classes=classes, kwargs=kwargs),
           nested=NestedExport(budgets=BUDGETS, group_levels=levels, norms=norms, reference=[None] * 3, default=1))
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    manifest = Manifest.load(tmp_path / "deploy")
    image = image_tensor(picture, manifest)[None]
    expected = {b: torch.softmax(run_in_process(tmp_path / "deploy", image, budget=b)[0], 1)[0] for b in BUDGETS}
    service = Served(tmp_path / "deploy", log=tmp_path / "serve.log")
    try:
        service.wait_ready()
        card = service.client.get("/v1/model").json()
        assert [(b["budget"], b["default"]) for b in card["budgets"]] == [(0.5, False), (0.2, True), (0.05, False)]
        assert [b["bytes_per_image"] for b in card["budgets"]] == [manifest.expected_at(k).bytes for k in range(3)]
        for budget in BUDGETS + [None]:
            answer = service.predict(buffer.getvalue(), **({} if budget is None else {"budget": budget}))
            assert answer.status_code == 200, answer.text
            top = answer.json()["top"][0]
            probabilities = expected[0.2 if budget is None else budget]
            assert top["class"] == int(probabilities.argmax())
            assert top["probability"] == pytest.approx(float(probabilities.max()), rel=1e-4)
            assert answer.json()["budget"] == (0.2 if budget is None else budget)
        refused = service.predict(buffer.getvalue(), budget=0.1)
        assert refused.status_code == 422 and refused.json()["error"]["kind"] == "bad_budget"
        assert "0.5, 0.2, 0.05" in refused.json()["error"]["message"]
        metrics = service.client.get("/metrics").text
        assert 'disco_images_by_budget_total{budget="0.2"} 2.0' in metrics
        assert 'disco_images_by_budget_total{budget="0.05"} 1.0' in metrics
        _the_page_picks_a_budget(service, picture, tmp_path, expected[0.05])
    finally:
        service.stop()


def _the_page_picks_a_budget(service, picture, tmp_path, probabilities) -> None:
    """The page lists the budgets and runs an upload at the one picked (skipped without chromium)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from serve_helpers import browser

    driver = browser()
    if driver is None:
        return  # tests/test_serve.py says why the page tests skip
    try:
        driver.get(service.url)
        Select(driver.find_element(By.ID, "budget")).select_by_value("0.05")
        picture.save(tmp_path / "picture.png")
        driver.find_element(By.ID, "file").send_keys(str(tmp_path / "picture.png"))
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "error").text or d.find_elements(By.ID, "text"))
        assert driver.find_element(By.ID, "error").text == ""
        assert "(ran at budget 0.05)" in driver.find_element(By.ID, "text").text
        bar = driver.find_elements(By.CSS_SELECTOR, ".bar")[0]
        assert float(bar.get_attribute("data-probability")) == pytest.approx(float(probabilities.max()), rel=1e-4)
    finally:
        driver.quit()


def test_the_budget_follows_the_link():
    """--latency-target-ms: batches slower than the target for `patience` batches step requests that name no budget
    to the next smaller budget, down to the smallest; fast ones (under half the target) step back up, to the
    largest; batches run at a budget asked for by name do not count."""
    from disco.serve.adapt import BudgetAdapter

    adapter = BudgetAdapter(levels=3, level=1, target_s=0.1, patience=3)
    seen = [adapter.observe(adapter.current(), 0.3) for _ in range(8)]  # the link slowed
    assert seen == [1, 1, 2, 2, 2, 2, 2, 2]
    assert adapter.observe(0, 0.01) == 2  # a batch asked for at another budget: ignored
    seen = [adapter.observe(adapter.current(), 0.07) for _ in range(6)]  # under the target, not under half of it
    assert seen == [2] * 6
    seen = [adapter.observe(adapter.current(), 0.02) for _ in range(9)]  # the link recovered
    assert seen == [2, 2, 1, 1, 1, 0, 0, 0, 0]
    with pytest.raises(DiscoError, match="several budgets"):
        BudgetAdapter(levels=1, level=0, target_s=0.1)
