"""`disco inspect` end to end, in a subprocess as a user runs it (bad input through the same entry point in this
process: the same code, without paying the seconds torch and torchvision take to import per case)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import disco
from disco.cli import COMMAND_HELP
from runtime_helpers import disco_here
from tests_helpers import tiny_model_spec


def run_disco(*args):
    return subprocess.run([sys.executable, "-m", "disco.cli.main", *args], capture_output=True, text=True,
                          timeout=300)


def test_inspect_json_equals_library_report():
    result = run_disco("inspect", "--model", tiny_model_spec(), "--nodes", "2", "--input-size", "1,12,12", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    from disco.models import build_model
    model = build_model(tiny_model_spec())
    x = torch.zeros(1, 1, 12, 12)
    assert report == json.loads(json.dumps(disco.cost_report(disco.partition(model, nodes=2, example_inputs=x), x)))
    # hand count: each input channel goes once to the other node: 8 of 12x12, 16 of 6x6, 16 features of 1
    assert report["dense_bytes"] == (8 * 144 + 16 * 36 + 16) * 4


def test_inspect_table_mentions_totals():
    result = run_disco("inspect", "--model", tiny_model_spec(), "--nodes", "3", "--input-size", "1,12,12",
                       "--verbose", "--keep-random", "0.5")
    assert result.returncode == 0, result.stderr
    assert "node 2" in result.stdout and "dense split" in result.stdout and "ratio" in result.stdout


@pytest.mark.parametrize("args,needle", [
    (["--model", "torchvision:resnet5000"], "unknown torchvision model"),
    (["--model", "nonexistent.py:make"], "not found"),
    (["--model", "resnet50"], "model spec"),
    (["--model", "torchvision:resnet18", "--input-size", "3,abc"], "input size"),
    (["--model", "torchvision:resnet18", "--input-size", "0,224,224"], "input size"),
    (["--model", "torchvision:resnet18", "--nodes", "0"], "nodes"),
    (["--model", "torchvision:resnet18", "--input-size", "1,32,32"], "fails on the example input"),
])
def test_bad_input_gives_one_line_error(capsys, args, needle):
    result = disco_here(capsys, "inspect", *args)
    assert result.returncode == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_factory_that_returns_no_model_is_refused(capsys):
    spec = tiny_model_spec().replace("make_model", "not_a_model")
    result = disco_here(capsys, "inspect", "--model", spec)
    assert result.returncode == 2 and "not a torch.nn.Module" in result.stderr


def test_help_explains_every_option():
    result = run_disco("inspect", "--help")
    assert result.returncode == 0
    for option in ("--model", "--nodes", "--input-size", "--dtype", "--json", "--verbose"):
        assert option in result.stdout


def test_model_kwargs_are_parsed_as_python_literals():
    from disco.fields import parse_kwargs as _kwargs
    assert _kwargs("width_mult=0.5, dropout=0.1,name=abc") == {"width_mult": 0.5, "dropout": 0.1, "name": "abc"}
    assert _kwargs("") == {}
    with pytest.raises(disco.DiscoError, match="name=value"):
        _kwargs("width_mult")


@pytest.mark.parametrize("command", ["inspect", "train", "export", "run", "bench"])
def test_every_command_explains_itself(command):
    result = run_disco(command, "--help")
    assert result.returncode == 0 and "usage: disco" in result.stdout


def test_bench_passes_arguments_to_the_script():
    result = run_disco("bench", "latency", "--help")
    assert result.returncode == 0 and "--quick" in result.stdout


@pytest.mark.parametrize("args,needle", [
    (["export", "no/such/run", "--out", "x"], "no disco.safetensors"),
    (["run", "no/such/deploy", "--eval"], "no manifest.json"),
    (["run", "no/such/deploy"], "give exactly one of --input PATH or --eval"),
])
def test_export_and_run_errors_are_one_line(args, needle):
    result = run_disco(*args)
    assert result.returncode == 2
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


# what `disco --help` and `disco COMMAND --help` load: the top level no command module and no torch; a command's
# help its own module and no torch (help answers at once: the task registry names implementations it imports later)
HELP_IMPORTS = """
import sys
from disco.cli import COMMAND_HELP
from disco.cli.main import main
try:
    main({argv!r})
except SystemExit:
    pass
watched = ("torch", "torchvision", *(f"disco.cli.{{name}}_cmd" for name in COMMAND_HELP))
print(sorted(m for m in watched if m in sys.modules))
"""


@pytest.mark.parametrize("argv, loaded", [(["--help"], []), *(([name, "--help"], [f"disco.cli.{name}_cmd"])
                                                             for name in COMMAND_HELP)])
def test_help_loads_only_what_it_shows(argv, loaded):
    result = subprocess.run([sys.executable, "-c", HELP_IMPORTS.format(argv=argv)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: disco" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == repr(loaded)


def test_the_launcher_reads_a_manifest_without_torchvision():
    code = "import sys, disco.runtime.launch, disco.export.manifest; print('torchvision' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr
