"""Atomic outputs: a file (or folder) appears whole at its final name, or not at all.

On Linux the file is written as an unnamed inode (``O_TMPFILE``) in the target's folder,
fsynced, and only then linked in under its name: a writer killed at any moment, even by
SIGKILL, leaves nothing behind. Elsewhere a hidden temp file is renamed into place (and
removed on any exception). Folders are built under a hidden name tagged with the writer's
pid; leftovers of dead writers are removed by the next build.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from kvcli.errors import KvcliError


def _output_folder(path: Path, *, replace_folder: bool = False) -> Path:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KvcliError(f"cannot create the output folder {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise KvcliError(f"cannot write to the output folder {parent}")
    if path.is_dir() and not replace_folder:
        raise KvcliError(f"the output path is a folder: {path}")
    return parent


def check_writable(path: str | Path, *, folder: bool = False) -> None:
    """Refuse, before any long work, an output that could not be written at the end: its
    parent cannot be created or written, or a file output is an existing folder."""
    _output_folder(Path(path), replace_folder=folder)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _open_unnamed(folder: Path) -> int | None:
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not Path("/proc/self/fd").is_dir():
        return None
    try:
        return os.open(folder, flag | os.O_RDWR, 0o644)
    except OSError:  # the filesystem does not support it
        return None


def _link(fd_path: str, dest: Path) -> None:
    # plain link() does not follow /proc/self/fd/N; linkat(AT_SYMLINK_FOLLOW) does, and
    # CPython calls linkat only when a dir fd is given
    root = os.open("/", os.O_RDONLY)
    try:
        os.link(fd_path, dest, src_dir_fd=root, follow_symlinks=True)
    finally:
        os.close(root)


def _link_into_place(fd_path: str, path: Path) -> None:
    try:
        _link(fd_path, path)
        return
    except FileExistsError:
        pass
    # link() cannot replace: link under a hidden name, then rename over the old file
    tmp = path.parent / f".{path.name}.{os.getpid()}.new"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    _link(fd_path, tmp)
    try:
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` to produce the file, then put it at ``path`` atomically.

    ``write`` must open ``tmp_path`` by name (it may be ``/proc/self/fd/N``)."""
    path = Path(path)
    folder = _output_folder(path)
    fd = _open_unnamed(folder)
    if fd is not None:
        try:
            fd_path = f"/proc/self/fd/{fd}"
            write(Path(fd_path))
            os.fsync(fd)
            _link_into_place(fd_path, path)
        finally:
            os.close(fd)
    else:
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        os.close(handle)
        try:
            write(Path(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    _fsync_dir(folder)
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return write_atomically(path, write)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def building_folder(folder: str | Path):
    """Yield a hidden temp folder beside ``folder``; on success it replaces ``folder``."""
    folder = Path(folder)
    _output_folder(folder, replace_folder=True)
    for stale in [
        *folder.parent.glob(f".{folder.name}.build-*"),
        *folder.parent.glob(f".{folder.name}.old-*"),
    ]:
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.parent / f".{folder.name}.build-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        _fsync_dir(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
