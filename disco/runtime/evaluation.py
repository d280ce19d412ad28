"""Rank 0's batch loop: feed the batches, read each output the task's way (predictions, or the test metric
with --eval), keep the outputs for --save-output. Talks to the other ranks only through the Coordinator."""
from __future__ import annotations

from collections import deque
from pathlib import Path

import safetensors.torch
import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from disco.errors import DiscoError
from disco.files import write_bytes_atomically
from disco.progress import Progress
from disco.export.manifest import Manifest
from disco.export.trust import build_deployed_model
from disco.runtime.options import RunOptions
from disco.runtime.protocol import REFUSED
from disco.runtime.roles import Coordinator
from disco.tasks.registry import get_task


def _detector(manifest: Manifest, model_code: str | None):
    """Node 0's decoder of outputs for tasks that need one (detection head maps: anchors, box decoding, NMS;
    no weights needed)."""
    if not get_task(manifest.task).decodes_with_model:
        return None
    return build_deployed_model(manifest.model, model_code).eval()


def join_batches(outputs: list):
    """The outputs of several batches as one, in the model's output structure (tensors joined along the batch)."""
    leaves = [tree_flatten(o)[0] for o in outputs]
    if not all(isinstance(t, torch.Tensor) for t in leaves[0]):
        raise DiscoError("outputs of several batches can only be joined when every leaf is a tensor")
    joined = [torch.cat([batch[i] for batch in leaves]) for i in range(len(leaves[0]))]
    return tree_unflatten(joined, tree_flatten(outputs[0])[1])


def save_outputs(outputs: list, path: str) -> None:
    """One tensor 'output', or 'output.0', 'output.1'... for models with several outputs (detection maps)."""
    tensors = [t.contiguous() for t in tree_flatten(join_batches(outputs))[0]]
    names = ["output"] if len(tensors) == 1 else [f"output.{i}" for i in range(len(tensors))]
    write_bytes_atomically(Path(path), safetensors.torch.save(dict(zip(names, tensors))), "--save-output")


def coordinate(coordinator: Coordinator, manifest: Manifest, options: RunOptions, batches) -> dict:
    task = get_task(manifest.task)
    detector = _detector(manifest, options.model_code)
    objective = task.objective(classes=manifest.model.classes, model=detector,
                               image_size=tuple(manifest.input_shape[1:]))
    # only rank 0 scores: no synchronisation of the metric across the process group
    metric = objective.metric(sync_on_compute=False) if options.eval else None
    predictions, outputs = [], []
    in_flight: deque = deque()  # (batch, future, whether its output is read): at most 2K batches held
    distinct = 0

    def read(batch, future, used: bool) -> None:
        output = future.result()
        if not used:
            return
        output = tree_map(lambda t: t.cpu(), output)
        if metric is not None:
            objective.update(metric, output, batch.labels)
        else:
            described = task.describe(output, manifest.class_names, detector=detector,
                                      image_size=manifest.input_shape[1:])
            predictions.extend({"input": name, **d} for name, d in zip(batch.names, described))
        if options.save_output:
            outputs.append(output)

    try:
        # a line every 30 s in a log (a bar on a terminal): an --eval over thousands of images takes minutes
        for index, batch in enumerate(Progress(batches, "disco run", enabled=not options.quiet)):
            distinct += batch.images.shape[0]
            for _ in range(options.warmup if index == 0 else 0):
                coordinator.forward(batch.images, timed=False)
            for run in range(options.repeat):  # the last run's output is the one read
                in_flight.append((batch, coordinator.submit(batch.images), run == options.repeat - 1))
                while len(in_flight) > 2 * options.inflight:
                    read(*in_flight.popleft())
        while in_flight:
            read(*in_flight.popleft())
    except DiscoError:  # bad input met mid-way, or a peer lost: tell the others before failing
        coordinator.stop(REFUSED)
        raise
    coordinator.stop()
    if options.save_output:
        save_outputs(outputs, options.save_output)
    score = objective.score(metric) if metric is not None and coordinator.images else None
    return {"metric": objective.metric_name, "score": score,
            "accuracy": score if objective.metric_name == "accuracy" else None,
            "predictions": predictions, "latencies_s": coordinator.latencies, "images": distinct,
            "images_run": coordinator.images, "images_per_s": coordinator.images_per_s(), "inflight": options.inflight}
