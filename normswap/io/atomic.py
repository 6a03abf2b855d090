"""Write an output file or folder atomically: a temporary name in the destination folder, renamed into
place only when complete. An existing destination is refused unless ``force=True``; an input is never
overwritten, even with ``force``; a folder is replaced only when normswap wrote it (its marker file) or
it is empty; any failure (an exception, Ctrl-C) removes the temporary and leaves the destination as it
was.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import uuid
from collections.abc import Iterable, Iterator

from ..errors import DestinationExistsError


def _covers(outer: pathlib.Path, inner: pathlib.Path) -> bool:
    """Whether ``inner`` is ``outer`` or lies inside it (after resolving links)."""
    try:
        outer, inner = outer.resolve(), inner.resolve()
    except OSError:
        return False
    return inner == outer or outer in inner.parents


def check_destination(dst: pathlib.Path, *, force: bool, inputs: Iterable[pathlib.Path] = ()) -> None:
    """Raise :class:`~normswap.errors.DestinationExistsError` when writing ``dst`` would overwrite or delete
    an input (even with ``force``), or replace an existing path without ``force``."""
    for src in inputs:
        if _covers(dst, src):
            raise DestinationExistsError(f"{dst}: holds an input of this command ({src}); normswap never "
                                         "overwrites its input - write to another path")
    if dst.exists() and not force:
        raise DestinationExistsError(f"{dst}: already exists; pass --force (force=True) to replace it")
    if dst.is_dir() and not dst.is_symlink() and not _written_by_normswap(dst):
        held = ", ".join(sorted(p.name for p in dst.iterdir())[:5])
        raise DestinationExistsError(f"{dst}: a folder normswap did not write (it holds {held}); normswap replaces "
                                     "only folders it wrote, even with --force: remove it yourself or write elsewhere")


MARKER = ".normswap"  # written into every folder normswap writes, so --force knows what it may replace


def _written_by_normswap(folder: pathlib.Path) -> bool:
    """An empty folder, or one holding normswap's marker file."""
    try:
        return (folder / MARKER).is_file() or not any(folder.iterdir())
    except OSError:
        return False


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_tree(path: pathlib.Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_output(dst: str | os.PathLike, *, force: bool = False, folder: bool = False,
                  inputs: Iterable[pathlib.Path] = ()) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside ``dst`` to write a file (or, with ``folder=True``, a folder) into;
    on success it replaces ``dst``, on any failure it is removed and ``dst`` is untouched.

    Example:
        >>> import tempfile
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "model.safetensors"
        >>> with atomic_output(out) as tmp:
        ...     _ = tmp.write_bytes(b"data")
        >>> out.read_bytes()
        b'data'
    """
    dst = pathlib.Path(dst)
    check_destination(dst, force=force, inputs=inputs)
    created = [p for p in reversed(dst.parents) if not p.exists()]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.normswap-{uuid.uuid4().hex[:12]}.tmp"
    if folder:
        tmp.mkdir()
        (tmp / MARKER).write_text("written by normswap; `--force` may replace this folder\n")
    try:
        yield tmp
        _fsync_tree(tmp)
        if dst.is_dir() and not dst.is_symlink():
            # a folder cannot be renamed over another: move the old one aside, then drop it
            old = dst.parent / f".{dst.name}.normswap-old-{uuid.uuid4().hex[:12]}"
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if folder and dst.exists():
                dst.unlink()
            os.replace(tmp, dst)
    except BaseException:
        _remove(tmp)
        for p in reversed(created):
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
