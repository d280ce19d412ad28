"""What a distributed run reports: the summary rank 0 builds (written by --summary) and the lines it prints."""
from __future__ import annotations

import statistics

from disco.export.manifest import Manifest
from disco.runtime.comm import CATEGORIES


def summarise(result: dict, sent: dict, manifest: Manifest, nodes: int, backend: str, level: int = 0) -> dict:
    """`level`: the budget level the run used (a deployment carrying several: its simulation is that level's)."""
    run = result["images_run"]  # every image of every forward, warm-up included: what the counters saw
    expected = manifest.expected_at(level)
    nested = manifest.budgets()
    forwards = len(result["latencies_s"])
    per_image = {c: sum(map(sum, sent[c])) / run if run else 0.0 for c in CATEGORIES}
    return {
        "nodes": nodes, "backend": backend, "transport_dtype": manifest.transport_dtype,
        "images": result["images"], "images_run": run, "forwards": forwards,
        "inflight": result["inflight"], "images_per_s": result["images_per_s"],
        "latency_s": {"median": statistics.median(result["latencies_s"]) if forwards else None,
                      "all": result["latencies_s"]},
        "accuracy": result["accuracy"], "metric": result["metric"], "score": result["score"],
        "reference": manifest.reference_at(level),
        "budget": nested.budgets[level] if nested is not None else None,
        "bytes_sent": sent, "bytes_per_image": per_image,
        "expected_per_image": {"activations": expected.bytes, "norm": expected.norm_bytes,
                               "fallback": expected.fallback_bytes, "input": expected.io_bytes.input,
                               "output": expected.io_bytes.output},
        "predictions": result["predictions"],
    }


def print_summary(summary: dict) -> None:
    for p in summary["predictions"][:50]:
        print(f"{p['input']}: {p['text']}")
    if len(summary["predictions"]) > 50:
        print(f"... {len(summary['predictions']) - 50} more predictions (see --summary)")
    if summary["score"] is not None:
        metric, reference = summary["metric"], summary["reference"] or {}
        also = f" (simulation: {reference[metric]:.4f})" if reference.get(metric) is not None else ""
        print(f"{metric} on {summary['images']} test images: {summary['score']:.4f}{also}")
    if summary["latency_s"]["median"] is not None:
        rate = summary["images_per_s"]
        print(f"latency: median {summary['latency_s']['median'] * 1000:.2f} ms per batch over {summary['forwards']} "
              f"runs ({summary['nodes']} ranks, {summary['backend']}, {summary['inflight']} in flight)"
              + (f"; {rate:.1f} images/s" if rate else ""))
    actual, expected = summary["bytes_per_image"], summary["expected_per_image"]
    budget = f", budget {summary['budget']}" if summary.get("budget") is not None else ""
    print(f"bytes per image ({summary['transport_dtype']}{budget}): activations {actual['activations']:,.0f} "
          f"(simulation {expected['activations']:,}), input {actual['input']:,.0f} ({expected['input']:,}), "
          f"output {actual['output']:,.0f} ({expected['output']:,})"
          + (f", norm sums {actual['norm']:,.0f} ({expected['norm']:,})" if expected["norm"] else "")
          + (f", moved by fallbacks {actual['fallback']:,.0f} ({expected['fallback']:,})" if expected["fallback"]
             else ""))
    for rank, row in enumerate(summary["bytes_sent"]["activations"]):
        print(f"  rank {rank} sent {sum(row):,} activation bytes in total: " +
              ", ".join(f"{b:,} to rank {dst}" for dst, b in enumerate(row) if dst != rank))
    if summary.get("profile"):
        print(f"profile: per-layer compute, waiting and bytes in {summary['profile']}; traces rankK.trace.json "
              "beside it (open in ui.perfetto.dev)")

