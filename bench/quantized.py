"""Accuracy vs bytes per image with quantised messages (Fashion-MNIST, mobilenet_v2 width 0.5, 4 nodes).

Rows, all from one dense model (bench/tradeoff.py's, shared through runs/tradeoff/):
  - the dense split with every channel sent, in fp32, fp16, bf16, int8 and int4 (no training: peers' honest
    baseline, quantised activations need none);
  - DISCO at budget 0.1 trained for fp32, for int8 and for int4 (`disco train --dtype`), 2 seeds each;
  - the fp32-trained DISCO 0.1 runs with int8 / int4 messages switched on afterwards (no retraining).
Bytes are the cost report's per image in the row's dtype (codes plus their scales). Writes
docs/results/quantized.{md,json,png}. Re-run:
    .venv/bin/python bench/quantized.py            # about 80 minutes on 2 CPU cores
    .venv/bin/python bench/quantized.py --quick    # smoke version (numbers not meaningful)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import tradeoff  # noqa: E402  (bench/tradeoff.py: the dense model, run configs)

FAMILY = "mobilenet_v2_w0.5"
NODES, BUDGET, SEEDS = 4, 0.1, (0, 1)
TRAINED_DTYPES = ("fp32", "int8", "int4")
UNTRAINED_DTYPES = ("fp32", "fp16", "bf16", "int8", "int4")


def job_name(dtype: str, seed: int) -> str:
    suffix = "" if dtype == "fp32" else f"-{dtype}"  # the fp32 rows are bench/tradeoff.py's own runs
    return f"{FAMILY}-n{NODES}-learned-{BUDGET}-s{seed}{suffix}"


def scorer(dense_run: Path, test_subset: int | None):
    """(score(model), example input) on the dense run's test images."""
    from torch.utils.data import DataLoader

    from disco.tasks.registry import get_task
    from disco.training.config import TrainConfig
    from disco.training.loops import evaluate
    import torch

    config = TrainConfig.load(dense_run / "config.json")
    config = type(config)(**{**config.__dict__, "test_subset": test_subset})
    data = config.load_data()
    objective = get_task(config.task).objective(classes=data.classes, model=None, image_size=data.image_size)
    loader = DataLoader(data.test, batch_size=256, collate_fn=objective.collate)

    def score(model) -> float:
        return evaluate(model, loader, objective, device=torch.device("cpu"), desc="eval")
    return score, data.test[0][0][None], config


def untrained_rows(dense_run: Path, test_subset: int | None) -> list[dict]:
    """The dense split (every group kept) with each dtype's rounding, and its bytes."""
    import disco
    from disco.models import build_for_data
    from disco.training import checkpoint

    score, example, config = scorer(dense_run, test_subset)
    data = config.load_data()
    model = build_for_data(config.model, channels=data.channels, classes=data.classes, stem_stride=config.stem_stride,
                           **config.model_kwargs)
    checkpoint.load_model_state(model, dense_run / "dense.safetensors")
    simulated = disco.partition(model.eval(), nodes=NODES, example_inputs=example)
    rows = []
    for dtype in UNTRAINED_DTYPES:
        disco.set_transport(simulated, dtype)
        costs = disco.cost_report(simulated, example, transport_dtype=dtype)
        rows.append({"row": "dense split (no training)", "dtype": dtype, "seeds": 1, "accuracy": score(simulated),
                     "spread": None, "bytes": costs.traffic.bytes})
    return rows


def switched_rows(runs: Path, dense_run: Path, test_subset: int | None) -> list[dict]:
    """The fp32-trained DISCO runs, exported at int8/int4 without retraining."""
    import disco
    from disco.models import build_for_data
    from disco.training import checkpoint

    score, example, config = scorer(dense_run, test_subset)
    data = config.load_data()
    rows = []
    for dtype in ("int8", "int4"):
        accuracies, sizes = [], []
        for seed in SEEDS:
            run = runs / job_name("fp32", seed)
            if not (run / "disco.safetensors").is_file():
                continue
            model = build_for_data(config.model, channels=data.channels, classes=data.classes,
                                   stem_stride=config.stem_stride, **config.model_kwargs)
            simulated = disco.partition(model, nodes=NODES, example_inputs=example)
            checkpoint.load_model_state(simulated, run / "disco.safetensors")
            disco.set_transport(simulated.eval(), dtype)
            accuracies.append(score(simulated))
            sizes.append(disco.cost_report(simulated, example, transport_dtype=dtype).traffic.bytes)
        if accuracies:
            rows.append(_row(f"DISCO {BUDGET}, trained for fp32, sent as {dtype}", dtype, accuracies, sizes))
    return rows


def _row(label: str, dtype: str, accuracies: list[float], sizes: list[int]) -> dict:
    return {"row": label, "dtype": dtype, "seeds": len(accuracies), "accuracy": statistics.mean(accuracies),
            "spread": (max(accuracies) - min(accuracies)) / 2 if len(accuracies) > 1 else None,
            "bytes": statistics.mean(sizes)}


def render(rows: list[dict], dense_accuracy: float, args, elapsed: float) -> str:
    fp32 = next((r for r in rows if r["row"] == f"DISCO {BUDGET}, trained for fp32"), None)
    lines = ["# Quantised messages: accuracy vs bytes (Fashion-MNIST, mobilenet_v2 width 0.5, 4 nodes)", "",
             f"Produced by `python bench/quantized.py{' --quick' if args.quick else ''}` in {elapsed / 60:.0f} min. "
             "Every row starts from bench/tradeoff.py's dense model (one device: "
             f"{dense_accuracy * 100:.2f}%); DISCO rows get its 1 sparsify + 1 fine-tune epochs (distilled), "
             "trained with the row's dtype rounding the channels that cross the network (straight-through). "
             "Bytes per image are the cost report's in the row's dtype: values plus the (low, step) float32 pair "
             "of each channel (or of each message, for channels under 64 values). Spread = half the range over "
             "seeds.", "",
             "| row | dtype | seeds | accuracy | spread | vs DISCO 0.1 fp32 (points) | bytes/image |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = f"±{r['spread'] * 100:.2f}" if r["spread"] is not None else ""
        versus = f"{(r['accuracy'] - fp32['accuracy']) * 100:+.2f}" if fp32 else ""
        lines.append(f"| {r['row']} | {r['dtype']} | {r['seeds']} | {r['accuracy'] * 100:.2f}% | {spread} | "
                     f"{versus} | {r['bytes']:,.0f} |")
    int8 = next((r for r in rows if r["row"] == f"DISCO {BUDGET}, trained for int8"), None)
    if fp32 and int8:
        gap = (int8["accuracy"] - fp32["accuracy"]) * 100
        lines += ["", f"- target: DISCO {BUDGET} int8 within 0.2 points of DISCO {BUDGET} fp32: {gap:+.2f} points "
                  f"({'met' if gap >= -0.2 else 'missed'}), with {fp32['bytes'] / int8['bytes']:.1f}x fewer bytes."]
    lines += ["", "![accuracy vs bytes per image, every dtype](quantized.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict], dense_accuracy: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"fp32": "o", "fp16": "s", "bf16": "D", "int8": "^", "int4": "v"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds = (("dense split (no training)", "tab:gray", "dense split, every channel, no training"),
             (f"DISCO {BUDGET}, trained for ", "tab:blue", f"DISCO {BUDGET}, trained for its dtype"),
             (f"DISCO {BUDGET}, trained for fp32, sent as", "tab:orange", f"DISCO {BUDGET}, trained for fp32, sent as"))
    for prefix, color, label in kinds:
        chosen = [r for r in rows if r["row"].startswith(prefix)
                  and (color != "tab:blue" or "sent as" not in r["row"])]
        for r in chosen:
            ax.scatter(r["bytes"], r["accuracy"] * 100, marker=markers[r["dtype"]], color=color, s=50)
            ax.annotate(r["dtype"], (r["bytes"], r["accuracy"] * 100), textcoords="offset points", xytext=(5, 3),
                        fontsize=8)
        ax.scatter([], [], color=color, label=label)
    ax.axhline(dense_accuracy * 100, color="black", linestyle=":", label="dense, one device")
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent per image (log; every dtype, scales included)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{FAMILY}, {NODES} nodes: sparsity and quantisation on one axis")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few images, one seed: a smoke run")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "tradeoff")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained side by side (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    args = parser.parse_args()
    # the same schedule as bench/tradeoff.py's classification rows
    args.dense_epochs, args.sparsify_epochs, args.finetune_epochs = 2, 1, 1
    args.dense_subset, args.train_subset, args.test_subset = None, None, None
    seeds = SEEDS
    if args.quick:
        args.dense_epochs, args.dense_subset, args.train_subset, args.test_subset = 1, 2000, 1000, 1000
        args.runs, seeds = args.runs.with_name(args.runs.name + "-quick"), (0,)
    started = time.perf_counter()
    family = tradeoff.MOBILENET
    dense_run = tradeoff.run_dense(args, FAMILY, family)
    configs = {job_name(dtype, seed): tradeoff._config(args, family, args.runs / job_name(dtype, seed), nodes=NODES,
                                                        budget=BUDGET, method="learned", seed=seed,
                                                        dense_run=str(dense_run), transport_dtype=dtype)
               for dtype in TRAINED_DTYPES for seed in seeds}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        reports = dict(zip(configs, pool.map(tradeoff._run, configs.values(), [args.threads] * len(configs))))
    rows = untrained_rows(dense_run, args.test_subset)
    for dtype in TRAINED_DTYPES:
        chosen = [reports[job_name(dtype, seed)] for seed in seeds]
        rows.append(_row(f"DISCO {BUDGET}, trained for {dtype}", dtype,
                         [r.get("disco_score", r.get("disco_accuracy")) for r in chosen],
                         [r["bytes_per_image"] for r in chosen]))
    rows += switched_rows(args.runs, dense_run, args.test_subset)
    dense_accuracy = tradeoff._dense_score(dense_run)
    stem = "quantized-quick" if args.quick else "quantized"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    plot(rows, dense_accuracy, args.out / f"{stem}.png")
    text = render(rows, dense_accuracy, args, time.perf_counter() - started).replace("quantized.png", f"{stem}.png")
    (args.out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
