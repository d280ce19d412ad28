"""Where a 2-node deployment's latency goes: compute alone, the exchanges alone, and both together.

Three measurements of one deployment, one after the other on the same machine:
  1. the real run: `disco run --profile` (torchrun, gloo, a core per rank): latency, each rank's compute and wait;
  2. compute alone: every rank's program in this process with an instant in-memory link (each receive is
     answered at once with a buffer of the right shape), so only the rank's own work is timed;
  3. exchanges alone: two processes (a core each, gloo) post the deployment's exchanges in the same order and
     sizes (rank k's bytes per layer from step 1), back to back, with no compute between them.
If (1) is much more than max(2) and well below (2) + (3), overlap works but the exchanges' CPU cost is not hidden:
on a core of its own a rank pays for its own socket copies and gloo's I/O thread. Writes docs/results/rank-breakdown.md.
Re-run (after bench/latency.py has exported the deployments):
    .venv/bin/python bench/rank_breakdown.py runs/latency/resnet50-224-n2-0.2 runs/latency/resnet50-224-n2-0.0
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REPEAT = 9


def real_run(deploy: Path, profile: Path) -> dict:
    command = [sys.executable, "-m", "disco", "run", str(deploy), "--input", str(deploy / "input.safetensors"),
               "--repeat", str(REPEAT), "--warmup", "2", "--quiet", "--profile", str(profile)]
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    return json.loads((profile / "layers.json").read_text())


def compute_alone(deploy: Path) -> tuple[list[float], list[list[str]]]:
    """Median forward (ms) of each rank's program with instant exchanges, and each rank's step names in order."""
    import torch
    from disco.export.manifest import Manifest
    from disco.runtime.comm import Comm, Exchange
    from disco.runtime.program import load_program

    class InstantLink(Comm):
        def _post(self, sends, receives, what):
            exchange = Exchange(self, what, [])
            exchange.received = {src: torch.zeros(shape, dtype=dtype) for src, (shape, dtype) in receives.items()}
            return exchange

    torch.set_num_threads(1)
    manifest = Manifest.load(deploy)
    x = torch.randn(1, *manifest.input_shape)
    medians, orders = [], []
    for rank in range(manifest.nodes):
        program = load_program(manifest, deploy, rank, torch.device("cpu"))
        link = InstantLink(rank, manifest.nodes, torch.device("cpu"), 60.0)
        times = []
        with torch.no_grad():
            for _ in range(REPEAT + 2):
                began = time.perf_counter()
                program.forward(x, link)
                times.append(time.perf_counter() - began)
        medians.append(statistics.median(times[2:]) * 1e3)
        orders.append([step.graph_node.name for step in program.steps])
    return medians, orders


REPLAY = """
import json, os, statistics, sys, time, torch, torch.distributed as dist
sizes = json.loads(sys.argv[1])  # [[bytes rank 0 sends, bytes rank 1 sends], ...] in step order
dist.init_process_group("gloo")
rank = dist.get_rank(); peer = 1 - rank
os.sched_setaffinity(0, {{rank % os.cpu_count()}})
times = []
for _ in range({repeat} + 2):
    dist.barrier()
    began = time.perf_counter()
    for pair in sizes:
        send, receive = torch.empty(pair[rank] // 4), torch.empty(pair[peer] // 4)
        ops = [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, receive, peer)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    times.append(time.perf_counter() - began)
if rank == 0:
    print(json.dumps(statistics.median(times[2:]) * 1e3))
dist.destroy_process_group()
"""


def exchanges_alone(sizes: list[list[int]]) -> float:
    """Median ms of the exchange sequence between two processes with nothing else to do."""
    if not sizes:
        return 0.0
    code = REPLAY.format(repeat=REPEAT)
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 500),
               OMP_NUM_THREADS="1")
    ranks = [subprocess.Popen([sys.executable, "-c", code, json.dumps(sizes)], env=dict(env, RANK=str(rank)),
                              stdout=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = [process.communicate()[0] for process in ranks]
    if any(process.returncode for process in ranks):
        raise RuntimeError("the exchange replay failed")
    return json.loads(outputs[0].strip().splitlines()[-1])


def measure(deploy: Path) -> dict:
    with tempfile.TemporaryDirectory() as profile:
        table = real_run(deploy, Path(profile))
    if len(table["compute_ms_per_rank"]) != 2:
        raise SystemExit(f"{deploy}: rank_breakdown replays 2-node deployments only")
    alone, orders = compute_alone(deploy)
    bytes_by_step = {row["step"]: row["bytes_sent"] for row in table["steps_by_slowest_compute"]}
    sizes = [[int(b) for b in bytes_by_step[name]] for name in orders[0]
             if name in bytes_by_step and any(bytes_by_step[name])]
    return {"deploy": deploy.name, "latency_ms": table.get("median_latency_ms"), "compute_ms": table["compute_ms_per_rank"],
            "wait_ms": table["wait_ms_per_rank"], "compute_alone_ms": alone, "exchanges": len(sizes),
            "bytes_sent": [sum(pair[k] for pair in sizes) for k in range(2)], "exchanges_alone_ms": exchanges_alone(sizes)}


def render(rows: list[dict], elapsed: float) -> str:
    lines = ["# Where a 2-node deployment's latency goes", "",
             f"Generated by `python bench/rank_breakdown.py {' '.join('runs/latency/' + r['deploy'] for r in rows)}` in "
             f"{elapsed:.0f} s on a {os.cpu_count()}-core CPU machine (host loopback, unshaped; a core per rank; "
             f"medians of {REPEAT} runs). Real run: `disco run --profile`. Compute alone: each rank's program with "
             "an instant link. Exchanges alone: the same exchanges (order and sizes) between two processes with "
             "no compute.", "",
             "| deployment | real latency (ms) | real compute, rank 0 / 1 (ms) | real wait, rank 0 / 1 (ms) "
             "| compute alone, rank 0 / 1 (ms) | exchanges | bytes sent, rank 0 / 1 | exchanges alone (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pair = lambda values, f="{:.1f}": " / ".join(f.format(v) for v in values)  # noqa: E731
        latency = f"{r['latency_ms']:.1f}" if r["latency_ms"] is not None else "-"
        lines.append(f"| {r['deploy']} | {latency} | {pair(r['compute_ms'])} | {pair(r['wait_ms'])} | "
                     f"{pair(r['compute_alone_ms'])} | {r['exchanges']} | {pair(r['bytes_sent'], '{:,}')} | "
                     f"{r['exchanges_alone_ms']:.1f} |")
    lines += ["", "Real compute minus compute alone is what the exchanges cost the rank's one core: posting, socket "
              "copies and gloo's I/O thread preempting the compute thread (and evicting its caches). It is several "
              "times the exchanges' own time alone, and no overlap can hide it, because there is no second core to "
              "hide it on. This is why ResNet-50 DISCO 0.2 on 2 ranks of one core each stays near one process's "
              "time on this machine (docs/results/latency.md); on devices with a spare core for the network "
              "thread the compute-alone column is the relevant one. The machine's speed also drifts by up to 2x "
              "between minutes (shared host), so compare columns of one row, measured back to back.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("deploys", nargs="+", type=Path, help="2-node deployment folders with an input.safetensors")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "rank-breakdown.md")
    args = parser.parse_args()
    began = time.time()
    rows = [measure(deploy) for deploy in args.deploys]
    args.out.write_text(render(rows, time.time() - began))
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
