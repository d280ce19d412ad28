"""Model zoo: does DISCO split the models people use? (issue "any model", docs/results/models.md)

For every model of a broad sample - one or more models from each of 30+ timm families, 10+ transformers vision
architectures built from their default configs, and every torchvision classification model - with random weights
at its own input size, at N = 2 and 3 nodes:

- capture: the time `torch.export` takes (disco/split/capture.py), or why it cannot capture the model;
- the dense split (every group kept) exported and run by the in-process runtime (every rank's program, the real
  wire protocol) on 2 images, compared with the original model: relative error max|out - ref| / max|ref|
  (equal: < 1e-4, or, where the float32 original itself is that far from the float64 model, no farther from
  the float64 model than twice the original; anything else is silently wrong); and the bytes every rank sent,
  per category, against the cost report;
- bytes of the dense split, bytes moved by fallbacks and their share, partial sums of norms and reductions, MACs
  per node, and the operations that fell back.

Each model runs in its own process (a crash or an out-of-memory kill is that model's result, not the run's); results
are appended to docs/results/models.json as they come, so an interrupted run continues where it stopped.

    .venv/bin/python bench/models.py                      # everything (hours on 2 cores)
    .venv/bin/python bench/models.py --source timm        # one zoo
    .venv/bin/python bench/models.py --only timm:resnet18,hf:vit
    .venv/bin/python bench/models.py --render             # docs/results/models.md from the JSON only
    .venv/bin/python bench/models.py --distributed        # real processes: docs/results/models-distributed.md

`--distributed`: for DISTRIBUTED (CNNs and transformers from timm and transformers), 30% of the communication
groups kept at random, `disco run` on 2 and 3 real processes (torchrun, gloo) against the simulation: outputs, and
the bytes every rank sent per category against the cost report.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
EQUAL = 1e-4

# timm: one or more models per family (the timm module that defines them), ConvNets to metaformers
TIMM = [
    "resnet18", "resnet50d", "resnext26ts", "regnety_002", "densenet121", "dla34", "dpn68", "vgg11", "inception_v3",
    "xception41", "hrnet_w18_small", "cspresnet50", "res2net50_14w_8s", "resnest14d", "skresnet18", "selecsls42b",
    "vovnet39a", "tresnet_m", "rexnet_100", "ghostnet_100", "efficientnet_b0", "mobilenetv3_small_050", "lcnet_050",
    "tinynet_a", "mnasnet_050", "efficientvit_b0", "mobilevit_xs", "fastvit_t8", "mobileone_s0", "repvit_m1",
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "beit_base_patch16_224", "swin_tiny_patch4_window7_224",
    "pvt_v2_b0", "coat_lite_tiny", "twins_svt_small", "cait_xxs24_224", "crossvit_tiny_240",
    "xcit_nano_12_p16_224", "levit_128", "pit_ti_224", "tnt_s_patch16_224", "nest_tiny", "gcvit_xxtiny",
    "davit_tiny", "maxvit_tiny_tf_224", "efficientformer_l1", "edgenext_xx_small", "volo_d1_224", "visformer_tiny",
    "eva02_tiny_patch14_224", "hiera_tiny_224", "vitamin_small_224", "mixer_b16_224", "resmlp_12_224",
    "gmlp_ti16_224", "sequencer2d_s", "poolformer_s12", "convformer_s18", "mambaout_femto", "inception_next_tiny",
    "focalnet_tiny_srf", "convnext_atto", "rdnet_tiny", "starnet_s1", "halonet26t", "botnet26t_256",
    "lambda_resnet26t", "coatnet_0_rw_224", "nfnet_l0", "convmixer_768_32", "cs3darknet_focus_s", "ghostnetv2_100",
    "tiny_vit_5m_224", "hgnetv2_b0", "mobilenetv4_conv_small", "nextvit_small",
]
# transformers: model types with an image-classification head, built from their default configs
HF = [
    "vit", "deit", "beit", "swin", "swinv2", "convnext", "convnextv2", "resnet", "regnet", "mobilenet_v1",
    "mobilenet_v2", "mobilevit", "mobilevitv2", "efficientnet", "poolformer", "pvt", "pvt_v2", "segformer", "levit",
    "cvt", "focalnet", "dinov2", "data2vec-vision", "bit", "hiera", "vit_msn",
]


DISTRIBUTED = ["timm:resnet18", "timm:efficientnet_b0", "timm:convnext_atto", "timm:vit_tiny_patch16_224",
               "timm:swin_tiny_patch4_window7_224", "timm:poolformer_s12", "hf:vit", "hf:swin", "hf:convnext"]


def torchvision_models() -> list[str]:
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def specs(source: str) -> list[str]:
    if source == "timm":
        return [f"timm:{name}" for name in TIMM]
    if source == "hf":
        return [f"hf:{name}" for name in HF]
    return [f"torchvision:{name}" for name in torchvision_models()]


# --- one model, in its own process ---------------------------------------------------------------------------
def _input_size(spec: str, model) -> tuple[int, ...]:
    source, name = spec.split(":", 1)
    if source == "timm":
        return tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    if source == "hf":
        size = getattr(model.model.config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        return (getattr(model.model.config, "num_channels", 3), size, size)
    return (3, 299, 299) if name == "inception_v3" else (3, 224, 224)


def _family(spec: str, model) -> str:
    source, name = spec.split(":", 1)
    if source == "timm":
        return type(model).__module__.rsplit(".", 1)[-1]
    if source == "hf":
        return name
    return type(model).__module__.rsplit(".", 1)[-1]


def measure(spec: str, nodes_list: tuple[int, ...]) -> dict:
    import torch

    from disco.errors import DiscoError
    from disco.models import build_for_data
    from disco.split.capture import capture

    torch.manual_seed(0)
    classes = 1000
    model = build_for_data(spec, channels=3, classes=classes).eval()
    with torch.no_grad():  # zero-initialised heads and scales would make every output equal
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    size = _input_size(spec, model)
    result = {"model": spec, "family": _family(spec, model), "input": list(size),
              "parameters": sum(p.numel() for p in model.parameters()), "nodes": {}}
    x = torch.randn(2, *size)
    began = time.perf_counter()
    try:
        capture(model, x[:1])
    except DiscoError as error:
        result.update(status="refused", reason=str(error))
        return result
    result["capture_s"] = time.perf_counter() - began
    with torch.no_grad():
        reference = model(x)
        reference = getattr(reference, "logits", reference)
    for nodes in nodes_list:
        result["nodes"][str(nodes)] = _split(model, spec, x, reference, nodes, classes)
    _judge_by_float64(model, x, reference, result["nodes"].values())
    statuses = {r["status"] for r in result["nodes"].values()}
    result["status"] = "equal" if statuses == {"equal"} else sorted(statuses - {"equal"})[0]
    return result


def _judge_by_float64(model, x, reference, splits) -> None:
    """A split beyond EQUAL of the float32 original may only show the original's own rounding (a deep model at
    random weights can lose digits): against the float64 model, it is equal when no farther than twice the
    float32 original is. Every split's output is then dropped from its row."""
    import copy

    import torch

    outputs = [split.pop("output") for split in splits]
    doubtful = [(split, out) for split, out in zip(splits, outputs)
                if split["status"] == "wrong" and split["bytes_equal_report"]]
    if not doubtful:
        return
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        exact = getattr(exact, "logits", exact).float()

    def error(output):
        return float((output - exact).abs().max() / exact.abs().max().clamp_min(1e-30))
    own = error(reference)
    for split, output in doubtful:
        split.update(float64_error=error(output), original_float64_error=own)
        if split["float64_error"] <= max(EQUAL, 2 * own):
            split["status"] = "equal"


def _split(model, spec, x, reference, nodes, classes) -> dict:
    import disco
    from disco.export import ModelSpec, export
    from disco.runtime.inprocess import run_in_process

    began = time.perf_counter()
    simulated = disco.partition(model, nodes=nodes, example_inputs=x[:1]).eval()
    partition_s = time.perf_counter() - began
    report = disco.cost_report(simulated, x[:1])
    with tempfile.TemporaryDirectory() as folder:
        export(simulated, folder, example_inputs=x[:1],
               spec=ModelSpec(model=spec, channels=int(x.shape[1]), classes=classes))
        began = time.perf_counter()
        output, sent = run_in_process(folder, x)
        run_s = time.perf_counter() - began
    error = float((output - reference).abs().max() / reference.abs().max().clamp_min(1e-30))
    per_image = {category: [[v // len(x) for v in row] for row in matrix] for category, matrix in sent.items()}
    counted = {"activations": report.traffic.bytes_matrix, "norm": report.traffic.norm_bytes_matrix,
               "fallback": report.traffic.fallback_bytes_matrix}
    bytes_equal = all(per_image[c] == m for c, m in counted.items())
    ops = collections.Counter(entry.op or "(layout)" for entry in report.fallbacks)
    return {"status": "equal" if error < EQUAL and bytes_equal else "wrong", "relative_error": error,
            "bytes_equal_report": bytes_equal, "dense_bytes": report.traffic.dense_bytes,
            "fallback_bytes": report.traffic.fallback_bytes, "norm_bytes": report.traffic.norm_bytes,
            "fallback_share": report.traffic.fallback_bytes / report.traffic.dense_bytes if report.traffic.dense_bytes else 0.0,
            "fallback_ops": dict(ops), "macs_per_node": report.compute.dense_macs_per_node,
            "model_macs": report.compute.model_macs, "partition_s": partition_s, "run_s": run_s, "output": output}


def distributed(spec: str, nodes_list: tuple[int, ...]) -> dict:
    """The deployment of a model with 30% of its groups kept, run by `disco run` on real processes."""
    import safetensors.torch
    import torch

    import disco
    from disco.export import ModelSpec, export
    from disco.models import build_for_data
    from disco.split.masks import keep_random_groups

    torch.manual_seed(0)
    model = build_for_data(spec, channels=3, classes=1000).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    x = torch.randn(2, *_input_size(spec, model))
    result = {"model": spec, "family": _family(spec, model), "input": list(x.shape[1:]), "nodes": {}}
    for nodes in nodes_list:
        simulated = disco.partition(model, nodes=nodes, example_inputs=x[:1]).eval()
        keep_random_groups(simulated, 0.3, seed=nodes)
        report = disco.cost_report(simulated, x[:1])
        with torch.no_grad():
            expected = simulated(x)
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            export(simulated, folder, example_inputs=x[:1], spec=ModelSpec(model=spec, channels=3, classes=1000))
            safetensors.torch.save_file({"input": x}, str(folder / "x.safetensors"))
            began = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "disco", "run", str(folder), "--input",
                                   str(folder / "x.safetensors"), "--batch-size", "2", "--save-output",
                                   str(folder / "y.safetensors"), "--summary", str(folder / "s.json"),
                                   "--timeout", "600"], capture_output=True, text=True)
            wall = time.perf_counter() - began
            if done.returncode:
                result["nodes"][str(nodes)] = {"status": "error", "reason": done.stderr.strip()[-300:]}
                continue
            output = safetensors.torch.load_file(str(folder / "y.safetensors"))["output"]
            sent = json.loads((folder / "s.json").read_text())["bytes_sent"]
        error = float((output - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
        counted = {"activations": report.traffic.bytes_matrix, "norm": report.traffic.norm_bytes_matrix,
                   "fallback": report.traffic.fallback_bytes_matrix}
        equal = all([[v // len(x) for v in row] for row in sent[c]] == m for c, m in counted.items())
        result["nodes"][str(nodes)] = {
            "status": "equal" if error < EQUAL and equal else "wrong", "relative_error": error,
            "bytes_equal_report": equal, "bytes": report.traffic.bytes, "norm_bytes": report.traffic.norm_bytes,
            "fallback_bytes": report.traffic.fallback_bytes, "ratio": report.traffic.ratio, "wall_s": wall}
    statuses = {r["status"] for r in result["nodes"].values()}
    result["status"] = "equal" if statuses == {"equal"} else sorted(statuses - {"equal"})[0]
    return result


def render_distributed(results: list[dict]) -> str:
    lines = ["# Distributed equals simulated: zoo models on real processes", "",
             "Produced by `.venv/bin/python bench/models.py --distributed` (results in models-distributed.json). Random "
             "weights, each model at its own input size, 30% of the communication groups kept at random, exported "
             "and run by `disco run` (torchrun, gloo, one process per node) on 2 images; compared with the "
             "simulation (`disco.partition` with the same masks). *equal*: relative error under 1e-4 and the bytes "
             "every rank sent, per category (activations, norm sums, fallbacks), equal to the cost report.", "",
             "| model | N | status | max rel. error | bytes per image | norm sums | fallback bytes | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for nodes, split in r.get("nodes", {}).items():
            if split["status"] == "error":
                lines.append(f"| {r['model']} | {nodes} | error | | | | | {split['reason'][:120]} |")
                continue
            lines.append(f"| {r['model']} | {nodes} | {split['status']} | {split['relative_error']:.1e} | "
                         f"{split['bytes']:,} | {split['norm_bytes']:,} | {split['fallback_bytes']:,} | "
                         f"{split['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def run_one(spec: str, nodes: tuple[int, ...], timeout: float, mode: str = "--one") -> dict:
    command = [sys.executable, __file__, mode, spec, "--nodes", ",".join(map(str, nodes))]
    began = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    except subprocess.TimeoutExpired:
        return {"model": spec, "status": "error", "reason": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"model": spec, "status": "error", "reason": f"exit {done.returncode}: {tail[:300]}"}
    result = json.loads(lines[-1])
    result["wall_s"] = time.perf_counter() - began
    return result


# --- the table -----------------------------------------------------------------------------------------------
def render(results: list[dict]) -> str:
    by_source = collections.defaultdict(list)
    for r in results:
        by_source[r["model"].split(":", 1)[0]].append(r)
    lines = ["# Model zoo: split outputs against the original model", "",
             "Produced by `.venv/bin/python bench/models.py` (results in models.json). Random weights, each model at "
             "its own input size, N = 2 and 3 nodes, every communication group kept (the dense split), exported and "
             "run by the in-process runtime (every rank's program and the real wire protocol) on 2 images. *equal*: "
             "relative error max|out - ref| / max|ref| under 1e-4 at both N (or, for a model whose float32 output is "
             "itself that far from its float64 one, no farther from the float64 output than twice the float32 "
             "original: models marked †) and every rank's bytes per category equal "
             "to the cost report; *wrong*: silently different; *refused*: the model cannot be captured "
             "(the reason is given); *error*: DISCO failed on it (a bug to fix). Fallback share: bytes moved by "
             "fallbacks over the dense split's bytes (N = 2).", "", "| source | models | families | equal | wrong | "
             "refused | error | median fallback share |", "|---|---|---|---|---|---|---|---|"]
    for source, rows in by_source.items():
        count = collections.Counter(r["status"] for r in rows)
        shares = [r["nodes"]["2"]["fallback_share"] for r in rows if r.get("nodes", {}).get("2")]
        families = len({r.get("family") for r in rows if r.get("family")})
        lines.append(f"| {source} | {len(rows)} | {families} | {count['equal']} ({100 * count['equal'] / len(rows):.0f}%) "
                     f"| {count['wrong']} | {count['refused']} | {count['error']} | "
                     f"{100 * statistics.median(shares) if shares else 0:.2f}% |")
    all_ops = collections.Counter()
    for r in results:
        for split in r.get("nodes", {}).values():
            all_ops.update(split["fallback_ops"])
    lines += ["", "Operations that fall back most (occurrences over all models and N):", ""]
    lines += [f"- `{op}`: {count}" for op, count in all_ops.most_common(12)] or ["- none"]
    lines += ["", "## Per model", "", "| model | family | input | status | capture s | dense MB (N=2) | fallback "
              "share N=2 / N=3 | norm KB (N=2) | MACs per node, G (N=3) | max rel. error | fallbacks |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        splits = r.get("nodes", {})
        two, three = splits.get("2"), splits.get("3")
        if not two:
            lines.append(f"| {r['model']} | {r.get('family', '')} | | {r['status']} | | | | | | | "
                         f"{r.get('reason', '')[:160]} |")
            continue
        error = max(s["relative_error"] for s in splits.values())
        by_float64 = any("float64_error" in s for s in splits.values()) and r["status"] == "equal"
        macs = " / ".join(f"{m / 1e9:.2f}" for m in (three or two)["macs_per_node"])
        ops = ", ".join(f"{op} x{n}" for op, n in two["fallback_ops"].items())
        share = " / ".join(f"{100 * s['fallback_share']:.2f}%" for s in (two, three) if s)
        lines.append(f"| {r['model']} | {r['family']} | {'x'.join(map(str, r['input']))} | {r['status']}{' †' if by_float64 else ''} | "
                     f"{r['capture_s']:.1f} | {two['dense_bytes'] / 1e6:.2f} | {share} | {two['norm_bytes'] / 1e3:.1f} | "
                     f"{macs} | {error:.1e} | {ops} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=["timm", "hf", "torchvision", "all"], default="all")
    parser.add_argument("--only", help="comma-separated specs (timm:NAME, hf:TYPE, torchvision:NAME)")
    parser.add_argument("--nodes", default="2,3")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model (all N)")
    parser.add_argument("--out", type=Path, default=RESULTS / "models.json")
    parser.add_argument("--render", action="store_true", help="only write models.md from the JSON")
    parser.add_argument("--again", action="store_true", help="measure models the JSON already has")
    parser.add_argument("--distributed", action="store_true", help="real processes, models of DISTRIBUTED")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--one-distributed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    nodes = tuple(int(n) for n in args.nodes.split(","))
    if args.one or args.one_distributed:
        print(json.dumps(measure(args.one, nodes) if args.one else distributed(args.one_distributed, nodes)))
        return
    if args.distributed and args.out == RESULTS / "models.json":
        args.out = RESULTS / "models-distributed.json"
    results = json.loads(args.out.read_text()) if args.out.is_file() else []
    if not args.render:
        wanted = args.only.split(",") if args.only else DISTRIBUTED if args.distributed else [s for source in (
            ("timm", "hf", "torchvision") if args.source == "all" else (args.source,)) for s in specs(source)]
        done = {r["model"] for r in results}
        for spec in wanted:
            if spec in done and not args.again:
                continue
            result = run_one(spec, nodes, args.timeout, "--one-distributed" if args.distributed else "--one")
            at = next((i for i, r in enumerate(results) if r["model"] == spec), len(results))
            results = results[:at] + [result] + results[at + 1:]  # measured again: stays in its place
            args.out.write_text(json.dumps(results, indent=1) + "\n")
            print(f"{spec}: {result['status']} {result.get('reason', '')[:200]}", flush=True)
    (args.out.with_suffix(".md")).write_text((render_distributed if args.distributed else render)(results))


if __name__ == "__main__":
    main()
