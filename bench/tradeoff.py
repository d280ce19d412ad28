"""Accuracy vs bytes per image on Fashion-MNIST: learned DISCO masks vs random groups vs no communication.

Trains the dense model once, then sparsifies it at each budget and node count (sparsify + fine-tune with
distillation), and writes docs/results/tradeoff.md, tradeoff.json and tradeoff.png. The dense-prediction
tasks (segmentation mIoU, detection mAP on Fashion-MNIST scenes; super-resolution PSNR) get their own rows.
Re-run:
    .venv/bin/python bench/tradeoff.py --only mobilenet,resnet18   # classification sweep (~105 min, 2 cores)
    .venv/bin/python bench/tradeoff.py --only fcn,edsr   # train only these families (others' rows kept)
    .venv/bin/python bench/tradeoff.py --only mobilenet --rows 4k-,n4-learned-1.0-s0,n4-learned-0.05,0.02
                                                  # issue 17's rows: small data, 50x less (~2 h)
    .venv/bin/python bench/tradeoff.py            # every family (several hours on 2 CPU cores)
    .venv/bin/python bench/tradeoff.py --quick    # a few-minute smoke version (numbers not meaningful)
Runs go to runs/tradeoff/<name>/ (each a normal `disco train` run folder with report.json); rows of runs
already there are reused, so partial re-runs rebuild the whole table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MOBILENET = dict(model="torchvision:mobilenet_v2", model_kwargs={"width_mult": 0.5}, stem_stride=1)
# A user's small dataset (issue 17): 4,000 training images (the full 10,000 test images), the dense model 6
# epochs, then 2 sparsify + 2 fine-tune epochs asked: 32 steps an epoch, so the step schedule repeats the data
# (docs/method.md 4)
SMALL = "mobilenet_v2_w0.5-4k"
NESTED_LABEL = "DISCO nested (one model)"
GATES_LABEL = "DISCO (gates)"  # learned gate scores (issue 17, item 2), against "DISCO (learned)"
MOBILENET_4K = dict(MOBILENET, train_subset=4000, dense_subset=4000, dense_epochs=6, sparsify_epochs=2,
                    finetune_epochs=2)
# its rows train on 20k images: a 60k-image epoch takes ~7 min on one CPU thread (2.4x mobilenet's), which
# would add ~30 min to the sweep for a secondary row (ResNet-18 is too wide to tell the methods apart here)
RESNET18 = dict(model="torchvision:resnet18", model_kwargs={}, stem_stride=None, train_subset=20000)
# a timm model (issue "any model"): ResNet-10-T (deep stem, avg-pool downsampling), as timm builds it for 1-channel
# 28x28 images, trained on 20k images like ResNet-18
TIMM_RESNET10T = dict(model="timm:resnet10t", model_kwargs={}, stem_stride=None, train_subset=20000)
# 6 layers, 8 heads, width 256: ~20 min per epoch of 60k images on one CPU thread, so it trains on subsets
VIT = dict(model="disco:vit_small", model_kwargs={}, stem_stride=None, lr=1e-3, train_subset=10000, dense_subset=20000)
# Dense prediction, sized for CPU: 64x64 scenes for segmentation (FCN features at 1/8), 96x96 for detection
# (its anchors); super-resolution x2 on Fashion-MNIST (14x14 -> 28x28).
# 2000 scenes are only 16 steps per epoch at batch 128: the sparse rows restart AdamW at the full rate for so
# few steps that even the dense split (budget 1.0) lost 5 mIoU points and all its mAP; they take batch 32
# (63 steps per epoch) at a quarter of the rate instead (the dense models keep batch 128).
SPARSE_ROWS_ON_FEW_SCENES = dict(batch_size=32, sparse_lr_scale=0.25)
SEGMENTATION = dict(model="disco:fcn_resnet18", task="segmentation", image_size=64, train_subset=2000,
                    dense_subset=2000, test_subset=500, dense_epochs=4, **SPARSE_ROWS_ON_FEW_SCENES)
DETECTION = dict(model="disco:retinanet_resnet18", task="detection", train_subset=2000, dense_subset=2000,
                 test_subset=500, dense_epochs=6, lr=1e-3, **SPARSE_ROWS_ON_FEW_SCENES)
SUPERRES = dict(model="disco:edsr", task="superres", train_subset=20000, dense_subset=20000, test_subset=2000,
                dense_epochs=3)
TASK_FAMILIES = {"fcn_resnet18": SEGMENTATION, "retinanet_resnet18": DETECTION, "edsr": SUPERRES}
METRIC_SCALE = {"accuracy": 100, "miou": 100, "map": 100, "psnr": 1}  # shown as %, %, %, dB


@dataclass(frozen=True)
class Job:
    name: str
    family: str  # which dense model it starts from
    nodes: int
    budget: float
    method: str
    seed: int
    label: str
    nested: tuple[float, ...] = ()  # larger budgets nested around `budget` (one model for all)


def plan(quick: bool) -> tuple[dict, list[Job]]:
    families = {SMALL: MOBILENET_4K, "mobilenet_v2_w0.5": MOBILENET, "resnet18": RESNET18, "vit_small": VIT,
                "timm_resnet10t": TIMM_RESNET10T, **TASK_FAMILIES}
    jobs = []
    for seed in (0, 1):  # small data first: its rows are short
        for budget, method, label in ((1.0, "learned", "DISCO (learned)"), (0.1, "learned", "DISCO (learned)"),
                                      (0.05, "learned", "DISCO (learned)"), (0.0, "learned", "no communication"),
                                      (0.1, "random", "random groups"), (0.05, "random", "random groups"),
                                      (0.1, "gates", GATES_LABEL), (0.05, "gates", GATES_LABEL)):
            kind = "nocomm" if budget == 0.0 else method
            jobs.append(Job(f"{SMALL}-n4-{kind}-{budget}-s{seed}".replace("-nocomm-0.0", "-nocomm"), SMALL, 4, budget,
                            method, seed, label))
        # one nested model for 0.2 > 0.1 > 0.05 > 0.02 (issue 17, item 3)
        jobs.append(Job(f"{SMALL}-n4-nested-0.02-s{seed}", SMALL, 4, 0.02, "learned", seed, NESTED_LABEL,
                        nested=(0.2, 0.1, 0.05)))
    for nodes in (2, 4):
        f = "mobilenet_v2_w0.5"
        for budget in (1.0, 0.5, 0.2, 0.1, 0.05):
            jobs.append(Job(f"{f}-n{nodes}-learned-{budget}-s0", f, nodes, budget, "learned", 0, "DISCO (learned)"))
        if nodes == 4:  # 50x less (issue 17)
            jobs.append(Job(f"{f}-n{nodes}-learned-0.02-s0", f, nodes, 0.02, "learned", 0, "DISCO (learned)"))
        for budget in (0.1, 0.05, 0.02) if nodes == 4 else (0.1,):  # learned gates (issue 17, item 2)
            jobs.append(Job(f"{f}-n{nodes}-gates-{budget}-s0", f, nodes, budget, "gates", 0, GATES_LABEL))
        # second seeds where the issues set targets: 0.1 on both node counts, 0.05 and 0.02 on 4 nodes
        second_seeds = (0.1, 0.05, 0.02) if nodes == 4 else (0.1,)
        for budget in second_seeds:
            jobs.append(Job(f"{f}-n{nodes}-learned-{budget}-s1", f, nodes, budget, "learned", 1, "DISCO (learned)"))
        for budget in (0.1, 0.05) + ((0.02,) if nodes == 4 else ()):
            seeds = (0, 1) if budget in second_seeds else (0,)
            for seed in seeds:
                jobs.append(Job(f"{f}-n{nodes}-random-{budget}-s{seed}", f, nodes, budget, "random", seed,
                                "random groups"))
        for seed in (0, 1):
            jobs.append(Job(f"{f}-n{nodes}-nocomm-s{seed}", f, nodes, 0.0, "learned", seed, "no communication"))
    for budget, method, label in ((0.1, "learned", "DISCO (learned)"), (0.1, "random", "random groups"),
                                  (0.0, "learned", "no communication"), (1.0, "learned", "DISCO (learned)")):
        jobs.append(Job(f"resnet18-n2-{method}-{budget}-s0", "resnet18", 2, budget, method, 0, label))
    for budget, label in ((0.2, "DISCO (learned)"), (0.1, "DISCO (learned)"), (0.0, "no communication")):
        jobs.append(Job(f"vit_small-n4-learned-{budget}-s0", "vit_small", 4, budget, "learned", 0, label))
    for budget, method, label in ((1.0, "learned", "DISCO (learned)"), (0.1, "learned", "DISCO (learned)"),
                                  (0.1, "random", "random groups"), (0.0, "learned", "no communication")):
        jobs.append(Job(f"timm_resnet10t-n2-{method}-{budget}-s0", "timm_resnet10t", 2, budget, method, 0, label))
    for family in TASK_FAMILIES:
        for budget, label in ((1.0, "DISCO (learned)"), (0.2, "DISCO (learned)"), (0.1, "DISCO (learned)"),
                              (0.0, "no communication")):
            jobs.append(Job(f"{family}-n2-learned-{budget}-s0", family, 2, budget, "learned", 0, label))
    if quick:
        jobs = [j for j in jobs if j.family == "mobilenet_v2_w0.5" and j.nodes == 2 and j.seed == 0
                and j.budget in (1.0, 0.1, 0.0)]
        families = {"mobilenet_v2_w0.5": MOBILENET}
    return families, jobs


def _wanted(jobs: list[Job], rows: str | None) -> list[Job]:
    """The jobs whose name contains one of the comma-separated words, in the order of the words (the first
    word's rows train first); all jobs, in plan order, without --rows."""
    if not rows:
        return jobs
    words = rows.split(",")
    rank = {job.name: next((i for i, word in enumerate(words) if word in job.name), None) for job in jobs}
    return sorted((job for job in jobs if rank[job.name] is not None), key=lambda job: rank[job.name])


def _config(args, family: dict, out: Path, **overrides):
    from disco.training.config import TrainConfig
    values = dict(out=str(out), dense_epochs=args.dense_epochs, sparsify_epochs=args.sparsify_epochs,
                  finetune_epochs=args.finetune_epochs, train_subset=args.train_subset, test_subset=args.test_subset)
    values.update({k: v for k, v in family.items() if k not in ("dense_subset", "dense_epochs")})
    return replace(TrainConfig(**values), **overrides)  # a family may train on less data, or longer


def _run(config, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    from disco.training.pipeline import resume, train
    out = Path(config.out)
    if (out / "report.json").is_file():
        return json.loads((out / "report.json").read_text())
    return resume(out) if (out / "config.json").is_file() else train(config)  # an interrupted run continues


def run_dense(args, family_name: str, family: dict) -> Path:
    out = args.runs / f"{family_name}-dense"
    if not (out / "dense.safetensors").is_file() or not (out / "dense.json").is_file():
        config = _config(args, family, out, sparsify_epochs=0, finetune_epochs=0, budget=1.0, batch_size=128,
                         train_subset=family.get("dense_subset", args.dense_subset),
                         dense_epochs=family.get("dense_epochs", args.dense_epochs))
        _run(config, args.threads * args.jobs)
    return out


def _finished_elsewhere(runs: Path, jobs: list[Job], done: dict) -> dict:
    """Reports of rows not trained by this invocation (other families, --only) that an earlier one left."""
    return {job.name: json.loads((runs / job.name / "report.json").read_text()) for job in jobs
            if job.name not in done and (runs / job.name / "report.json").is_file()}


def training_minutes(runs: Path, families: list[str], jobs: list[Job], parallel: int) -> dict[str, float]:
    """Per family: its dense run's epochs plus its rows' epochs divided by `parallel` (rows run side by side)."""
    def seconds(run: Path) -> float:
        metrics = run / "metrics.jsonl"
        if not metrics.is_file():
            return 0.0
        return sum(json.loads(line)["seconds"] for line in metrics.read_text().splitlines())
    return {family: (seconds(runs / f"{family}-dense")
                     + sum(seconds(runs / job.name) for job in jobs if job.family == family) / parallel) / 60
            for family in families}


def _dense_score(run: Path) -> float:
    """The dense model's test metric (dense.json holds test_accuracy, test_miou, test_map or test_psnr)."""
    saved = json.loads((run / "dense.json").read_text())
    return next(v for k, v in saved.items() if k.startswith("test_"))


def _family_nodes_method_budget_down(item: tuple) -> tuple:
    (family, nodes, label, budget), _ = item
    return family, nodes, label, -budget


def summarise(results: dict[str, dict], jobs: list[Job], dense: dict[str, float], runs: Path) -> list[dict]:
    rows = {}
    for job in jobs:
        report = results.get(job.name)
        if report is None:
            continue
        key = (job.family, job.nodes, job.label, job.budget)
        rows.setdefault(key, []).append(report)
    table = []
    for (family, nodes, label, budget), reports in sorted(rows.items(), key=_family_nodes_method_budget_down):
        accuracies = [r.get("disco_score", r.get("disco_accuracy")) for r in reports]
        table.append({"family": family, "nodes": nodes, "method": label, "budget": budget,
                      "task": reports[0].get("task", "classification"), "metric": reports[0].get("metric", "accuracy"),
                      "seeds": len(reports), "accuracy": statistics.mean(accuracies),
                      "spread": (max(accuracies) - min(accuracies)) / 2 if len(accuracies) > 1 else None,
                      "ratio": statistics.mean(r["ratio"] for r in reports),
                      "bytes": statistics.mean(r["bytes_per_image"] for r in reports),
                      "dense_bytes": reports[0]["dense_bytes_per_image"],
                      "macs_max_node": statistics.mean(max(r["macs_per_node"]) for r in reports),
                      "model_macs": reports[0]["model_macs"], "dense_accuracy": dense[family],
                      "step_schedule": all("schedule" in r.get("training", {}) for r in reports),
                      "nested": _nested_scores(reports),
                      "lowest_epoch": min(_lowest_epoch_score(runs / job.name) for job in jobs
                                          if (family, nodes, label, budget) == (job.family, job.nodes, job.label,
                                                                                job.budget) and job.name in results)})
    return table


def _nested_scores(reports: list[dict]) -> dict[float, list[float]]:
    """{budget: [score per seed]} of nested runs (empty for the others)."""
    scores: dict[float, list[float]] = {}
    for report in reports:
        for entry in report.get("nested", []):
            scores.setdefault(entry["budget"], []).append(entry["score"])
    return scores


def with_earlier_rows(table: list[dict], earlier: Path) -> list[dict]:
    """The table, plus the rows of the committed table whose runs are no longer in --runs (trained by an earlier
    invocation, possibly under an earlier schedule: marked so, unless they say otherwise)."""
    if not earlier.is_file():
        return table
    key = lambda r: (r["family"], r["nodes"], r["method"], r["budget"])  # noqa: E731
    have = {key(r) for r in table}
    kept = [{"step_schedule": False, "lowest_epoch": None, **r,
             "nested": {float(b): scores for b, scores in r.get("nested", {}).items()}}  # JSON keys are strings
            for r in json.loads(earlier.read_text()) if key(r) not in have]
    order = {family: i for i, family in enumerate(plan(False)[0])}
    return sorted(table + kept, key=lambda r: (order.get(r["family"], len(order)), r["family"], r["nodes"],
                                               r["method"], -r["budget"]))


def _lowest_epoch_score(run: Path) -> float:
    """The lowest test score any sparsify or fine-tune epoch of the run logged (a collapse shows here)."""
    scores = [next(v for k, v in line.items() if k.startswith("test_"))
              for line in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if line["phase"] != "dense"]
    return min(scores) if scores else float("nan")


def render(table: list[dict], args, elapsed: float) -> str:
    lines = ["# Accuracy vs communication (Fashion-MNIST)", "",
             "Produced by `python bench/tradeoff.py" + (" --quick" if args.quick else "") +
             (f" --only {args.only}" if args.only else "") + (f" --rows {args.rows}" if args.rows else "")
             + _non_default_paths(args) + "`. The table's runs trained for "
             + ", ".join(f"{family} {minutes:.0f} min" for family, minutes in args.training_minutes.items())
             + f" (see below); this invocation took {elapsed / 60:.0f} min, reusing the runs it found. "
             f"Dense model trained once ({args.dense_epochs} epochs on "
             f"{args.dense_subset or 60000} images); every other row starts from it and gets the same "
             f"{args.sparsify_epochs} sparsify + {args.finetune_epochs} fine-tune epochs on "
             f"{args.train_subset or 60000} images (fine-tuning distils from the dense model). Test accuracy "
             f"on {args.test_subset or 10000} test images. 'DISCO (learned)' at budget 1.0 is the dense split "
             "given the same extra epochs. Spread = half the range over seeds. resnet18's rows train on 20,000 "
             "images (its dense model on all 60,000). vit_small (6 layers, 8 heads, "
             "width 256; about 20 min per 60k-image epoch on one CPU thread) trains on less: dense 2 epochs on "
             "20,000 images, its other rows on 10,000. Runs already in runs/tradeoff/ are reused, not retrained; "
             "the training times above are those logged in the runs' metrics.jsonl (summed, then divided by the "
             "runs trained side by side).", "",
             f"{SMALL} is a user's small dataset (issue 17): 4,000 training images, the dense model 6 epochs on "
             "them, every row 2 sparsify + 2 fine-tune epochs asked, which the step schedule (docs/method.md 4) "
             "runs as 10 + 10 epochs (at least 300 steps a phase); test on all 10,000 test images. Rows marked † "
             "were trained before the step schedule (no warm-up, cuts from the first step, BatchNorm statistics "
             "not restarted at cuts) and are kept from earlier runs; 'vs split' compares with the budget-1.0 row "
             "of the same model and nodes (marked † when that row is). 'lowest epoch' is the lowest test "
             "accuracy any sparsify or fine-tune epoch logged (of all seeds).", "",
             "| model | nodes | method | budget | seeds | accuracy | spread | vs dense (points) | vs split (points) "
             "| lowest epoch | ratio | bytes/image | largest node's MACs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in table if r["task"] == "classification"):
        spread = f"±{r['spread'] * 100:.2f}" if r["spread"] is not None else ""
        split = _row_of(table, r["family"], r["nodes"], "DISCO (learned)", 1.0)
        vs_split = f"{(r['accuracy'] - split['accuracy']) * 100:+.2f}" if split else ""
        lines.append(f"| {r['family']} | {r['nodes']} | {r['method']}{'' if r['step_schedule'] else ' †'} "
                     f"| {r['budget']} | {r['seeds']} | {r['accuracy'] * 100:.2f}% | {spread} "
                     f"| {(r['accuracy'] - r['dense_accuracy']) * 100:+.2f} | {vs_split} "
                     f"| {_percent(r['lowest_epoch'])} | {r['ratio']:.4f} | {r['bytes']:,.0f} of {r['dense_bytes']:,} "
                     f"| {r['macs_max_node'] / r['model_macs']:.1%} |")
    dense_rows = sorted({(r['family'], r['dense_accuracy']) for r in table if r["task"] == "classification"})
    lines += ["", "Dense model (one device): " + ", ".join(f"{f} {a * 100:.2f}%" for f, a in dense_rows), ""]
    lines += accuracy_targets(table)
    lines += render_tasks([r for r in table if r["task"] != "classification"])
    lines += ["![accuracy vs bytes](tradeoff.png)", ""]
    return "\n".join(lines)


def _non_default_paths(args) -> str:
    """--runs and --out as given, when they are not the defaults (so the header's command reproduces the table)."""
    paths = ((" --runs", args.runs, ROOT / "runs" / "tradeoff"), (" --out", args.out, ROOT / "docs" / "results"))
    return "".join(f"{flag} {path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path}"
                   for flag, path, default in paths if path.resolve() != default)


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.2f}%"


def _row_of(table: list[dict], family: str, nodes: int, method: str, budget: float) -> dict | None:
    return next((r for r in table if (r["family"], r["nodes"], r["method"], r["budget"]) == (family, nodes, method,
                                                                                                budget)), None)


def _within(row: dict | None, reference: dict | None, points: float) -> tuple[str, str]:
    """(measured gap, verdict) of `row` against `reference` for a target of at most `points` below it."""
    if row is None or reference is None:
        return "not run", "—"
    gap = (row["accuracy"] - reference["accuracy"]) * 100
    marks = "" if row["step_schedule"] and reference["step_schedule"] else " (†)"
    verdict = "met" if gap >= -points else f"missed by {-gap - points:.2f} points"
    return f"{gap:+.2f} points ({row['seeds']} and {reference['seeds']} seeds){marks}", verdict


def accuracy_targets(table: list[dict]) -> list[str]:
    """Issue 17's targets, each measured from the table above."""
    small, full = SMALL, "mobilenet_v2_w0.5"
    lines = ["## Targets of issue 17 (from the table above; vs the dense split trained alike)", "",
             "| target | measured | verdict |", "|---|---|---|"]
    split4k = _row_of(table, small, 4, "DISCO (learned)", 1.0)
    lines.append("| 4k images, 4 nodes: budget 0.1 within 1.5 points | %s | %s |"
                 % _within(_row_of(table, small, 4, "DISCO (learned)", 0.1), split4k, 1.5))
    nocomm = _row_of(table, small, 4, "no communication", 0.0)
    if nocomm is not None:
        learned = [r for r in table if r["family"] == small and r["method"] == "DISCO (learned)"]
        worst = min(learned, key=lambda r: r["accuracy"], default=None)
        if worst is not None:
            lines.append(f"| 4k: never below no communication ({nocomm['accuracy'] * 100:.2f}%) at any budget "
                         f"| lowest: budget {worst['budget']} at {worst['accuracy'] * 100:.2f}% | "
                         f"{'met' if worst['accuracy'] >= nocomm['accuracy'] else 'missed'} |")
        sparse_rows = [r for r in table if r["family"] == small and r["method"] != "no communication"
                       and r["lowest_epoch"] is not None]
        lowest = min(sparse_rows, key=lambda r: r["lowest_epoch"], default=None)
        if lowest is not None:
            lines.append(f"| 4k: no epoch of any phase below no communication | lowest epoch "
                         f"{lowest['lowest_epoch'] * 100:.2f}% ({lowest['method']} {lowest['budget']}) | "
                         f"{'met' if lowest['lowest_epoch'] >= nocomm['accuracy'] else 'missed'} |")
    split60k = _row_of(table, full, 4, "DISCO (learned)", 1.0)
    for budget, points in ((0.05, 0.5), (0.02, 1.0)):
        lines.append(f"| 60k images, 4 nodes: budget {budget} within {points} points | %s | %s |"
                     % _within(_row_of(table, full, 4, "DISCO (learned)", budget), split60k, points))
    for family in (small, full):
        for nodes in (2, 4):
            for budget, (label, name) in product((0.1, 0.05, 0.02), (("DISCO (learned)", "learned"),
                                                                       (GATES_LABEL, "learned gates"))):
                learned = _row_of(table, family, nodes, label, budget)
                chance = _row_of(table, family, nodes, "random groups", budget)
                if learned is None or chance is None:
                    continue
                lead = (learned["accuracy"] - chance["accuracy"]) * 100
                spread = max(learned["spread"] or 0.0, chance["spread"] or 0.0) * 100
                seeds = min(learned["seeds"], chance["seeds"])
                verdict = ("met" if lead > spread else "missed") if seeds > 1 else "one seed: not judged"
                marks = "" if learned["step_schedule"] and chance["step_schedule"] else " (†)"
                lines.append(f"| {family}, {nodes} nodes, budget {budget}: {name} above random by more than the "
                             f"seed spread | {lead:+.2f} points, spread ±{spread:.2f}{marks} | {verdict} |")
    return lines + gates_against_importance(table) + nested_targets(table)


def gates_against_importance(table: list[dict]) -> list[str]:
    """Learned gates (straight-through scores) against gradient importance, wherever both ran."""
    lines = []
    for gates in (r for r in table if r["method"] == GATES_LABEL):
        learned = _row_of(table, gates["family"], gates["nodes"], "DISCO (learned)", gates["budget"])
        if learned is None:
            continue
        lead = (gates["accuracy"] - learned["accuracy"]) * 100
        spread = max(gates["spread"] or 0.0, learned["spread"] or 0.0) * 100
        verdict = ("one seed: not judged" if min(gates["seeds"], learned["seeds"]) < 2 else "gates better"
                   if lead > spread else "importance better" if -lead > spread else "no difference beyond the spread")
        lines.append(f"| {gates['family']}, {gates['nodes']} nodes, budget {gates['budget']}: learned gates vs "
                     f"gradient importance | {gates['accuracy'] * 100:.2f}% vs {learned['accuracy'] * 100:.2f}%: "
                     f"{lead:+.2f} points, spread ±{spread:.2f} ({gates['seeds']} and {learned['seeds']} seeds) "
                     f"| {verdict} |")
    return lines


def nested_targets(table: list[dict]) -> list[str]:
    """Each budget of the one nested model against the model trained for that budget alone."""
    rows = [r for r in table if r["method"] == NESTED_LABEL]
    lines = []
    for row in rows:
        for budget, scores in sorted(row["nested"].items(), reverse=True):
            alone = _row_of(table, row["family"], row["nodes"], "DISCO (learned)", budget)
            score = statistics.mean(scores)
            if alone is None:
                lines.append(f"| {row['family']}, {row['nodes']} nodes, nested model at {budget}: "
                             f"{score * 100:.2f}% ({len(scores)} seeds) | no model trained for {budget} alone | — |")
                continue
            gap = (score - alone["accuracy"]) * 100
            lines.append(f"| {row['family']}, {row['nodes']} nodes: the nested model at {budget} within 0.3 points "
                         f"of one trained for {budget} alone | {score * 100:.2f}% vs {alone['accuracy'] * 100:.2f}%: "
                         f"{gap:+.2f} points ({len(scores)} and {alone['seeds']} seeds) | "
                         f"{'met' if gap >= -0.3 else f'missed by {-gap - 0.3:.2f} points'} |")
    return lines + [""]


def _shown(value: float, metric: str) -> str:
    return f"{value:.2f} dB" if metric == "psnr" else f"{value * 100:.2f}%"


def render_tasks(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["## Dense prediction (2 nodes)", "",
             "Segmentation: disco:fcn_resnet18 (ResNet-18 to layer3, FCN head) on 64x64 Fashion-MNIST scenes, "
             "mIoU over 11 classes (background included). Detection: disco:retinanet_resnet18 (ResNet-18 + FPN "
             "64 wide + RetinaNet heads) on 96x96 scenes, COCO mAP@[0.5:0.95]; anchors, decoding and NMS run on "
             "node 0 from the split heads' maps. Super-resolution: disco:edsr (4 residual blocks, 32 wide, "
             "PixelShuffle x2) on Fashion-MNIST 14x14 -> 28x28, PSNR. Each family's dense model trains "
             "from scratch on CPU (see SEGMENTATION/DETECTION/SUPERRES in bench/tradeoff.py for sizes and "
             "epochs); every row then gets 1 sparsify + 1 fine-tune epoch with distillation (segmentation and "
             "detection rows at batch 32 and a quarter of the learning rate: their 2000 scenes make too few steps "
             "at batch 128, see SPARSE_ROWS_ON_FEW_SCENES). Budget 1.0 is the dense split given the same extra "
             "epochs, the fair reference: the dense models are not converged.", "",
             "| task | model | method | budget | metric | score | vs dense | vs dense split (1.0) | ratio "
             "| bytes/image |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reference = next((x["accuracy"] for x in rows if x["family"] == r["family"] and x["budget"] == 1.0), None)
        scale = METRIC_SCALE[r["metric"]]
        unit = " dB" if r["metric"] == "psnr" else " points"
        split_gap = f"{(r['accuracy'] - reference) * scale:+.2f}{unit}" if reference is not None else ""
        dense_gap = f"{(r['accuracy'] - r['dense_accuracy']) * scale:+.2f}{unit}"
        lines.append(f"| {r['task']} | {r['family']} | {r['method']} | {r['budget']} | {r['metric']} "
                     f"| {_shown(r['accuracy'], r['metric'])} | {dense_gap} "
                     f"| {split_gap} | {r['ratio']:.4f} | {r['bytes']:,.0f} of {r['dense_bytes']:,} |")
    dense = sorted({(r["family"], r["metric"], r["dense_accuracy"]) for r in rows})
    lines += ["", "Dense models (one device): " + ", ".join(f"{f} {m} {_shown(v, m)}" for f, m, v in dense)]
    if any(r["task"] == "superres" for r in rows):
        lines += ["", f"Bicubic upscaling of the same test images (no network): {bicubic_psnr(SUPERRES):.2f} dB."]
    return lines + [""]


def bicubic_psnr(family: dict) -> float:
    """PSNR of plain bicubic x2 upscaling on the super-resolution family's test images (the baseline)."""
    import torch
    from disco.data.superres import bicubic_upscale, psnr
    from disco.tasks.data import load_task_data
    data = load_task_data("superres", test_size=family["test_subset"])
    low, high = (torch.stack(t) for t in zip(*(data.test[i] for i in range(len(data.test)))))
    return float(psnr(bicubic_upscale(low, 2), high))


def plot(table: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = sorted({(r["family"], r["nodes"]) for r in table})
    columns = min(2, len(panels))
    grid_rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(grid_rows, columns, figsize=(6 * columns, 4.2 * grid_rows), squeeze=False)
    for ax in axes.flatten()[len(panels):]:
        ax.set_visible(False)
    styles = (("DISCO (learned)", "o-", "tab:blue"), (GATES_LABEL, "D:", "tab:purple"),
              ("random groups", "s--", "tab:orange"),
              ("no communication", "^", "tab:green"))
    for ax, (family, nodes) in zip(axes.flatten(), panels):
        rows = [r for r in table if r["family"] == family and r["nodes"] == nodes]
        for method, marker, color in styles:
            scale = METRIC_SCALE[rows[0]["metric"]]
            points = sorted((max(r["bytes"], 1.0), r["accuracy"] * scale, (r["spread"] or 0) * scale)
                            for r in rows if r["method"] == method)
            if points:
                xs, ys, es = zip(*points)
                ax.errorbar(xs, ys, yerr=es, fmt=marker, color=color, capsize=3, label=method)
        ax.axhline(rows[0]["dense_accuracy"] * METRIC_SCALE[rows[0]["metric"]], color="grey", linestyle=":",
                   label="dense, one device")
        ax.set_xscale("log")
        ax.set_xlabel("bytes sent per image (fp32; no communication drawn at 1)")
        ax.set_ylabel({"accuracy": "test accuracy (%)", "miou": "mIoU (%)", "map": "mAP (%)",
                       "psnr": "PSNR (dB)"}[rows[0]["metric"]])
        ax.set_title(f"{family}, {nodes} nodes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: few samples, few jobs")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "tradeoff")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--only", default=None,
                        help="train only families whose name contains one of these comma-separated words "
                             "(rows of the others already in --runs are kept in the table)")
    parser.add_argument("--rows", default=None,
                        help="train only the rows whose run name contains one of these comma-separated words, in "
                             "the order of the words, e.g. '4k-,n4-learned-0.02' (the other rows come from --runs or "
                             "the committed table)")
    args = parser.parse_args()
    args.dense_epochs, args.sparsify_epochs, args.finetune_epochs = 2, 1, 1
    # every row sees all 60k images once per phase: on 20k (the schedule before) the pruned models had too few
    # steps to recover (4 nodes, budget 0.1: 83.94% vs 88.09% on 60k, dense 87.87%)
    args.dense_subset, args.train_subset, args.test_subset = None, None, None
    if args.quick:
        args.dense_epochs, args.dense_subset, args.train_subset, args.test_subset = 1, 2000, 1000, 1000
    started = time.perf_counter()
    families, jobs = plan(args.quick)
    wanted = args.only.split(",") if args.only else None
    chosen = {k: v for k, v in families.items() if not wanted or any(w in k for w in wanted)}
    dense_runs = {name: run_dense(args, name, family) for name, family in chosen.items()}
    configs = {job.name: _config(args, families[job.family], args.runs / job.name, nodes=job.nodes,
                                 budget=job.budget, method=job.method, seed=job.seed, nested=list(job.nested),
                                 dense_run=str(dense_runs[job.family]))
               for job in _wanted(jobs, args.rows) if job.family in chosen}
    results = {}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {name: pool.submit(_run, config, args.threads) for name, config in configs.items()}
        for name, future in futures.items():
            results[name] = future.result()
            score = results[name].get("disco_score", results[name].get("disco_accuracy"))
            print(f"done {name}: score {score:.4f} ratio {results[name]['ratio']:.4f}", flush=True)
    results.update(_finished_elsewhere(args.runs, jobs, results))
    dense = {name: _dense_score(args.runs / f"{name}-dense") for name in families
             if (args.runs / f"{name}-dense" / "dense.json").is_file()}
    table = summarise(results, [job for job in jobs if job.family in dense], dense, args.runs)
    table = with_earlier_rows(table, args.out / ("tradeoff-quick.json" if args.quick else "tradeoff.json"))
    args.training_minutes = training_minutes(args.runs, [f for f in dense if f in (SMALL, "mobilenet_v2_w0.5", "resnet18")],
                                             jobs, args.jobs)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "tradeoff-quick" if args.quick else "tradeoff"
    (args.out / f"{stem}.json").write_text(json.dumps(table, indent=1))
    plot(table, args.out / f"{stem}.png")
    text = render(table, args, time.perf_counter() - started).replace("tradeoff.png", f"{stem}.png")
    (args.out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
