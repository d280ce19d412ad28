"""Training throughput on several processes and in lower precision (issue 19).

    python bench/train_scale.py                  # this machine's CPUs: 1 process against 2 (about 10 min on 2 cores)
    python bench/train_scale.py --gpu            # a GPU: ResNet-50 at 224x224, batch 128, fp32 / bf16 / fp16

CPU: `disco train` itself, started by torchrun with 1 and with 2 processes (gloo) sharing this machine's cores
(threads per process = cores / processes), on the Fashion-MNIST mobilenet_v2 (width 0.5) of `make demo`: images
per second of each phase's training steps (metrics.jsonl's train_seconds), median of --repeat runs taken in
turns. Both runs train the same global batch and the same steps (disco/training/batches.py), so the ratio is
what the second process buys on the same cores. Writes docs/results/train_scale/cpu.md and .json.

GPU: the training loop's steps (disco.training.loops.train_epoch, the one `disco train` runs) on one GPU, with
random images already in memory (the model's speed, not the data loader's): the dense ResNet-50 and its DISCO
split (2 nodes, masks cut to 0.2, the sparsify phase's step with the regulariser and mask gradients) in fp32, bf16
and fp16, channels-last. The hours per ImageNet epoch are 1,281,167 images at that rate on G GPUs assuming
linear scaling (DDP on one host usually gets 90% or more of it); the data loader must keep up (--workers).
Writes docs/results/train_scale/gpu.md and .json. `--device cpu --image-size 32 --batch 8 --steps 2` runs the
same code at toy size where no GPU is lent.
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "docs" / "results" / "train_scale"
IMAGENET_TRAIN_IMAGES = 1_281_167
CPU_RUN = ["--model", "torchvision:mobilenet_v2", "--model-kwargs", "width_mult=0.5", "--stem-stride", "1",
           "--dataset", "fashion-mnist", "--nodes", "2", "--budget", "0.2", "--epochs", "1", "--batch-size", "128",
           "--min-phase-steps", "0", "--test-subset", "256"]
PHASES = ("dense", "sparsify", "finetune")


# --- CPU: disco train under torchrun --------------------------------------------------------------------------
def cpu_run(processes: int, images: int, work: Path) -> dict[str, float]:
    """Images per second of each phase's steps, one `disco train` on `processes` processes."""
    out = work / f"p{processes}-{time.monotonic_ns()}"
    threads = max(1, (os.cpu_count() or 1) // processes)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "disco", "train", *CPU_RUN, "--train-subset", str(images), "--device", "cpu", "--out", str(out)]
    result = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS=str(threads)), cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["phase"]: images / m["train_seconds"] for m in metrics}


def measure_cpu(images: int, repeat: int) -> dict:
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="train_scale-") as work:
        for attempt in range(repeat):
            for processes in runs:  # in turns: a slow minute of the machine hits both alike
                runs[processes].append(cpu_run(processes, images, Path(work)))
                print(f"run {attempt + 1}/{repeat}, {processes} process(es): {runs[processes][-1]}", flush=True)
    medians = {p: {phase: statistics.median(r[phase] for r in rs) for phase in PHASES} for p, rs in runs.items()}
    return {"cores": os.cpu_count(), "images": images, "repeat": repeat, "command": CPU_RUN, "runs": runs,
            "images_per_s": medians, "ratio": {phase: medians[2][phase] / medians[1][phase] for phase in PHASES}}


def render_cpu(result: dict) -> str:
    lines = ["# Training throughput: 1 process against 2 on this machine's CPUs", "",
             f"`python bench/train_scale.py --repeat {result['repeat']}` on {result['cores']} cores: `disco train "
             f"{' '.join(result['command'])} --train-subset {result['images']}` started by torchrun with 1 and 2 "
             "processes (threads per process: cores / processes). Images per second of each phase's training steps, "
             f"median of {result['repeat']} runs taken in turns.", "",
             "| phase | 1 process | 2 processes | ratio |", "|---|---|---|---|"]
    for phase in PHASES:
        one, two = result["images_per_s"][1][phase], result["images_per_s"][2][phase]
        lines.append(f"| {phase} | {one:.0f} | {two:.0f} | {two / one:.2f}x |")
    return "\n".join(lines) + "\n"


# --- GPU: the training loop's steps -----------------------------------------------------------------------------
def gpu_case(model_name: str, disco_split: bool, precision: str, args) -> float:
    """Images per second of train_epoch's steps on random images in memory."""
    from torch.utils.data import DataLoader, TensorDataset

    from disco.models import build_for_data
    from disco.sparsify import Sparsifier, SparsifyOptions
    from disco.split.partitioner import partition
    from disco.tasks.registry import get_task
    from disco.training.batches import BatchLayout, StepSampler
    from disco.training.data_parallel import DataParallel
    from disco.training.loops import TaskLoss, train_epoch
    from disco.training.precision import MixedPrecision

    device = torch.device(args.device)
    size, batch, steps = args.image_size, args.batch, args.warmup + args.steps + 1  # the last one untimed
    torch.manual_seed(0)
    model = build_for_data(model_name, channels=3, classes=1000)
    example = torch.randn(1, 3, size, size)
    sparsifier = None
    if disco_split:
        model = partition(model, nodes=2, example_inputs=example)
    model = model.to(device, memory_format=torch.channels_last)
    if disco_split:
        sparsifier = Sparsifier(model, example.to(device), SparsifyOptions(budget=0.2, total_steps=10**6))
        sparsifier.cut_to(0.2)
    images = TensorDataset(torch.randn(batch * steps, 3, size, size), torch.randint(0, 1000, (batch * steps,)))
    loader = DataLoader(images, batch_sampler=StepSampler(BatchLayout(len(images), batch)),
                        pin_memory=device.type == "cuda")
    objective = get_task("classification").objective(classes=1000, model=model, image_size=(size, size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    timed = _StepClock(device, args.warmup)
    train_epoch(model, _Timed(loader, timed), optimizer, scheduler, TaskLoss(objective), device=device,
                desc=f"{model_name} {precision}", objective=objective, sparsifier=sparsifier,
                precision=MixedPrecision(precision, device), parallel=DataParallel(device=device))
    return batch * args.steps / timed.elapsed()


class _StepClock:
    """Wall time from the end of the warm-up steps to the end of the timed ones (the device synchronised when a
    step's batch is asked for: the step before has then ended)."""

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup, self.seen, self.began, self.ended = device, warmup, 0, None, None

    def tick(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self.seen == self.warmup:
            self.began = now
        self.ended = now
        self.seen += 1

    def elapsed(self) -> float:
        return self.ended - self.began


class _Timed:
    """The loader, ticking the clock as each step's batch is asked for (the previous step has then ended)."""

    def __init__(self, loader, clock: _StepClock):
        self.loader, self.clock, self.batch_sampler = loader, clock, loader.batch_sampler

    def __iter__(self):
        for batch in self.loader:
            self.clock.tick()
            yield batch


def measure_gpu(args) -> dict:
    rows = []
    for disco_split in (False, True):
        for precision in ("fp32", "bf16", "fp16"):
            rate = gpu_case(args.model, disco_split, precision, args)
            rows.append({"model": args.model, "disco": disco_split, "precision": precision, "images_per_s": rate,
                         "imagenet_epoch_hours": {g: IMAGENET_TRAIN_IMAGES / (rate * g) / 3600 for g in (1, 8, 16)}})
            print(rows[-1], flush=True)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    return {"device": name, "image_size": args.image_size, "batch": args.batch, "steps": args.steps, "rows": rows}


def render_gpu(result: dict) -> str:
    lines = [f"# Training steps on one {result['device']}", "",
             f"`python bench/train_scale.py --gpu`: batch {result['batch']} at {result['image_size']}x"
             f"{result['image_size']}, {result['steps']} timed steps of disco.training.loops.train_epoch on random "
             "images in memory, channels-last. Hours per ImageNet epoch assume linear scaling over GPUs and a data "
             "loader that keeps up.", "",
             "| model | precision | images/s | ImageNet epoch, 1 GPU | 8 GPUs | 2 hosts x 8 |", "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        hours = row["imagenet_epoch_hours"]
        label = f"{row['model']} {'DISCO 2 nodes, 0.2' if row['disco'] else 'dense'}"
        lines.append(f"| {label} | {row['precision']} | {row['images_per_s']:.0f} | {hours[1]:.2f} h | "
                     f"{hours[8] * 60:.0f} min | {hours[16] * 60:.0f} min |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="the GPU benchmark (default: 1 against 2 CPU processes)")
    parser.add_argument("--images", type=int, default=4096, help="CPU: training images per run")
    parser.add_argument("--repeat", type=int, default=3, help="CPU: runs of each process count")
    parser.add_argument("--device", default="cuda", help="GPU benchmark: the device (cpu for a toy-size check)")
    parser.add_argument("--model", default="torchvision:resnet50", help="GPU benchmark: the model")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="GPU benchmark: timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.gpu:
        result, name, render = measure_gpu(args), "gpu", render_gpu
    else:
        result, name, render = measure_cpu(args.images, args.repeat), "cpu", render_cpu
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{name}.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
