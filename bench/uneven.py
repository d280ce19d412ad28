"""Uneven nodes and links (issue 18), measured on real processes: does `disco plan` predict what `disco run`
measures, does a speed-weighted split pay off on unequal nodes, and does training to a latency budget beat a
uniform byte budget when one link is slow?

    python bench/uneven.py                      # every part (about 70 min on 2 cores; needs root)
    python bench/uneven.py --parts predict      # one part: predict, weights, train (comma-separated)

Parts:
- predict: the latency benchmark's rows (bench/latency.py: ResNet-50 at 224x224 and the Fashion-MNIST
  mobilenet_v2 at 28x28, 2 and 4 nodes; the dense split, DISCO 0.2 and 0.1, no communication) on one shared
  loopback, unshaped, 1 Gbit/s and 100 Mbit/s, and the emulated edge devices (a quarter of a core each,
  100 Mbit/s). For each model, node count and network, `disco probe` measures the topology once (on the dense
  split's deployment, under the same conditions); `disco plan`'s prediction of every row is then compared with
  the latency `disco run` measures (median of --repeat runs).
- weights: two nodes with compute speeds 1 and 0.5 (CPU quotas of one core and half a core), each with its own
  link (bench/netns.py, a switch: 1 Gbit/s and 100 Mbit/s): ResNet-50 at DISCO 0.2 split evenly and split by
  speed (node_weights 1, 0.5), same byte budget; also predicted from a probe of the same setting.
- train: the Fashion-MNIST mobilenet_v2 (width 0.5) on 4 nodes of a switch where node 3's link is 10x slower
  than the others': a uniform byte budget against a latency budget (disco train --latency-budget-ms, priced on
  the probed topology), 2 seeds each; accuracy and measured latency.
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cgroups  # noqa: E402
import latency  # noqa: E402
import netns  # noqa: E402
import disco  # noqa: E402
from disco.export import ModelSpec, export  # noqa: E402
from disco.export.manifest import Manifest  # noqa: E402
from disco.models import build_for_data  # noqa: E402
from disco.planning.latency import predict  # noqa: E402
from disco.topology import Topology  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "uneven"
LABELS = ("dense split", "DISCO 0.2", "DISCO 0.1", "no communication")
BURST = {None: "256kb", "1gbit": "256kb", "100mbit": "32kb"}  # small models' messages must not fit in the bucket
PYTHON = sys.executable


# --- probing and measuring ---------------------------------------------------------------------------------
def probe_shared(deploy: Path, prefix: list[str], out: Path) -> Topology:
    """`disco probe` on all ranks of one host (inside `prefix`'s namespace), as `disco run` starts them."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    command = prefix + [PYTHON, "-m", "disco", "probe", str(deploy), "--out", str(out), "--timeout", "300"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode:
        raise RuntimeError(f"probe of {deploy} failed: {result.stderr[-1500:]}")
    return Topology.load(out)


def per_rank(network: netns.Network | None, commands: list[list[str]], groups: list, prefix: list[str],
             port: int) -> None:
    """Each rank started by hand: in its own namespace of `network`, or all in `prefix`'s, inside `groups`."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if network is not None:
        netns.run_ranks(network, commands, env=env, groups=groups, cwd=ROOT, port=port)
        return
    ranks = []
    for rank, (command, group) in enumerate(zip(commands, groups)):
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(len(commands)),
                        LOCAL_WORLD_SIZE=str(len(commands)), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                        GLOO_SOCKET_IFNAME="lo")
        ranks.append(subprocess.Popen(cgroups.enter_command(group, prefix + command), env=rank_env, cwd=ROOT,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = [rank.communicate()[1] for rank in ranks]
    if any(rank.returncode for rank in ranks):
        raise RuntimeError(" | ".join(e[-800:] for e in errors if e))


def probe_ranks(deploy: Path, out: Path, *, network=None, groups=None, prefix=()) -> Topology:
    nodes = Manifest.load(deploy).nodes
    command = [PYTHON, "-m", "disco.runtime.probe", str(deploy), "--out", str(out), "--timeout", "300"]
    per_rank(network, [command] * nodes, groups or [None] * nodes, list(prefix), 29700 + os.getpid() % 500)
    return Topology.load(out)


def measure_ranks(deploy: Path, repeat: int, *, network=None, groups=None, prefix=()) -> float:
    """Median latency (s) of `disco run`'s ranks started by hand."""
    nodes = Manifest.load(deploy).nodes
    summary = deploy / "summary-uneven.json"
    command = [PYTHON, "-m", "disco.runtime", str(deploy), "--input", str(latency._input_file(deploy)), "--repeat",
               str(repeat), "--warmup", "1", "--summary", str(summary), "--quiet", "--timeout", "600"]
    per_rank(network, [command] * nodes, groups or [None] * nodes, list(prefix), 29200 + os.getpid() % 500)
    data = json.loads(summary.read_text())
    if data["bytes_per_image"]["activations"] != data["expected_per_image"]["activations"]:
        raise RuntimeError(f"{deploy}: bytes sent differ from the cost report")
    return data["latency_s"]["median"]


def predicted(deploy: Path, topology: Topology) -> float:
    return predict(Manifest.load(deploy).expected_at(0), topology).latency_s


# --- part 1: prediction on the latency benchmark's rows ------------------------------------------------------
def rows_for(family: str, nodes: int, steps: int) -> list:
    rows = (latency.fmnist_rows(nodes, steps) if family == "fmnist"
            else latency.torchvision_rows("resnet50", nodes, 224, steps))
    return [row for row in rows if row.label in LABELS]


def part_predict(args, results: dict) -> None:
    table = results.setdefault("predict", [])
    for family in ("resnet50", "fmnist"):
        for nodes in (2, 4):
            rows = rows_for(family, nodes, 4)
            for link in ("unshaped", "1gbit", "100mbit"):
                rate = latency.LINKS[link]
                with latency.shaped_link(rate, BURST[rate]) as prefix:
                    path = WORK / f"topology-{family}-n{nodes}-{link}.json"
                    topology = probe_shared(rows[0].deploy, prefix, path)
                    for row in rows:
                        measured = latency.distributed(row, prefix, args.repeat)["latency_s"]
                        _record(table, family, nodes, link, row.label, measured, row.deploy, path)
            if family == "resnet50" and cgroups.available() is None:
                _edge(args, table, rows, nodes)
            _save(args, results)


def _edge(args, table: list, rows: list, nodes: int) -> None:
    with latency.shaped_link(latency.LINKS[latency.EDGE_LINK]) as prefix, \
            cgroups.quota_groups([latency.EDGE_QUOTA] * nodes) as groups:
        path = WORK / f"topology-edge-n{nodes}.json"
        probe_ranks(rows[0].deploy, path, groups=groups, prefix=prefix)
        for row in rows:
            if row.label in latency.EDGE_LABELS:
                measured = measure_ranks(row.deploy, args.repeat, groups=groups, prefix=prefix)
                _record(table, "resnet50", nodes, "edge 25% core, 100mbit", row.label, measured, row.deploy, path)


def _record(table: list, family: str, nodes: int, link: str, label: str, measured: float, deploy: Path,
            topology: Path) -> None:
    guess = predicted(deploy, Topology.load(topology))
    error = (guess - measured) / measured
    table.append({"family": family, "nodes": nodes, "link": link, "label": label, "measured_ms": measured * 1e3,
                  "predicted_ms": guess * 1e3, "error": error, "deploy": str(deploy), "topology": str(topology)})
    print(f"[predict] {family} n{nodes} {link} {label}: measured {measured * 1e3:.1f} ms, predicted "
          f"{guess * 1e3:.1f} ms ({error:+.0%})", flush=True)


# --- part 2: speed-weighted split on unequal nodes -----------------------------------------------------------
SPEEDS = (1.0, 0.5)


def weighted_deployments(budget: float, steps: int) -> dict[str, Path]:
    spec = ModelSpec(model="torchvision:resnet50", channels=3, classes=1000)
    found = {}
    for label, weights in (("even split", None), ("speed-weighted split", SPEEDS)):
        folder = WORK / f"resnet50-224-n2-{budget}-{'even' if weights is None else 'weighted'}"
        if not latency._current(folder):
            torch.manual_seed(0)
            model = build_for_data(spec.model, channels=3, classes=1000).eval()
            example = torch.randn(1, 3, 224, 224)
            simulated = disco.partition(model, nodes=2, example_inputs=example, node_weights=weights).eval()
            latency._masks_on_random_data(simulated, example, budget, steps, 1000)
            export(simulated, folder, example_inputs=example, spec=spec)
        found[f"{label}, DISCO {budget}"] = folder
    return found


def part_weights(args, results: dict) -> None:
    table = results.setdefault("weights", [])
    deployments = {}
    for budget in map(float, args.weights_budgets.split(",")):
        deployments.update(weighted_deployments(budget, 4))
    for rate in ("1gbit", "100mbit"):
        links = [netns.NodeLink(rate)] * 2
        with netns.switch_network(links) as network, cgroups.quota_groups(list(SPEEDS)) as groups:
            for label, deploy in deployments.items():
                path = WORK / f"topology-weights-{rate}-{deploy.name}.json"
                topology = probe_ranks(deploy, path, network=network, groups=groups)
                measured = measure_ranks(deploy, args.repeat, network=network, groups=groups)
                guess = predicted(deploy, topology)
                table.append({"link": rate, "label": label, "measured_ms": measured * 1e3,
                              "predicted_ms": guess * 1e3, "bytes": Manifest.load(deploy).expected["bytes"],
                              "macs_per_node": Manifest.load(deploy).expected["macs_per_node"]})
                _record(results.setdefault("predict", []), "resnet50", 2, f"switch {rate}, speeds 1 and 0.5", label,
                        measured, deploy, path)
        _save(args, results)


# --- part 3: training to a latency budget with one slow link -------------------------------------------------
TRAIN_LINKS = [netns.NodeLink("20mbit", burst="16kb")] * 3 + [netns.NodeLink("2mbit", burst="16kb")]
TRAIN = dict(model="torchvision:mobilenet_v2", model_kwargs="width_mult=0.5", stem_stride="1", train_subset="4000",
             dense_epochs="6", sparsify_epochs="2", finetune_epochs="2", nodes="4")


def _train_command(out: Path, extra: list[str]) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TRAIN.items()]
    resume = ["--resume"] if (out / "config.json").is_file() else []
    return [PYTHON, "-m", "disco", "train", "--dataset", "fashion-mnist", "--out", str(out), *flags, *extra, *resume]


def _train_all(runs: list[tuple[Path, list[str]]], parallel: int = 2) -> None:
    """Runs not finished yet, `parallel` at a time (one core each)."""
    waiting = [(out, extra) for out, extra in runs if not (out / "report.json").is_file()]
    while waiting:
        batch, waiting = waiting[:parallel], waiting[parallel:]
        processes = [subprocess.Popen(_train_command(out, extra), cwd=ROOT, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
                     for out, extra in batch]
        for (out, _), process in zip(batch, processes):
            if process.wait():
                raise RuntimeError(f"training {out} failed: {process.stderr.read()[-1500:]}")


def _export(run: Path) -> Path:
    deploy = run.parent / f"{run.name}-deploy"
    if not latency._current(deploy):
        subprocess.run([PYTHON, "-m", "disco", "export", str(run), "--out", str(deploy)], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
    return deploy


def part_train(args, results: dict) -> None:
    table = results.setdefault("train", [])
    dense = WORK / "train-dense"
    _train_all([(dense, ["--budget=1.0", "--sparsify-epochs=0", "--finetune-epochs=0"])], parallel=1)
    topology_path = WORK / "topology-train.json"
    with netns.switch_network(TRAIN_LINKS) as network:
        topology = probe_ranks(_export(dense), topology_path, network=network)
    seeds = (0, 1)
    uniform = [(WORK / f"train-bytes-{args.train_budget}-s{seed}",
                [f"--budget={args.train_budget}", f"--seed={seed}", f"--dense-run={dense}"]) for seed in seeds]
    _train_all(uniform)
    runs = [("uniform byte budget", seed, out) for seed, (out, _) in zip(seeds, uniform)]
    budgeted = []
    for seed, (out, _) in zip(seeds, uniform):
        target_ms = predicted(_export(out), topology) * 1e3 / args.latency_factor
        config = WORK / f"train-latency-s{seed}" / "config.json"
        if config.is_file():  # begun earlier: its own budget (a new probe reads a little differently)
            target_ms = json.loads(config.read_text())["latency_budget_ms"]
        # equal nodes: the probe's rates differ a little, and the comparison is about the links
        budgeted.append((WORK / f"train-latency-s{seed}", [f"--latency-budget-ms={target_ms:.2f}",
                                                          f"--topology={topology_path}", f"--seed={seed}",
                                                          f"--dense-run={dense}", "--node-weights=1,1,1,1"]))
        runs.append((f"latency budget {target_ms:.0f} ms", seed, budgeted[-1][0]))
    _train_all(budgeted)
    with netns.switch_network(TRAIN_LINKS) as network:
        for label, seed, out in runs:
            report = json.loads((out / "report.json").read_text())
            deploy = _export(out)
            measured = measure_ranks(deploy, args.repeat, network=network)
            guess = predicted(deploy, topology)
            table.append({"label": label, "seed": seed, "accuracy": report["disco_accuracy"],
                          "measured_ms": measured * 1e3, "predicted_ms": guess * 1e3, "bytes": report["bytes_per_image"],
                          "bytes_matrix": Manifest.load(deploy).expected["bytes_matrix"]})
            print(f"[train] {label} seed {seed}: accuracy {report['disco_accuracy']:.4f}, measured "
                  f"{measured * 1e3:.1f} ms, predicted {guess * 1e3:.1f} ms", flush=True)
            _save(args, results)


# --- report --------------------------------------------------------------------------------------------------
def _save(args, results: dict) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commands = results.setdefault("commands", [])
    if args.command_line not in commands:
        commands.append(args.command_line)
    (out / "uneven.json").write_text(json.dumps(results, indent=1))
    (out / "uneven.md").write_text(render(results))


def render(results: dict) -> str:
    lines = ["# Uneven nodes and links: prediction, speed-weighted splits, latency budgets", "",
             "Generated on a 2-core CPU machine (torchrun + gloo, one CPU thread per rank; median of the timed runs, "
             "batch 1) by " + ", then ".join(f"`python bench/uneven.py {c}`".replace(" `", "`")
                                             for c in results.get("commands", [])) + ".", ""]
    lines += _predict_section(results.get("predict", []))
    lines += _weights_section(results.get("weights", []))
    lines += _train_section(results.get("train", []))
    return "\n".join(lines) + "\n"


def _predict_section(rows: list) -> list[str]:
    if not rows:
        return []
    errors = [abs(r["error"]) for r in rows]
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(f"{r['family']}, {r['nodes']} nodes", []).append(abs(r["error"]))
    lines = ["## disco plan against disco run", "",
             f"Median absolute error over {len(rows)} rows: **{statistics.median(errors):.1%}** (target: at most "
             "15%). By model and node count: " + "; ".join(f"{group} {statistics.median(e):.0%} ({len(e)} rows)"
                                                          for group, e in groups.items()) + ".", "",
             "| model | nodes | network | configuration | measured (ms) | predicted (ms) | error |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['nodes']} | {r['link']} | {r['label']} | {r['measured_ms']:,.1f} | "
              f"{r['predicted_ms']:,.1f} | {r['error']:+.0%} |" for r in rows]
    return lines + [""]


def _weights_section(rows: list) -> list[str]:
    if not rows:
        return []
    lines = ["## Two nodes at speeds 1 and 0.5: even against speed-weighted split (ResNet-50, same byte budget)", "",
             "| link | split | MACs per node | bytes/image | measured (ms) | predicted (ms) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['link']} | {r['label']} | {', '.join(f'{m / 1e9:.2f} G' for m in r['macs_per_node'])} | "
              f"{r['bytes']:,} | {r['measured_ms']:,.1f} | {r['predicted_ms']:,.1f} |" for r in rows]
    lines.append("")
    for link in dict.fromkeys(r["link"] for r in rows):
        measured = {r["label"]: r["measured_ms"] for r in rows if r["link"] == link}
        for even in [label for label in measured if label.startswith("even split")]:
            weighted = even.replace("even split", "speed-weighted split")
            if weighted in measured:
                speedup = measured[even] / measured[weighted]
                lines.append(f"- {link}, {even.partition(', ')[2] or 'DISCO 0.2'}: the speed-weighted split is "
                             f"{speedup:.2f}x faster than the even split (target: at least 1.3x): "
                             f"{'met' if speedup >= 1.3 else 'missed'}")
    return lines + [""]


def _train_section(rows: list) -> list[str]:
    if not rows:
        return []
    lines = ["## One slow link: uniform byte budget against a latency budget (Fashion-MNIST mobilenet_v2, 4 nodes)",
             "", "Nodes 0-2 on 20 Mbit/s links, node 3 on 2 Mbit/s (10x slower), a switch (bench/netns.py).", "",
             "| training | seed | accuracy | bytes/image | measured (ms) | predicted (ms) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['seed']} | {r['accuracy']:.2%} | {r['bytes']:,} | {r['measured_ms']:,.1f} | "
              f"{r['predicted_ms']:,.1f} |" for r in rows]
    uniform = [r for r in rows if r["label"].startswith("uniform")]
    budget = [r for r in rows if r["label"].startswith("latency")]
    if uniform and budget:
        accuracy = (statistics.mean(r["accuracy"] for r in budget) - statistics.mean(r["accuracy"] for r in uniform))
        speedup = statistics.mean(r["measured_ms"] for r in uniform) / statistics.mean(r["measured_ms"] for r in budget)
        lines.append(f"\n- latency budget vs uniform byte budget: accuracy {accuracy * 100:+.2f} points, measured "
                     f"latency {speedup:.2f}x lower (target: same accuracy at at least 1.3x lower latency)")
    return lines + [""]


def repredict(results: dict) -> None:
    """Predictions again from the saved topologies and deployments (after the model changed; nothing measured)."""
    for row in results.get("predict", []):
        guess = predicted(Path(row["deploy"]), Topology.load(row["topology"]))
        row["predicted_ms"], row["error"] = guess * 1e3, (guess * 1e3 - row["measured_ms"]) / row["measured_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="predict,weights,train", help="comma-separated: predict, weights, train")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per row (median reported)")
    parser.add_argument("--train-budget", type=float, default=0.1, help="the uniform byte budget of part train")
    parser.add_argument("--weights-budgets", default="0.2,0.05",
                        help="part weights: the byte budgets both splits are measured at (comma-separated)")
    parser.add_argument("--latency-factor", type=float, default=1.5,
                        help="part train: the latency budget is the uniform run's predicted latency over this")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "uneven"), help="where results go")
    parser.add_argument("--repredict", action="store_true", help="only predict the saved rows again")
    args = parser.parse_args()
    args.command_line = shlex.join(sys.argv[1:])
    if os.geteuid() != 0:
        raise SystemExit("bench/uneven.py needs root (network namespaces, tc, cgroup CPU quotas)")
    WORK.mkdir(parents=True, exist_ok=True)
    saved = Path(args.out) / "uneven.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    if args.repredict:
        repredict(results)
        _save(args, results)
        return
    parts = args.parts.split(",")
    for part in parts:  # a part measured again replaces its rows
        results.pop(part, None)
        if part == "weights" and "predict" in results:
            results["predict"] = [r for r in results["predict"] if not r["link"].startswith("switch")]
    began = time.time()
    for name, run in (("predict", part_predict), ("weights", part_weights), ("train", part_train)):
        if name in parts:
            run(args, results)
    results["elapsed_s"] = time.time() - began
    _save(args, results)
    print((Path(args.out) / "uneven.md").read_text())


if __name__ == "__main__":
    main()
