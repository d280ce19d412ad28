"""Dense accounting of torchvision ResNet-50 at 224x224 split across 2 and 4 nodes.

Writes docs/results/accounting.md. Re-run: `.venv/bin/python bench/accounting.py` (about a minute on 2 CPU cores).
Numbers are exact counts (no timing), so they are the same on every machine.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torchvision

import disco

ROOT = Path(__file__).resolve().parents[1]


def _mb(value: float) -> str:
    return f"{value / 1e6:.2f}"


def measure(nodes: int, size: int) -> dict:
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.zeros(1, 3, size, size)
    return disco.cost_report(disco.partition(model, nodes=nodes, example_inputs=x), x).to_json()


def render(reports: dict[int, dict], size: int) -> str:
    lines = [
        "# Accounting: torchvision ResNet-50, dense split",
        "",
        f"Input 3x{size}x{size}, per image, every communication group kept (the dense within-layer split).",
        "Produced by `python bench/accounting.py`; exact counts from `disco.cost_report`, cross-checked in",
        "tests against forward-hook counts and `torch.utils.flop_counter`.",
        "",
        "| nodes | sent per image, fp32 (MB) | fp16 (MB) | int8 (MB) | groups | MACs per node (G) "
        "| parameter MB per node | peak activation MB per node | input scatter / output gather (bytes) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for nodes, r in reports.items():
        by = r["bytes_by_dtype"]
        lines.append(
            f"| {nodes} | {_mb(by['fp32']['dense_bytes'])} | {_mb(by['fp16']['dense_bytes'])} "
            f"| {_mb(by['int8']['dense_bytes'])} | {r['groups_total']:,} "
            f"| {' / '.join(f'{m / 1e9:.3f}' for m in r['dense_macs_per_node'])} "
            f"| {' / '.join(_mb(p) for p in r['dense_param_bytes_per_node'])} "
            f"| {' / '.join(_mb(a) for a in r['activation_bytes_per_node'])} "
            f"| {r['io_bytes']['input']:,} / {r['io_bytes']['output']:,} |")
    whole = next(iter(reports.values()))
    lines += [
        "",
        f"Whole model on one device: {whole['model_macs'] / 1e9:.3f} GMACs, {_mb(whole['model_param_bytes'])} MB "
        "of parameters.",
        "",
        "Bytes sent per (source, destination) pair, fp32:",
        "",
    ]
    for nodes, r in reports.items():
        lines.append(f"- {nodes} nodes: `{json.dumps(r['dense_bytes_matrix'])}`")
    lines += ["", "At 100 Mbit/s, the 2-node dense split's "
              f"{_mb(reports[2]['dense_bytes'])} MB per image take "
              f"{reports[2]['dense_bytes'] * 8 / 100e6:.2f} s on the wire.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "accounting.md")
    args = parser.parse_args()
    reports = {nodes: measure(nodes, args.size) for nodes in (2, 4)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(reports, args.size))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
