"""Export a trained run folder (`disco train --out RUN`) as a deployment (`disco export RUN --out DIR`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from disco.errors import DiscoError
from disco.export.budgets import NestedExport
from disco.export.manifest import Manifest, ModelSpec
from disco.export.shards import export
from disco.models import build_for_data
from disco.sparsify.nested import NESTED, load_levels
from disco.split.modules import load_norm_statistics
from disco.split.partitioner import disco_layers, partition, set_transport
from disco.tasks.registry import get_task
from disco.training import checkpoint
from disco.training.config import TrainConfig


def export_run(run: str | Path, out: str | Path, *, transport_dtype: str | None = None,
               sign_key: str | Path | None = None, budget: float | None = None,
               budgets: list[float] | None = None) -> Manifest:
    """`budget`: a run trained with nested budgets: deploy the masks of this one; `budgets`: deploy several of
    them in one deployment (an empty list: all), the run's own budget the default one."""
    run = Path(run)
    if budget is not None and budgets is not None:
        raise DiscoError("give --budget (one of a nested run's budgets) or --budgets (several), not both")
    weights = run / "disco.safetensors"
    if not weights.is_file():
        raise DiscoError(f"{run} has no disco.safetensors: finish (or --resume) its training first")
    config = TrainConfig.load(run / "config.json")
    data = config.load_data()
    spec = ModelSpec(model=config.model, channels=data.channels, classes=data.classes, kwargs=config.model_kwargs,
                     stem_stride=config.stem_stride)
    model = build_for_data(spec.model, channels=spec.channels, classes=spec.classes, stem_stride=spec.stem_stride,
                           **spec.kwargs)
    example = data.test[0][0][None]
    simulated = partition(model, example_inputs=example, **config.partition_options())
    checkpoint.load_model_state(simulated, weights)
    if budget is not None:
        _use_nested_budget(simulated, run, budget)
    report = run / "report.json"
    results = json.loads(report.read_text()) if report.is_file() else None
    nested = _nested_export(run, config, budgets, results) if budgets is not None else None
    dtype = transport_dtype or config.transport_dtype
    if dtype != config.transport_dtype:
        _warn_dtype_change(simulated, config, data, dtype)
    preprocess = {"channels": data.channels, "size": list(data.image_size), "mean": data.mean, "std": data.std,
                  **({"crop": True} if data.crop else {})}  # resize the shorter side, crop the centre (photos)
    dataset = {"dataset": config.dataset, "data": config.data, "image_size": config.image_size,
               "test_subset": config.test_subset, "seed": config.seed, "skip_bad_data": config.skip_bad_data,
               "recipe": config.recipe}
    with torch.no_grad():
        return export(simulated, out, example_inputs=example, spec=spec, transport_dtype=dtype,
                      preprocess=preprocess, dataset=dataset, class_names=data.class_names,
                      reference=_reference(results, config, budget), task=config.task, sign_key=sign_key,
                      nested=nested)


def _reference(results: dict | None, config: TrainConfig, budget: float | None) -> dict | None:
    """The simulated test score a deployment is checked against (report.json's): the run's own, or with `budget`
    that nested budget's; None without a report."""
    if results is None:
        return None
    score = results.get("disco_score", results.get("disco_accuracy"))
    if budget is not None:
        score = next((n["score"] for n in results.get("nested", []) if abs(n["budget"] - budget) < 1e-9), None)
    return {results.get("metric", "accuracy"): score, "test_subset": config.test_subset}


def _budget_index(run: Path, budgets: tuple[float, ...], budget: float, flag: str) -> int:
    """Where `budget` is among a nested run's budgets; one it was not trained for is refused, naming them."""
    index = next((i for i, b in enumerate(budgets) if abs(b - budget) < 1e-9), None)
    if index is None:
        raise DiscoError(f"{run} was trained for the nested budgets {', '.join(map(str, budgets))}; {flag} {budget} "
                         "is not one of them")
    return index


def _use_nested_budget(simulated, run: Path, budget: float) -> None:
    """Set the masks of one of the run's nested budgets (disco/sparsify/nested.py)."""
    budgets, levels, norms = load_levels(run / NESTED)
    index = _budget_index(run, budgets, budget, "--budget")
    layers = disco_layers(simulated)
    if set(levels) != set(layers):
        raise DiscoError(f"{run / NESTED} does not belong to this run's model (its layers differ)")
    for name, layer in layers.items():
        layer.set_group_mask(levels[name] > index)
    load_norm_statistics(simulated, norms[index])  # the statistics measured at that budget


def _nested_export(run: Path, config: TrainConfig, wanted: list[float], results: dict | None) -> NestedExport:
    """Several of a nested run's budgets for one deployment (`wanted`; empty: all of them)."""
    budgets, levels, norms = load_levels(run / NESTED)
    chosen = sorted({_budget_index(run, budgets, budget, "--budgets") for budget in wanted or budgets})  # largest first
    if len(chosen) < 2:
        raise DiscoError("--budgets needs at least two of the run's budgets (one budget: --budget B)")
    # a group's level in the deployment: how many of the chosen budgets keep it
    group_levels = {name: sum((level > index).to(torch.uint8) for index in chosen) for name, level in levels.items()}
    own = next((k for k, index in enumerate(chosen) if abs(budgets[index] - config.budget) < 1e-9), len(chosen) - 1)
    return NestedExport(budgets=[budgets[i] for i in chosen], group_levels=group_levels,
                        norms=[norms[i] for i in chosen],
                        reference=[_reference(results, config, budgets[i]) for i in chosen], default=own)


def _warn_dtype_change(simulated, config: TrainConfig, data, dtype: str) -> None:
    """Exporting for another dtype than the run trained for: measure what it does to the test score, say it, and
    leave the model simulating the exported dtype (so the deployment equals its simulation)."""
    from torch.utils.data import DataLoader

    from disco.training.loops import evaluate

    objective = get_task(config.task).objective(classes=data.classes, model=simulated, image_size=data.image_size)
    loader = DataLoader(data.test, batch_size=256, collate_fn=objective.collate)
    device = torch.device("cpu")
    trained = evaluate(simulated, loader, objective, device=device, desc=f"eval at {config.transport_dtype}")
    set_transport(simulated, dtype)
    exported = evaluate(simulated, loader, objective, device=device, desc=f"eval at {dtype}")
    name = objective.metric_name
    print(f"warning: the run was trained for {config.transport_dtype} messages; exported as {dtype}, its test "
          f"{name} goes from {trained:.4f} to {exported:.4f} ({exported - trained:+.4f}) on its "
          f"{len(data.test)} test images. Train with --dtype {dtype} to train for it.", file=sys.stderr, flush=True)
