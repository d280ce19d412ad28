"""Files a kill leaves whole: `write_atomically` writes a temporary file beside the target, fsyncs it, renames it
over the target (rename is atomic) and fsyncs the folder, so the new name is durable too. A leaf module: training,
the sparsifier's nested files and reports all write through it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (names created, renamed or deleted), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temporary_path)` writes the whole file; `path` then holds either its old content or the new one,
    never a part (write(path) for an ordinary write, e.g. TrainConfig.save or safetensors' save_file)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")  # hidden, beside the target: same file system for rename
    try:
        write(temporary)
        fsync_path(temporary)
    except BaseException:
        temporary.unlink(missing_ok=True)  # e.g. a full disk: leave no half file behind
        raise
    os.replace(temporary, path)
    fsync_path(path.parent)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(text))


def remove_temporary_files(folder: Path) -> None:
    """Delete what writes killed midway left in `folder` (write_atomically's temporary files)."""
    for leftover in Path(folder).glob(".*.tmp"):
        leftover.unlink()
