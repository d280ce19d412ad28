"""Helpers for multi-process runtime tests: build a deployment with random masks, launch ranks."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import safetensors.torch
import torch

import disco
from disco.export import ModelSpec, export
from disco.models import build_for_data
from disco.split.masks import keep_random_groups


@dataclass
class Deployment:
    folder: Path
    simulated: torch.nn.Module
    inputs: torch.Tensor
    input_file: Path
    costs: dict


def make_deployment(folder: Path, model: str, nodes: int, *, keep: float = 0.3, size: int = 32, images: int = 3,
                    transport_dtype: str = "fp32", channels: int = 3, classes: int = 10,
                    preprocess: dict | None = None, class_names: list[str] | None = None,
                    kwargs: dict | None = None) -> Deployment:
    """A model (a torchvision name, or any spec such as disco:edsr) with random weights, non-trivial
    BatchNorm statistics and random masks; preprocess (how image files are read) and class_names as a training
    run would record them."""
    torch.manual_seed(0)
    spec = ModelSpec(model=model if ":" in model else f"torchvision:{model}", channels=channels, classes=classes,
                     kwargs=kwargs or {})
    original = build_for_data(spec.model, channels=channels, classes=classes, **spec.kwargs).eval()
    for module in original.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    inputs = torch.randn(images, channels, size, size)
    simulated = disco.partition(original, nodes=nodes, example_inputs=inputs[:1], transport_dtype=transport_dtype).eval()
    keep_random_groups(simulated, keep, seed=nodes)
    export(simulated, folder, example_inputs=inputs[:1], spec=spec, transport_dtype=transport_dtype,
           preprocess=preprocess, class_names=class_names)
    input_file = folder / "inputs.safetensors"
    safetensors.torch.save_file({"input": inputs}, str(input_file))
    costs = disco.cost_report(simulated, inputs[:1], transport_dtype=transport_dtype)
    return Deployment(folder, simulated, inputs, input_file, costs)


def disco_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "disco", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def disco_here(capsys, *args: str) -> SimpleNamespace:
    """`disco ARGS` through the console script's `main`, in this process (a command that starts no ranks: the
    same code as in a subprocess, without the seconds torch takes to import): exit status, stdout, stderr."""
    from disco.cli.main import main
    try:
        code = main(list(args))
    except SystemExit as leaving:  # argparse's own errors
        code = leaving.code
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(folder: Path, nodes: int, *args: str) -> list[subprocess.Popen]:
    """Ranks started by hand (as torchrun would), so a test can kill or freeze one of them."""
    port = free_port()
    ranks = []
    for rank in range(nodes):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nodes),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
        ranks.append(subprocess.Popen([sys.executable, "-m", "disco.runtime", str(folder), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return ranks
