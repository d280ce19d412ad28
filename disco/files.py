"""Files a kill leaves whole: `write_atomically` writes a temporary file beside the target, fsyncs it, renames it
over the target (rename is atomic) and fsyncs the folder, so the new name is durable too. A leaf module: training,
the sparsifier's nested files and reports all write through it."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from disco.errors import DiscoError


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (names created, renamed or deleted), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output_file(path: str | Path, what: str) -> Path:
    """`path` may be written: a new file, or a regular file, in an existing writable folder. Never a folder, a
    device, a FIFO or a symlink: replacing one of those (as root, /dev/full) would destroy what is not ours."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        kind = "a folder" if path.is_dir() and not path.is_symlink() else "not a regular file"
        raise DiscoError(f"{what} {path} is {kind}: give a new file or a regular file to replace")
    if not path.parent.is_dir():
        raise DiscoError(f"{what} {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise DiscoError(f"{what} {path}: folder {path.parent} is not writable")
    return path


def lock_folder(folder: Path, what: str):
    """An exclusive lock on `folder` itself (flock on the folder: no lock file left behind), held while the returned
    file stays open; refused at once when another process holds it: two writers of one run folder would
    interleave its files."""
    import fcntl  # here: POSIX only, and importing this module must work everywhere

    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        raise DiscoError(f"another process is writing {what} {folder}: wait for it to end or stop it (or choose "
                         "another folder)") from None
    return FolderLock(descriptor)


def claim_folder(folder: Path, what: str) -> "FolderLock":
    """`folder` made if new, shown writable (a read-only file system is one clear error before any work, not a
    traceback after the first epoch) and locked (lock_folder) for this one writer."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DiscoError(f"{what} {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise DiscoError(f"cannot write {what} {folder}: {error.strerror or error}") from None
    return lock_folder(folder, what)


class FolderLock:
    """A held lock_folder: released by close() or at the end of a `with` block (or when the process ends)."""

    def __init__(self, descriptor: int):
        self.descriptor: int | None = descriptor

    def close(self) -> None:
        if self.descriptor is not None:
            os.close(self.descriptor)  # closing the folder's descriptor releases its flock
            self.descriptor = None

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exception) -> None:
        self.close()


def write_atomically(path: Path, write: Callable[[Path], None], what: str = "output file") -> None:
    """`write(temporary_path)` writes the whole file; `path` then holds either its old content or the new one,
    never a part (write(path) for an ordinary write, e.g. TrainConfig.save or safetensors' save_file)."""
    path = check_output_file(path, what)
    temporary = path.with_name(f".{path.name}.tmp")  # hidden, beside the target: same file system for rename
    try:
        write(temporary)
        fsync_path(temporary)
    except BaseException as error:
        temporary.unlink(missing_ok=True)  # e.g. a full disk: leave no half file behind
        if isinstance(error, OSError):
            raise DiscoError(f"cannot write {what} {path}: {error.strerror or error}") from None
        raise
    os.replace(temporary, path)
    fsync_path(path.parent)


def write_text_atomically(path: Path, text: str, what: str = "output file") -> None:
    write_atomically(path, lambda temporary: temporary.write_text(text), what)


def write_bytes_atomically(path: Path, data: bytes, what: str = "output file") -> None:
    """`data` written whole. Libraries' own file writers (safetensors' save_file, torch.save) turn a full disk into
    errors of their own without the errno; serialised first and written here, it is one clear OSError."""
    write_atomically(path, lambda temporary: temporary.write_bytes(data), what)


def remove_temporary_files(folder: Path) -> None:
    """Delete what writes killed midway left in `folder` (write_atomically's temporary files)."""
    for leftover in Path(folder).glob(".*.tmp"):
        leftover.unlink()


def write_folder_whole(folder: Path, write: Callable[[Path], None], *, replaceable: Callable[[Path], bool],
                       what: str) -> None:
    """`write(staging)` fills a new folder beside `folder`, which then takes `folder`'s place in one step: a kill at
    any instant leaves the old folder or the new one, never a mix or neither. An existing `folder` is replaced only
    if it is empty or `replaceable(folder)` says it is one of ours (never a folder of the user's other files)."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise DiscoError(f"{what} {folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not replaceable(folder):
        raise DiscoError(f"{what} {folder} holds other files: give a new or empty folder (or a previous one of ours)")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)  # `--out deploy/x` makes deploy/ as it always did
    except OSError as error:
        raise DiscoError(f"cannot create {folder.parent} for {what} {folder}: {error.strerror or error}") from None
    staging = folder.with_name(f".{folder.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)  # what a killed earlier attempt left
    try:
        staging.mkdir()
        write(staging)
        fsync_path(staging)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise DiscoError(f"cannot write {what} {folder}: {error.strerror or error}") from None
        raise
    _swap_in(staging, folder)


def _swap_in(staging: Path, folder: Path) -> None:
    """Put `staging` at `folder`: renamed when `folder` is new; exchanged atomically (Linux renameat2) when it
    exists, the old content then deleted."""
    if not folder.exists():
        os.rename(staging, folder)
    else:
        _exchange(staging, folder)
        shutil.rmtree(staging)  # now the old content
    fsync_path(folder.parent)


def _exchange(first: Path, second: Path) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) != 0:
        error = ctypes.get_errno()
        raise DiscoError(f"cannot swap {first} into {second}: {os.strerror(error)}")
