"""Atomic writes: a reader sees the old file (or set of files) or the new one, never a mix.

A file is written under a temporary name, fsynced, renamed over the old one, and its folder
fsynced so the rename itself survives a crash. A set of files that must change together (an
adapter's config and weights) is written into a staging folder that is swapped with the old
folder in one step (``renameat2(RENAME_EXCHANGE)`` on Linux); files of the user's in that
folder are carried over by hard links.

Temporary files and folders are made private by ``tempfile`` (0600/0700); before they take
their final name they get the mode a plain ``open()`` or ``mkdir()`` would have given under the
user's umask, so an adapter written here is readable wherever the user's other files are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

Writer = Callable[[str], None]  # writes a file at the path it is given


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


def fsync_dir(folder: Union[str, os.PathLike]) -> None:
    """Make renames and deletions inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def utf8_text(data: bytes, where: str, error: type[Exception] = ValueError) -> str:
    """``data`` decoded as UTF-8 (a BOM is dropped); undecodable bytes raise ``error`` naming
    ``where`` and the line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise error(f"{where}, line {line}: not UTF-8 text (byte {data[err.start]:#04x})") from None


def write_atomically(path: Union[str, os.PathLike], write: Writer) -> None:
    """Call ``write(tmp_path)``, fsync the result, rename it over ``path``, fsync the folder."""
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
    fsync_dir(path.parent)


def write_text_atomically(path: Union[str, os.PathLike], text: str) -> None:
    """``Path.write_text``, atomically."""
    write_atomically(path, lambda p: Path(p).write_text(text))


_RENAME_EXCHANGE = 2  # linux/fs.h
_libc: Optional[ctypes.CDLL] = None


def exchange_paths(a: Union[str, os.PathLike], b: Union[str, os.PathLike]) -> bool:
    """Swap two paths in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``).

    Returns False where the system cannot (another OS, an old kernel or file system), having
    changed nothing."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here
        return False
    raise OSError(err, os.strerror(err), f"{a} <-> {b}")


def install_folder(staging: Union[str, os.PathLike], final: Union[str, os.PathLike]) -> None:
    """Give a filled staging folder its final name, swapping out any folder there (which is then
    deleted), and make the rename durable. Where the system has no one-step swap, the old folder
    is renamed aside first: for a moment there is no folder, but never a mix of the two."""
    staging, final = Path(staging), Path(final)
    if final.exists() and not exchange_paths(staging, final):
        aside = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old."))
        os.replace(final, aside)  # replaces the empty placeholder folder
        os.replace(staging, final)
        staging = aside
    elif not final.exists():
        os.replace(staging, final)
    fsync_dir(final.parent)
    if staging.exists():
        shutil.rmtree(staging)  # the old folder


def replace_folder_files(folder: Union[str, os.PathLike], files: Mapping[str, Writer]) -> Path:
    """Write ``files`` (name -> writer) into ``folder`` as one unit: a reader of the folder sees
    all the old files or all the new ones. The user's other files and folders in it stay: they
    are hard-linked into the new folder (the same files under a second name, nothing copied), so
    until the swap they are untouched where they were."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(folder.parent, prefix=f".{folder.name}.")
    try:
        for name, write in files.items():
            write(str(staging / name))
        settle_files(staging)
        if folder.exists():
            for entry in folder.iterdir():
                if entry.name in files:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.copytree(entry, staging / entry.name, symlinks=True, copy_function=os.link)
                else:
                    os.link(entry, staging / entry.name, follow_symlinks=False)
        install_folder(staging, folder)
        return folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
