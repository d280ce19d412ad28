"""README.md runs as written: every python snippet is executed, every command is parsed by the program it calls,
and the commands are run in README order at tiny sizes, with its placeholders (photo.png, path/to/images,
dense.safetensors...) supplied by small real files. A README change that breaks a snippet fails here.

What "tiny" changes is listed in TINY below and nothing else: training commands see a few dozen images for one
epoch, --eval a few images. `disco serve` runs in the background on a free port, asked by the README's curl
commands, and is stopped at the end. `make demo` and `make test` are not run here (CI runs `make test`, of which this
test is a part; `make demo` is a longer version of the commands below)."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from readme_blocks import Command, blocks, commands
from runtime_helpers import free_port
from synthetic import make_image_folder
from tests_helpers import tiny_model_file

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOT_RUN = {("make", "demo"), ("make", "test")}
TINY = {  # appended to a command (later options win in argparse): small, but every phase and path still runs
    "train": ["--train-subset", "48", "--test-subset", "24", "--epochs", "1", "--batch-size", "16",
              "--min-phase-steps", "0"],
    "run --eval": ["--limit", "8"],
}
ALL_BLOCKS = blocks(README)
PYTHON = [b for b in ALL_BLOCKS if b.language == "python"]
COMMANDS = [c for b in ALL_BLOCKS if b.language == "sh" for c in commands(b) if c.argv[:2] not in NOT_RUN]


def test_readme_has_what_this_test_reads():
    assert PYTHON and COMMANDS
    assert {b.language for b in ALL_BLOCKS} <= {"sh", "python"}, "a block this test does not run"
    assert sum(len(_claims(b.text)) for b in PYTHON) >= 2  # the snippets' printed claims are checked


CLAIM = re.compile(r"print\(.*\)\s*#\s*(<=|~)\s*([0-9.]+)")  # `print(x)  # <= 0.1`: the README says x <= 0.1


def _claims(text: str) -> dict[int, tuple[str, float]]:
    """{line number in the block: (relation, bound)} of every print whose comment states what it prints."""
    found = {}
    for number, line in enumerate(text.splitlines(), start=1):
        match = CLAIM.search(line)
        if match:
            found[number] = (match.group(1), float(match.group(2)))
    return found


def _holds(value: float, relation: str, bound: float) -> bool:
    return value <= bound + 1e-9 if relation == "<=" else abs(value - bound) <= 0.25 * bound  # "~": within 25%


@pytest.mark.parametrize("block", PYTHON, ids=[b.where for b in PYTHON])
def test_python_snippet_runs_and_prints_what_it_claims(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    printed: dict[int, tuple] = {}

    def record(*values, **_):  # the snippet's print: what each line printed, by its line number in the block
        printed[sys._getframe(1).f_lineno] = values

    exec(compile(block.text, block.where, "exec"), {"__name__": "__readme__", "print": record})
    for number, (relation, bound) in _claims(block.text).items():
        assert number in printed, f"{block.where}: line {number} printed nothing"
        (value,) = printed[number]
        assert _holds(float(value), relation, bound), f"{block.where}: line {number} printed {value}, " \
                                                      f"the README says {relation} {bound}"


def _disco_parser(argv: tuple[str, ...]):
    from disco.cli.main import build_parser
    return build_parser(argv[1], every=False)


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where} {Path(c.argv[0]).name} {c.argv[1]}" for c in COMMANDS])
def test_command_is_accepted_by_the_program_it_calls(command):
    program = Path(command.argv[0]).name
    if program == "curl":  # a client of `disco serve`: the system's curl, asking the README's own service
        assert "-f" in command.argv and any(SERVED in word for word in command.argv), command.where
        return
    assert command.argv[0].startswith(".venv/bin/"), f"{command.where}: call the virtual environment's {program}"
    if program == "disco":
        _disco_parser(command.argv).parse_args(command.argv[1:])
    else:
        assert program == "torchrun", f"{command.where}: unknown program {program}"
        launcher = _torchrun_options(command.argv)
        assert launcher.module and launcher.training_script in ("disco.runtime", "disco")
        if _trains(command):
            _disco_parser(("disco", *launcher.training_script_args)).parse_args(launcher.training_script_args)
            return
        from disco.runtime.worker import build_parser
        build_parser().parse_args(launcher.training_script_args)


def _trains(command: Command) -> bool:
    """torchrun starting data-parallel training (`-m disco train`), not the ranks of a deployment."""
    return Path(command.argv[0]).name == "torchrun" and _torchrun_options(command.argv).training_script == "disco"


def test_every_multi_host_example_starts_as_many_ranks_as_its_deployment_has_nodes():
    nodes: dict[str, int] = {}  # run or deployment folder -> its node count, as the README builds them
    for command in COMMANDS:
        options = _options(command.argv)
        if command.argv[1:2] == ("train",) and "--nodes" in options:
            nodes[options["--out"]] = int(options["--nodes"])
        elif command.argv[1:2] == ("export",):
            nodes[options["--out"]] = nodes[command.argv[2]]
        elif Path(command.argv[0]).name == "torchrun" and not _trains(command):
            launcher = _torchrun_options(command.argv)
            deploy = launcher.training_script_args[0]
            assert int(launcher.nnodes) * int(launcher.nproc_per_node) == nodes[deploy], command.where


def _torchrun_options(argv: tuple[str, ...]):
    """torchrun's own reading of a README command, for the rank K the reader fills in (0 here)."""
    from torch.distributed.run import get_args_parser
    return get_args_parser().parse_args(["0" if word == "K" else word for word in argv[1:]])


def _options(argv: tuple[str, ...]) -> dict[str, str]:
    return {a: b for a, b in zip(argv, argv[1:]) if a.startswith("--")}


# --- the commands, run -------------------------------------------------------------------------------
def _placeholders(folder: Path) -> dict[str, str]:
    """Small real files where the README names the user's own; returns text replacements for commands."""
    images = make_image_folder(folder / "path" / "to" / "images")
    from disco.models import build_for_data
    dense = build_for_data("torchvision:resnet18", channels=1, classes=3)
    safetensors.torch.save_file(dense.state_dict(), str(folder / "dense.safetensors"))
    (folder / "path" / "to" / "my_models.py").write_text(Path(tiny_model_file()).read_text()
                                                         + "\n\nmake_net = make_model\n")
    rng = np.random.default_rng(0)
    (folder / "photos").mkdir()
    for index in range(3):
        picture = Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), mode="L")
        picture.save(folder / "photos" / f"{index}.png")
    (folder / "photo.png").write_bytes((folder / "photos" / "0.png").read_bytes())
    safetensors.torch.save_file({"input": torch.rand(1, 1, 28, 28)}, str(folder / "x.safetensors"))
    safetensors.torch.save_file({"input": torch.rand(2, 1, 96, 96)}, str(folder / "scenes.safetensors"))
    assert images.is_dir()
    return {"HOST0": "127.0.0.1", "29500": str(free_port()), "8000": str(free_port())}


def _tiny(argv: tuple[str, ...]) -> list[str]:
    argv = list(argv)
    if argv[1:2] == ["train"] and "--resume" not in argv:
        argv += TINY["train"]
    if argv[1:2] == ["run"] and "--eval" in argv:
        argv += TINY["run --eval"]
    return argv


SERVED = "127.0.0.1:8000"  # where the README's `disco serve` listens (a free port here)


def _serve(argv: list[str], folder: Path, port: str, services: list) -> None:
    """`disco serve` as the README starts it, in the background until the test ends; waits until it is ready."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = [port if word == SERVED.split(":")[1] else word for word in argv]
    service = subprocess.Popen([sys.executable, "-m", "disco", *argv[1:]], cwd=folder, env=env,
                               stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    services.append(service)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and service.poll() is None:
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5).status == 200:
                return
        time.sleep(0.3)
    raise AssertionError(f"disco serve did not become ready: {' '.join(argv)}")


def _execute(command: Command, folder: Path, replacements: dict[str, str], capsys, services: list) -> None:
    argv = [replacements.get(word, word) for word in _tiny(command.argv)]
    port = replacements["8000"]
    if argv[1:2] == ["serve"]:
        _serve(argv, folder, port, services)
        return
    if argv[0] == "curl":
        argv = [word.replace(SERVED, f"127.0.0.1:{port}") for word in argv]
        result = subprocess.run(argv, cwd=folder, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{command.where}: {command.text}\n{result.stderr}"
        return
    if Path(argv[0]).name == "torchrun":  # one host plays the README's hosts: every rank K started here
        env = dict(os.environ, OMP_NUM_THREADS="1")
        ranks = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run",
                                   *[str(rank) if word == "K" else word for word in argv[1:]]], cwd=folder, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in range(int(argv[argv.index("--nnodes") + 1]))]
        outputs = [rank.communicate(timeout=300)[0] for rank in ranks]
        assert all(rank.returncode == 0 for rank in ranks), f"{command.where}: {command.text}\n" + outputs[0][-3000:]
        return
    # `disco ...` in this process (its imports are paid once); `disco run` still starts its ranks with torchrun
    from disco.cli.main import main
    status = main(argv[1:])
    captured = capsys.readouterr()
    assert status == 0, f"{command.where}: {command.text}\n{captured.out[-2000:]}\n{captured.err[-3000:]}"


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="the README trains on Fashion-MNIST: `make data` installs it (as root)")
def test_commands_run_in_readme_order_at_tiny_sizes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    replacements = _placeholders(tmp_path)
    services: list[subprocess.Popen] = []
    try:
        for command in COMMANDS:
            if not _trains(command):  # ImageNet on GPUs: tests/test_data_parallel.py runs torchrun training small
                _execute(command, tmp_path, replacements, capsys, services)
    finally:
        torch.set_num_threads(threads)  # a command may set it for this process
        for service in services:
            service.send_signal(signal.SIGINT)
            service.wait(60)
    assert services and all(service.returncode == 0 for service in services)
    assert (tmp_path / "run.json").is_file() and (tmp_path / "prof" / "layers.md").is_file()
