"""Command-line options derived from config dataclasses (disco.fields), and `disco train`'s."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Literal

import pytest

from disco.cli.main import build_parser
from disco.fields import add_options, from_args, option
from disco.cli.train_cmd import config_from_args
from disco.errors import DiscoError
from disco.training.config import TrainConfig


def _parse(cls, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_options(parser, cls)
    return parser.parse_args(argv)


def _check_positive(text: str) -> int:
    if int(text) < 1:
        raise DiscoError(f"{text} is not positive")
    return int(text)


@dataclasses.dataclass(kw_only=True)
class Example:
    deploy: str = option(help="a folder", positional=True)
    name: str = option(help="required option")
    count: int | None = option(None, help="optional int")
    rate: float = option(0.5, help="a rate")
    quiet: bool = option(False, help="say nothing")
    fancy: bool = option(True, help="plain output")
    backend: Literal["gloo", "nccl"] = option("gloo", help="backend")
    kwargs: dict = option(default_factory=dict, help="K=V pairs")
    level: int = option(1, flag="--lvl", type=_check_positive, help="level %% of max")
    internal: int = option(7, cli=False, help="not an option")


def test_fields_become_options_with_their_defaults_types_and_flags():
    args = _parse(Example, ["here", "--name", "n", "--count", "3", "--rate", "2", "--quiet", "--no-fancy",
                            "--backend", "nccl", "--kwargs", "a=1,b=x", "--lvl", "4"])
    assert from_args(Example, args) == Example(deploy="here", name="n", count=3, rate=2.0, quiet=True, fancy=False,
                                               backend="nccl", kwargs={"a": 1, "b": "x"}, level=4)
    defaults = from_args(Example, _parse(Example, ["here", "--name", "n"]))
    assert defaults == Example(deploy="here", name="n") and defaults.internal == 7


def test_bad_values_are_argparse_errors_with_the_message(capsys):
    for argv, needle in ((["x"], "required: --name"), (["x", "--name", "n", "--backend", "mpi"], "invalid choice"),
                         (["x", "--name", "n", "--lvl", "0"], "0 is not positive"),
                         (["x", "--name", "n", "--kwargs", "a"], "'a' must look like name=value")):
        with pytest.raises(SystemExit):
            _parse(Example, argv)
        assert needle in capsys.readouterr().err


def test_help_shows_the_dataclass_default_once():
    parser = argparse.ArgumentParser()
    add_options(parser, Example)
    text = " ".join(parser.format_help().split())
    assert "a rate (default: 0.5)" in text and "level % of max (default: 1)" in text
    assert "optional int (default" not in text and "say nothing (default" not in text and "--internal" not in text


def test_train_options_take_their_defaults_from_train_config():
    parser = build_parser()
    args = parser.parse_args(["train", "--model", "torchvision:resnet18", "--out", "run"])
    config, fields = config_from_args(args), {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, field in fields.items():
        if field.default is not dataclasses.MISSING:
            assert getattr(args, name) == field.default, name
    assert (config.dense_epochs, config.sparsify_epochs, config.finetune_epochs) == (config.epochs,) * 3
    assert config.dataset == "fashion-mnist" and config.model_kwargs == {} and config.distill


def test_train_epochs_fill_the_phases_not_set_and_flags_keep_their_names():
    args = build_parser().parse_args(["train", "--model", "m.py:f", "--out", "run", "--epochs", "5",
                                      "--sparsify-epochs", "1", "--no-distill", "--dtype", "fp16",
                                      "--model-kwargs", "width_mult=0.5", "--resume", "--device", "cpu"])
    config = config_from_args(args)
    assert (config.dense_epochs, config.sparsify_epochs, config.finetune_epochs) == (5, 1, 5)
    assert (config.distill, config.transport_dtype, config.model_kwargs) == (False, "fp16", {"width_mult": 0.5})
    assert args.resume and args.device == "cpu"
    with pytest.raises(DiscoError, match="--model is required"):
        config_from_args(build_parser().parse_args(["train", "--out", "run"]))


def test_one_node_is_refused_with_a_reason_before_anything_runs(tmp_path):
    with pytest.raises(DiscoError, match="between 2 and .*one node sends nothing"):
        TrainConfig(model="torchvision:resnet18", nodes=1, out=str(tmp_path))
    assert TrainConfig(model="torchvision:resnet18", nodes=2, out=str(tmp_path)).nodes == 2


@pytest.mark.parametrize("argv, message", [
    (["run", "deploy", "--eval", "--budget", "nan"], "finite number"),
    (["run", "deploy", "--eval", "--timeout", "inf"], "finite number"),
    (["serve", "deploy", "--max-body-mb", "nan"], "finite number"),
    (["inspect", "--model", "torchvision:resnet18", "--nodes", "3", "--node-weights", "1,,2"], "one weight per node"),
])
def test_non_finite_or_malformed_numbers_are_refused_by_the_parser(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        build_parser(argv[0], every=False).parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("values, message", [
    ({"token": ""}, "--token"),  # an empty token would switch authentication off
    ({"token": "pässwörd-token"}, "--token"),  # HTTP carries headers as latin-1: never matched as typed
    ({"inflight": 20_000}, "--inflight"),
    ({"max_body_mb": float("nan")}, "--max-body-mb"),
    ({"budget": float("nan")}, "--budget"),
    ({"budget": 1.5}, "--budget"),
])
def test_serve_options_out_of_bounds_are_refused(values, message, monkeypatch):
    from disco.serve.options import TOKEN_ENV, ServeOptions

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(DiscoError, match=message):
        ServeOptions(deploy="deploy", **values)
    monkeypatch.setenv(TOKEN_ENV, "")
    with pytest.raises(DiscoError, match="--token"):
        ServeOptions(deploy="deploy")  # the variable set but empty: refused, not "no token"


def test_node_weights_that_overflow_their_shares_are_refused():
    from disco.options import check_weights

    with pytest.raises(DiscoError, match="differ by more than"):
        check_weights((1e308, 1e-308), 2)
    assert check_weights((2.0, 1.0), 2) == (2.0, 1.0)


def test_node_weights_too_large_to_add_up_are_refused_on_the_command_line():
    from disco.options import parse_weights

    with pytest.raises(DiscoError, match="relative shares"):
        parse_weights("1e308,1e308")  # their sum is inf: every share would be 0
    assert parse_weights("2,1,1") == (2.0, 1.0, 1.0)
