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

import contextlib
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
from disco.models import build_for_data, load_pretrained, load_weights
from disco.split.partitioner import partition
from disco.sparsify import Sparsifier, SparsifyOptions
from disco import files
from disco.training import checkpoint
from disco.training.checkpoint import Checkpoint
from disco.training.config import PHASES, TOPOLOGY, TrainConfig
from disco.tasks.objectives import Objective
from disco.tasks.registry import get_task
from disco.training.batches import BatchLayout, ShardSampler, StepSampler
from disco.training.data_parallel import DataParallel, join, settle_strides
from disco.training.precision import MixedPrecision
from disco.training.loops import DistillationLoss, TaskLoss, evaluate, recalibrate_norms, train_epoch
from disco.accounting import cost_report
from disco.sparsify.nested import NESTED, save_levels
from disco.split.modules import load_norm_statistics, norm_statistics
from disco.training.report import write_report
from disco.training.schedule import PhaseSchedule, schedule_phases

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
    parallel: DataParallel  # this process's place among the data-parallel processes (one: itself alone)
    dense: nn.Module
    out: Path
    objective: Objective
    saved: Checkpoint | None  # where this invocation starts (None: from the beginning)
    metrics_lines: int = 0  # lines in metrics.jsonl: the checkpoint of each epoch records how many it covers
    epochs_run: int = 0  # by this invocation
    stop_after_epochs: int | None = None
    dense_score: float | None = None  # the task's metric (accuracy, mIoU, mAP, PSNR) of the dense model
    dense_weights: str | None = None  # the file the dense model was loaded from instead of training it

    @property
    def device(self) -> torch.device:
        return self.parallel.device

    @property
    def sampler(self) -> StepSampler:
        return self.train_loader.batch_sampler

    @property
    def schedules(self) -> dict[str, PhaseSchedule]:
        """Each phase's epochs, steps and learning rate (disco.training.schedule); steps per epoch do not depend
        on the number of processes."""
        return schedule_phases(self.config, self.sampler.layout.steps)

    def reseed(self, seed: int) -> None:
        """The random state of an epoch: the data's order, the loader workers' seeds, the rest."""
        torch.manual_seed(seed)
        self.sampler.set_seed(seed)
        self.train_loader.generator.manual_seed(seed)

    def saved_in(self, phase: str) -> Checkpoint | None:
        """The checkpoint to continue `phase` from, if the run stopped inside it."""
        return self.saved if self.saved is not None and self.saved.phase == phase else None


def _seed_for(config: TrainConfig, phase: str, epoch: int) -> int:
    return config.seed * 10_000 + PHASES.index(phase) * 1_000 + epoch


def _loaders(config: TrainConfig, data: DataSpec, collate, parallel: DataParallel) -> tuple[DataLoader, DataLoader]:
    """data comes already cut to the run's subsets (TrainConfig.load_data). Training draws this process's
    micro-batches of each step (disco/training/batches.py); evaluation its share of the test set. With --workers,
    worker processes read and transform the images; they are started afresh for each pass, so each pass draws
    their seeds from the loader's generator, which every epoch reseeds: the data and its order do not depend on
    the worker count."""
    loading = dict(num_workers=config.workers, pin_memory=parallel.device.type == "cuda", collate_fn=collate)
    layout = BatchLayout(len(data.train), config.batch_size, parallel.world, config.micro_batch)
    train_loader = DataLoader(data.train, batch_sampler=StepSampler(layout, parallel.rank),
                              generator=torch.Generator(), **loading)
    test_loader = DataLoader(data.test, batch_size=256, sampler=ShardSampler(len(data.test), parallel.world,
                                                                             parallel.rank), **loading)
    return train_loader, test_loader


def _log(run: RunState, record: dict) -> None:
    run.metrics_lines += 1  # counted by every process: rank 0's checkpoints and a resumed run agree on it
    if not run.parallel.main:
        return
    checkpoint.append_line(run.out / METRICS, json.dumps(record))
    shown = ", ".join(f"{k}={v:.4g}" if k == "lr" else f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in record.items() if not isinstance(v, (dict, list)))
    print(shown, flush=True)


def _run_phase(run: RunState, phase: str, model: nn.Module, trained: nn.Module, loss_fn,
               sparsifier: Sparsifier | None) -> None:
    """Train `model` for the phase's epochs, checkpointing after each; `trained` is what runs the steps (the
    model, or its DDP wrapper: RunState.parallel). Resuming inside the phase, the caller has loaded the model (and
    sparsifier) from the checkpoint; the optimiser and scheduler are loaded here. Each epoch reseeds the RNG and
    the loader from (seed, phase, epoch), so nothing else needs saving."""
    config, schedule = run.config, run.schedules[phase]
    epochs = schedule.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.lr, weight_decay=config.weight_decay)
    scheduler = schedule.scheduler(optimizer)
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
        run.reseed(_seed_for(config, phase, epoch))
        began = time.perf_counter()
        metrics = train_epoch(trained, run.train_loader, optimizer, scheduler, loss_fn, device=run.device,
                              desc=f"{phase} {epoch + 1}/{epochs}", objective=run.objective, sparsifier=sparsifier,
                              precision=precision, parallel=run.parallel)
        metrics["train_seconds"] = time.perf_counter() - began  # the steps alone (bench/train_scale.py reads it)
        if _statistics_are_stale(sparsifier):
            recalibrate_norms(model, run.train_loader, device=run.device, parallel=run.parallel)
        else:  # each process's statistics saw its own micro-batches: the model scored and saved holds their mean
            run.parallel.average_norm_statistics(model)
        metrics[f"test_{run.objective.metric_name}"] = evaluate(model, run.test_loader, run.objective,
                                                                 device=run.device, show=run.parallel.main)
        ran = {"lr": scheduler.get_last_lr()[0], "schedule": schedule.record()}  # the schedule that ran
        if sparsifier is not None and not sparsifier.frozen:
            first_step = epoch * schedule.steps_per_epoch
            ran["cuts"] = [cut for cut in sparsifier.cuts if cut["step"] > first_step]
        _log(run, {"phase": phase, "epoch": epoch + 1, **metrics, "seconds": time.perf_counter() - began, **ran})
        if run.parallel.main:
            training_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                              "precision": precision.state_dict(),
                              "sparsifier": sparsifier.state_dict() if sparsifier else None}
            checkpoint.save_checkpoint(run.out, phase=phase, epoch=epoch, metrics_lines=run.metrics_lines,
                                       model=model, training_state=training_state)
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
    parallel = run.parallel
    given = run.dense_weights = _given_weights(run)
    if given is None and (run.saved is None or run.saved.phase == "dense"):
        if run.saved is not None:
            run.saved.load_model(run.dense)
        _run_phase(run, "dense", run.dense, parallel.wrap(run.dense), TaskLoss(run.objective), None)
        if parallel.main:
            checkpoint.save_model(run.dense, run.out / "dense.safetensors")
    elif given is None:  # resumed after the dense phase
        checkpoint.load_model_state(run.dense, run.out / "dense.safetensors")
    # both files are written before the first sparse checkpoint: a run resumed in a later phase finds them whole
    scored = run.out / "dense.json"
    if given or not parallel.from_main(int(scored.is_file())):
        run.dense_score = evaluate(run.dense, run.test_loader, run.objective, device=run.device, desc="dense eval",
                                   show=parallel.main)
        if parallel.main:
            files.write_text_atomically(scored, json.dumps(
                {f"test_{run.objective.metric_name}": run.dense_score, "weights": given}))
    elif parallel.main:  # (only rank 0 reports it)
        run.dense_score = json.loads(scored.read_text())[f"test_{run.objective.metric_name}"]


def _given_weights(run: RunState) -> str | None:
    """Load the weights the run starts from (--weights, --dense-run); the file when they are the dense model, which
    the dense phase is then skipped for. --weights whose classifier is for another number of classes (a timm or
    transformers ImageNet checkpoint for 10-class data) load all but the classifier: the dense phase trains from
    them."""
    config = run.config
    if config.weights:
        return config.weights if load_pretrained(run.dense, config.weights) else None
    if config.dense_run:
        given = str(Path(config.dense_run) / "dense.safetensors")
        load_weights(run.dense, given)
        return given
    return None


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
    options = SparsifyOptions(budget=config.budget, total_steps=max(1, run.schedules["sparsify"].steps),
                              regularization=config.regularization, method=config.method, seed=config.seed,
                              transport_dtype=config.transport_dtype, nested=tuple(config.nested),
                              link_budgets=tuple(tuple(entry) for entry in config.link_budget))
    saved = run.saved if run.saved is not None and run.saved.phase != "dense" else None
    if saved is not None:  # first: the checkpoint's split plans (a run begun by an older disco keeps its own)
        saved.load_model(simulated)
    trained = run.parallel.wrap(simulated)  # (before the masks track gradients: DDP copies rank 0's state)
    sparsifier = Sparsifier(simulated, run.example, options, latency=latency, group=run.parallel)
    if saved is not None:
        sparsifier.load_state_dict(saved.training_state()["sparsifier"])
    if saved is None or saved.phase == "sparsify":
        _run_phase(run, "sparsify", simulated, trained, TaskLoss(run.objective), sparsifier)
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
    _run_phase(run, "finetune", simulated, trained, loss, sparsifier)
    return simulated, sparsifier


def train(config: TrainConfig, *, stop_after_epochs: int | None = None, device: str | None = None) -> dict:
    """Run the whole pipeline in a new run folder (config.out); returns the report (also written there). Under
    torchrun, every process calls this (disco/training/data_parallel.py) and rank 0 alone writes the folder."""
    parallel = join(device)
    try:
        out = Path(config.out)
        # held for the whole run: two runs started into one new folder would otherwise both pass the check below
        one_writer = files.claim_folder(out, "the run folder") if parallel.main else contextlib.nullcontext()
        with one_writer:
            taken = (out / CONFIG).exists() or (out / checkpoint.CHECKPOINTS).exists()
            if parallel.from_main(int(taken)):
                raise DiscoError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
            return _run(config, None, parallel, stop_after_epochs=stop_after_epochs)
    finally:
        parallel.close()


def resume(folder: str | Path, *, stop_after_epochs: int | None = None, device: str | None = None) -> dict:
    """Continue the run in `folder` from its newest checkpoint, with its saved options (from the beginning if
    no epoch ended; a finished run only rewrites its results). The folder may have been moved or copied: the
    run continues there, whatever path its config.json names. Any number of processes may resume a run, however
    many trained it: every process reads the folder (on several hosts: a file system they all see)."""
    parallel = join(device)
    try:
        out = Path(folder)
        if not (out / CONFIG).is_file():
            raise DiscoError(f"{out} is not a run folder (no {CONFIG}): start the run without --resume")
        config = replace(TrainConfig.load(out / CONFIG), out=str(out))
        one_writer = files.claim_folder(out, "the run folder") if parallel.main else contextlib.nullcontext()
        with one_writer:  # two resumes of one folder would interleave its checkpoints and metrics
            if parallel.main:
                if (out / "report.json").is_file() and (out / "disco.safetensors").is_file():
                    print(f"{out}: the run is already complete; nothing to resume (its report is written again from "
                          "its final model)", flush=True)
                files.remove_temporary_files(out)
                checkpoint.remove_stale_checkpoints(out)
            parallel.barrier()
            saved = checkpoint.latest_checkpoint(out)
            lines = saved.metrics_lines if saved is not None else -1
            if parallel.from_main(lines) != lines:
                raise DiscoError(f"rank {parallel.rank} sees another checkpoint in {out} than rank 0: resuming on "
                                 "several hosts needs the run folder on a file system they all see")
            return _run(config, saved, parallel, stop_after_epochs=stop_after_epochs)
    finally:
        parallel.close()


def _run(config: TrainConfig, saved: Checkpoint | None, parallel: DataParallel, *,
         stop_after_epochs: int | None) -> dict:
    out = Path(config.out)
    data = config.load_data()
    torch.manual_seed(config.seed)  # the initial weights are part of the run: resuming must rebuild the same ones
    dense = build_for_data(config.model, channels=data.channels, classes=data.classes, stem_stride=config.stem_stride,
                           **config.model_kwargs)
    # channels-last conv weights make PyTorch pick its channels-last conv kernels: measured 1.5x faster training
    # of mobilenet_v2 on one CPU thread (and the layout tensor cores want on a GPU); values are unchanged
    dense = dense.to(parallel.device, memory_format=torch.channels_last)
    settle_strides(dense)
    objective = get_task(config.task).objective(classes=data.classes, model=dense, image_size=data.image_size)
    train_loader, test_loader = _loaders(config, data, objective.collate, parallel)
    example = train_loader.dataset[0][0][None].to(parallel.device)
    _check_latency_reachable(config, dense, example)
    lines = saved.metrics_lines if saved is not None else 0
    if parallel.main:
        _prepare_folder(config, out, lines)
    run = RunState(config, data, train_loader, test_loader, example, parallel, dense, out, objective, saved,
                   metrics_lines=lines, stop_after_epochs=stop_after_epochs)
    try:
        _dense_phase(run)
        simulated, sparsifier = _sparse_phases(run)
    except StopRequested:
        return {"stopped": True, "epochs_run": run.epochs_run}
    nested = nested_results(run, simulated, sparsifier) if sparsifier.nested is not None else None
    score = evaluate(simulated, test_loader, objective, device=parallel.device, desc="final eval",
                     show=parallel.main)
    if not parallel.main:
        return {"rank": parallel.rank, "disco_score": score}
    checkpoint.save_model(simulated, out / "disco.safetensors")
    return write_report(run, simulated, score, nested=nested)


def _prepare_folder(config: TrainConfig, out: Path, lines: int) -> None:
    """Rank 0, once model and data load (so a mistyped option leaves no run behind): the folder, config.json
    (resumed: where the run now lives), a latency-budget run's topology, metrics.jsonl cut to the checkpoint's
    lines (the epochs after it are redone)."""
    if not out.is_dir():
        out.mkdir(parents=True)
        files.fsync_path(out.parent)
    files.write_atomically(out / CONFIG, config.save)
    if config.latency_budget_ms is not None and not (out / TOPOLOGY).is_file():
        files.write_atomically(out / TOPOLOGY, config.load_topology().save)
    checkpoint.cut_lines(out / METRICS, lines)


def nested_results(run: RunState, simulated: nn.Module, sparsifier: Sparsifier) -> list[dict]:
    """Each nested budget's test score and bytes (the masks are left at the run's own budget), and the nested
    order saved once as nested.safetensors (disco/sparsify/nested.py)."""
    results, statistics = [], []
    run.reseed(_seed_for(run.config, "finetune", run.schedules["finetune"].epochs))
    for index, budget in enumerate(sparsifier.nested.budgets):
        sparsifier.use_budget(index)
        # fine-tuning mixed every budget's statistics: each budget gets its own (saved with the nested order)
        recalibrate_norms(simulated, run.train_loader, device=run.device, parallel=run.parallel)
        statistics.append(norm_statistics(simulated))
        score = evaluate(simulated, run.test_loader, run.objective, device=run.device, desc=f"eval at {budget}",
                         show=run.parallel.main)
        costs = cost_report(simulated.cpu(), run.example.cpu(), transport_dtype=run.config.transport_dtype)
        simulated.to(run.device)
        results.append({"budget": budget, "score": score, "ratio": costs.traffic.ratio,
                        "bytes_per_image": costs.traffic.bytes})
    sparsifier.use_budget(len(sparsifier.nested.budgets) - 1)
    load_norm_statistics(simulated, statistics[-1])  # the run's own budget: disco.safetensors holds it
    if run.parallel.main:
        save_levels(sparsifier.nested, statistics, run.out / NESTED)
    return results
