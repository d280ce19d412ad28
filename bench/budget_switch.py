"""`disco serve` following the link: one deployment carrying three nested budgets, served while the link slows
and recovers, with the budget chosen by `--latency-target-ms` against fixed budgets.

ResNet-50 at 224x224 on 2 nodes (random weights; nested groups chosen by the training method's own importance on
random images, as bench/latency.py does: latency depends on the channels kept, not on what was learned), budgets
0.2 > 0.05 > 0.02 in one deployment. As root, the service runs in a network namespace whose loopback (MTU 1500)
is shaped with `tc tbf`; one closed-loop client sends a photograph (scikit-image's) again and again while the
link goes 1 Gbit/s -> 100 Mbit/s -> 1 Gbit/s (`tc qdisc change`, nothing restarted). Three services, one after
the other: adaptive (`--latency-target-ms`, starting at 0.2), fixed 0.2, fixed 0.02. Each answer says which
budget it ran at. Writes docs/results/budget_switch.{md,json,png}.
Re-run (root):
    .venv/bin/python bench/budget_switch.py           # about 8 minutes on 2 CPU cores
    .venv/bin/python bench/budget_switch.py --quick   # smoke version (short phases; numbers not meaningful)
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import latency  # noqa: E402  (bench/latency.py: shaped links, groups chosen on random data)
import disco  # noqa: E402
from disco.export import ModelSpec, export  # noqa: E402
from disco.export.budgets import NestedExport  # noqa: E402
from disco.export.manifest import Manifest  # noqa: E402
from disco.models import build_for_data  # noqa: E402
from disco.serve.client import interrupt, post_image, wait_ready  # noqa: E402
from disco.sparsify import Sparsifier, SparsifyOptions  # noqa: E402
from disco.sparsify.nested import norm_statistics  # noqa: E402

BUDGETS = (0.2, 0.05, 0.02)
TARGET_MS = 300.0  # 0.2 takes ~150 ms at 1 Gbit/s and ~750 ms at 100 Mbit/s here (docs/results/latency.md)
PHASES = (("1gbit", 25.0), ("100mbit", 35.0), ("1gbit", 25.0))  # link rate, seconds
SERVICES = (("adaptive", ["--latency-target-ms", str(TARGET_MS)]), ("fixed 0.2", ["--budget", "0.2"]),
            ("fixed 0.02", ["--budget", "0.02"]))
PORT = 8765


def nested_deployment(folder: Path, steps: int) -> Path:
    """ResNet-50, 2 nodes, budgets 0.2 > 0.05 > 0.02 nested (cached in `folder`)."""
    if (folder / "manifest.json").is_file():
        return folder
    torch.manual_seed(0)
    spec = ModelSpec(model="torchvision:resnet50", channels=3, classes=1000)
    model = build_for_data(spec.model, channels=3, classes=1000).eval()
    example = torch.randn(1, 3, 224, 224)
    simulated = disco.partition(model, nodes=2, example_inputs=example).eval()
    options = SparsifyOptions(budget=BUDGETS[-1], nested=BUDGETS[:-1], total_steps=steps, end_fraction=1.0,
                              first_cut_fraction=0.0, prune_every=1)
    sparsifier = Sparsifier(simulated, example, options)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(2, 3, 224, 224, generator=generator)
        y = torch.randint(0, 1000, (2,), generator=generator)
        loss = torch.nn.functional.cross_entropy(simulated(x), y) + sparsifier.regularizer()
        simulated.zero_grad()
        loss.backward()
        sparsifier.step()
    if not sparsifier.nested.complete:
        raise RuntimeError("the schedule did not pass every nested budget")
    statistics_ = norm_statistics(simulated)  # random weights: every budget keeps the same statistics
    nested = NestedExport(budgets=list(BUDGETS), group_levels=dict(sparsifier.nested.level),
                          norms=[statistics_] * len(BUDGETS), reference=[None] * len(BUDGETS), default=0)
    export(simulated, folder, example_inputs=example, spec=spec, nested=nested,
           class_names=[f"class {i}" for i in range(1000)],
           preprocess={"channels": 3, "size": [224, 224], "mean": [0.485, 0.456, 0.406],
                       "std": [0.229, 0.224, 0.225]})
    return folder


def photograph() -> bytes:
    from PIL import Image
    from skimage import data
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def set_rate(rate: str) -> None:
    """Inside the namespace: the loopback's rate changed in place (the service keeps running)."""
    subprocess.run(["tc", "qdisc", "change", "dev", "lo", "root", "tbf", "rate", rate, "burst", "256kb",
                    "latency", "100ms"], check=True, capture_output=True)


def serve_through_phases(deploy: Path, extra: list[str], phases, log: Path) -> list[dict]:
    """One service, one closed-loop client through every phase: each answer's time, latency, budget."""
    base = f"http://127.0.0.1:{PORT}"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    set_rate(phases[0][0])
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "disco", "serve", str(deploy), "--port", str(PORT),
                                    "--timeout", "120", "--max-wait-ms", "0", *extra], env=env, stderr=stderr,
                                   stdout=subprocess.DEVNULL)
    try:
        wait_ready(base, process, 600)
        image, answers, began = photograph(), [], time.monotonic()
        for _ in range(2):  # warm-up
            post_image(base, image, timeout=120)
        for phase, (rate, seconds) in enumerate(phases):
            set_rate(rate)
            ends = time.monotonic() + seconds
            while time.monotonic() < ends:
                sent = time.monotonic()
                status, answer = post_image(base, image, timeout=120)
                if status != 200:
                    raise RuntimeError(f"request failed ({status}): {answer}")
                answers.append({"t": sent - began, "latency_s": time.monotonic() - sent, "budget": answer["budget"],
                                "phase": phase, "rate": rate})
        return answers
    finally:
        interrupt(process)


def inside(args) -> None:
    """Runs inside the namespace: every service through the phases."""
    results = {}
    for name, extra in SERVICES:
        print(f"{name} ...", flush=True)
        results[name] = serve_through_phases(args.deploy, extra, args.phases, args.work / f"{name}.log")
    Path(args.results).write_text(json.dumps(results))


def summarise(results: dict, phases) -> dict:
    table = {}
    for name, answers in results.items():
        rows = []
        for phase, (rate, _) in enumerate(phases):
            mine = [a for a in answers if a["phase"] == phase]
            latencies = [a["latency_s"] for a in mine]
            budgets = [a["budget"] for a in mine]
            rows.append({"rate": rate, "requests": len(mine), "median_ms": statistics.median(latencies) * 1e3,
                         "p90_ms": sorted(latencies)[int(0.9 * (len(latencies) - 1))] * 1e3,
                         "budgets": {str(b): budgets.count(b) for b in sorted(set(budgets), reverse=True)},
                         "last_budget": budgets[-1]})
        table[name] = rows
    return table


def render(table: dict, manifest: Manifest, phases, command: str, elapsed: float) -> str:
    nested = manifest.budgets()
    lines = ["# Budget that follows the link (`disco serve --latency-target-ms`)", "",
             f"Produced by `{command}` in {elapsed / 60:.0f} min (as root: the service in a network namespace whose "
             "loopback, MTU 1500, is shaped by `tc tbf` and changed in place between phases). One deployment: "
             "ResNet-50, 224x224, 2 nodes, random weights, nested budgets "
             + ", ".join(f"{b} ({manifest.expected_at(k).bytes:,} bytes/image)" for k, b in enumerate(nested.budgets))
             + f". One closed-loop client sends one photograph again and again. Adaptive: target {TARGET_MS:.0f} ms "
             "per batch at the ranks, starting at 0.2 (disco/serve/adapt.py: 8 batches at a budget before a step; "
             "down when the average is over the target, up when under half of it). Latency is the client's, per "
             "request (HTTP included).", "",
             "| service | " + " | ".join(f"phase {i + 1}: {rate} ({seconds:.0f} s)" for i, (rate, seconds) in
                                       enumerate(phases)) + " |",
             "|---|" + "---|" * len(phases)]
    for name, rows in table.items():
        cells = [f"median {r['median_ms']:.0f} ms, p90 {r['p90_ms']:.0f} ms, {r['requests']} answers; budgets "
                 + ", ".join(f"{b}: {n}" for b, n in r["budgets"].items()) for r in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "![latency and budget over time](budget_switch.png)", ""]
    return "\n".join(lines)


def plot(results: dict, phases, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for name, answers in results.items():
        times = [a["t"] for a in answers]
        top.plot(times, [a["latency_s"] * 1e3 for a in answers], ".", markersize=3, label=name)
        bottom.step(times, [a["budget"] for a in answers], where="post", label=name)
    top.axhline(TARGET_MS, color="grey", linestyle=":", label="adaptive target")
    top.set_ylabel("latency per request (ms)")
    top.set_yscale("log")
    bottom.set_ylabel("budget it ran at")
    bottom.set_xlabel("seconds (link: " + " -> ".join(rate for rate, _ in phases) + ")")
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short phases (numbers not meaningful)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--deploy", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "budget_switch", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.phases = tuple((rate, seconds / 5 if args.quick else seconds) for rate, seconds in PHASES)
    if args.inside:
        inside(args)
        return
    if os.geteuid() != 0:
        raise SystemExit("bench/budget_switch.py shapes a link with tc in a network namespace: run it as root")
    began = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    deploy = nested_deployment(args.work / "deploy", steps=12 if args.quick else 24)
    results_path = args.work / "results.json"
    with latency.shaped_link(PHASES[0][0]) as prefix:
        command = prefix + [sys.executable, __file__, "--inside", "--deploy", str(deploy), "--work", str(args.work),
                            "--results", str(results_path)] + (["--quick"] if args.quick else [])
        subprocess.run(command, check=True, cwd=ROOT)
    results = json.loads(results_path.read_text())
    table = summarise(results, args.phases)
    args.out.mkdir(parents=True, exist_ok=True)
    invocation = "python bench/budget_switch.py" + (" --quick" if args.quick else "")
    (args.out / "budget_switch.md").write_text(render(table, Manifest.load(deploy), args.phases, invocation,
                                                      time.perf_counter() - began))
    (args.out / "budget_switch.json").write_text(json.dumps({"summary": table, "answers": results}, indent=1))
    plot(results, args.phases, args.out / "budget_switch.png")
    print((args.out / "budget_switch.md").read_text())


if __name__ == "__main__":
    main()
