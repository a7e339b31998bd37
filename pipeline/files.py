"""Files and folders that appear whole or not at all: what every stage writes goes through here.

A reader (DVC, the next stage, the service) never sees half a file or half a folder, and an interrupted stage
(Ctrl-C, SIGKILL, a full disk) leaves its previous output as it was. The work happens beside the target, on the
same disk, so the last step is one rename. The work's name is the target's, hidden, with `.tmp` added
(`models/.model.pt.tmp`): what a SIGKILL left (no `except` runs then) is found by that name, and removed by the
next write of the same target, by `train` before it trains and by `make tidy` (pipeline/tools/tidy.py).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_sibling(path: Path) -> Path:
    """Where `path` is built before it replaces itself: `.name.tmp` in the same folder."""
    return path.with_name(f".{path.name}.tmp")


def is_temporary(path: Path) -> bool:
    """Whether `path` is named as a `temporary_sibling` is: `.name.tmp`."""
    return path.name.startswith(".") and path.name.endswith(".tmp") and len(path.name) > len("..tmp")


def remove_leftover(tmp: Path) -> int | None:
    """Remove `tmp`, a temporary a killed write left (a file or a folder); its size in bytes, None if there was none."""
    if tmp.is_dir() and not tmp.is_symlink():
        size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(tmp)
        return size
    try:
        size = tmp.lstat().st_size
    except FileNotFoundError:
        return None
    tmp.unlink()
    return size


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` writes the file at a temporary path beside `path`, which then replaces `path` at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path`, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


@contextmanager
def atomic_folder(out: Path, keep_failed: bool = False) -> Iterator[Path]:
    """An empty folder beside `out` to build it in: when the block ends normally it replaces `out`; when it raises,
    `out` is untouched and the folder is removed (kept with `keep_failed`, to inspect)."""
    work = temporary_sibling(out)
    if work.exists():  # left by a run that was killed
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        yield work
    except BaseException:
        if not keep_failed:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
