"""Crash-safe files of a run folder: atomic writes, the metrics log, and whole-epoch checkpoints.

A kill (or power loss) at any instant leaves every file either as it was or as it was meant to be:

- `write_atomically` writes a temporary file beside the target, fsyncs it, renames it over the target
  (rename is atomic) and fsyncs the folder, so the new name is durable too.
- metrics.jsonl only grows by whole lines (`append_line` fsyncs each); `cut_lines` drops what the newest
  checkpoint does not cover, so a resumed epoch writes its line once.
- A checkpoint is one folder, checkpoints/NNNN (NNNN: the metrics lines it covers), holding the model
  (safetensors), the optimiser, scheduler and sparsifier state (state.pt, read back with weights_only=True:
  no arbitrary unpickling) and progress.json (phase, epoch, lines). It is written as checkpoints/.tmp-NNNN
  and renamed into place in one step: rename() cannot replace a non-empty folder, hence one new name per
  epoch, the older folders deleted only once the new one is in place. Any folder with a number for a name
  is therefore complete, and the highest number is the checkpoint to resume from.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch
from torch import nn

from disco.errors import DiscoError
from disco.jsonfile import SMALL_JSON_BYTES, read_json
from disco.files import fsync_path, write_bytes_atomically

CHECKPOINTS = "checkpoints"
_MODEL, _STATE, _PROGRESS = "model.safetensors", "state.pt", "progress.json"
_TEMPORARY = ".tmp-"  # prefix of a checkpoint folder still being written
_OLD_FORMAT_FOLDER = "checkpoint"  # where runs kept their one checkpoint before


# --- files ---------------------------------------------------------------------------------------
def append_line(path: Path, line: str) -> None:
    """Append one line and make it durable before returning (a checkpoint written next may count it)."""
    created = not path.exists()
    with open(path, "a") as stream:
        stream.write(line + "\n")
        stream.flush()
        os.fsync(stream.fileno())
    if created:
        fsync_path(path.parent)


def cut_lines(path: Path, count: int) -> None:
    """Keep the first `count` lines of `path`: drops lines written after the checkpoint that counted
    `count` (and a line cut short by a kill)."""
    if not path.exists():
        if count:
            raise DiscoError(f"{path} is missing: its checkpoint covers {count} lines of it")
        return
    content = path.read_bytes()
    end = 0
    for _ in range(count):
        newline = content.find(b"\n", end)
        if newline < 0:
            raise DiscoError(f"{path} has fewer lines than the {count} its checkpoint covers")
        end = newline + 1
    if end < len(content):
        os.truncate(path, end)
        fsync_path(path)


# --- model weights ---------------------------------------------------------------------------------
def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict (parameters, BatchNorm statistics, DISCO plans and masks) as CPU tensors."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_model(model: nn.Module, path: Path) -> None:
    write_bytes_atomically(path, safetensors.torch.save(_model_tensors(model)), "the model")


def load_model_state(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise DiscoError(f"missing checkpoint file {path}")
    model.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)


# --- whole-epoch checkpoints -----------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    """The state after `epoch` (0-based) of `phase`, covering the first `metrics_lines` of metrics.jsonl."""
    folder: Path
    phase: str
    epoch: int
    metrics_lines: int

    def load_model(self, model: nn.Module) -> None:
        load_model_state(model, self.folder / _MODEL)

    def training_state(self) -> dict:
        """{"optimizer", "scheduler", "sparsifier"} state dicts (sparsifier None in the dense phase)."""
        return torch.load(self.folder / _STATE, map_location="cpu", weights_only=True)


def _serialised(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _write_synced(path: Path, write: Callable[[Path], None]) -> None:
    write(path)
    fsync_path(path)


def save_checkpoint(out: Path, *, phase: str, epoch: int, metrics_lines: int, model: nn.Module,
                    training_state: dict) -> None:
    """Write the checkpoint of one epoch as a whole (see the module doc), then delete the older ones."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        root.mkdir()
        fsync_path(root.parent)
    name = f"{metrics_lines:04d}"
    temporary = root / f"{_TEMPORARY}{name}"
    if temporary.exists():  # left by a kill; resume removes these, but never trust a half-written one
        shutil.rmtree(temporary)
    progress = {"phase": phase, "epoch": epoch, "metrics_lines": metrics_lines}
    try:
        temporary.mkdir()
        for file, data in ((_MODEL, safetensors.torch.save(_model_tensors(model))),
                           (_STATE, _serialised(training_state)), (_PROGRESS, json.dumps(progress).encode())):
            _write_synced(temporary / file, lambda path: path.write_bytes(data))
        fsync_path(temporary)
    except OSError as error:  # a full disk, say: the previous checkpoint stays the one to resume from
        shutil.rmtree(temporary, ignore_errors=True)
        raise DiscoError(f"cannot write the checkpoint of {phase} epoch {epoch + 1} in {root}: "
                         f"{error.strerror or error}; make room, then `disco train --resume {out}` continues from "
                         "the last checkpoint written") from None
    os.replace(temporary, root / name)  # the one step that makes this epoch the current checkpoint
    fsync_path(root)
    for older in _numbered(root):
        if int(older.name) < metrics_lines:
            shutil.rmtree(older)


def _numbered(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def latest_checkpoint(out: Path) -> Checkpoint | None:
    """The newest complete checkpoint of the run in `out` (None before the first epoch ends)."""
    if (Path(out) / _OLD_FORMAT_FOLDER).is_dir():  # one folder rewritten file by file: not safe to trust
        raise DiscoError(f"{out} holds a checkpoint in the old format ({_OLD_FORMAT_FOLDER}/), which this version "
                         "cannot resume: start the run again")
    root = Path(out) / CHECKPOINTS
    folders = _numbered(root) if root.is_dir() else []
    if not folders:
        return None
    folder = folders[-1]
    for name in (_MODEL, _STATE, _PROGRESS):
        if not (folder / name).is_file():
            raise DiscoError(f"checkpoint {folder} is damaged: {name} is missing")
    progress = read_json(folder / _PROGRESS, what="checkpoint progress", max_bytes=SMALL_JSON_BYTES)
    try:
        return Checkpoint(folder, str(progress["phase"]), int(progress["epoch"]), int(progress["metrics_lines"]))
    except (KeyError, TypeError, ValueError):
        raise DiscoError(f"checkpoint {folder} is damaged: {_PROGRESS} lacks its phase, epoch or lines") from None


def remove_stale_checkpoints(out: Path) -> None:
    """Delete all but the newest complete checkpoint: folders a kill left half-written, or older ones
    whose deletion it interrupted."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return
    newest = _numbered(root)[-1:]
    for entry in root.iterdir():
        if entry in newest:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
