"""`disco serve` under load and faults: throughput and latency at 1, 8 and 32 concurrent clients, against what
`disco run` reaches with the same batch size; then a rank killed (SIGKILL) and one frozen (SIGSTOP) during load.

Two deployments, 2 nodes each: the Fashion-MNIST mobilenet_v2 of `make demo` (trained; trained here with the same
command when runs/demo is missing), asked with real Fashion-MNIST test images; ResNet-50 at budget 0.2 (random
weights, groups chosen as in bench/latency.py), asked with scikit-image's photographs (resized to 224x224 by the
service, as the deployment's preprocessing says). Load is closed-loop (each client sends its next request when
its last one is answered), on loopback only, bounded in requests and in time. Writes docs/results/serve.{md,json,png}.
Re-run:
    .venv/bin/python bench/serve.py           # about 15 minutes on 2 CPU cores
    .venv/bin/python bench/serve.py --quick   # smoke version (numbers not meaningful)
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import safetensors.torch
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import latency  # noqa: E402  (bench/latency.py: how its ResNet-50 deployment chooses groups)
import loadgen  # noqa: E402  (bench/loadgen.py)
import disco  # noqa: E402
from disco.export import ModelSpec, export  # noqa: E402
from disco.errors import DiscoError  # noqa: E402
from disco.export.manifest import Manifest  # noqa: E402
from disco.models import build_for_data  # noqa: E402
from disco.serve import client, local_ranks  # noqa: E402
from disco.training.export_run import export_run  # noqa: E402

WORK = ROOT / "runs" / "serve"
RESULTS = ROOT / "docs" / "results"
CONCURRENCY = (1, 8, 32)
MAX_BATCH = 16
IMAGENET = {"channels": 3, "size": [224, 224], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
DEMO_TRAIN = ["--model", "torchvision:mobilenet_v2", "--model-kwargs", "width_mult=0.5", "--stem-stride", "1",
              "--nodes", "2", "--budget", "0.1", "--epochs", "1", "--train-subset", "10000", "--test-subset", "2000"]
CLIENT_TIMEOUT_S = 60.0  # a request unanswered this long counts as hung


# --- deployments and the images sent --------------------------------------------------------------------------
def fmnist_deployment() -> Path:
    run, folder = ROOT / "runs" / "demo", WORK / "fmnist-mobilenet_v2-n2-0.1"
    if not (run / "disco.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "disco", "train", *DEMO_TRAIN, "--out", str(run)], check=True, cwd=ROOT)
    if not folder.is_dir():
        export_run(run, folder)
    return folder


def resnet_deployment(quick: bool) -> Path:
    """bench/latency.py's ResNet-50 DISCO 0.2 deployment (same seed, same group choice), exported with the ImageNet
    way of reading images recorded (a deployment's manifest cannot be edited after export: its shards are bound
    to it)."""
    folder = WORK / f"resnet50-{64 if quick else 224}-n2-0.2"
    if latency._current(folder):
        return folder
    size = 64 if quick else 224
    torch.manual_seed(0)
    spec = ModelSpec(model="torchvision:resnet50", channels=3, classes=1000)
    model = build_for_data(spec.model, channels=3, classes=1000).eval()
    example = torch.randn(1, 3, size, size)
    simulated = disco.partition(model, nodes=2, example_inputs=example).eval()
    latency._masks_on_random_data(simulated, example, 0.2, steps=2 if quick else 4)
    export(simulated, folder, example_inputs=example, spec=spec, transport_dtype="fp32",
           preprocess={**IMAGENET, "size": [size, size]})
    return folder


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def fmnist_images(count: int) -> list[bytes]:
    from disco.data.datasets import fashion_mnist_splits

    _, test = fashion_mnist_splits()
    return [_png(Image.fromarray(test.data[i].numpy(), mode="L")) for i in range(count)]


def photo_images() -> list[bytes]:
    import skimage.data

    from disco.data.superres import SKIMAGE_PHOTOS

    return [_png(Image.fromarray(getattr(skimage.data, name)())) for name in SKIMAGE_PHOTOS]


# --- the service ----------------------------------------------------------------------------------------------
class Service:
    def __init__(self, deploy: Path, port: int, *args: str):
        self.url, self.log = f"http://127.0.0.1:{port}", WORK / f"serve-{deploy.name}.log"
        env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "disco", "serve", str(deploy), "--port", str(port),
                                             "--max-batch", str(MAX_BATCH), *args], env=env, stderr=log, cwd=ROOT)

    def wait_ready(self, timeout: float = 300) -> float:
        try:
            return client.wait_ready(self.url, self.process, timeout)
        except DiscoError as error:
            raise RuntimeError(f"{error}: {self.log.read_text()[-2000:]}") from None

    def ranks(self) -> list[int]:
        return sorted(pid for torchrun in local_ranks.local_children(self.process.pid)
                      for pid in local_ranks.local_children(torchrun))

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) used so far by the front end and by the ranks together."""
        def used(pid: int) -> float:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return {"front end": used(self.process.pid), "ranks": sum(used(pid) for pid in self.ranks())}

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            return response.read().decode()

    def stop(self) -> None:
        client.interrupt(self.process)


def _metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


# --- load -----------------------------------------------------------------------------------------------------
def load(url: str, images: list[bytes], concurrency: int, seconds: float, max_requests: int,
         expected: dict[int, tuple[int, float]] | None = None) -> dict:
    """Closed-loop clients (bench/loadgen.py) until `seconds` pass or `max_requests` were sent; every answer checked
    against `expected` (image index -> top-1 class and probability) when given."""
    host, port = url.removeprefix("http://").split(":")
    requests = [loadgen.request_bytes(host, "/v1/predict", image) for image in images]
    result = loadgen.run_load(host, int(port), requests, concurrency, seconds, max_requests, CLIENT_TIMEOUT_S)
    answered = sorted(r.seconds for r in result.records if r.status == 200)
    verdicts = [_verdict(r, expected) for r in result.records]
    statuses = sorted({r.status for r in result.records} - {200})
    return {"concurrency": concurrency, "requests": len(result.records), "seconds": result.seconds,
            "answered": len(answered), "images_per_s": len(answered) / result.seconds,
            "latency_ms": {q: 1000 * _quantile(answered, q) for q in (0.5, 0.95, 0.99)} if answered else None,
            "errors": {str(s): sum(1 for r in result.records if r.status == s) for s in statuses if s != 0},
            "correct": verdicts.count("correct"), "wrong": verdicts.count("wrong"), "hung": verdicts.count("hung")}


def _verdict(record: loadgen.Record, expected: dict | None) -> str:
    if record.status == 0:
        return "hung"
    if record.status != 200:
        return "error"
    if expected is None:
        return "answered"
    label, probability = expected[record.request]
    found = loadgen.top_answer(record)
    return "correct" if found[0] == label and abs(found[1] - probability) < 1e-4 else "wrong"


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def answers(url: str, images: list[bytes]) -> dict[int, tuple[int, float]]:
    """Each image's top class and probability, asked one at a time before any fault."""
    found = {}
    for index, image in enumerate(images):
        status, answer = client.post_image(url, image, CLIENT_TIMEOUT_S)
        if status != 200:
            raise RuntimeError(f"the service refused image {index}: {answer}")
        found[index] = (answer["top"][0]["class"], answer["top"][0]["probability"])
    return found


def disco_run_rate(deploy: Path, batch: int, repeat: int) -> float:
    """Images per second of `disco run` on one batch of `batch` images, run `repeat` times."""
    shape = Manifest.load(deploy).input_shape
    inputs, summary = WORK / f"{deploy.name}-batch{batch}.safetensors", WORK / f"{deploy.name}-run.json"
    safetensors.torch.save_file({"input": torch.randn(batch, *shape)}, str(inputs))
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "disco", "run", str(deploy), "--input", str(inputs), "--batch-size",
                    str(batch), "--repeat", str(repeat), "--warmup", "1", "--summary", str(summary), "--quiet"],
                   check=True, env=env, cwd=ROOT)
    return json.loads(summary.read_text())["images_per_s"]


# --- the measurements -----------------------------------------------------------------------------------------
def measure_load(name: str, deploy: Path, images: list[bytes], port: int, quick: bool) -> dict:
    service = Service(deploy, port)
    try:
        startup = service.wait_ready()
        expected = answers(service.url, images[:16]) if name == "fmnist" else None
        levels = []
        for concurrency in CONCURRENCY:
            before, cpu_before = service.metrics(), service.cpu_seconds()
            seconds = 5 if quick else (30 if name == "fmnist" else 60)
            result = load(service.url, images[:16] if expected else images, concurrency, seconds,
                          max_requests=50 if quick else 20_000, expected=expected)
            after, cpu_after = service.metrics(), service.cpu_seconds()
            answered = max(result["answered"], 1)
            result["cpu_ms_per_image"] = {part: 1000 * (cpu_after[part] - cpu_before[part]) / answered
                                          for part in cpu_after}
            batches = _metric(after, "disco_batch_size_count") - _metric(before, "disco_batch_size_count")
            result["mean_batch"] = (_metric(after, "disco_batch_size_sum")
                                    - _metric(before, "disco_batch_size_sum")) / max(batches, 1)
            levels.append(result)
            print(f"{name} concurrency {concurrency}: {result['images_per_s']:.1f} images/s, p50 "
                  f"{result['latency_ms'][0.5]:.1f} ms, errors "
                  f"{result['errors']}, mean batch {result['mean_batch']:.1f}", flush=True)
    finally:
        service.stop()
    reference = disco_run_rate(deploy, MAX_BATCH, 2 if quick else (20 if name == "fmnist" else 4))
    return {"deploy": str(deploy.relative_to(ROOT)), "startup_s": startup, "levels": levels,
            "disco_run_images_per_s": reference, "disco_run_batch": MAX_BATCH}


def measure_faults(deploy: Path, images: list[bytes], port: int, quick: bool) -> dict:
    """Load from 8 clients; a rank is SIGKILLed, the service recovers; then one is SIGSTOPped, and it recovers."""
    service = Service(deploy, port, "--restarts", "3", "--timeout", "5")
    results = {}
    try:
        service.wait_ready()
        expected = answers(service.url, images[:16])
        for fault, how in (("SIGKILL rank 1", signal.SIGKILL), ("SIGSTOP rank 1", signal.SIGSTOP)):
            victim = service.ranks()[1]
            with ThreadPoolExecutor(1) as pool:
                running = pool.submit(load, service.url, images[:16], 8, 10 if quick else 25, 100_000, expected)
                time.sleep(3)
                struck = time.monotonic()
                os.kill(victim, how)
                back = _wait_ready_after(service, struck)
                result = running.result()
            result.update(fault=fault, ready_again_s=back)
            results[fault] = result
            print(f"{fault}: {result['correct']} correct, {sum(result['errors'].values())} refused, "
                  f"{result['wrong']} wrong, {result['hung']} hung; ready again after {back:.1f} s", flush=True)
    finally:
        service.stop()
    return results


def _wait_ready_after(service: Service, struck: float) -> float:
    """Seconds from the fault until /ready is 200 again (it first turns 503)."""
    while client.status_of(service.url + "/ready") == 200 and time.monotonic() - struck < 60:
        time.sleep(0.05)
    while client.status_of(service.url + "/ready") != 200:
        if time.monotonic() - struck > 300:
            raise RuntimeError("the service did not become ready again within 300 s")
        time.sleep(0.1)
    return time.monotonic() - struck


# --- report ---------------------------------------------------------------------------------------------------
def render(results: dict, command: str, elapsed: float) -> str:
    lines = ["# `disco serve` under load and faults", "",
             f"`{command}` ({elapsed / 60:.0f} minutes on this machine: 2 CPU cores shared by the load generator, the "
             "HTTP front end and both ranks; one thread per rank). Closed-loop clients over loopback; max batch "
             f"{MAX_BATCH}, max wait 5 ms. `disco run` column: its images/s on batches of {MAX_BATCH} (the same "
             "deployment, the same batch size).", ""]
    for name, result in results["load"].items():
        lines += [f"## {name} ({result['deploy']}), ready {result['startup_s']:.1f} s after start", "",
                  "| clients | images/s | p50 ms | p95 ms | p99 ms | mean batch | errors | vs disco run "
                  "| CPU ms/image: front end, ranks |", "|---|---|---|---|---|---|---|---|---|"]
        for level in result["levels"]:
            q = level["latency_ms"]
            lines.append(f"| {level['concurrency']} | {level['images_per_s']:.1f} | {q[0.5]:.1f} | {q[0.95]:.1f} | "
                         f"{q[0.99]:.1f} | {level['mean_batch']:.1f} | {sum(level['errors'].values())} | "
                         f"{level['images_per_s'] / result['disco_run_images_per_s']:.2f}x | "
                         f"{level['cpu_ms_per_image']['front end']:.1f}, {level['cpu_ms_per_image']['ranks']:.1f} |")
        top = result["levels"][-1]
        cpu = top["cpu_ms_per_image"]
        ceiling = 2000 / (cpu["front end"] + cpu["ranks"])  # 2 cores' worth of CPU milliseconds per second
        lines += ["", f"`disco run`, batches of {result['disco_run_batch']}: "
                      f"{result['disco_run_images_per_s']:.1f} images/s. At {top['concurrency']} clients each answered "
                      f"image cost {cpu['front end']:.1f} ms of front-end CPU and {cpu['ranks']:.1f} ms of the ranks' "
                      "(the load generator's not counted): two "
                      f"cores allow at most {ceiling:.1f} images/s, "
                      f"{ceiling / result['disco_run_images_per_s']:.2f}x `disco run`'s.", ""]
    lines += ["## Faults (Fashion-MNIST deployment, 8 clients, `--restarts 3 --timeout 5`)", "",
              "| fault | answered correctly | refused (503) | wrong | hung | ready again after |",
              "|---|---|---|---|---|---|"]
    for fault, result in results["faults"].items():
        lines.append(f"| {fault} | {result['correct']} | {sum(result['errors'].values())} | {result['wrong']} | "
                     f"{result['hung']} | {result['ready_again_s']:.1f} s |")
    lines += ["", "## Targets (issue 16)", "", *targets(results), ""]
    return "\n".join(lines)


def targets(results: dict) -> list[str]:
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    for name, result in results["load"].items():
        top, eight = result["levels"][-1], result["levels"][1]
        ratio = top["images_per_s"] / result["disco_run_images_per_s"]
        lines.append(f"| {name}: 32 clients >= 0.8x `disco run` (batch {MAX_BATCH}) | {ratio:.2f}x | "
                     f"{'met' if ratio >= 0.8 else f'missed by {(0.8 - ratio) / 0.8:.0%}'} |")
        errors = sum(sum(level["errors"].values()) for level in result["levels"])
        lines.append(f"| {name}: 0 errors at steady load | {errors} | {'met' if errors == 0 else 'missed'} |")
        spread = eight["latency_ms"][0.99] / eight["latency_ms"][0.5]
        lines.append(f"| {name}: p99 < 3x p50 at 8 clients | {spread:.2f}x | "
                     f"{'met' if spread < 3 else f'missed by {(spread - 3) / 3:.0%}'} |")
    for fault, result in results["faults"].items():
        lines.append(f"| {fault}: 0 hung, 0 wrong | {result['hung']} hung, {result['wrong']} wrong | "
                     f"{'met' if result['hung'] == result['wrong'] == 0 else 'missed'} |")
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, result in results["load"].items():
        clients = [level["concurrency"] for level in result["levels"]]
        rate = result["disco_run_images_per_s"]
        axes[0].plot(clients, [level["images_per_s"] / rate for level in result["levels"]], marker="o", label=name)
        axes[1].plot(clients, [level["latency_ms"][0.5] for level in result["levels"]], marker="o", label=f"{name} p50")
        axes[1].plot(clients, [level["latency_ms"][0.99] for level in result["levels"]], marker="x", linestyle="--",
                     label=f"{name} p99")
    axes[0].axhline(0.8, color="grey", linestyle=":", label="target 0.8")
    axes[0].set(xscale="log", xlabel="concurrent clients", ylabel="images/s / disco run's (batch 16)")
    axes[1].set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="latency (ms)")
    for axis in axes:
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few seconds per level")
    parser.add_argument("--port", type=int, default=18400, help="first loopback port the services use")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    fmnist = fmnist_deployment()
    resnet = resnet_deployment(args.quick)
    fmnist_pictures, photos = fmnist_images(64), photo_images()
    results = {"load": {"fmnist": measure_load("fmnist", fmnist, fmnist_pictures, args.port, args.quick),
                        "resnet50": measure_load("resnet50", resnet, photos, args.port + 1, args.quick)},
               "faults": measure_faults(fmnist, fmnist_pictures, args.port + 2, args.quick)}
    command = "python bench/serve.py" + (" --quick" if args.quick else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps({"command": command, **results}, indent=1, default=str))
    (RESULTS / "serve.md").write_text(render(results, command, time.perf_counter() - began))
    plot(results, RESULTS / "serve.png")
    print((RESULTS / "serve.md").read_text())


if __name__ == "__main__":
    main()
