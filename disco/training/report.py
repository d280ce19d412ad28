"""report.json and report.md of a training run: accuracy dense vs DISCO next to the costs."""
from __future__ import annotations

import json
from dataclasses import asdict

from disco.accounting import cost_report
from disco.accounting.costs import CostReport
from disco.files import write_text_atomically


def _row(label: str, values: list, fmt) -> str:
    return f"| {label} | " + " | ".join(fmt(v) for v in values) + " |"


def write_report(run, simulated, score: float, *, nested: list[dict] | None = None) -> dict:
    """`score` is the DISCO model's test metric (run.objective.metric_name); classification runs also
    report it as dense_accuracy / disco_accuracy."""
    config = run.config
    metric = run.objective.metric_name
    costs = cost_report(simulated.cpu(), run.example.cpu(), transport_dtype=config.transport_dtype)
    simulated.to(run.device)
    traffic = costs.traffic
    report = {
        "model": config.model, "model_kwargs": config.model_kwargs, "dataset": run.data.name,
        "nodes": config.nodes, "budget": config.budget, "method": config.method,
        "task": config.task, "metric": metric, "dense_score": run.dense_score, "disco_score": score,
        **({"dense_accuracy": run.dense_score, "disco_accuracy": score} if metric == "accuracy" else {}),
        "ratio": traffic.ratio, "bytes_per_image": traffic.bytes, "dense_bytes_per_image": traffic.dense_bytes,
        "transport_dtype": traffic.transport_dtype,
        "macs_per_node": costs.compute.macs_per_node, "dense_macs_per_node": costs.compute.dense_macs_per_node,
        "model_macs": costs.compute.model_macs,
        "param_bytes_per_node": costs.memory.param_bytes_per_node,
        "dense_param_bytes_per_node": costs.memory.dense_param_bytes_per_node,
        "io_bytes": asdict(traffic.io_bytes),
        "training": training_epochs(config, run.schedules, run.dense_weights),
        **({"nested": nested} if nested else {}),
        **_uneven(config, costs),
    }
    write_text_atomically(run.out / "report.json", json.dumps(report, indent=1))
    write_text_atomically(run.out / "report.md", render(report))
    print(render(report))
    return report


def _uneven(config, costs: CostReport) -> dict:
    """Node weights and per-link budgets when given; a latency-budget run: the budget, and the plan's predicted
    latency on its topology (disco plan); its byte `budget` is then not what the run aimed at (None)."""
    found = {"node_weights": config.node_weights} if config.node_weights else {}
    if config.link_budget:
        found["link_budget"] = config.link_budget
    if config.latency_budget_ms is not None:
        from disco.planning.latency import predict

        prediction = predict(costs.expected(), config.load_topology())
        found.update({"budget": None, "latency_budget_ms": config.latency_budget_ms, "topology": config.topology,
                      "predicted_latency_ms": prediction.latency_s * 1e3})
    return found


def training_epochs(config, schedules: dict, given: str | None) -> dict:
    """How much training each side of the comparison had: the dense model's epochs (None: it was loaded from the
    file `given`), and DISCO's sparsify and fine-tune epochs on top of it, as they ran (more than asked on small
    data; `schedule`: each phase's steps, learning rate and warm-up, disco.training.schedule)."""
    return {"dense_epochs": None if given else config.dense_epochs, "dense_weights": given,
            "sparsify_epochs": schedules["sparsify"].epochs, "finetune_epochs": schedules["finetune"].epochs,
            "schedule": {phase: schedule.record() for phase, schedule in schedules.items()}}


def _training_lines(r: dict) -> list[str]:
    """Which side trained how long, and, when DISCO scores above the dense model after more epochs, that the
    extra epochs may be where the gain comes from (an old report.json without this says nothing)."""
    t = r.get("training")
    if not t:
        return []
    extra = t["sparsify_epochs"] + t["finetune_epochs"]
    dense = f"{t['dense_epochs']} epochs" if t["dense_epochs"] is not None else f"given weights ({t['dense_weights']})"
    lines = [f"- training: dense model {dense}; DISCO starts from it and trains {t['sparsify_epochs']} sparsify + "
             f"{t['finetune_epochs']} fine-tune epochs more" + _steps_said(t.get("schedule"))]
    dense_score, disco_score = r.get("dense_score"), r.get("disco_score")
    if extra and dense_score is not None and disco_score is not None and disco_score > dense_score:
        lines.append(f"- DISCO had {extra} more epochs of training than the dense model it is compared with: part of "
                     "its lead may come from that, not from the split (bench/tradeoff.py compares with the dense "
                     "split trained alike)")
    return lines


def _steps_said(schedule: dict | None) -> str:
    """' (N + M steps; ...)': the sparse phases' steps, and whether small data was repeated to reach them."""
    if not schedule:
        return ""
    sparse = [schedule[phase] for phase in ("sparsify", "finetune")]
    parts = [f"{sparse[0]['steps']} + {sparse[1]['steps']} steps"]
    if any(plan["epochs"] > plan["asked_epochs"] for plan in sparse):
        parts.append(f"{sparse[0]['asked_epochs']} + {sparse[1]['asked_epochs']} epochs were asked: the data is "
                     "small, and was repeated so that each sparse phase has the steps it needs")
    return " (" + "; ".join(parts) + ")"


def _nested_lines(r: dict) -> list[str]:
    """One line per nested budget of the one model: its score and bytes."""
    metric = r.get("metric", "accuracy")
    return [f"- nested budget {n['budget']}: {metric} {n['score']:.4f}, {n['bytes_per_image']:,} bytes per image "
            f"(ratio {n['ratio']:.4f})" for n in r.get("nested", [])]


def _score_line(r: dict) -> str:
    metric = r.get("metric", "accuracy")
    dense, disco = r.get("dense_score", r.get("dense_accuracy")), r.get("disco_score", r.get("disco_accuracy"))
    gap = f"{disco - dense:+.2f} dB" if metric == "psnr" else f"{(disco - dense) * 100:+.2f} points"
    return f"- {metric}: dense {dense:.4f}, DISCO {disco:.4f} ({gap})"


def _budget_words(r: dict) -> str:
    if "latency_budget_ms" in r:
        return f"latency budget {r['latency_budget_ms']} ms"
    return f"budget {r['budget']}"


def render(r: dict) -> str:
    nodes = r["nodes"]
    less = 1 / r["ratio"] if r["ratio"] else float("inf")
    head = "| per image | " + " | ".join(f"node {k}" for k in range(nodes)) + " |"
    lines = [
        f"# DISCO run: {r['model']} on {r['dataset']}, {nodes} nodes, {_budget_words(r)} ({r['method']})",
        "",
        _score_line(r),
        *_training_lines(r),
        f"- communication: {r['bytes_per_image']:,} of {r['dense_bytes_per_image']:,} bytes per image "
        f"({r['transport_dtype']}), ratio {r['ratio']:.4f} ({less:.1f}x less)",
        f"- whole model: {r['model_macs']:,} MACs",
        *_nested_lines(r),
        *([f"- predicted latency on {r['topology']}: {r['predicted_latency_ms']:.1f} ms per image (budget "
           f"{r['latency_budget_ms']} ms)"] if "latency_budget_ms" in r else []),
        "",
        head,
        "|---" * (nodes + 1) + "|",
        _row("MACs (DISCO)", r["macs_per_node"], lambda v: f"{v:,}"),
        _row("MACs (dense split)", r["dense_macs_per_node"], lambda v: f"{v:,}"),
        _row("parameter bytes (DISCO)", r["param_bytes_per_node"], lambda v: f"{v:,}"),
        _row("parameter bytes (dense split)", r["dense_param_bytes_per_node"], lambda v: f"{v:,}"),
        "",
    ]
    return "\n".join(lines)
