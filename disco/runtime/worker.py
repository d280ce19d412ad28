"""One rank of a distributed run: `torchrun --nproc-per-node N -m disco.runtime DEPLOY --input ...`.

Rank 0 reads the input (refusing a bad one before anything is sent), sends each batch to every rank,
runs its own part and assembles the output. Other ranks serve batches until rank 0 says stop. Shards
are verified against the manifest before the process group is joined, and every rank checks that all
hold the same manifest. Errors end the rank at once with one line naming the cause (and the peer, for
a dead or hung one); nothing waits forever.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch.utils._pytree import tree_flatten, tree_map

from disco.errors import DiscoError
from disco.export.manifest import MANIFEST_NAME, Manifest, sha256_of
from disco.runtime.comm import CATEGORIES, Comm, choose_backend, launch_environment
from disco.runtime.inputs import Batch, eval_batches, file_batches
from disco.transport import transport_dtype
from disco.runtime.program import LocalProgram, load_program
from disco.tasks.objectives import OBJECTIVES, objective_for
from disco.tasks.predictions import describe

RUN, STOP, REFUSED = 1, 0, 2


@dataclass(kw_only=True)
class RunOptions:
    """deploy: folder from `disco export`. Exactly one of input (image, folder, .safetensors) or eval.
    repeat: times each batch is run (latency medians); warmup: untimed runs of the first batch first."""

    deploy: str
    input: str | None = None
    eval: bool = False
    limit: int | None = None
    batch_size: int | None = None
    repeat: int = 1
    warmup: int = 0
    timeout: float = 60.0
    backend: str = "auto"
    save_output: str | None = None
    summary: str | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        if (self.input is None) == (not self.eval):
            raise DiscoError("give exactly one of --input PATH or --eval")
        if self.batch_size is None:
            self.batch_size = 256 if self.eval else 1
        if self.batch_size < 1 or self.repeat < 1 or self.warmup < 0 or (self.limit is not None and self.limit < 1):
            raise DiscoError("--batch-size, --repeat and --limit must be at least 1, --warmup at least 0")
        if self.timeout <= 0:
            raise DiscoError("--timeout must be positive (seconds)")


class Coordinator:
    """Rank 0: feeds batches, runs its part, gathers and assembles outputs, keeps the numbers."""

    def __init__(self, program: LocalProgram, comm: Comm, manifest: Manifest):
        self.program, self.comm, self.manifest = program, comm, manifest
        self.transport = transport_dtype(manifest.transport_dtype, runtime=True).torch_dtype
        self.others = [k for k in range(comm.world) if k != comm.rank]
        self.counts = {k: sum(p.numel() for p in program.output_positions[k]) for k in self.others}
        self.latencies: list[float] = []
        self.images = 0

    def _tell_all(self, status: int, batch: int) -> None:
        header = torch.tensor([status, batch], dtype=torch.int64)
        self.comm.exchange({k: header for k in self.others}, {}, category="control", what="sending work").wait()

    def forward(self, x: torch.Tensor, timed: bool = True):
        start = time.perf_counter()
        x = x.to(self.comm.device)
        self._tell_all(RUN, x.shape[0])
        scatter = self.comm.exchange({k: x.to(self.transport) for k in self.others}, {}, category="input",
                                     what="sending the input")
        local = self.program.forward(x, self.comm)
        scatter.wait()
        receives = {k: ((x.shape[0], n), self.transport) for k, n in self.counts.items() if n}
        parts = self.comm.exchange({}, receives, category="control", what="gathering the output").wait()
        output = self.program.assemble_output({0: self.program.output_part(local), **parts})
        if self.comm.device.type == "cuda":
            torch.cuda.synchronize()
        if timed:
            self.latencies.append(time.perf_counter() - start)
        self.images += x.shape[0]
        return output

    def stop(self, status: int = STOP) -> None:
        self._tell_all(status, 0)


def serve(program: LocalProgram, comm: Comm, manifest: Manifest) -> None:
    """Ranks other than 0: run every batch rank 0 sends until it says stop."""
    transport = transport_dtype(manifest.transport_dtype, runtime=True).torch_dtype
    while True:
        status, batch = comm.receive((2,), torch.int64, 0, what="waiting for work from rank 0").tolist()
        if status == STOP:
            return
        if status == REFUSED:
            raise DiscoError("rank 0 refused the input (see its error); stopping")
        x = comm.receive((batch, *manifest.input_shape), transport, 0, what="receiving the input")
        local = program.forward(x.to(torch.float32), comm)
        part = program.output_part(local)
        if part.shape[1]:
            comm.send(part.to(transport), 0, category="output", what="sending the output")


def _counters(comm: Comm) -> dict[str, list[list[int]]]:
    """Every rank's bytes sent per category and destination, collected on rank 0 as [src][dst]."""
    mine = torch.tensor([comm.sent[c] for c in CATEGORIES], dtype=torch.int64)
    if comm.rank != 0:
        comm.send(mine, 0, category="control", what="reporting byte counts")
        return {}
    others = {k: ((len(CATEGORIES), comm.world), torch.int64) for k in range(1, comm.world)}
    received = comm.exchange({}, others, category="control", what="collecting byte counts").wait()
    table = torch.stack([mine] + [received[k].cpu() for k in range(1, comm.world)])  # [src, category, dst]
    return {c: table[:, i].tolist() for i, c in enumerate(CATEGORIES)}


def _detector(manifest: Manifest):
    """Node 0's decoder of detection head maps (anchors, box decoding, NMS: no weights needed)."""
    if manifest.task != "detection":
        return None
    from disco.models import build_for_data
    return build_for_data(manifest.model.model, channels=manifest.model.channels, classes=manifest.model.classes,
                          **manifest.model.kwargs).eval()


def _save_outputs(outputs: list, path: str) -> None:
    """One tensor 'output', or 'output.0', 'output.1'... for models with several outputs (detection maps)."""
    leaves = [tree_flatten(o)[0] for o in outputs]
    tensors = [torch.cat([batch[i] for batch in leaves]).contiguous() for i in range(len(leaves[0]))]
    names = ["output"] if len(tensors) == 1 else [f"output.{i}" for i in range(len(tensors))]
    safetensors.torch.save_file(dict(zip(names, tensors)), path)


def coordinate(program: LocalProgram, comm: Comm, manifest: Manifest, options: RunOptions, batches) -> dict:
    coordinator = Coordinator(program, comm, manifest)
    detector = _detector(manifest)
    objective = objective_for(manifest.task, classes=manifest.model.classes, model=detector,
                              image_size=tuple(manifest.input_shape[1:]))
    # only rank 0 scores: no synchronisation of the metric across the process group
    metric = objective.metric(sync_on_compute=False) if options.eval else None
    predictions, outputs = [], []
    try:
        for index, batch in enumerate(batches):
            for _ in range(options.warmup if index == 0 else 0):
                coordinator.forward(batch.images, timed=False)
            for _ in range(options.repeat):
                output = coordinator.forward(batch.images)
            output = tree_map(lambda t: t.cpu(), output)
            if metric is not None:
                objective.update(metric, output, batch.labels)
            else:
                described = describe(manifest.task, output, manifest.class_names, detector=detector,
                                     image_size=manifest.input_shape[1:])
                predictions += [{"input": name, **d} for name, d in zip(batch.names, described)]
            if options.save_output:
                outputs.append(output)
    except DiscoError:  # bad input met mid-way: tell the others before failing
        coordinator.stop(REFUSED)
        raise
    coordinator.stop()
    if options.save_output:
        _save_outputs(outputs, options.save_output)
    score = objective.score(metric) if metric is not None and coordinator.images else None
    return {"metric": objective.metric_name, "score": score,
            "accuracy": score if objective.metric_name == "accuracy" else None,
            "predictions": predictions, "latencies_s": coordinator.latencies, "images": coordinator.images}


def summarise(result: dict, sent: dict, manifest: Manifest, comm: Comm, backend: str) -> dict:
    images = result["images"]
    forwards = len(result["latencies_s"])
    per_image = {c: sum(map(sum, sent[c])) / images if images else 0.0 for c in CATEGORIES}
    return {
        "nodes": comm.world, "backend": backend, "transport_dtype": manifest.transport_dtype,
        "images": images, "forwards": forwards,
        "latency_s": {"median": statistics.median(result["latencies_s"]) if forwards else None,
                      "all": result["latencies_s"]},
        "accuracy": result["accuracy"], "metric": result["metric"], "score": result["score"],
        "reference": manifest.reference,
        "bytes_sent": sent, "bytes_per_image": per_image,
        "expected_per_image": {"activations": manifest.expected["bytes"], "norm": manifest.expected.get("norm_bytes", 0),
                               **manifest.expected["io_bytes"]},
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
        print(f"latency: median {summary['latency_s']['median'] * 1000:.2f} ms per batch over {summary['forwards']} "
              f"runs ({summary['nodes']} ranks, {summary['backend']})")
    actual, expected = summary["bytes_per_image"], summary["expected_per_image"]
    print(f"bytes per image ({summary['transport_dtype']}): activations {actual['activations']:,.0f} "
          f"(simulation {expected['activations']:,}), input {actual['input']:,.0f} ({expected['input']:,}), "
          f"output {actual['output']:,.0f} ({expected['output']:,})"
          + (f", norm sums {actual['norm']:,.0f} ({expected['norm']:,})" if expected["norm"] else ""))
    for rank, row in enumerate(summary["bytes_sent"]["activations"]):
        print(f"  rank {rank} sent {sum(row):,} activation bytes in total: " +
              ", ".join(f"{b:,} to rank {dst}" for dst, b in enumerate(row) if dst != rank))


def run_rank(options: RunOptions) -> dict | None:
    rank, world = launch_environment()
    folder = Path(options.deploy)
    manifest = Manifest.load(folder)
    if world != manifest.nodes:
        raise DiscoError(f"the deployment is split across {manifest.nodes} nodes but {world} ranks were started")
    backend, device = choose_backend(options.backend)
    program = load_program(manifest, folder, rank, device)  # shard verified before any communication
    batches = None
    if rank == 0:
        collate = OBJECTIVES[manifest.task].collate
        batches = eval_batches(manifest, options.batch_size, options.limit, collate) if options.eval \
            else file_batches(options.input, manifest, options.batch_size)
    comm = Comm.start(timeout=options.timeout, backend=backend, device=device)
    comm.agree_on(sha256_of(folder / MANIFEST_NAME), "manifest")
    if rank == 0 and not options.quiet:
        print(f"ready: {world} ranks joined ({backend}), shards and manifest verified", flush=True)
    if rank != 0:
        serve(program, comm, manifest)
        _counters(comm)
        comm.close()
        return None
    with torch.no_grad():
        result = coordinate(program, comm, manifest, options, batches)
    summary = summarise(result, _counters(comm), manifest, comm, backend)
    comm.close()
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m disco.runtime", description=(
        "One rank of a distributed DISCO run (start it with torchrun, or use `disco run`)."))
    add_run_arguments(parser)
    return parser


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("deploy", help="deployment folder written by `disco export`")
    parser.add_argument("--input", help="an image, a folder of images, or a .safetensors file with a tensor 'input'")
    parser.add_argument("--eval", action="store_true",
                        help="score the model on its dataset's test split (accuracy, mIoU, mAP or PSNR by task)")
    parser.add_argument("--limit", type=int, help="with --eval: only this many test images")
    parser.add_argument("--batch-size", type=int, help="images per forward (default 1; 256 with --eval)")
    parser.add_argument("--repeat", type=int, default=1, help="run each batch this many times (latency)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed runs of the first batch before timing")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for a peer before failing with an error naming it (default 60)")
    parser.add_argument("--backend", default="auto", help="auto (NCCL if every rank has a GPU, else gloo), gloo, nccl")
    parser.add_argument("--save-output", help="write the outputs to this .safetensors file (rank 0)")
    parser.add_argument("--summary", help="write predictions, latency and bytes sent per rank to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", "?")
    try:
        summary = run_rank(RunOptions(**vars(args)))
    except (DiscoError, FileNotFoundError) as error:
        print(f"disco run: rank {rank}: error: {error}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)  # leave at once: tearing down a broken process group could wait on the dead peer
    except Exception:  # a bug, not bad input: show where, but still do not leave the peers waiting
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    if summary is not None:
        if args.summary:
            Path(args.summary).write_text(json.dumps(summary, indent=1))
        if not args.quiet:
            print_summary(summary)
    return 0
