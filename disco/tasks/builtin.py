"""The tasks DISCO brings, registered by name: each implementation is named by where it lives and imported
when first used (disco.tasks.registry.Implementation), so listing tasks for `--help` or validating
`--task` imports no torch. Registration order is the order `--task` lists them; classification, first,
is the default."""
from __future__ import annotations

from disco.tasks.registry import Implementation, Task, register_task


def _in(module: str, *names: str) -> list[Implementation]:
    return [Implementation(f"{module}:{name}") for name in names]


def _register_builtin_tasks() -> None:
    objective, describe, answer, vit_small, fashion_mnist, folder = _in(
        "disco.tasks.classification", "ClassificationObjective", "describe", "answer", "vit_small",
        "fashion_mnist_data", "image_folder_data")
    register_task(Task("classification", objective, describe, datasets={"fashion-mnist": fashion_mnist},
                       load_folder=folder, folder_layout="an ImageFolder (train/, val/)", answer=answer,
                       models={"vit_small": vit_small}))

    scenes, = _in("disco.data.scenes", "scenes_data")
    objective, describe, answer, fcn = _in("disco.tasks.segmentation", "SegmentationObjective", "describe", "answer",
                                           "fcn_resnet18")
    register_task(Task("segmentation", objective, describe, datasets={"fashion-scenes": scenes},
                       load_folder=Implementation("disco.data.annotated:voc_data"), folder_layout="a VOC folder",
                       answer=answer, models={"fcn_resnet18": fcn}))

    objective, describe, answer, retinanet = _in("disco.tasks.detection", "DetectionObjective", "describe", "answer",
                                                 "retinanet_resnet18")
    register_task(Task("detection", objective, describe, datasets={"fashion-scenes": scenes},
                       load_folder=Implementation("disco.data.annotated:coco_data"), folder_layout="a COCO folder",
                       answer=answer, models={"retinanet_resnet18": retinanet}, decodes_with_model=True))

    objective, describe, answer, edsr = _in("disco.tasks.superres", "SuperResObjective", "describe", "answer", "edsr")
    fashion_pairs, photo_pairs, folder_pairs = _in("disco.data.superres", "fashion_mnist_pairs", "skimage_pairs",
                                                   "folder_pairs")
    register_task(Task("superres", objective, describe,
                       datasets={"fashion-mnist": fashion_pairs, "photos": photo_pairs},
                       load_folder=folder_pairs, folder_layout="a folder of images", answer=answer,
                       models={"edsr": edsr}))


_register_builtin_tasks()
