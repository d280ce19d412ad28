"""Per-image latency of real distributed inference: one process vs dense split vs DISCO vs no communication.

Every distributed row is `disco run` (torchrun, gloo, one CPU thread per rank) on an exported deployment;
the single-process row runs the whole model in one process with one thread. Links, as root: a network
namespace whose loopback has Ethernet's MTU (1500), unshaped or shaped with tc to 1 Gbit/s and 100 Mbit/s (one
shared link for all ranks' traffic); without root only "unshaped", on the host's loopback. Writes docs/results/latency.{md,json,png}.
Re-run:
    .venv/bin/python bench/latency.py           # about 80 minutes on 2 CPU cores (every family, 2 and 4 nodes)
    .venv/bin/python bench/latency.py --only resnet50 --nodes 2   # about 40 minutes
    .venv/bin/python bench/latency.py --quick   # smoke version (numbers not meaningful)
Deployments are cached in runs/latency/. The Fashion-MNIST rows use the runs of bench/tradeoff.py when present
(else the same architecture with random weights: latency depends on the channels kept, not on what was learned).
As root it also emulates edge devices: every rank, and the one device it is compared with, under a CPU quota
(bench/cgroups.py; --no-edge skips it).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cgroups  # noqa: E402  (bench/cgroups.py)
import disco  # noqa: E402
from disco.export import ModelSpec, export  # noqa: E402
from disco.training.export_run import export_run  # noqa: E402
from disco.errors import DiscoError  # noqa: E402
from disco.export.manifest import Manifest  # noqa: E402
from disco.models import build_for_data, load_weights  # noqa: E402
from disco.sparsify import Sparsifier, SparsifyOptions  # noqa: E402

WORK = ROOT / "runs" / "latency"
LINKS = {"unshaped": None, "1gbit": "1gbit", "100mbit": "100mbit"}
LINK_BYTES_PER_S = {"unshaped": None, "1gbit": 125e6, "100mbit": 12.5e6}
EDGE_QUOTA = 0.25  # each emulated edge node (and the one device it is compared with): a quarter of one core
EDGE_LINK = "100mbit"
EDGE_LABELS = ("DISCO 0.2", "DISCO 0.1", "no communication", "DISCO 0.2, int8")
STREAM_LABELS = ("DISCO 0.2", "DISCO 0.1")  # ResNet-50 rows also run with several images in flight
STREAM_INFLIGHT = (2, 3)
STREAM_IMAGES = 24  # images per streaming measurement (one image, run this many times)
NAMESPACE = "disco-bench"


@dataclass(frozen=True)
class Row:
    family: str  # "resnet50" or "fmnist-mobilenet_v2"
    nodes: int
    label: str  # "dense split", "DISCO 0.2", ...
    deploy: Path


# --- deployments ---------------------------------------------------------------------------------------
def _masks_on_random_data(simulated, example, budget: float, steps: int, classes: int = 1000) -> None:
    """Choose groups with the training method's own importance on random images (weights untouched)."""
    sparsifier = Sparsifier(simulated, example, SparsifyOptions(budget=budget, total_steps=steps, end_fraction=1.0,
                                                               prune_every=1))
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(2, *example.shape[1:], generator=generator)
        y = torch.randint(0, classes, (2,), generator=generator)
        loss = torch.nn.functional.cross_entropy(simulated(x), y) + sparsifier.regularizer()
        simulated.zero_grad()
        loss.backward()
        sparsifier.step()
    sparsifier.cut_to(budget)
    sparsifier.freeze()


def torchvision_rows(name: str, nodes: int, size: int, steps: int) -> list[Row]:
    spec = ModelSpec(model=f"torchvision:{name}", channels=3, classes=1000)
    return random_rows(name, spec, nodes, (3, size, size), steps, dtypes=name == "resnet50" and nodes == 2)


# rows that send the same channels in another dtype (issue 15): the honest baselines of a quantised dense split
# (no training needed) and DISCO with int8 messages; masks are the fp32 rows' own (latency depends on bytes)
DTYPE_ROWS = {1.0: (("dense split, fp16", "fp16"), ("dense split, int8", "int8")), 0.2: (("DISCO 0.2, int8", "int8"),),
              0.1: (("DISCO 0.1, int8", "int8"),)}


def random_rows(family: str, spec: ModelSpec, nodes: int, shape: tuple[int, ...], steps: int,
                dtypes: bool = False) -> list[Row]:
    """Deployments of random weights whose groups are chosen on random images: latency does not depend on what
    the weights learned, only on the channels kept (and the dtype they travel in, with `dtypes`)."""
    rows = []
    for label, budget in (("dense split", 1.0), ("DISCO 0.2", 0.2), ("DISCO 0.1", 0.1), ("no communication", 0.0)):
        folder = WORK / f"{family}-{shape[-1]}-n{nodes}-{budget}"
        variants = [(variant, dtype, WORK / f"{folder.name}-{dtype}") for variant, dtype in DTYPE_ROWS.get(budget, ())
                    if dtypes]
        if not _current(folder) or not all(_current(path) for _, _, path in variants):
            torch.manual_seed(0)
            model = build_for_data(spec.model, channels=spec.channels, classes=spec.classes,
                                   stem_stride=spec.stem_stride, **spec.kwargs).eval()
            example = torch.randn(1, *shape)
            simulated = disco.partition(model, nodes=nodes, example_inputs=example).eval()
            if budget < 1.0:
                _masks_on_random_data(simulated, example, budget, steps, spec.classes)
            export(simulated, folder, example_inputs=example, spec=spec, transport_dtype="fp32")
            for _, dtype, path in variants:
                export(simulated, path, example_inputs=example, spec=spec, transport_dtype=dtype)
        rows.append(Row(family, nodes, label, folder))
        rows += [Row(family, nodes, variant, path) for variant, _, path in variants]
    return rows


def _current(folder: Path) -> bool:
    """A cached deployment this version of disco still runs (an older format is exported again)."""
    try:
        Manifest.load(folder)
        return True
    except DiscoError:
        return False


FMNIST_SPEC = ModelSpec(model="torchvision:mobilenet_v2", channels=1, classes=10, kwargs={"width_mult": 0.5},
                        stem_stride=1)


def fmnist_rows(nodes: int, steps: int) -> list[Row]:
    """The trained runs of bench/tradeoff.py when present, else the same architecture with random weights."""
    runs = ROOT / "runs" / "tradeoff"
    if not (runs / f"mobilenet_v2_w0.5-n{nodes}-learned-0.1-s0" / "disco.safetensors").is_file():
        return random_rows("fmnist-mobilenet_v2", FMNIST_SPEC, nodes, (1, 28, 28), steps)
    rows = []
    for label, run in (("dense split", "learned-1.0"), ("DISCO 0.2", "learned-0.2"), ("DISCO 0.1", "learned-0.1"),
                       ("no communication", "nocomm")):
        source = runs / f"mobilenet_v2_w0.5-n{nodes}-{run}-s0"
        if not (source / "disco.safetensors").is_file():
            continue
        folder = WORK / f"fmnist-{source.name}"
        if not _current(folder):
            export_run(source, folder)
        rows.append(Row("fmnist-mobilenet_v2", nodes, label, folder))
    return rows


def _input_file(folder: Path) -> Path:
    path = folder / "input.safetensors"
    if not path.is_file():
        shape = Manifest.load(folder).input_shape
        safetensors.torch.save_file({"input": torch.randn(1, *shape)}, str(path))
    return path


# --- links ---------------------------------------------------------------------------------------------
@contextmanager
def shaped_link(rate: str | None, burst: str = "256kb"):
    """A fresh network namespace whose loopback has Ethernet's MTU (1500) and, unless `rate` is None, is limited
    to `rate` with tc (tbf; `burst`: what passes at full speed after an idle moment). Without root: plain loopback for None (its 64 KiB MTU made the same ResNet-50 run 191 ms
    against 146 ms at MTU 1500 here: compare such rows only with each other), PermissionError otherwise."""
    if os.geteuid() != 0:
        if rate is None:
            yield []
            return
        raise PermissionError("shaping a link needs root (ip netns, tc)")
    subprocess.run(["ip", "netns", "del", NAMESPACE], capture_output=True)
    commands = [["ip", "netns", "add", NAMESPACE],
                ["ip", "netns", "exec", NAMESPACE, "ip", "link", "set", "lo", "up", "mtu", "1500"]]
    if rate is not None:
        commands.append(["ip", "netns", "exec", NAMESPACE, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate",
                         rate, "burst", burst, "latency", "100ms"])
    for command in commands:
        subprocess.run(command, check=True, capture_output=True)
    try:
        yield ["ip", "netns", "exec", NAMESPACE]
    finally:
        subprocess.run(["ip", "netns", "del", NAMESPACE], capture_output=True)


# --- measuring -----------------------------------------------------------------------------------------
def distributed(row: Row, prefix: list[str], repeat: int, inflight: int = 1, profile: Path | None = None) -> dict:
    summary = row.deploy / "summary.json"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    command = prefix + [sys.executable, "-m", "disco", "run", str(row.deploy), "--input", str(_input_file(row.deploy)),
                        "--repeat", str(repeat), "--warmup", "1", "--summary", str(summary), "--quiet",
                        "--timeout", "300", "--inflight", str(inflight)]
    command += ["--profile", str(profile)] if profile else []
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{row}: {result.stderr[-2000:]}")
    data = json.loads(summary.read_text())
    if data["bytes_per_image"]["activations"] != data["expected_per_image"]["activations"]:
        raise RuntimeError(f"{row}: bytes sent differ from the cost report: {data['bytes_per_image']}")
    return {"latency_s": data["latency_s"]["median"], "all_s": data["latency_s"]["all"],
            "images_per_s": data["images_per_s"], "inflight": inflight,
            "bytes_per_image": data["bytes_per_image"]["activations"],
            "expected_bytes_per_image": data["expected_per_image"]["activations"],
            "macs_per_node": Manifest.load(row.deploy).expected["macs_per_node"]}


def bounds(measured: dict, link: str, macs_per_s: float) -> tuple[float, float]:
    """(overlapped, serial) analytical bound in seconds: the largest node's MACs at the measured MAC rate,
    and the bytes on the (one, shared) link at its rate; overlapped takes the larger, serial adds them."""
    compute = max(measured["macs_per_node"]) / macs_per_s
    rate = LINK_BYTES_PER_S[link]
    transfer = measured["bytes_per_image"] / rate if rate else 0.0
    return max(compute, transfer), compute + transfer


SINGLE = """
import json, statistics, sys, time, torch
sys.path.insert(0, {root!r})
from disco.models import build_for_data, load_weights
torch.set_num_threads(1)
model = build_for_data({spec!r}, channels={channels}, classes={classes}, stem_stride={stride!r}, **{kwargs!r}).eval()
if {weights!r}:
    load_weights(model, {weights!r})
from torch.fx.experimental.optimization import fuse
model = fuse(model)  # BatchNorm folded into the convs, as the distributed runtime does (disco/runtime/fusion.py)
x = torch.randn(1, *{shape!r})
times = []
with torch.no_grad():
    model(x)
    for _ in range({repeat}):
        began = time.perf_counter(); model(x); times.append(time.perf_counter() - began)
print(json.dumps({{"latency_s": statistics.median(times), "all_s": times}}))
"""


def single_process(deploy: Path, repeat: int, weights: Path | None, group: Path | None = None) -> dict:
    manifest = Manifest.load(deploy)
    spec = manifest.model
    code = SINGLE.format(root=str(ROOT), spec=spec.model, channels=spec.channels, classes=spec.classes,
                         stride=spec.stem_stride, kwargs=spec.kwargs, weights=str(weights) if weights else "",
                         shape=tuple(manifest.input_shape), repeat=repeat)
    result = cgroups.run_in(group, [sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads(result.stdout.strip().splitlines()[-1])


def edge_ranks(row: Row, prefix: list[str], repeat: int, groups: list[Path]) -> dict:
    """Like `distributed`, but each rank started by hand (as torchrun would) inside its own CPU-quota group."""
    summary = row.deploy / "summary-edge.json"
    nodes = len(groups)
    common = [sys.executable, "-m", "disco.runtime", str(row.deploy), "--input", str(_input_file(row.deploy)),
              "--repeat", str(repeat), "--warmup", "1", "--summary", str(summary), "--quiet", "--timeout", "600"]
    port = str(29600 + os.getpid() % 1000)
    ranks = []
    for rank, group in enumerate(groups):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nodes), LOCAL_WORLD_SIZE=str(nodes),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
        # the group first: `ip netns exec` mounts its own /sys, where the cgroup folders are not to be seen
        ranks.append(subprocess.Popen(cgroups.enter_command(group, prefix + common), env=env, cwd=ROOT,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = [rank.communicate()[1] for rank in ranks]
    if any(rank.returncode for rank in ranks):
        raise RuntimeError(f"{row}: {' | '.join(e[-500:] for e in errors if e)}")
    data = json.loads(summary.read_text())
    return {"latency_s": data["latency_s"]["median"], "all_s": data["latency_s"]["all"],
            "bytes_per_image": data["bytes_per_image"]["activations"]}


# --- report --------------------------------------------------------------------------------------------
def render(results: dict, skipped: dict, args, elapsed: float, results_edge: dict | None = None,
           profiles: dict | None = None) -> str:
    lines = ["# Latency: real distributed inference (torchrun + gloo, one CPU thread per rank)", "",
             f"Generated by `python bench/latency.py{(' ' + args.command_line) if args.command_line else ''}` in "
             f"{elapsed / 60:.0f} min "
             f"on a {os.cpu_count()}-core CPU machine. Median of {args.repeat} timed runs after one warm-up, batch 1; "
             "latency is rank 0's time from sending the input to holding the whole output. Links: all "
             "ranks inside one network namespace whose loopback has MTU 1500, unshaped or limited by `tc tbf` "
             "(one shared link for both directions). Bytes are activation bytes between ranks per image, counted at the send calls (they equal "
             "the simulation's cost report in every row). With 4 ranks on 2 cores compute is oversubscribed, so "
             "4-node compute times are pessimistic.", ""]
    for reason in skipped.values():
        lines.append(f"- skipped: {reason}")
    headline = results.get("resnet50|2", {})  # the paper's headline setting
    if headline.get("DISCO 0.2", {}).get("100mbit") and headline.get("dense split", {}).get("100mbit"):
        ratio = headline["dense split"]["100mbit"]["latency_s"] / headline["DISCO 0.2"]["100mbit"]["latency_s"]
        lines.append(f"- headline: ResNet-50, 2 nodes, 100 Mbit/s: DISCO at budget 0.2 is {ratio:.2f}x faster than "
                     f"the dense split (target: at least 4.7x).")
    lines.append("- small models (the 28x28 Fashion-MNIST mobilenet) are dominated by one synchronous exchange "
                 "per layer (52 layers): splitting them only pays when the link, not the round trips, is the "
                 "bottleneck.")
    lines.append("- why a rank with one core stays above its bound: docs/results/rank-breakdown.md (its compute alone, "
                 "its exchanges alone, and both together).")
    lines += _targets(results, results_edge or {})
    for key, table in results.items():
        family, nodes = key.split("|")
        links = list(next(iter(table.values())).keys())
        lines += ["", f"## {family}, {nodes} nodes", "",
                  "| configuration | bytes/image | " + " | ".join(f"{link} (ms)" for link in links) + " | "
                  + " | ".join(f"speed-up vs dense split, {link}" for link in links) + " |",
                  "|---" * (2 + 2 * len(links)) + "|"]
        dense = table.get("dense split", {})
        for label, per_link in table.items():
            cells = [f"{per_link[link]['latency_s'] * 1000:,.1f}" if per_link.get(link) else "-" for link in links]
            speedups = []
            for link in links:
                if per_link.get(link) and dense.get(link):
                    speedups.append(f"{dense[link]['latency_s'] / per_link[link]['latency_s']:.2f}x")
                else:
                    speedups.append("-")
            sent = next((v["bytes_per_image"] for v in per_link.values() if v and "bytes_per_image" in v), 0)
            lines.append(f"| {label} | {sent:,.0f} | " + " | ".join(cells) + " | " + " | ".join(speedups) + " |")
        lines += _bound_table(table, links)
        lines += _streaming_table(table, links)
    lines += _edge_section(results_edge or {})
    lines += _profile_section(profiles or {})
    return "\n".join(lines) + "\n"


def _cell(results: dict, key: str, label: str, link: str) -> dict | None:
    return results.get(key, {}).get(label, {}).get(link)


def _targets(results: dict, edge: dict) -> list[str]:
    """The runtime's targets (issue 14), each as measured in this run: ratios of rows measured together."""
    checks = []  # table rows: what, measured, wanted, verdict

    def add(what: str, value: float | None, target: str, met) -> None:
        if value is not None:
            checks.append(f"| {what} | {value:.2f} | {target} | {'met' if met(value) else 'missed'} |")

    one = _cell(results, "resnet50|2", "one process (whole model)", "1gbit")
    disco = _cell(results, "resnet50|2", "DISCO 0.2", "1gbit")
    rate = _model_rate(results.get("resnet50|2", {}))
    if one and disco and rate:
        add("ResNet-50, 2 nodes, DISCO 0.2, 1 Gbit/s: speed-up over one process", one["latency_s"] / disco["latency_s"],
            ">= 1.5x", lambda v: v >= 1.5)
        add("... measured / overlapped bound", disco["latency_s"] / bounds(disco, "1gbit", rate)[0], "<= 1.3x",
            lambda v: v <= 1.3)
        streams = disco.get("streaming", {})
        if streams:
            best = max(v["images_per_s"] for v in streams.values())
            add("... streaming: best images/s / min(link, compute) bound", best / min(throughput_bounds(disco, "1gbit",
                rate)), ">= 0.8", lambda v: v >= 0.8)
    nocomm = _cell(results, "resnet50|2", "no communication", "unshaped")
    single = _cell(results, "resnet50|2", "one process (whole model)", "unshaped")
    if nocomm and single:
        share = max(nocomm["macs_per_node"]) / sum(_cell(results, "resnet50|2", "dense split", "unshaped")
                                                    ["macs_per_node"])
        add("ResNet-50, 2 nodes, no communication, unshaped: latency / (one process x largest MAC share)",
            nocomm["latency_s"] / (single["latency_s"] * share), "<= 1.4x", lambda v: v <= 1.4)
    small = _cell(results, "fmnist-mobilenet_v2|2", "DISCO 0.1", "unshaped")
    small_one = _cell(results, "fmnist-mobilenet_v2|2", "one process (whole model)", "unshaped")
    if small and small_one:
        add("Fashion-MNIST mobilenet_v2, 2 nodes, DISCO 0.1, unshaped: latency / one process",
            small["latency_s"] / small_one["latency_s"], "<= 2x", lambda v: v <= 2)
    for nodes, target in ((2, 1.5), (4, 2.0)):
        table = edge.get(f"resnet50|{nodes}", {})
        if "DISCO 0.1" in table and "one device (whole model)" in table:
            add(f"edge ({EDGE_QUOTA:.0%} core each), ResNet-50, {nodes} nodes, {EDGE_LINK}, DISCO 0.1: speed-up over "
                "one device", table["one device (whole model)"]["latency_s"] / table["DISCO 0.1"]["latency_s"],
                f">= {target}x", lambda v, t=target: v >= t)
    _quantized_targets(results, edge, add)
    if not checks:
        return []
    return ["", "## Targets (issues 14 and 15), measured in this run", "", "| target | measured | wanted | verdict |",
            "|---|---|---|---|", *checks]


def _quantized_targets(results: dict, edge: dict, add) -> None:
    """Issue 15: DISCO 0.2 with int8 messages against the fp32 and int8 dense splits, one process, one device."""
    int8 = _cell(results, "resnet50|2", "DISCO 0.2, int8", "100mbit")
    for label, shown, wanted in (("dense split", "fp32 dense split", 15), ("dense split, int8", "int8 dense split", 3)):
        other = _cell(results, "resnet50|2", label, "100mbit")
        if int8 and other:
            add(f"ResNet-50, 2 nodes, 100 Mbit/s: DISCO 0.2 int8 speed-up over the {shown}",
                other["latency_s"] / int8["latency_s"], f">= {wanted}x", lambda v, w=wanted: v >= w)
    fast = _cell(results, "resnet50|2", "DISCO 0.2, int8", "1gbit")
    one = _cell(results, "resnet50|2", "one process (whole model)", "1gbit")
    if fast and one:
        add("ResNet-50, 2 nodes, 1 Gbit/s: DISCO 0.2 int8 speed-up over one process", one["latency_s"] / fast["latency_s"],
            ">= 2x", lambda v: v >= 2)
    table = edge.get("resnet50|2", {})
    if "DISCO 0.2, int8" in table and "one device (whole model)" in table:
        add(f"edge ({EDGE_QUOTA:.0%} core each), ResNet-50, 2 nodes, {EDGE_LINK}, DISCO 0.2 int8: speed-up over one "
            "device", table["one device (whole model)"]["latency_s"] / table["DISCO 0.2, int8"]["latency_s"],
            ">= 2.5x", lambda v: v >= 2.5)


def _model_rate(table: dict) -> float | None:
    """MACs per second of one process running the whole model (the dense split's MACs summed over nodes)."""
    single, dense = table.get("one process (whole model)", {}), table.get("dense split", {})
    one = next((v for v in single.values() if v), None)
    macs = next((sum(v["macs_per_node"]) for v in dense.values() if v and "macs_per_node" in v), None)
    return macs / one["latency_s"] if one and macs else None


def _bound_table(table: dict, links: list[str]) -> list[str]:
    rate = _model_rate(table)
    if rate is None:
        return []
    lines = ["", f"Bounds (one process computes {rate / 1e9:.2f} GMAC/s): measured / overlapped bound "
             "(max of the largest node's MACs at that rate and the bytes on the link), then the serial bound "
             "(their sum), in ms.", "",
             "| configuration | " + " | ".join(link for link in links) + " |", "|---" * (1 + len(links)) + "|"]
    for label, per_link in table.items():
        cells = []
        for link in links:
            measured = per_link.get(link)
            if not measured or "macs_per_node" not in measured:
                cells.append("-")
                continue
            overlapped, serial = bounds(measured, link, rate)
            cells.append(f"{measured['latency_s'] * 1e3:,.1f} / {overlapped * 1e3:,.1f} "
                         f"({measured['latency_s'] / overlapped:.2f}x), serial {serial * 1e3:,.1f}")
        if any(c != "-" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _edge_section(edge: dict) -> list[str]:
    if not edge:
        return []
    lines = ["", f"## Emulated edge devices: each node (and the one device) limited to {EDGE_QUOTA:.0%} of a core "
             f"(cgroup cpu quota), {EDGE_LINK} shared link", ""]
    for key, table in edge.items():
        family, nodes = key.split("|")
        one = table.get("one device (whole model)")
        rate = one.get("macs_per_s") if one else None
        lines += [f"### {family}, {nodes} nodes" + (f" (one device here: {rate / 1e9:.2f} GMAC/s)" if rate else ""),
                  "", "| configuration | bytes/image | latency (ms) | speed-up vs one device |", "|---|---|---|---|"]
        for label, measured in table.items():
            speedup = f"{one['latency_s'] / measured['latency_s']:.2f}x" if one else "-"
            sent, latency_ms = measured.get("bytes_per_image", 0), measured["latency_s"] * 1e3
            lines.append(f"| {label} | {sent:,.0f} | {latency_ms:,.1f} | {speedup} |")
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = list(results.items())
    columns = min(2, len(panels))
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4.2 * rows), squeeze=False)
    for axis in axes.flatten()[len(panels):]:
        axis.set_visible(False)
    for axis, (key, table) in zip(axes.flatten(), panels):
        labels = list(table)
        links = list(next(iter(table.values())).keys())
        width = 0.8 / len(links)
        for i, link in enumerate(links):
            values = [table[label][link]["latency_s"] * 1000 if table[label].get(link) else 0 for label in labels]
            axis.bar([x + i * width for x in range(len(labels))], values, width, label=link)
        axis.set_xticks([x + width * (len(links) - 1) / 2 for x in range(len(labels))], labels, rotation=30,
                        ha="right", fontsize=8)
        axis.set_yscale("log")
        axis.set_ylabel("latency per image (ms, log)")
        axis.set_title(key.replace("|", ", ") + " nodes", fontsize=9)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def measure_streaming(rows: list[Row], results: dict, links: list[str]) -> None:
    """ResNet-50, 2 nodes: images per second with K images in flight (`disco run --inflight K`), stored beside
    the one-at-a-time row as results[key][label][link]["streaming"][K]."""
    for name, rate in LINKS.items():
        if name not in links or (rate and os.geteuid() != 0):  # shaped links need root (skipped above, said)
            continue
        with shaped_link(rate) as prefix:
            for row in rows:
                if row.family != "resnet50" or row.nodes != 2 or row.label not in STREAM_LABELS:
                    continue
                for inflight in STREAM_INFLIGHT:
                    print(f"[{name}] {row.family} n{row.nodes} {row.label}, {inflight} in flight", flush=True)
                    measured = distributed(row, prefix, STREAM_IMAGES, inflight)
                    cell = results[f"{row.family}|{row.nodes}"][row.label][name]
                    cell.setdefault("streaming", {})[str(inflight)] = {
                        k: measured[k] for k in ("latency_s", "images_per_s", "inflight")}


PROFILED = ("resnet50", 2, "DISCO 0.2")  # the row whose per-layer profile goes into the results, per link


def profile_rows(rows: list[Row], links: list[str], out: Path) -> dict:
    """`disco run --profile` on the PROFILED row at every link: its layers.md copied to out/profile-*.md, and the
    per-rank compute and wait sums kept for the report (the traces stay in runs/latency/)."""
    summaries = {}
    for name, rate in LINKS.items():
        row = next((r for r in rows if (r.family, r.nodes, r.label) == PROFILED), None)
        if name not in links or row is None or (rate and os.geteuid() != 0):
            continue
        folder = WORK / "profile" / name
        with shaped_link(rate) as prefix:
            print(f"[{name}] {row.family} n{row.nodes} {row.label}, profiled", flush=True)
            distributed(row, prefix, 5, profile=folder)
        table = json.loads((folder / "layers.json").read_text())
        target = out / f"profile-{row.family}-n{row.nodes}-{name}.md"
        target.write_text((folder / "layers.md").read_text())
        summaries[name] = {"file": target.name, "latency_ms": table["median_latency_ms"],
                           "lockstep_compute_ms": table["lockstep_compute_ms"],
                           "compute_ms_per_rank": table["compute_ms_per_rank"],
                           "wait_ms_per_rank": table["wait_ms_per_rank"]}
    return summaries


def _profile_section(profiles: dict) -> list[str]:
    if not profiles:
        return []
    family, nodes, label = PROFILED
    lines = ["", f"## Where the time goes: {family}, {nodes} nodes, {label} (`disco run --profile`, per image)", "",
             "| link | latency (ms) | lockstep compute (ms) | " + " | ".join(
                 f"rank {r} compute / wait (ms)" for r in range(nodes)) + " | per-layer table |",
             "|---" * (4 + nodes) + "|"]
    for link, p in profiles.items():
        ranks = " | ".join(f"{c:.1f} / {w:.1f}" for c, w in zip(p["compute_ms_per_rank"], p["wait_ms_per_rank"]))
        lines.append(f"| {link} | {p['latency_ms']:.1f} | {p['lockstep_compute_ms']:.1f} | {ranks} | [{p['file']}]"
                     f"({p['file']}) |")
    return lines


def throughput_bounds(measured: dict, link: str, macs_per_s: float) -> tuple[float, float]:
    """(link bound, compute bound) in images per second: the bytes of one image on the (one, shared) link, and
    the largest node's MACs at the one-process rate; the slower of the two bounds what streaming can reach."""
    rate = LINK_BYTES_PER_S[link]
    by_link = rate / measured["bytes_per_image"] if rate and measured["bytes_per_image"] else float("inf")
    return by_link, macs_per_s / max(measured["macs_per_node"])


def _streaming_table(table: dict, links: list[str]) -> list[str]:
    rate = _model_rate(table)
    rows = []
    for label, per_link in table.items():
        for link in links:
            measured = (per_link.get(link) or {})
            for inflight, streamed in measured.get("streaming", {}).items():
                by_link, by_compute = throughput_bounds(measured, link, rate)
                bound = min(by_link, by_compute)
                rows.append(f"| {label} | {link} | {1 / measured['latency_s']:.1f} | {inflight} | "
                            f"{streamed['images_per_s']:.1f} | {streamed['latency_s'] * 1e3:,.1f} | "
                            f"{'-' if by_link == float('inf') else f'{by_link:.1f}'} | {by_compute:.1f} | "
                            f"{streamed['images_per_s'] / bound:.2f} |")
    if not rows or rate is None:
        return []
    return ["", "Streaming (`disco run --inflight K`, one image run "
            f"{STREAM_IMAGES} times): images per second against the throughput bound min(link, compute), the "
            "link's rate over the bytes of one image and the largest node's MACs at the one-process rate.", "",
            "| configuration | link | images/s, one at a time | in flight | images/s | latency (ms) | link bound | "
            "compute bound | of the bound |", "|---" * 9 + "|"] + rows


def measure_edge(rows: list[Row], repeat: int, skipped: dict) -> dict:
    """ResNet-50 rows on nodes limited to EDGE_QUOTA of a core each, over the EDGE_LINK link, and the one device
    under the same quota. Groups and the namespace are removed afterwards, also when interrupted."""
    reason = cgroups.available() or (None if os.geteuid() == 0 else "shaping a link needs root")
    if reason:
        skipped["edge"] = f"edge devices: {reason}"
        return {}
    edge: dict = {}
    for row in rows:
        if row.family != "resnet50" or row.label not in EDGE_LABELS:
            continue
        print(f"[edge {EDGE_QUOTA:.0%} core, {EDGE_LINK}] {row.family} n{row.nodes} {row.label}", flush=True)
        with shaped_link(LINKS[EDGE_LINK]) as prefix, cgroups.quota_groups([EDGE_QUOTA] * row.nodes) as groups:
            edge.setdefault(f"{row.family}|{row.nodes}", {})[row.label] = edge_ranks(row, prefix, repeat, groups)
    for key, table in edge.items():
        deploy = next(r.deploy for r in rows if f"{r.family}|{r.nodes}" == key and r.label == "dense split")
        with cgroups.quota_groups([EDGE_QUOTA]) as (group,):
            one = single_process(deploy, repeat, None, group)
        macs = sum(Manifest.load(deploy).expected["macs_per_node"])
        table["one device (whole model)"] = {**one, "macs_per_s": macs / one["latency_s"]}
    return edge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small input, few runs: a smoke test")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per configuration (median reported)")
    parser.add_argument("--links", default=",".join(LINKS), help="comma-separated subset of " + ", ".join(LINKS))
    parser.add_argument("--nodes", default="2,4", help="node counts")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results"), help="where latency.md/json/png go")
    parser.add_argument("--replot", action="store_true", help="only redraw latency.png from latency.json")
    parser.add_argument("--no-edge", dest="edge", action="store_false",
                        help="skip the emulated edge devices (cgroup CPU quotas; needs root)")
    parser.add_argument("--labels", help="only the rows with these labels, separated by ';' (e.g. 'dense split;DISCO "
                                         "0.2, int8'); the one-process row is always measured")
    parser.add_argument("--no-streaming", dest="streaming", action="store_false",
                        help="skip the rows with several images in flight and the per-layer profiles")
    parser.add_argument("--only", help="only the model families containing one of these (comma-separated, e.g. "
                                       "vit_b_16 or resnet50,fmnist); other families, and the edge rows and profiles "
                                       "when not measured again, are kept from latency.json")
    args = parser.parse_args()
    args.command_line = shlex.join(sys.argv[1:])
    if args.replot:  # redraw the plot and table from latency.json (e.g. after changing their layout)
        saved = json.loads((Path(args.out) / "latency.json").read_text())
        args.command_line = saved.get("command_line", "")
        plot(saved["results"], Path(args.out) / "latency.png")
        (Path(args.out) / "latency.md").write_text(render(saved["results"], saved["skipped"], args,
                                                          saved.get("elapsed_s", 0), saved.get("edge"),
                                                          saved.get("profiles")))
        return
    began = time.time()
    size, steps = (64, 2) if args.quick else (224, 4)
    if args.quick:
        args.repeat = min(args.repeat, 2)
    rows = []
    for nodes in map(int, args.nodes.split(",")):
        for family in ("resnet50", "vit_b_16", "fmnist"):
            if args.only and not any(only in family for only in args.only.split(",")) or (
                    args.quick and family != "resnet50"):
                continue
            rows += fmnist_rows(nodes, steps) if family == "fmnist" else torchvision_rows(family, nodes, size, steps)
    if args.labels:
        rows = [row for row in rows if row.label in args.labels.split(";")]
    saved = Path(args.out) / "latency.json"
    results = json.loads(saved.read_text())["results"] if args.only and saved.is_file() else {}
    results = {k: v for k, v in results.items() if not any(k == f"{r.family}|{r.nodes}" for r in rows)}
    earlier = json.loads(saved.read_text()).get("elapsed_s", 0) if args.only and saved.is_file() else 0
    began -= earlier  # the report states the time of every family's measurements together
    skipped = {}
    for name, rate in LINKS.items():
        if name not in args.links.split(","):
            continue
        try:
            with shaped_link(rate) as prefix:
                for row in rows:
                    print(f"[{name}] {row.family} n{row.nodes} {row.label}", flush=True)
                    table = results.setdefault(f"{row.family}|{row.nodes}", {})
                    table.setdefault(row.label, {})[name] = distributed(row, prefix, args.repeat)
        except PermissionError as error:
            skipped[name] = f"{name}: {error}"
    measuring_more = args.streaming and not args.quick
    if measuring_more:
        measure_streaming(rows, results, args.links.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profiles = profile_rows(rows, args.links.split(","), out) if measuring_more else {}
    for key, table in results.items():  # the single-process baseline needs no network
        family, nodes = key.split("|")
        if "one process (whole model)" in table:
            continue
        deploy = next(r.deploy for r in rows if r.family == family and r.nodes == int(nodes))
        weights = ROOT / "runs" / "tradeoff" / "mobilenet_v2_w0.5-dense" / "dense.safetensors"
        single = single_process(deploy, args.repeat, weights if family.startswith("fmnist") and weights.is_file()
                                else None)
        table["one process (whole model)"] = {link: single for link in next(iter(table.values()))}
    earlier_run = json.loads(saved.read_text()) if args.only and saved.is_file() else {}
    edge = earlier_run.get("edge", {})  # families and node counts not measured again keep their edge rows
    if args.edge:
        edge.update(measure_edge(rows, args.repeat, skipped))
    profiles = profiles or earlier_run.get("profiles", {})
    (out / "latency.json").write_text(json.dumps({"results": results, "skipped": skipped, "edge": edge,
                                                  "profiles": profiles, "elapsed_s": time.time() - began,
                                                  "command_line": args.command_line}, indent=1))
    (out / "latency.md").write_text(render(results, skipped, args, time.time() - began, edge, profiles))
    plot(results, out / "latency.png")
    print((out / "latency.md").read_text())


if __name__ == "__main__":
    main()
