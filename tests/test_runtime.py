"""Distributed runtime on real processes (gloo on CPU): outputs, bytes, shards, failures.

References: the simulation-mode model (outputs), cost_report (bytes), the full model's weights sliced
by hand from the plan (shards)."""
from __future__ import annotations

import json
import signal
import time

import pytest
import safetensors.torch
import torch

import disco
from disco.errors import DiscoError
from disco.export.manifest import Manifest, verify_shard
from disco.runtime.program import load_program
from runtime_helpers import disco_cli, make_deployment, start_ranks

# real processes cost seconds each: two cases here (plain convs on 2 ranks, depthwise and streaming on 4); every
# model at 2, 3 and 4 nodes runs through the same protocol in tests/test_runtime_inprocess.py
CASES = [("resnet18", 2), ("mobilenet_v2", 4)]


@pytest.fixture(scope="module")
def deployments(tmp_path_factory):
    cache = {}

    def get(model: str, nodes: int, dtype: str = "fp32"):
        key = (model, nodes, dtype)
        if key not in cache:
            cache[key] = make_deployment(tmp_path_factory.mktemp(f"{model}{nodes}{dtype}"), model, nodes,
                                         transport_dtype=dtype)
        return cache[key]
    return get


def _run(deployment, *extra):
    out, summary = deployment.folder / "out.safetensors", deployment.folder / "summary.json"
    result = disco_cli("run", str(deployment.folder), "--input", str(deployment.input_file), "--batch-size", "2",
                       "--save-output", str(out), "--summary", str(summary), *extra)
    assert result.returncode == 0, result.stderr + result.stdout
    return safetensors.torch.load_file(str(out))["output"], json.loads(summary.read_text())


# one case streams: --inflight 2 opens two lanes (process groups) per rank; each image must get its own output
STREAMED = ("mobilenet_v2", 4)


@pytest.mark.parametrize("model,nodes", CASES)
def test_distributed_output_and_bytes_equal_simulation(deployments, model, nodes):
    deployment = deployments(model, nodes)
    streamed = (model, nodes) == STREAMED
    output, summary = _run(deployment, *(["--batch-size", "1", "--inflight", "2"] if streamed else []))
    with torch.no_grad():
        expected = deployment.simulated(deployment.inputs)
    torch.testing.assert_close(output, expected, atol=1e-4, rtol=1e-4)
    images = deployment.inputs.shape[0]
    assert summary["images"] == summary["images_run"] == images and summary["inflight"] == (2 if streamed else 1)
    assert summary["images_per_s"] > 0
    per_image = [[b * images for b in row] for row in deployment.costs.traffic.bytes_matrix]
    assert summary["bytes_sent"]["activations"] == per_image  # counted at every send call, [src][dst]
    assert sum(map(sum, summary["bytes_sent"]["input"])) == deployment.costs.traffic.io_bytes.input * images
    assert sum(map(sum, summary["bytes_sent"]["output"])) == deployment.costs.traffic.io_bytes.output * images
    assert 0 < deployment.costs.traffic.ratio < 0.5  # masks really dropped groups


def test_fp16_transport_halves_bytes(deployments):
    full, half = deployments("mobilenet_v2", 2), deployments("mobilenet_v2", 2, "fp16")
    output, summary = _run(half)
    with torch.no_grad():
        expected = half.simulated(half.inputs)
    torch.testing.assert_close(output, expected, atol=2e-3, rtol=2e-2)
    assert summary["bytes_per_image"]["activations"] * 2 == full.costs.traffic.bytes


def _hand_slices(simulated, node: int) -> dict[str, torch.Tensor]:
    """What node `node` must hold, read straight off the full model and its plan."""
    expected = {}
    for name, layer in disco.disco_layers(simulated).items():
        rows = [o for o in range(layer.out_assign.numel()) if layer.out_assign[o] == node]
        if layer.bias is not None:
            expected[f"{name}.bias"] = layer.bias.detach()[rows]
        if getattr(layer, "groups", 1) > 1:
            continue  # grouped: checked by the output test
        mine = [c for c in range(layer.in_assign.numel()) if layer.in_assign[c] in (node, -1)]
        expected[f"{name}.weight.local"] = layer.weight.detach()[rows][:, mine]
        received = []  # the columns of what arrives, by sender, then channel
        for src in range(layer.nodes):
            received += [c for c in range(layer.in_assign.numel())
                         if layer.in_assign[c] == src != node and layer.group_mask[node, c] > 0]
        expected[f"{name}.weight.remote"] = layer.weight.detach()[rows][:, received]
    return expected


@pytest.mark.parametrize("model,nodes", [("resnet18", 4), ("mobilenet_v2", 2)])
def test_each_rank_loads_only_its_slices(deployments, model, nodes):
    deployment = deployments(model, nodes)
    manifest = Manifest.load(deployment.folder)
    for node in range(nodes):
        shard = safetensors.torch.load_file(str(deployment.folder / f"node{node}.safetensors"))
        for key, tensor in _hand_slices(deployment.simulated, node).items():
            assert torch.equal(shard[key], tensor), key
        parameters = sum(t.numel() * t.element_size() for k, t in shard.items()
                         if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
        assert parameters == deployment.costs.memory.param_bytes_per_node[node]
        # the rank's program is built from the manifest and its tensors: they are the shard's, nothing more
        program = load_program(manifest, deployment.folder, node, torch.device("cpu"))
        assert program.tensors.keys() == shard.keys()


def test_program_needs_only_its_own_shard(deployments, tmp_path):
    deployment = deployments("resnet18", 2)
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("manifest.json", "node1.safetensors"):
        (alone / name).write_bytes((deployment.folder / name).read_bytes())
    manifest = Manifest.load(alone)
    load_program(manifest, alone, 1, torch.device("cpu"))
    with pytest.raises(DiscoError, match="shard of node 0 not found"):
        load_program(manifest, alone, 0, torch.device("cpu"))


def _copy(deployment, folder):
    folder.mkdir()
    for path in deployment.folder.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def test_tampered_shard_is_refused_before_communication(deployments, tmp_path):
    folder = _copy(deployments("resnet18", 2), tmp_path / "tampered")
    shard = folder / "node1.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit in a weight
    shard.write_bytes(bytes(data))
    with pytest.raises(DiscoError, match="does not match the manifest"):
        verify_shard(Manifest.load(folder), folder, 1)
    began = time.monotonic()
    result = disco_cli("run", str(folder), "--input", str(folder / "inputs.safetensors"), "--timeout", "20")
    assert result.returncode != 0
    assert "does not match the manifest" in result.stderr
    assert time.monotonic() - began < 60


def test_manifest_that_no_longer_matches_is_refused(deployments, tmp_path):
    folder = _copy(deployments("resnet18", 2), tmp_path / "edited")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DiscoError, match="does not match the manifest"):
        verify_shard(Manifest.load(folder), folder, 0)


def test_wrong_input_is_refused_on_node_0(deployments, tmp_path):
    deployment = deployments("resnet18", 2)
    bad = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({"input": torch.randn(2, 1, 32, 32)}, str(bad))
    result = disco_cli("run", str(deployment.folder), "--input", str(bad), "--timeout", "20")
    assert result.returncode != 0
    assert "rank 0" in result.stderr and "does not fit the deployed model" in result.stderr


def _wait_until_ready(rank0) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = rank0.stdout.readline()
        if line.startswith("ready"):
            return
        if not line and rank0.poll() is not None:
            raise AssertionError(f"rank 0 ended early: {rank0.stderr.read()}")
    raise AssertionError("ranks did not join in time")


@pytest.mark.parametrize("how,needle", [(signal.SIGKILL, "lost the connection to rank 1"),
                                        (signal.SIGSTOP, "no answer from rank 1 within 5 s")])
def test_dead_or_hung_peer_gives_an_error_naming_it(deployments, how, needle):
    deployment = deployments("resnet18", 2)
    ranks = start_ranks(deployment.folder, 2, "--input", str(deployment.input_file), "--repeat", "1000000",
                        "--timeout", "5")
    try:
        _wait_until_ready(ranks[0])
        time.sleep(1.0)
        ranks[1].send_signal(how)
        began = time.monotonic()
        code = ranks[0].wait(timeout=60)
        assert time.monotonic() - began < 30
        assert code != 0
        assert needle in ranks[0].stderr.read()
    finally:
        for process in ranks:
            process.kill()
            process.wait()


def test_profile_times_every_step_on_every_rank_and_its_bytes_add_up(deployments, tmp_path):
    deployment = deployments("resnet18", 2)
    _, summary = _run(deployment, "--profile", str(tmp_path / "profile"), "--repeat", "2")
    table = json.loads((tmp_path / "profile" / "layers.json").read_text())
    program = load_program(Manifest.load(deployment.folder), deployment.folder, 0, torch.device("cpu"))
    assert sorted(row["step"] for row in table["steps_by_slowest_compute"]) == sorted(program.step_names())
    assert set(disco.disco_layers(deployment.simulated)) <= set(program.step_names())  # layers by their own names
    forwards = summary["forwards"]  # every forward sent the same bytes: a run's share is exact
    for rank in range(2):
        per_run = sum(row["bytes_sent"][rank] for row in table["steps_by_slowest_compute"])
        sent = sum(summary["bytes_sent"]["activations"][rank]) + sum(summary["bytes_sent"]["norm"][rank])
        assert per_run * forwards == pytest.approx(sent)
        trace = json.loads((tmp_path / "profile" / f"rank{rank}.trace.json").read_text())
        spans = {event.get("name") for event in trace["traceEvents"]}
        assert {"layer1.0.conv1", "fc"} <= spans and any(str(s).startswith("wait: layer") for s in spans)
    assert all(row["compute_ms"][0] >= 0 and row["wait_ms"][0] >= 0 for row in table["steps_by_slowest_compute"])
