"""`train()`: dense model -> masks driven to the byte budget -> fine-tuning with frozen masks + distillation.

Run folder (config.out):
- config.json: the run's options (written once the model and data load; it makes the folder a run);
- metrics.jsonl: one line per epoch;
- checkpoints/NNNN/: the newest whole-epoch checkpoint (disco.training.checkpoint); `resume(folder)`
  continues from it, and ends with the same metrics and weights as a run never interrupted;
- dense.safetensors + dense.json: the dense model and its test metric;
- disco.safetensors: the partitioned model with its masks; report.json and report.md.

Every file is written so that a kill at any instant leaves it whole (old or new), and each epoch appends its
metrics line before its checkpoint counts it: resuming after a kill redoes at most the epoch under way.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from disco.data.datasets import DataSpec
from disco.errors import DiscoError
from disco.models import build_for_data, load_weights
from disco.split.partitioner import partition
from disco.sparsify import Sparsifier, SparsifyOptions
from disco.training import checkpoint
from disco.training.checkpoint import Checkpoint
from disco.training.config import PHASES, TOPOLOGY, TrainConfig
from disco.tasks.objectives import Objective
from disco.tasks.registry import get_task
from disco.training.precision import MixedPrecision
from disco.training.loops import DistillationLoss, TaskLoss, evaluate, recalibrate_norms, train_epoch
from disco.accounting import cost_report
from disco.sparsify.nested import NESTED, load_norm_statistics, norm_statistics, save_levels
from disco.training.report import write_report
from disco.training.schedule import PhasePlan, plan_phases

CONFIG, METRICS = "config.json", "metrics.jsonl"


class StopRequested(Exception):
    """Raised after `stop_after_epochs` epochs (used to test resuming)."""


@dataclass
class RunState:
    config: TrainConfig
    data: DataSpec
    train_loader: DataLoader
    test_loader: DataLoader
    example: torch.Tensor
    device: torch.device
    dense: nn.Module
    out: Path
    objective: Objective
    saved: Checkpoint | None  # where this invocation starts (None: from the beginning)
    metrics_lines: int = 0  # lines in metrics.jsonl: the checkpoint of each epoch records how many it covers
    epochs_run: int = 0  # by this invocation
    stop_after_epochs: int | None = None
    dense_score: float | None = None  # the task's metric (accuracy, mIoU, mAP, PSNR) of the dense model

    @property
    def plans(self) -> dict[str, PhasePlan]:
        """Each phase's epochs, steps and learning rate (disco.training.schedule)."""
        return plan_phases(self.config, len(self.train_loader))

    def saved_in(self, phase: str) -> Checkpoint | None:
        """The checkpoint to continue `phase` from, if the run stopped inside it."""
        return self.saved if self.saved is not None and self.saved.phase == phase else None


def _seed_for(config: TrainConfig, phase: str, epoch: int) -> int:
    return config.seed * 10_000 + PHASES.index(phase) * 1_000 + epoch


def _loaders(config: TrainConfig, data: DataSpec, collate, device: torch.device) -> tuple[DataLoader, DataLoader]:
    """data comes already cut to the run's subsets (TrainConfig.load_data). With --workers, worker processes
    read and transform the images; they are started afresh for each pass, so each pass draws their seeds from the
    loader's generator, which every epoch reseeds: the data and its order do not depend on the worker count."""
    loading = dict(num_workers=config.workers, pin_memory=device.type == "cuda", collate_fn=collate)
    train_loader = DataLoader(data.train, batch_size=config.batch_size, shuffle=True, generator=torch.Generator(),
                              **loading)
    return train_loader, DataLoader(data.test, batch_size=256, **loading)


def _log(run: RunState, record: dict) -> None:
    checkpoint.append_line(run.out / METRICS, json.dumps(record))
    run.metrics_lines += 1
    shown = ", ".join(f"{k}={v:.4g}" if k == "lr" else f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in record.items() if not isinstance(v, (dict, list)))
    print(shown, flush=True)


def _run_phase(run: RunState, phase: str, model: nn.Module, loss_fn, sparsifier: Sparsifier | None) -> None:
    """Train `model` for the phase's epochs, checkpointing after each. Resuming inside the phase, the caller
    has loaded the model (and sparsifier) from the checkpoint; the optimiser and scheduler are loaded here.
    Each epoch reseeds the RNG and the loader from (seed, phase, epoch), so nothing else needs saving."""
    config, plan = run.config, run.plans[phase]
    epochs = plan.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=config.weight_decay)
    scheduler = plan.scheduler(optimizer)
    precision = MixedPrecision(config.precision, run.device)
    first_epoch = 0
    saved = run.saved_in(phase)
    if saved is not None:
        state = saved.training_state()
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        precision.load_state_dict(state.get("precision", {}))
        first_epoch = saved.epoch + 1
    for epoch in range(first_epoch, epochs):
        if run.stop_after_epochs is not None and run.epochs_run >= run.stop_after_epochs:
            raise StopRequested
        seed = _seed_for(config, phase, epoch)
        torch.manual_seed(seed)
        run.train_loader.generator.manual_seed(seed)
        began = time.perf_counter()
        metrics = train_epoch(model, run.train_loader, optimizer, scheduler, loss_fn, device=run.device,
                              desc=f"{phase} {epoch + 1}/{epochs}", objective=run.objective, sparsifier=sparsifier,
                              precision=precision)
        if _statistics_are_stale(sparsifier):
            recalibrate_norms(model, run.train_loader, device=run.device)
        metrics[f"test_{run.objective.metric_name}"] = evaluate(model, run.test_loader, run.objective,
                                                                 device=run.device)
        schedule = {"lr": scheduler.get_last_lr()[0], "schedule": plan.record()}  # the schedule that ran
        if sparsifier is not None and not sparsifier.frozen:
            first_step = epoch * plan.steps_per_epoch
            schedule["cuts"] = [cut for cut in sparsifier.cuts if cut["step"] > first_step]
        _log(run, {"phase": phase, "epoch": epoch + 1, **metrics, "seconds": time.perf_counter() - began,
                   **schedule})
        training_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "precision": precision.state_dict(),
                          "sparsifier": sparsifier.state_dict() if sparsifier else None}
        checkpoint.save_checkpoint(run.out, phase=phase, epoch=epoch, metrics_lines=run.metrics_lines, model=model,
                                   training_state=training_state)
        run.epochs_run += 1


def _statistics_are_stale(sparsifier: Sparsifier | None) -> bool:
    """Whether BatchNorm's running statistics must be measured afresh before an epoch is scored (training
    normalises with batch statistics: it is unaffected). While masks are cut, they are an average since the last
    cut, which may be a few batches old. In nested fine-tuning every step runs every budget, so they mix them all
    (scored ~10% on 4,000 images): the epoch is scored at the run's own budget with its own statistics, as the
    report's final score is."""
    if sparsifier is None:
        return False
    return not sparsifier.frozen or sparsifier.nested is not None


def _dense_phase(run: RunState) -> None:
    config = run.config
    given = config.weights or (str(Path(config.dense_run) / "dense.safetensors") if config.dense_run else None)
    if given:
        load_weights(run.dense, given)
    elif run.saved is None or run.saved.phase == "dense":
        if run.saved is not None:
            run.saved.load_model(run.dense)
        _run_phase(run, "dense", run.dense, TaskLoss(run.objective), None)
        checkpoint.save_model(run.dense, run.out / "dense.safetensors")
    # both files are written before the first sparse checkpoint: a run resumed in a later phase finds them whole
    if not (run.out / "dense.json").is_file() or given:
        if not given:
            checkpoint.load_model_state(run.dense, run.out / "dense.safetensors")
        score = evaluate(run.dense, run.test_loader, run.objective, device=run.device, desc="dense eval")
        checkpoint.write_text_atomically(run.out / "dense.json", json.dumps(
            {f"test_{run.objective.metric_name}": score, "weights": given}))
    else:
        checkpoint.load_model_state(run.dense, run.out / "dense.safetensors")
    run.dense_score = json.loads((run.out / "dense.json").read_text())[f"test_{run.objective.metric_name}"]


def _latency_budget(config: TrainConfig, example: torch.Tensor):
    if config.latency_budget_ms is None:
        return None
    from disco.planning.prices import LatencyBudget

    return LatencyBudget(config.load_topology(), config.latency_budget_ms / 1e3, example[:1],
                         config.transport_dtype)


def _check_latency_reachable(config: TrainConfig, dense: nn.Module, example: torch.Tensor) -> None:
    """A latency budget the topology cannot meet even sending nothing: refused before any training."""
    latency = _latency_budget(config, example.cpu())
    if latency is not None:
        latency.check_reachable(partition(copy.deepcopy(dense).cpu(), example_inputs=example[:1].cpu(),
                                          **config.partition_options()))


def _sparse_phases(run: RunState) -> tuple[nn.Module, Sparsifier]:
    config = run.config
    # sparsify and fine-tune see what the network does to sent channels (int8: rounded, straight-through)
    simulated = partition(run.dense, example_inputs=run.example, **config.partition_options())
    latency = _latency_budget(config, run.example)
    options = SparsifyOptions(budget=config.budget, total_steps=max(1, run.plans["sparsify"].steps),
                              regularization=config.regularization, method=config.method, seed=config.seed,
                              transport_dtype=config.transport_dtype, nested=tuple(config.nested),
                              link_budgets=tuple(tuple(entry) for entry in config.link_budget))
    saved = run.saved if run.saved is not None and run.saved.phase != "dense" else None
    if saved is not None:  # first: the checkpoint's split plans (a run begun by an older disco keeps its own)
        saved.load_model(simulated)
    sparsifier = Sparsifier(simulated, run.example, options, latency=latency)
    if saved is not None:
        sparsifier.load_state_dict(saved.training_state()["sparsifier"])
    if saved is None or saved.phase == "sparsify":
        _run_phase(run, "sparsify", simulated, TaskLoss(run.objective), sparsifier)
        # The last sparsify checkpoint is saved before this cut, with the importance and generator it reads:
        # a run resumed from it cuts the same groups.
        if config.sparsify_epochs and latency is not None:
            if sparsifier.steps_done < sparsifier.options.end_step:  # the schedule's last cut did not happen
                sparsifier.cut_to_latency()
        elif config.sparsify_epochs:
            sparsifier.cut_to(min(config.budget, sparsifier.ratio))  # exact budget even if steps ran short
    sparsifier.freeze()  # (a finetune checkpoint holds the cut masks and a frozen sparsifier)
    teacher = copy.deepcopy(run.dense).eval()
    loss = (DistillationLoss(teacher, temperature=config.temperature, weight=config.distill_weight,
                             objective=run.objective) if config.distill else TaskLoss(run.objective))
    _run_phase(run, "finetune", simulated, loss, sparsifier)
    return simulated, sparsifier


def train(config: TrainConfig, *, stop_after_epochs: int | None = None, device: str | None = None) -> dict:
    """Run the whole pipeline in a new run folder (config.out); returns the report (also written there)."""
    out = Path(config.out)
    if (out / CONFIG).exists() or (out / checkpoint.CHECKPOINTS).exists():
        raise DiscoError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    return _run(config, None, stop_after_epochs=stop_after_epochs, device=device)


def resume(folder: str | Path, *, stop_after_epochs: int | None = None, device: str | None = None) -> dict:
    """Continue the run in `folder` from its newest checkpoint, with its saved options (from the beginning if
    no epoch ended; a finished run only rewrites its results). The folder may have been moved or copied: the
    run continues there, whatever path its config.json names."""
    out = Path(folder)
    if not (out / CONFIG).is_file():
        raise DiscoError(f"{out} is not a run folder (no {CONFIG}): start the run without --resume")
    config = replace(TrainConfig.load(out / CONFIG), out=str(out))
    if (out / "report.json").is_file() and (out / "disco.safetensors").is_file():
        print(f"{out}: the run is already complete; nothing to resume (its report is written again from its final "
              "model)", flush=True)
    checkpoint.remove_temporary_files(out)
    checkpoint.remove_stale_checkpoints(out)
    return _run(config, checkpoint.latest_checkpoint(out), stop_after_epochs=stop_after_epochs, device=device)


def _run(config: TrainConfig, saved: Checkpoint | None, *, stop_after_epochs: int | None,
         device: str | None) -> dict:
    out = Path(config.out)
    data = config.load_data()
    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)  # the initial weights are part of the run: resuming must rebuild the same ones
    dense = build_for_data(config.model, channels=data.channels, classes=data.classes, stem_stride=config.stem_stride,
                           **config.model_kwargs)
    # channels-last conv weights make PyTorch pick its channels-last conv kernels: measured 1.5x faster training
    # of mobilenet_v2 on one CPU thread (and the layout tensor cores want on a GPU); values are unchanged
    dense = dense.to(chosen, memory_format=torch.channels_last)
    objective = get_task(config.task).objective(classes=data.classes, model=dense, image_size=data.image_size)
    train_loader, test_loader = _loaders(config, data, objective.collate, chosen)
    example = train_loader.dataset[0][0][None].to(chosen)
    _check_latency_reachable(config, dense, example)
    # written only now that model and data load, so a mistyped option leaves no run behind; resumed, it
    # records where the run now lives
    if not out.is_dir():
        out.mkdir(parents=True)
        checkpoint.fsync_path(out.parent)
    checkpoint.write_atomically(out / CONFIG, config.save)
    if config.latency_budget_ms is not None and not (out / TOPOLOGY).is_file():
        checkpoint.write_atomically(out / TOPOLOGY, config.load_topology().save)
    lines = saved.metrics_lines if saved is not None else 0
    checkpoint.cut_lines(out / METRICS, lines)  # the lines of epochs after the checkpoint: they are redone
    run = RunState(config, data, train_loader, test_loader, example, chosen, dense, out, objective, saved,
                   metrics_lines=lines, stop_after_epochs=stop_after_epochs)
    try:
        _dense_phase(run)
        simulated, sparsifier = _sparse_phases(run)
    except StopRequested:
        return {"stopped": True, "epochs_run": run.epochs_run}
    nested = nested_results(run, simulated, sparsifier) if sparsifier.nested is not None else None
    checkpoint.save_model(simulated, out / "disco.safetensors")
    score = evaluate(simulated, test_loader, objective, device=chosen, desc="final eval")
    return write_report(run, simulated, score, nested=nested)


def nested_results(run: RunState, simulated: nn.Module, sparsifier: Sparsifier) -> list[dict]:
    """Each nested budget's test score and bytes (the masks are left at the run's own budget), and the nested
    order saved once as nested.safetensors (disco/sparsify/nested.py)."""
    results, statistics = [], []
    run.train_loader.generator.manual_seed(_seed_for(run.config, "finetune", run.plans["finetune"].epochs))
    for index, budget in enumerate(sparsifier.nested.budgets):
        sparsifier.use_budget(index)
        # fine-tuning mixed every budget's statistics: each budget gets its own (saved with the nested order)
        recalibrate_norms(simulated, run.train_loader, device=run.device)
        statistics.append(norm_statistics(simulated))
        score = evaluate(simulated, run.test_loader, run.objective, device=run.device, desc=f"eval at {budget}")
        costs = cost_report(simulated.cpu(), run.example.cpu(), transport_dtype=run.config.transport_dtype)
        simulated.to(run.device)
        results.append({"budget": budget, "score": score, "ratio": costs["ratio"], "bytes_per_image": costs["bytes"]})
    sparsifier.use_budget(len(sparsifier.nested.budgets) - 1)
    load_norm_statistics(simulated, statistics[-1])  # the run's own budget: disco.safetensors holds it
    save_levels(sparsifier.nested, statistics, run.out / NESTED)
    return results
