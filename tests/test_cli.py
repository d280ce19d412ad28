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
from tests_helpers import load_tiny_model, tiny_model_spec


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
    expected = disco.cost_report(disco.partition(model, nodes=2, example_inputs=x), x).to_json()
    assert report == json.loads(json.dumps(expected))
    # hand count: each input channel goes once to the other node: 8 of 12x12, 16 of 6x6, 16 features of 1
    assert report["dense_bytes"] == (8 * 144 + 16 * 36 + 16) * 4


def _table_rows(text: str) -> dict[str, list[str]]:
    """{first cell: the other cells} of every row of the rich tables in `text`."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if len(cells) > 1:
            rows[cells[0]] = cells[1:]
    return rows


def test_inspect_tables_show_the_cost_report_and_the_hooks_count(capsys):
    from disco.cli.main import main  # in this process: capsys sees what a user sees
    from disco.split.masks import keep_random_groups
    from reference import hook_count

    assert main(["inspect", "--model", tiny_model_spec(), "--nodes", "3", "--input-size", "1,48,48", "--verbose",
                 "--keep-random", "0.5", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    original, x = load_tiny_model().eval(), torch.zeros(1, 1, 48, 48)
    simulated = disco.partition(original, nodes=3, example_inputs=x)
    keep_random_groups(simulated, 0.5, seed=3)
    report, counted = disco.cost_report(simulated, x), hook_count(original, simulated, x, 4)
    rows, traffic = _table_rows(out), report.traffic
    assert f"communication: {sum(map(sum, counted)):,} of {traffic.dense_bytes:,} dense bytes per image " \
           f"(ratio {traffic.ratio:.3f}); groups kept {traffic.groups_kept:,}/{traffic.groups_total:,}" in out
    assert 0 < traffic.bytes < traffic.dense_bytes
    for layer in report.layers:  # the per-layer table, and its rows add up to the totals
        assert rows[layer.name][-2:] == [f"{layer.bytes:,}", f"{layer.dense_bytes:,}"]
    assert sum(int(rows[layer.name][-2].replace(",", "")) for layer in report.layers) == traffic.bytes
    sent = [sum(row) for row in counted]  # per node, and the total column
    assert rows["sent (this split)"] == [f"{b / 1e6:,.2f} MB" for b in [*sent, sum(sent)]]
    parameters = report.memory.param_bytes_per_node
    assert rows["parameters"] == [f"{b / 1e6:,.2f} MB" for b in [*parameters, sum(parameters)]]
    assert f"input scattered from node 0: {traffic.io_bytes.input:,} B" in out


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
