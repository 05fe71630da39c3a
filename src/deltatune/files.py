"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Temporary files and folders are made private by ``tempfile`` (0600/0700); before they take
their final name they get the mode a plain ``open()`` or ``mkdir()`` would have given under the
user's umask, so an adapter written here is readable wherever the user's other files are.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def plain_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file."""
    return 0o666 & ~current_umask()


def plain_dir_mode() -> int:
    """The mode ``os.mkdir`` gives a new folder."""
    return 0o777 & ~current_umask()


def write_atomically(path: Union[str, os.PathLike], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync the result, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, plain_file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def staging_dir(parent: Union[str, os.PathLike], prefix: str) -> Path:
    """A new folder in ``parent`` to fill and then rename into place, with a plain folder's mode."""
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(folder, plain_dir_mode())
    return folder


def settle_files(folder: Union[str, os.PathLike]) -> list[Path]:
    """Give every file under a staging folder a plain file's mode (some writers, such as
    safetensors, create private files) and fsync it; returns the files, sorted."""
    mode = plain_file_mode()
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    for f in files:
        os.chmod(f, mode)
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    return files
